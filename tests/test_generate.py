import json

import mlx.core as mx
import pytest

from mlx_specstream.decode import generate_step
from mlx_specstream.generate import generate, stream_generate
from mlx_specstream.responses import StopMatcher
from mlx_specstream.sample import SamplingParams
from mlx_specstream import load
from mlx_specstream.checkpoint import load_model, save_model


@pytest.mark.parametrize("name", ["llama", "llama3_tied_headdim", "mistral", "qwen2", "qwen3", "phi"])
def test_greedy_equals_mlx_lm(hf_model, tmp_path, name):
    from mlx_lm.generate import generate_step as lm_generate_step
    from mlx_lm.utils import load_model as mlx_lm_load

    path, _ = hf_model(name)
    ours, cfg = load_model(path)
    save_model(tmp_path / "m", ours, cfg)  # mlx-lm reads the checkpoint we write
    theirs, _ = mlx_lm_load(tmp_path / "m")
    prompt = mx.array([1, 17, 300, 45, 9, 211, 77])
    a = [t for t, _ in generate_step(prompt, ours, max_tokens=60)]
    b = []
    for t, _ in lm_generate_step(prompt, theirs, max_tokens=60):
        b.append(int(t))
    assert a == b


def test_chunked_prefill_gives_same_tokens(hf_model):
    model, _ = load_model(hf_model("qwen3")[0])
    prompt = mx.array(list(range(3, 90)))
    a = [t for t, _ in generate_step(prompt, model, max_tokens=20)]
    b = [t for t, _ in generate_step(prompt, model, max_tokens=20, prefill_step_size=16)]
    assert a == b


def test_stream_generate_fields_and_length(hf_model):
    model, tok = load(str(hf_model("llama")[0]))
    rs = list(stream_generate(model, tok, "def f(x):", max_tokens=12))
    last = rs[-1]
    assert last.finish_reason == "length" and last.generation_tokens == 12
    assert all(r.finish_reason is None for r in rs[:-1])
    assert last.prompt_tokens == len(tok.encode("def f(x):"))
    assert last.prompt_tps > 0 and last.generation_tps > 0 and last.peak_memory >= 0
    tokens = [r.token for r in rs]
    assert "".join(r.text for r in rs) == tok.decode(tokens)
    assert generate(model, tok, "def f(x):", max_tokens=12) == tok.decode(tokens)


