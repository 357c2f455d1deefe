import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_map

from mlx_specstream.cache import make_cache
from mlx_specstream.decode import generate_step
from mlx_specstream.generate import stream_generate
from mlx_specstream.sample import SamplingParams
from mlx_specstream.decode import tree_generate_step
from mlx_specstream.drafters import ContextDrafts, DraftedModel, MedusaConfig, MedusaDrafter, MedusaHeads, StreamDrafter
from mlx_specstream.streams import SpeculativeStreams, StreamConfig, forward_with_streams, save_streams
from mlx_specstream.tree import cartesian, chain, sparse
from mlx_specstream import load
from mlx_specstream.checkpoint import load_model


def randomize(streams, scale=0.1, seed=0):
    mx.random.seed(seed)
    streams.update(tree_map(lambda p: mx.random.normal(p.shape) * scale, streams.parameters()))
    return streams


def spec_tokens(model, streams, prompt, n, tree=None, cache=None):
    out, steps = [], 0
    for r in tree_generate_step(prompt, model, StreamDrafter(streams), max_tokens=n, tree=tree, prompt_cache=cache):
        out += r.tokens
        steps += 1
    return out[:n], steps


def ar_tokens(model, prompt, n):
    return [t for t, _ in generate_step(prompt, model, max_tokens=n)]


def _prompt(n, seed=0):
    return mx.array(np.random.RandomState(seed).randint(3, 500, size=n))


CASES = [
    # family, γ, Ns, tree, τ, mode, prompt length
    ("llama", 1, 1, chain(1), 0.0, "lossless", 7),
    ("llama", 2, 2, cartesian(2, 2), 0.0, "lossless", 1),
    ("llama", 3, 2, None, 0.0, "lossless", 33),
    ("llama", 4, 4, sparse(4, 20), 0.0, "lossless", 12),
    ("llama3_tied_headdim", 3, 1, cartesian(3, 2), 0.0, "lossless", 9),
    ("llama3_tied_headdim", 4, 2, chain(4), 0.05, "lossless", 20),
    ("mistral", 2, 3, None, 0.0, "shared", 5),
    ("qwen2", 3, 2, cartesian(2, 3), 0.02, "lossless", 16),
    ("qwen3", 4, 1, sparse(4, 8), 0.0, "lossless", 3),
    ("qwen3", 2, 2, None, 0.1, "shared", 40),
    ("opt", 3, 1, None, 0.0, "lossless", 10),
    ("opt_postln_proj", 2, 2, cartesian(2, 2), 0.01, "lossless", 6),
    ("phi", 3, 2, cartesian(3, 2), 0.0, "lossless", 14),
    ("phi", 1, 1, None, 0.05, "shared", 8),
    ("llama_linear_rope", 3, 2, sparse(3, 6), 0.0, "lossless", 25),
]


@pytest.mark.parametrize("name,gamma,ns,tree,tau,mode,plen", CASES)
def test_greedy_speculative_equals_plain_greedy(hf_model, name, gamma, ns, tree, tau, mode, plen):
    model, _ = load_model(hf_model(name)[0])
    cfg = StreamConfig(
        num_streams=gamma,
        num_msa_layers=ns,
        mode=mode,
        prune_threshold=tau,
        tree=[list(p) for p in tree] if tree else None,
    )
    streams = randomize(SpeculativeStreams(cfg, model), seed=plen)
    prompt = _prompt(plen, seed=plen)
    if streams.changes_main:  # shared-mode LoRA: the model's own one-token-per-step decoding
        ref, _ = spec_tokens(model, streams, prompt, 150, tree=())
    else:  # lossless: the base model itself
        ref = ar_tokens(model, prompt, 150)
    got, steps = spec_tokens(model, streams, prompt, 150)
    assert got == ref
    assert steps <= 150


