"""Tree decoding on mlx-lm's own model code: for every family of the gate, greedy speculative
output (context drafts, stream trees and chains, lossless and shared modes) equals mlx-lm's own
greedy ``generate_step`` with its own caches (sliding-window layers in ``RotatingKVCache``)."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_lm_families import FAMILIES, family_config, tiny_model
from test_drafters import draft_tokens
from mlx_specstream.decode import generate_step
from mlx_specstream.drafters import StreamDrafter, Verifier
from mlx_specstream.models import build_model
from mlx_specstream.models.mlxlm import VERIFIED, protocol_problem
from mlx_specstream.streams import SpeculativeStreams, StreamConfig
from mlx_specstream.tree import cartesian, chain

N = 32


def _mlx_lm_greedy(model, prompt, n):
    from mlx_lm.generate import generate_step as mlx_lm_generate_step

    return [int(t) for t, _ in mlx_lm_generate_step(prompt, model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, -1))]


def _tree_tokens(model, prompt, drafter, n, **kw):
    return draft_tokens(model, drafter, prompt, n, **kw)


def _streams(model, mode, seed):
    cfg = StreamConfig(num_streams=3, num_msa_layers=2, mode=mode, lora_rank=4)
    s = SpeculativeStreams(cfg, model)
    mx.random.seed(seed)
    s.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, s.parameters()))
    return s


def _prompt(seed):
    rng = np.random.RandomState(seed)
    motif = rng.randint(3, 250, size=5).tolist()
    return mx.array(rng.randint(3, 250, size=6).tolist() + motif + rng.randint(3, 250, size=3).tolist() + motif)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_speculative_equals_mlx_lm_generate(name):
    model = tiny_model(name)
    prompt = _prompt(len(name))
    ref = _mlx_lm_greedy(model, prompt, N)
    assert len(set(ref)) > 3, "degenerate reference: the test would show little"
    assert [t for t, _ in generate_step(prompt, model, max_tokens=N)] == ref
    assert _tree_tokens(model, prompt, Verifier(), N, lookup=4)[0] == ref  # context drafts
    streams = _streams(model, "lossless", seed=1)
    got, steps = _tree_tokens(
        model, prompt, StreamDrafter(streams), N, tree=[list(p) for p in cartesian(3, 2)], lookup=3
    )
    assert got == ref  # stream trees with context drafts
    assert _tree_tokens(model, prompt, StreamDrafter(streams), N, tree=[list(p) for p in chain(3)])[0] == ref


@pytest.mark.parametrize("name", ["llama_sliding", "gemma3_text", "qwen2_moe", "gemma2"])
def test_shared_mode_trees_equal_its_own_one_token_decoding(name):
    """Shared mode changes the main rows: trees must give what the same model decodes one token
    per step (its own law), on windowed, MoE and array-mask families too."""
    model = tiny_model(name)
    prompt = _prompt(3)
    streams = _streams(model, "shared", seed=2)
    ref, _ = _tree_tokens(model, prompt, StreamDrafter(streams), N, tree=())
    got, _ = _tree_tokens(model, prompt, StreamDrafter(streams), N, tree=[list(p) for p in cartesian(3, 2)])
    assert got == ref


def test_gate_families_are_the_verified_ones():
    tested = {family_config(n)["model_type"] for n in FAMILIES}
    assert len(tested) >= 13 and tested <= VERIFIED


def test_unverified_family_is_checked_at_load():
    """A family outside the gate passes the load-time check when its seams reproduce mlx-lm's
    forward, and is named as unsupported for trees when they do not."""
    cfg = dict(family_config("llama"), model_type="internlm3", qkv_bias=False, bias=False)
    cfg.pop("layer_types", None)
    model = build_model(cfg)  # a family mlx-lm has (0.32) that the CI gate does not list
    assert model.model_type not in VERIFIED
    assert protocol_problem(model) is None
    model._family = type(model._family)(embed_scale=lambda a, dt: 2.0)  # seams that no longer match
    assert "does not reproduce" in protocol_problem(model)


def test_refused_options_and_caches_are_named():
    from mlx_specstream.errors import UserError

    with pytest.raises(UserError, match="qk_layernorm"):
        build_model(dict(family_config("phi"), qk_layernorm=True))


def test_mlx_community_quantized_folder_loads_and_speculates(hf_model, tmp_path):
    """A folder made by ``mlx_lm.convert -q`` (what mlx-community publishes) loads through our
    loader, quantized as mlx-lm made it, and speculates to mlx-lm's own greedy output."""
    import mlx_lm
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from mlx_specstream import load

    src, _ = hf_model("llama")
    out = tmp_path / "q4"
    mlx_lm.convert(str(src), str(out), quantize=True, q_group_size=32, q_bits=4)
    ref_model, _ = mlx_lm_load_model(out)
    prompt = _prompt(5)
    ref = _mlx_lm_greedy(ref_model, prompt, N)
    model, _ = load(out, dtype=None)
    assert any(isinstance(m, __import__("mlx.nn").nn.QuantizedLinear) for _, m in model.named_modules())
    assert _tree_tokens(model, prompt, Verifier(), N, lookup=4)[0] == ref
    streams = _streams(model, "lossless", seed=3)
    assert _tree_tokens(model, prompt, StreamDrafter(streams), N, tree=[list(p) for p in cartesian(2, 2)])[0] == ref