def test_stop_string_cuts_before_it(hf_model):
    model, tok = load(str(hf_model("llama")[0]))
    full = generate(model, tok, "import os\n", max_tokens=40)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop
    cut = list(stream_generate(model, tok, "import os\n", max_tokens=40, stop=[stop]))
    text = "".join(r.text for r in cut)
    assert text == full[: full.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_eos_stops_and_is_not_emitted(hf_model):
    model, tok = load(str(hf_model("qwen2")[0]))
    seq = [t for t, _ in generate_step(mx.array(tok.encode("x = ")), model, max_tokens=10)]
    tok.eos_token_ids = {seq[4]}  # pretend the 5th greedy token is EOS
    rs = list(stream_generate(model, tok, "x = ", max_tokens=10))
    assert rs[-1].finish_reason == "stop"
    assert [r.token for r in rs if r.tokens] == seq[: seq.index(seq[4])]


def test_too_long_prompt_is_refused(hf_model):
    model, tok = load(str(hf_model("opt")[0]))
    with pytest.raises(ValueError, match="context is 512 tokens"):
        list(stream_generate(model, tok, list(range(3, 600)), max_tokens=4))
    # Near the limit, generation stops at the context edge instead of running past it.
    rs = list(stream_generate(model, tok, [5] * 508, max_tokens=50))
    assert rs[-1].generation_tokens == 4 and rs[-1].finish_reason == "length"


def test_sampling_is_seeded_and_varies(hf_model):
    model, tok = load(str(hf_model("phi")[0]))
    sampler = SamplingParams(temp=1.5, top_p=0.95, top_k=50).sampler()
    mx.random.seed(3)
    a = generate(model, tok, "for i in", max_tokens=30, sampler=sampler)
    mx.random.seed(3)
    b = generate(model, tok, "for i in", max_tokens=30, sampler=sampler)
    mx.random.seed(4)
    c = generate(model, tok, "for i in", max_tokens=30, sampler=sampler)
    assert a == b and a != c


def test_stop_matcher_holds_partial_matches():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("abc STX") == ("STX", False)
    assert m.feed("abc STX ST") == (" ", False)
    assert m.feed("abc STX STOP and more") == ("", True)


def test_cli_generate_json(hf_model, capsys):
    from mlx_specstream.cli import main

    path, _ = hf_model("llama")
    assert main(["generate", "--model", str(path), "--prompt", "def", "-m", "7", "--json", "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generation_tokens"] == 7 and out["finish_reason"] == "length"
    model, tok = load(str(path))
    assert out["text"] == generate(model, tok, "def", max_tokens=7)


def test_cli_reports_bad_model_cleanly(tmp_path, capsys):
    from mlx_specstream.cli import main

    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--no-speculate", "--tree", "chain"], "--no-speculate turns it off"),
        (["--no-speculate", "--lookup", "3"], "--no-speculate turns it off"),
        (["--prune-threshold", "0.1", "--streams", "nonexistent.json"], "not found"),
        (["-m", "0"], "--max-tokens must be at least 1"),
        (["--temp", "nan"], "--temp must be a finite number"),
        (["--temp", "-1"], "--temp must be a finite number"),
        (["--top-p", "1.5"], "--top-p must be in"),
        (["--top-k", "-2"], "--top-k must be"),
        (["--seed", "-1"], "--seed must be in"),
    ],
)
def test_generate_refuses_nonsense_options(hf_model, capsys, extra, msg):
    from mlx_specstream.cli import main

    d = hf_model("llama")[0]
    assert main(["generate", "--model", str(d), "--prompt", "def", "-m", "4"] + extra) == 1
    assert msg in capsys.readouterr().err


def test_stream_settings_without_streams_are_refused(hf_model):
    with pytest.raises(ValueError, match="has no stream adapter"):
        load(str(hf_model("llama")[0]), prune_threshold=0.1)


def test_a_non_utf8_prompt_on_stdin_is_a_named_error(hf_model, capsys, monkeypatch):
    import io
    import sys

    from mlx_specstream.cli import main as cli

    path, _ = hf_model("llama")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    assert cli(["generate", "--model", str(path), "-m", "4"]) == 1
    assert "the prompt on stdin is not UTF-8 text (byte 3: b'\\xe9')" in capsys.readouterr().err


def test_generate_flags_out_of_bounds_are_refused_before_work(hf_model, capsys, monkeypatch):
    """--prune-threshold past the config's bounds, a huge --num-draft, a 50k-deep --tree, a
    non-UTF-8 --prompt and a prompt far past the context: each a named error (exit 1), no
    traceback, no giant allocation or tokenization first."""
    import io
    import sys as _sys

    from mlx_specstream.cli import main

    path = str(hf_model("llama")[0])
    base = ["generate", "--model", path, "-m", "2"]
    cases = [
        (["--prompt", "x", "--prune-threshold", "1.5", "--lookup", "2"], "prune_threshold"),
        (["--prompt", "x", "--prune-threshold", "nan", "--lookup", "2"], "prune_threshold"),
        (["--prompt", "x", "--num-draft", "1000000"], "num-draft"),
        (["--prompt", "x", "--tree", "[" * 50000 + "]" * 50000], "--tree"),
        (["--prompt", "caf\udce9"], "not UTF-8"),
        (["--prompt", "a" * (128 * 512 + 1), "--ignore-chat-template"], "context"),
    ]
    for extra, named in cases:
        assert main(base + extra) == 1, extra[:3]
        err = capsys.readouterr().err
        assert named in err and "Traceback" not in err, (extra[:3], err[-300:])