@pytest.mark.parametrize("name,ns", [("llama", 2), ("qwen3", 1), ("phi", 3), ("opt", 2)])
def test_shared_main_sees_streams_equals_its_own_ar(hf_model, name, ns):
    """When main rows see streams the model itself changes; speculative greedy must equal that
    model's own one-token-per-step decoding."""
    model, _ = load_model(hf_model(name)[0])
    cfg = StreamConfig(
        num_streams=3, num_msa_layers=ns, mode="shared", main_sees_streams=True, tree=[list(p) for p in cartesian(3, 2)]
    )
    streams = randomize(SpeculativeStreams(cfg, model), scale=0.3)
    prompt = _prompt(11, seed=4)
    ar, ar_steps = spec_tokens(model, streams, prompt, 120, tree=())
    assert ar_steps == 120
    main, _ = forward_with_streams(model, streams, prompt[None])  # the streams really change the model
    assert np.abs(np.array(main) - np.array(model(prompt[None]))).max() > 1e-4
    got, _ = spec_tokens(model, streams, prompt, 120)
    assert got == ar


def test_long_generation_and_acceptance(hf_model):
    model, _ = load_model(hf_model("qwen2")[0])
    streams = randomize(SpeculativeStreams(StreamConfig(num_streams=4, num_msa_layers=2), model))
    prompt = _prompt(50, seed=9)
    ref = ar_tokens(model, prompt, 400)
    got, steps = spec_tokens(model, streams, prompt, 400)
    assert got == ref and steps < 400


@pytest.mark.parametrize("mode,main_sees", [("lossless", False), ("shared", True)])
def test_kv_cache_equals_plain_decoding_cache(hf_model, mode, main_sees):
    model, _ = load_model(hf_model("llama")[0])
    cfg = StreamConfig(
        num_streams=3,
        num_msa_layers=2,
        mode=mode,
        main_sees_streams=main_sees,
        prune_threshold=0.02,
        tree=[list(p) for p in cartesian(3, 2)],
    )
    streams = randomize(SpeculativeStreams(cfg, model), scale=0.3)
    prompt = _prompt(9, seed=2)
    cache = make_cache(model)
    toks, _ = spec_tokens(model, streams, prompt, 45, cache=cache)
    # Reference: the same model one token per step (for lossless that is the base model).
    ref = make_cache(model)
    n_ref = []
    for r in tree_generate_step(prompt, model, StreamDrafter(streams), max_tokens=10**6, tree=(), prompt_cache=ref):
        n_ref += r.tokens
        if ref[0].offset >= cache[0].offset:
            break
    assert cache[0].offset == ref[0].offset
    for a, b in zip(cache, ref):
        np.testing.assert_allclose(np.array(a.state[0]), np.array(b.state[0]), atol=1e-5, rtol=2e-5)
        np.testing.assert_allclose(np.array(a.state[1]), np.array(b.state[1]), atol=1e-5, rtol=2e-5)
    if mode == "lossless":
        plain = make_cache(model)
        model(mx.concatenate([prompt, mx.array(toks[: cache[0].offset - prompt.size])])[None], cache=plain)
        for a, b in zip(cache, plain):
            np.testing.assert_allclose(np.array(a.state[0]), np.array(b.state[0]), atol=1e-5)


def _ss_model(hf_model, name="llama", **cfg):
    path, _ = hf_model(name)
    model, tok = load(str(path))
    streams = randomize(SpeculativeStreams(StreamConfig(**cfg), model))
    return DraftedModel(model, StreamDrafter(streams)), tok


def test_stream_generate_speculative_stats_and_no_speculate(hf_model):
    model, tok = _ss_model(hf_model, num_streams=3, num_msa_layers=2)
    spec = list(stream_generate(model, tok, "def f(x):", max_tokens=60))
    ar = list(stream_generate(model, tok, "def f(x):", max_tokens=60, speculative=False))
    assert "".join(r.text for r in spec) == "".join(r.text for r in ar)
    last = spec[-1]
    assert last.generation_tokens == 60 and last.steps == len(spec)
    assert last.mean_accepted >= 60 / last.steps  # the last step may produce more than the limit keeps
    assert sum(r.accepted for r in spec) == 60
    assert len(last.acceptance_by_depth) <= 3 and all(0 <= a <= 1 for a in last.acceptance_by_depth)
    assert ar[-1].steps == 60 and ar[-1].mean_accepted == 1.0


