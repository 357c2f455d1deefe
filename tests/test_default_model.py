"""The embedded default model: loads offline, generates code, speculative greedy == AR greedy."""

import json

import pytest

from mlx_specstream.generate import stream_generate
from mlx_specstream.stdlib_data import eval_prompts
from mlx_specstream.drafters import StreamDrafter
from mlx_specstream.setting import DecodeSetting
from mlx_specstream import load
from mlx_specstream.checkpoint import default_model_path


@pytest.fixture(scope="module")
def default():
    return load()


def test_assets_are_small_and_complete():
    root = default_model_path().parent
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 25 * 2**20, f"default assets are {total / 2**20:.1f} MB"
    base = default_model_path()
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "speculative_streams.json",
        "speculative_streams.safetensors",
        "speculative_streams-shared.json",
    ):
        assert (base / f).exists(), f
    assert (root / "draft" / "config.json").exists()


def test_default_model_speculative_equals_ar(default):
    model, tok = default
    assert isinstance(model.drafter, StreamDrafter) and model.drafter.streams.config.mode == "lossless"
    for p in eval_prompts(3):
        prompt = p["prompt"]
        ar = list(stream_generate(model, tok, prompt, max_tokens=64, speculative=False))
        # as shipped (the tuned tree and context drafts), and the streams' own drafts alone
        for kw in ({}, {"tree": [[0], [0, 0]], "lookup": 0}):
            spec = list(stream_generate(model, tok, prompt, max_tokens=64, **kw))
            assert [t for r in spec for t in r.tokens] == [t for r in ar for t in r.tokens]
            assert spec[-1].steps < ar[-1].steps  # the drafts do get accepted


def test_default_model_context_drafts_equal_ar_and_land(default):
    """Context drafts (prompt lookup), with the streams and alone: the same tokens, fewer steps."""
    model, tok = default
    for p in eval_prompts(2):
        ar = list(stream_generate(model, tok, p["prompt"], max_tokens=64, speculative=False))
        ref = [t for r in ar for t in r.tokens]
        for m in (model, model.base):
            rs = list(stream_generate(m, tok, p["prompt"], max_tokens=64, lookup=4))
            assert [t for r in rs for t in r.tokens] == ref
            assert rs[-1].steps < ar[-1].steps


def test_default_model_writes_code(default):
    """Greedy continuations of held-out modules look like Python: indented lines, calls or
    assignments (a 7M-parameter model: code-shaped, not good code)."""
    from mlx_specstream.generate import generate

    model, tok = default
    for p in eval_prompts(3):
        text = generate(model, tok, p["prompt"], max_tokens=96)
        lines = text.splitlines()
        assert sum(line.startswith("    ") for line in lines) >= 2, text
        assert "=" in text or "(" in text, text


def test_shared_variant_equals_its_own_ar():
    model, tok = load(streams="shared")
    assert model.drafter.streams.config.mode == "shared"
    prompt = eval_prompts(1)[0]["prompt"]
    spec = [t for r in stream_generate(model, tok, prompt, max_tokens=48) for t in r.tokens]
    ar = [t for r in stream_generate(model, tok, prompt, max_tokens=48, speculative=False) for t in r.tokens]
    assert spec == ar