@pytest.mark.parametrize("bits,start", [(4, 0), (8, 0), (4, 10), (8, 10)])
def test_quantized_kv_cache_decodes_as_mlx_lm_quantized_cache(bits, start):
    """``kv=KVSettings(bits, group, start)``: plain and tree decoding (context drafts, stream trees
    whose stream rows join the quantized cache for one call) give mlx-lm's own greedy output with
    its QuantizedKVCache; the quantization changes the output at all (else the test shows nothing)."""
    from mlx_lm.generate import generate_step as mlx_lm_generate_step

    from mlx_specstream.cache import KVSettings, QuantizedKVCache, make_cache

    model = tiny_model("qwen3")  # head_dim 32: one group of 32
    prompt = _prompt(11)
    greedy = lambda lp: mx.argmax(lp, -1)  # noqa: E731
    ref = [
        int(t)
        for t, _ in mlx_lm_generate_step(
            prompt, model, max_tokens=N, sampler=greedy, kv_bits=bits, kv_group_size=32, quantized_kv_start=start
        )
    ]
    kv = KVSettings(bits, 32, start)
    cache = make_cache(model)
    assert [t for t, _ in generate_step(prompt, model, max_tokens=N, kv=kv, prompt_cache=cache)] == ref
    assert all(isinstance(c, QuantizedKVCache) for c in cache)
    assert _tree_tokens(model, prompt, Verifier(), N, lookup=4, kv=kv)[0] == ref
    streams = _streams(model, "lossless", seed=4)
    assert (
        _tree_tokens(model, prompt, StreamDrafter(streams), N, tree=[list(p) for p in cartesian(3, 2)], kv=kv)[0] == ref
    )
    if bits == 4:
        assert ref != _mlx_lm_greedy(model, prompt, N)


def test_quantized_kv_cache_compacts_rows_of_all_three_arrays():
    from mlx_specstream.cache import QuantizedKVCache

    c = QuantizedKVCache(group_size=32, bits=8)
    k = mx.random.normal((1, 2, 6, 32))
    c.update_and_fetch(k, k)
    c.compact(2, [0, 3])
    ref = QuantizedKVCache(group_size=32, bits=8)
    ref.update_and_fetch(
        mx.concatenate([k[:, :, :3], k[:, :, 5:6]], axis=2), mx.concatenate([k[:, :, :3], k[:, :, 5:6]], axis=2)
    )
    assert c.offset == 4
    for a, b in zip(c.state[0], ref.state[0]):
        np.testing.assert_array_equal(np.array(a), np.array(b))