def test_stops_cut_inside_an_accepted_path(hf_model):
    model, tok = _ss_model(hf_model, num_streams=4, num_msa_layers=2)
    full_ids = [t for r in stream_generate(model, tok, "x", max_tokens=80) for t in r.tokens]
    # max_tokens inside a multi-token step
    for n in (1, 2, 7, 13):
        rs = list(stream_generate(model, tok, "x", max_tokens=n))
        assert [t for r in rs for t in r.tokens] == full_ids[:n]
        assert rs[-1].finish_reason == "length"
    # EOS inside a step: the tokens before it, nothing after
    k = 10
    tok.eos_token_ids = {full_ids[k]}
    rs = list(stream_generate(model, tok, "x", max_tokens=80))
    assert [t for r in rs for t in r.tokens] == full_ids[: full_ids.index(full_ids[k])]
    assert rs[-1].finish_reason == "stop"
    # tokens per step count what each forward pass produced, EOS included: never below 1
    assert rs[-1].mean_accepted >= 1.0 and all(r.mean_accepted >= 1.0 for r in rs)
    ar = list(stream_generate(model, tok, "x", max_tokens=80, speculative=False))
    assert ar[-1].mean_accepted == 1.0 and ar[-1].finish_reason == "stop"
    tok.eos_token_ids = {2}
    # stop string
    text = tok.decode(full_ids)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    rs = list(stream_generate(model, tok, "x", max_tokens=80, stop=[stop]))
    assert "".join(r.text for r in rs) == text[: text.index(stop)]


def test_speculative_sampling_runs_and_is_seeded(hf_model):
    model, tok = _ss_model(hf_model, num_streams=3, num_msa_layers=2)
    sp = SamplingParams(temp=0.8, top_p=0.9)
    mx.random.seed(5)
    a = "".join(r.text for r in stream_generate(model, tok, "import", max_tokens=40, sampling=sp))
    mx.random.seed(5)
    b = "".join(r.text for r in stream_generate(model, tok, "import", max_tokens=40, sampling=sp))
    assert a == b
    with pytest.raises(ValueError, match="sampling=SamplingParams"):
        list(stream_generate(model, tok, "import", max_tokens=4, sampler=sp.sampler()))


def test_no_streams_means_no_speculation(hf_model):
    model, tok = load(str(hf_model("llama")[0]))
    with pytest.raises(ValueError, match="needs a drafter"):
        list(stream_generate(model, tok, "x", max_tokens=3, speculative=True))


def test_context_edge_falls_back_to_single_node(hf_model):
    model, tok = _ss_model(hf_model, "opt", num_streams=3, num_msa_layers=1)
    rs = list(stream_generate(model, tok, [5] * 500, max_tokens=50))
    assert rs[-1].generation_tokens == 12  # context 512
    ref = [t for t, _ in generate_step(mx.array([5] * 500), model.base, max_tokens=12)]
    assert [t for r in rs for t in r.tokens] == ref


def test_cli_speculative_json(hf_model, tmp_path, capsys):
    import json
    import shutil

    from mlx_specstream.cli import main

    d = tmp_path / "m"
    shutil.copytree(hf_model("llama")[0], d)
    base, _ = load_model(d)
    save_streams(d, randomize(SpeculativeStreams(StreamConfig(num_streams=3, num_msa_layers=2), base)))
    assert main(["generate", "--model", str(d), "--prompt", "def", "-m", "30", "--json"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", str(d), "--prompt", "def", "-m", "30", "--json", "--no-speculate"]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", str(d), "--prompt", "def", "-m", "30", "--json", "--tree", "cartesian:2"]) == 0
    cart = json.loads(capsys.readouterr().out)
    assert spec["text"] == ar["text"] == cart["text"]
    assert spec["speculative"] and not ar["speculative"]
    assert spec["steps"] < ar["steps"] == 30 and "acceptance_by_depth" in spec


def test_shared_lora_fuses_into_the_base(hf_model):
    model, _ = load_model(hf_model("qwen3")[0])
    cfg = StreamConfig(num_streams=2, num_msa_layers=2, mode="shared", lora_rank=4)
    streams = randomize(SpeculativeStreams(cfg, model), scale=0.2)
    assert streams.changes_main
    prompt = _prompt(10, seed=5)
    shared, _ = spec_tokens(model, streams, prompt, 60)

    main_before, str_before = forward_with_streams(model, streams, prompt[None])
    streams.fuse_lora(model)
    assert not streams.changes_main and streams.config.lora_rank == 0
    main_after, str_after = forward_with_streams(model, streams, prompt[None])
    np.testing.assert_allclose(np.array(main_after), np.array(main_before), atol=1e-4)
    np.testing.assert_allclose(np.array(str_after), np.array(str_before), atol=1e-4)
    np.testing.assert_allclose(np.array(model(prompt[None])), np.array(main_before), atol=1e-4)
    assert ar_tokens(model, prompt, 60) == shared