def test_cli_generate_with_no_model(capsys):
    from mlx_specstream.cli import main

    assert main(["generate", "--prompt", "def add(a, b):", "-m", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speculative"] and out["generation_tokens"] > 0 and out["mean_accepted"] > 1.0


def test_reference_blas_means_plain_decoding_by_default(monkeypatch, capsys, notices):
    """Settings tuned with an optimised BLAS are slower than plain decoding on the reference one:
    there the shipped tree is not used by default, and the user is told what to install."""
    import mlx_specstream.loading as loading

    monkeypatch.setattr(loading, "blas_kind", lambda: "reference")
    monkeypatch.setattr(loading, "tuned_on", lambda: {"backend": "cpu", "device": "AMD EPYC", "blas": "reference"})
    model, tok = load()
    err = "\n".join(notices())
    assert "reference BLAS" in err and "LD_PRELOAD" in err and "plain decoding by default" in err
    assert model.drafter.setting.drafts_nothing and model.drafter.sampled is None
    r = list(stream_generate(model, tok, "def f(x):", max_tokens=8))
    assert r[-1].mean_accepted == 1.0  # plain decoding
    from mlx_specstream.cli import main

    assert main(["generate", "--prompt", "def f(x):", "-m", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["speculative"] is False  # says it decoded plainly


def test_optimised_blas_keeps_the_tuned_settings(notices):
    model, _ = load()
    assert model.drafter.setting.lookup == 5 and not any("reference BLAS" in n for n in notices())


def test_sampling_with_settings_tuned_for_greedy_decoding_says_so(notices):
    """`bench tune` measures greedy decoding; sampled drafts are accepted less often, so sampling
    with the tuned setting is announced once (and nothing is said otherwise)."""
    from mlx_specstream.sample import SamplingParams

    model, tok = load()
    hot = SamplingParams(temp=0.7)
    list(stream_generate(model, tok, "def f(x):", max_tokens=4))  # greedy
    list(stream_generate(model, tok, "def f(x):", max_tokens=4, sampling=hot, lookup=3))  # chosen by the user
    list(stream_generate(model, tok, "def f(x):", max_tokens=4, sampling=hot, speculative=False))
    assert not any("tuned for greedy decoding" in n for n in notices())
    for _ in range(2):
        list(stream_generate(model, tok, "def f(x):", max_tokens=4, sampling=hot))
    said = [n for n in notices() if "tuned for greedy decoding" in n]
    assert len(said) == 1 and "--no-speculate" in said[0]


def test_sampling_uses_the_setting_tuned_for_sampling(notices):
    """With a `sampled` setting (`bench tune --temp T --write`), sampled generation decodes with it
    (here: plain decoding, then one stream draft per step) and says nothing about greedy tuning;
    greedy generation and the user's explicit tree keep theirs."""
    import mlx.core as mx
    from mlx_specstream.sample import SamplingParams

    model, tok = load()
    d, hot = model.drafter, SamplingParams(temp=0.7)

    def run(seed=3, **kw):
        mx.random.seed(seed)
        rs = list(stream_generate(model, tok, "def f(x):", max_tokens=12, **kw))
        return [t for r in rs for t in r.tokens], max(r.tree_size for r in rs)

    try:
        d.sampled = DecodeSetting((), 0, temp=0.7)  # tuned: sampling decodes plainly
        toks, size = run(sampling=hot)
        assert size == 1 and toks == run(sampling=hot, speculative=False)[0]
        d.sampled = DecodeSetting(((0,),), 0, temp=0.7)  # tuned: one stream draft per step
        assert run(sampling=hot)[1] == 2
        assert not any("tuned for greedy decoding" in n for n in notices())
        assert run()[1] >= 3  # greedy: its tuned tree [[0], [1]] (and up to 5 context drafts)
        assert run(sampling=hot, tree=((0,), (1,)))[1] == 3  # the caller's tree, the sampled lookup (0)
        d.sampled = DecodeSetting(((0,), (1,), (2,)), 5, temp=0.7)
        assert run(sampling=hot, lookup=0)[1] == 4  # the sampled tree (4 nodes), the caller's lookup
    finally:
        d.sampled = None


@pytest.mark.parametrize(
    "sampled, msg",
    [
        ([1], "sampled must be an object"),
        ({"tree": []}, "needs tree and lookup"),
        ({"tree": [], "lookup": 0, "bogus": 1}, "needs tree and lookup"),
        ({"tree": [[1, 0]], "lookup": 0}, "sampled.tree"),
        ({"tree": [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], "lookup": 0}, "deeper than the 3 levels"),
        ({"tree": [], "lookup": 99}, "sampled.lookup"),
        ({"tree": [], "lookup": 0, "prune_threshold": 1.5}, "sampled.prune_threshold"),
        ({"tree": [], "lookup": 0, "temp": 0}, "sampled.temp"),
    ],
)
def test_a_malformed_sampled_setting_is_a_named_error(sampled, msg):
    from mlx_specstream.streams import StreamConfig

    with pytest.raises(ValueError, match=msg):
        StreamConfig.from_dict({"num_streams": 3, "sampled": sampled})
    ok = StreamConfig.from_dict({"num_streams": 3, "sampled": {"tree": [[0], [0, 0]], "lookup": 2, "temp": 0.7}})
    assert ok.sampled_setting == DecodeSetting(((0,), (0, 0)), 2, 0.0, None, 0.7)