def test_kv_settings_refuse_nonsense_and_local_plugins(hf_model):
    from mlx_specstream.cache import KVSettings
    from mlx_specstream.checkpoint import load_model
    from mlx_specstream.errors import UserError

    for bad in (
        dict(bits=7),
        dict(bits=4, group_size=48),
        dict(bits=4, quantized_start=-1),
        dict(max_size=5),
        dict(max_size=True),
        dict(max_size=64, keep=-1),
    ):
        with pytest.raises(UserError):
            KVSettings(**bad)
    opt, _ = load_model(hf_model("opt")[0])
    with pytest.raises(UserError, match="local plugin has no quantized or windowed attention"):
        list(generate_step(mx.array([3, 4, 5]), opt, max_tokens=2, kv=KVSettings(8)))
    with pytest.raises(UserError, match="--max-kv-size"):
        list(generate_step(mx.array([3, 4, 5]), opt, max_tokens=2, kv=KVSettings(max_size=64)))


@pytest.mark.parametrize(
    "name,window,bits", [("qwen3", 20, None), ("qwen3", 16, 8), ("qwen2_moe", 18, None), ("gemma3_text", 20, None)]
)
def test_max_kv_size_window_trees_equal_plain_and_mlx_lm(monkeypatch, name, window, bits):
    """``--max-kv-size``: a token at position p sees the 4 first tokens and the positions up to p
    that fit the window; rows are evicted only between steps. Trees (context drafts, stream trees)
    give plain decoding's output with the same window, and for a family whose cache mlx-lm makes
    itself (no ``make_cache``), mlx-lm's own output with its rotating cache; rows were evicted."""
    from mlx_specstream.cache import KVCache, KVSettings, make_cache

    monkeypatch.setattr(KVCache, "step", 8)  # evict every 8 dead rows, not 256: the test sees evictions
    model = tiny_model(name)
    prompt = _prompt(7)[:12]
    kv = KVSettings(bits=bits, group_size=32, quantized_start=0, max_size=window)
    cache = make_cache(model)
    plain = [t for t, _ in generate_step(prompt, model, max_tokens=3 * N, kv=kv, prompt_cache=cache)]
    assert cache[0].evicted > 0 and cache[0].rows < window + KVCache.step + 2
    assert plain != [t for t, _ in generate_step(prompt, model, max_tokens=3 * N)]  # the window shows
    if not hasattr(model, "make_cache") and bits is None:
        from mlx_lm.generate import generate_step as mlx_lm_generate_step

        ref = [
            int(t)
            for t, _ in mlx_lm_generate_step(
                prompt, model, max_tokens=3 * N, max_kv_size=window, sampler=lambda lp: mx.argmax(lp, -1)
            )
        ]
        assert plain == ref
    assert _tree_tokens(model, prompt, Verifier(), 3 * N, lookup=4, kv=kv)[0] == plain
    streams = _streams(model, "lossless", seed=5)
    assert (
        _tree_tokens(model, prompt, StreamDrafter(streams), 3 * N, tree=[list(p) for p in cartesian(3, 2)], kv=kv)[0]
        == plain
    )


def test_windowed_prompt_cache_restarts_when_the_prefix_was_evicted(monkeypatch):
    from mlx_specstream.cache import KVCache, KVSettings, PromptCache

    monkeypatch.setattr(KVCache, "step", 8)
    model = tiny_model("qwen3")
    kv = KVSettings(max_size=12)
    pc = PromptCache(model)
    first = list(range(3, 40))
    kv.prepare(pc.cache)
    suffix = pc.prepare(first)
    list(generate_step(mx.array(suffix), model, max_tokens=4, kv=kv, prompt_cache=pc.cache))
    pc.record(suffix, [])
    assert pc.cache[0].evicted > 0
    held = pc.cache[0].evicted + 4  # positions before this are gone (but the 4 kept)
    assert pc.prepare(first[: held + 2] + [7, 8]) == [7, 8]  # diverges after the evicted span: trimmed
    assert pc.cache[0].offset == held + 2
    assert pc.prepare(first[:6] + [7, 8]) == first[:6] + [7, 8]  # inside it: everything again
    assert pc.cache[0].offset == 0