def test_context_drafts_copy_the_latest_longest_match():
    # suffix "1 2": the 2-gram last continued with 8 beats the 1-gram "2" (last continued with 7)
    assert ContextDrafts([5, 1, 2, 8, 9, 2, 7, 1, 2], n=2).propose() == [8, 9]
    # a loop shorter than n repeats itself: a b c a b -> c a b c
    assert ContextDrafts([1, 2, 3, 1, 2], n=4).propose() == [3, 1, 2, 3]
    # the most recent occurrence wins; no match -> no drafts
    assert ContextDrafts([4, 6, 4, 9, 3, 4], n=1).propose() == [9]
    assert ContextDrafts([1, 2, 3], n=3).propose() == []
    cd = ContextDrafts([], n=2)
    assert cd.propose() == []
    cd.extend([7, 8, 7])
    assert cd.propose() == [8, 7]


@pytest.mark.parametrize(
    "name,tree,lookup,tau,sampled",
    [
        ("llama", None, 3, 0.0, False),
        ("qwen3", chain(2), 5, 0.05, False),
        ("phi", cartesian(2, 2), 2, 0.0, True),
        ("llama", [], 4, 0.0, False),  # no stream drafts: the verify-only step
    ],
)
def test_context_drafts_join_the_tree_and_keep_greedy_output(hf_model, name, tree, lookup, tau, sampled):
    model, tok = _ss_model(hf_model, name, num_streams=3, num_msa_layers=2, prune_threshold=tau)
    prompt = [5, 6, 7, 8] * 6  # a repetitive prompt: the context drafts get accepted
    ar = [t for r in stream_generate(model, tok, prompt, max_tokens=48, speculative=False) for t in r.tokens]
    rs = list(stream_generate(model, tok, prompt, max_tokens=48, tree=tree, lookup=lookup))
    assert [t for r in rs for t in r.tokens] == ar
    assert max(r.accepted for r in rs) <= lookup + 1 or tree is not None
    # a plain model decodes with context drafts alone (prompt lookup), same tokens
    plain = list(stream_generate(model.base, tok, prompt, max_tokens=48, lookup=lookup))
    assert [t for r in plain for t in r.tokens] == ar
    assert all(r.accepted <= lookup + 1 for r in plain)
    if sampled:  # sampling acceptance takes context drafts too (and stays seeded)
        sp = SamplingParams(temp=0.7)
        mx.random.seed(1)
        a = [
            t for r in stream_generate(model, tok, prompt, max_tokens=20, sampling=sp, lookup=lookup) for t in r.tokens
        ]
        mx.random.seed(1)
        b = [
            t for r in stream_generate(model, tok, prompt, max_tokens=20, sampling=sp, lookup=lookup) for t in r.tokens
        ]
        assert a == b and len(a) == 20
    with pytest.raises(ValueError, match="lookup"):
        list(stream_generate(model, tok, prompt, max_tokens=4, lookup=-1))


def test_context_drafts_copy_from_the_cached_history(hf_model, monkeypatch):
    """With a prompt cache (chat turns, server requests) the tokens already cached are history the
    context drafts copy from; output still equals AR over the whole sequence."""
    import mlx_specstream.decode as decode

    model, tok = load(str(hf_model("llama")[0]))
    first, second = [5, 6, 7, 8] * 5, [9, 5, 6]
    ref = ar_tokens(model, mx.array(first + second), 24)
    built, real = [], decode.ContextDrafts

    def spy(tokens, n):
        built.append(list(tokens))
        return real(tokens, n)

    monkeypatch.setattr(decode, "ContextDrafts", spy)
    cache = make_cache(model)
    model(mx.array(first)[None], cache=cache)
    out = [
        t
        for r in stream_generate(model, tok, second, max_tokens=24, prompt_cache=cache, cached_tokens=first, lookup=3)
        for t in r.tokens
    ]
    assert out == ref
    assert built == [first + second]


def test_logits_processors_are_refused_by_every_tree_decoder(hf_model):
    """Processors act on one distribution per step; tree decoding would silently skip them."""
    model, tok = _ss_model(hf_model, num_streams=2, num_msa_layers=1)
    proc = [lambda toks, logits: logits]
    medusa = DraftedModel(model.base, MedusaDrafter(MedusaHeads(MedusaConfig(num_heads=2), model.base)))
    for m, kw in ((model, {}), (model.base, {"lookup": 3}), (medusa, {})):
        with pytest.raises(ValueError, match="logits_processors"):
            list(stream_generate(m, tok, "x", max_tokens=4, logits_processors=proc, **kw))
    # autoregressive decoding applies them
    assert list(stream_generate(model, tok, "x", max_tokens=4, logits_processors=proc, speculative=False))


@pytest.mark.parametrize(
    "dtype,bits", [("float16", None), ("bfloat16", None), ("float32", 4), ("float32", 8), ("float16", 4)]
)
def test_greedy_speculative_equals_plain_greedy_in_half_precision_and_quantized(hf_model, dtype, bits):
    """Tree rows and single rows go through different kernels; on the CPU the greedy tokens must
    still be the model's own (float16/bfloat16 weights, 4- and 8-bit quantized)."""
    model, _ = load(str(hf_model("qwen2")[0]), dtype=dtype, quantize=bits, q_group_size=32, streams=False)
    cfg = StreamConfig(num_streams=3, num_msa_layers=2, tree=[list(p) for p in cartesian(3, 2)])
    streams = randomize(SpeculativeStreams(cfg, model), seed=3)
    streams.update(tree_map(lambda p: p.astype(getattr(mx, dtype)), streams.parameters()))
    for plen in (5, 21):
        prompt = _prompt(plen, seed=plen)
        got, steps = spec_tokens(model, streams, prompt, 100)
        assert got == ar_tokens(model, prompt, 100)
        assert steps < 100
    got = [t for r in tree_generate_step(_prompt(9), model, None, max_tokens=60, lookup=4) for t in r.tokens][:60]
    assert got == ar_tokens(model, _prompt(9), 60)


def test_the_overlapped_loop_gives_the_sequential_loops_tokens_and_cache(hf_model):
    """Queueing the next step before the caller takes the current one changes timing only."""
    model, _ = load_model(hf_model("llama")[0])
    cfg = StreamConfig(num_streams=2, num_msa_layers=1, tree=[[0], [1], [0, 0]], lookup=3)
    streams = randomize(SpeculativeStreams(cfg, model), scale=0.3)
    prompt = _prompt(12, seed=4)
    runs = []
    for overlap in (True, False):
        cache = make_cache(model)
        toks = [
            t
            for r in tree_generate_step(
                prompt, model, StreamDrafter(streams), max_tokens=40, overlap=overlap, prompt_cache=cache
            )
            for t in r.tokens
        ]
        runs.append((toks, [np.array(c.keys[..., : c.offset, :]) for c in cache]))
    assert runs[0][0] == runs[1][0] == ar_tokens(model, prompt, 40)
    for a, b in zip(runs[0][1], runs[1][1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("where", ["lora_b", "lora_a", "stream_embeddings", "inf"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_non_finite_stream_values_never_reach_main_rows_in_lossless_mode(hf_model, name, where):
    """One NaN (or inf) in a stream parameter made every main row NaN (a masked attention weight
    0 times a NaN value, and a LoRA output times a per-row scale of 0): greedy decoding emitted
    <unk> forever. Main rows must be the base model's whatever the streams hold."""
    model, _ = load_model(hf_model(name)[0])
    s = randomize(SpeculativeStreams(StreamConfig(num_streams=3, num_msa_layers=2, lora_rank=4), model), seed=1)
    bad = float("inf") if where == "inf" else float("nan")
    if where == "stream_embeddings" or where == "inf":
        s.stream_embeddings = s.stream_embeddings.at[0, 0].add(bad)
    else:
        ad = s.lora[0]["self_attn__v_proj"]
        setattr(ad, where, getattr(ad, where).at[0, 0].add(bad))
    ids = mx.array([[1, 9, 40, 7, 300, 12, 5, 80]])
    main, _ = forward_with_streams(model, s, ids)
    # equal up to the summation order of a matmul over more rows (the joint call's)
    assert np.isfinite(np.array(main)).all()
    np.testing.assert_allclose(np.array(main), np.array(model(ids)), atol=1e-5)
    prompt = _prompt(9)
    assert spec_tokens(model, s, prompt, 16, tree=cartesian(2, 2))[0] == ar_tokens(model, prompt, 16)


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi"])
@pytest.mark.parametrize("drafter_kind", ["streams", "medusa", "context"])
@pytest.mark.parametrize("curve", ["cheap", "dear"])
def test_trees_sized_every_step_keep_greedy_output(hf_model, name, drafter_kind, curve):
    """Every step's shape chosen from the drafts' confidence (cheap steps: big trees; dear steps:
    mostly plain steps) gives exactly plain greedy decoding, for every drafter."""
    from mlx_specstream.sizing import AutoTree, CostCurve

    model, tok = _ss_model(hf_model, name, num_streams=3, num_msa_layers=2)
    cost = CostCurve((1, 16), (1.0, 1.05)) if curve == "cheap" else CostCurve((1, 2, 16), (1.0, 1.9, 20.0))
    if drafter_kind == "streams":
        drafter, levels = model.drafter, 3
    elif drafter_kind == "medusa":
        drafter, levels = MedusaDrafter(MedusaHeads(MedusaConfig(num_heads=2), model.base)), 2
    else:
        drafter, levels = None, 0
    prompt = mx.array([5, 6, 7, 8] * 5 + [9, 3])
    ref = ar_tokens(model.base, prompt, 40)
    sizer = AutoTree(cost, width=2 if levels else 1, levels=levels, lookup=4)
    out, sizes = [], []
    for r in tree_generate_step(prompt, model.base, drafter, max_tokens=40, sizer=sizer):
        out += r.tokens
        sizes.append(r.tree_size)
    assert out[:40] == ref
    if curve == "cheap":
        assert max(sizes) > 2  # trees grew
    else:
        assert sizes.count(1) > len(sizes) / 2  # mostly plain steps
    assert sum(sizer.sizes.values()) == len(sizes)  # after every step, the next one was sized


def test_tree_auto_through_stream_generate_and_the_cli(hf_model, tmp_path, monkeypatch, capsys):
    from mlx_specstream import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model, tok = _ss_model(hf_model, "llama", num_streams=2, num_msa_layers=1)
    prompt = [5, 6, 7, 8] * 5
    ar = [t for r in stream_generate(model, tok, prompt, max_tokens=24, speculative=False) for t in r.tokens]
    for m, kw in ((model, {}), (model, {"lookup": 0}), (model.base, {"lookup": 4})):
        assert [t for r in stream_generate(m, tok, prompt, max_tokens=24, tree="auto", **kw) for t in r.tokens] == ar
    assert len(list((tmp_path / "mlx-specstream").glob("cost-*.json"))) == 2  # once per drafter shape
    with pytest.raises(ValueError, match="rank paths or one of"):
        list(stream_generate(model, tok, prompt, max_tokens=4, tree="big"))
    capsys.readouterr()
    path = str(hf_model("llama")[0])
    assert (
        cli.main(
            [
                "generate",
                "--model",
                path,
                "--tree",
                "auto",
                "--lookup",
                "3",
                "-m",
                "8",
                "--prompt",
                "a b a b a",
                "--json",
            ]
        )
        == 0
    )
    assert '"speculative"' in capsys.readouterr().out
    assert "measuring" not in capsys.readouterr().err  # the curve was kept: measured once


@pytest.mark.parametrize("setting", ["auto", "auto:context"])
def test_a_stream_config_can_size_every_step(hf_model, tmp_path, monkeypatch, setting):
    """The adapter's own setting: ``tree: "auto"`` (streams and context drafts) or ``"auto:context"``
    (context drafts alone), used by stream_generate when the caller gives no tree."""
    import shutil

    from mlx_specstream.streams import load_streams

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    shutil.copytree(hf_model("llama")[0], folder)
    model, tok = load(str(folder), streams=False)
    s = randomize(SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=1, tree=setting, lookup=4), model))
    save_streams(folder, s)
    assert load_streams(folder / "speculative_streams.json", model).config.tree == setting
    m, tok = load(str(folder))
    assert m.drafter.setting.tree == m.drafter.setting.auto == setting
    prompt = [5, 6, 7, 8] * 5
    ar = [t for r in stream_generate(m, tok, prompt, max_tokens=24, speculative=False) for t in r.tokens]
    rs = list(stream_generate(m, tok, prompt, max_tokens=24))
    assert [t for r in rs for t in r.tokens] == ar and max(r.tree_size for r in rs) > 1
    with pytest.raises(ValueError, match="tree must be rank paths or one of"):
        StreamConfig(tree="big")


@pytest.mark.parametrize("setup", ["streams sized", "context sized", "context fixed", "streams sampled"])
def test_plain_steps_queued_early_give_the_same_tokens_and_cache(hf_model, setup, monkeypatch):
    """Pipelined plain steps (the next plain step queued before the sync on the current one)
    commit before the sync; tokens and the cache's rows must be those of the unpipelined loop,
    greedy; sampled, the output stays seeded and the pipelining really happened."""
    import mlx_specstream.decode as decode
    from mlx_specstream.sizing import AutoTree, CostCurve

    model, tok = _ss_model(hf_model, "qwen3", num_streams=3, num_msa_layers=2)
    early = []
    real = decode.committed_plain
    monkeypatch.setattr(decode, "committed_plain", lambda p, c: early.append(real(p, c)) or early[-1])
    prompt = mx.array(list(range(3, 60, 4)))  # greedy output varied (17 tokens): a stale root would show
    dear = CostCurve((1, 2, 16), (1.0, 1.9, 20.0))  # mostly plain steps, some trees
    accept = SamplingParams(temp=0.8).acceptance() if setup == "streams sampled" else None

    def run(pipeline):
        early.clear()
        drafter = None if setup.startswith("context") else model.drafter
        kw = dict(tree=[], lookup=4) if setup == "context fixed" else {}
        if "sized" in setup or "sampled" in setup:
            levels = 0 if drafter is None else 3
            kw["sizer"] = AutoTree(dear, width=2 if levels else 1, levels=levels, lookup=4)
        cache = make_cache(model.base)
        mx.random.seed(7)
        steps = list(
            tree_generate_step(
                prompt, model.base, drafter, max_tokens=41, prompt_cache=cache, pipeline=pipeline, accept=accept, **kw
            )
        )
        toks = [t for r in steps for t in r.tokens]
        rows = [np.array(c.keys[..., : c.offset, :]) for c in cache]
        return toks, rows, sum(early), [r.tree_size for r in steps], cache[0].offset

    toks, rows, n_early, sizes, offset = run(True)
    assert n_early > 0 and sizes.count(1) > n_early / 2  # plain steps were queued early
    assert offset == prompt.size - 1 + len(toks)  # the cache holds the context and no uncommitted row
    if setup == "streams sampled":
        assert run(True)[0] == toks and len(toks) >= 41
        return
    ref_toks, ref_rows, none_early, _, _ = run(False)
    assert none_early == 0 and len(set(ref_toks)) > 8
    assert toks[:41] == ref_toks[:41] == ar_tokens(model.base, prompt, 41)
    # Equal up to float rounding: a row computed in a one-node forward here and in a tree there
    # (pipelining delays a tree) differs in the last bits under OpenBLAS; a stale root's row by O(1).
    for a, b in zip(rows, ref_rows):
        np.testing.assert_allclose(a[..., : prompt.size + 40, :], b[..., : prompt.size + 40, :], rtol=1e-4, atol=1e-5)


def test_plain_steps_are_queued_early_by_default_only_where_it_pays(hf_model):
    import mlx.nn as nn

    from mlx_specstream.decode import pipelines_plain_steps

    model, _ = load_model(hf_model("llama")[0])
    assert pipelines_plain_steps(model) == (mx.default_device() != mx.cpu)
    nn.quantize(model, group_size=32, bits=4)
    assert pipelines_plain_steps(model)
