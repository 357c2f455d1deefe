"""Adapters bound to their base: a stream file records the fingerprint of the weights it was
trained on, attaches to those weights in any format, is refused on another base (unless forced),
and the package's own adapters attach by that fingerprint (SmolLM2's to the real model)."""

import mlx.core as mx
import pytest

from mlx_specstream import load
from mlx_specstream.checkpoint import CheckpointError, base_fingerprint, fingerprint_mismatch
from mlx_specstream.decode import generate_step
from mlx_specstream.drafters import StreamDrafter
from mlx_specstream.generate import stream_generate
from mlx_specstream.streams import SpeculativeStreams, StreamConfig, save_streams
from mlx_specstream.streams import files as stream_files

from hf_models import needs_smollm2


def _adapter_for(model, folder):
    s = SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=1), model)
    s.config.base = base_fingerprint(model)
    return save_streams(folder, s)


def test_an_adapter_attaches_to_its_base_in_any_format_and_is_refused_on_another(hf_model, tmp_path):
    path = hf_model("llama")[0]
    other = hf_model("llama", seed=1)[0]
    model, _ = load(str(path), streams=False)
    file = _adapter_for(model, tmp_path / "a")
    for kw in ({}, {"dtype": "float16"}, {"quantize": 4}, {"quantize": 8}):  # same weights, other formats
        m, _ = load(str(path), streams=str(file), **kw)
        assert isinstance(m.drafter, StreamDrafter), kw
    with pytest.raises(CheckpointError, match="trained on another base model.*--force-streams"):
        load(str(other), streams=str(file))
    m, _ = load(str(other), streams=str(file), force_streams=True)
    assert isinstance(m.drafter, StreamDrafter)


def test_a_fine_tune_of_the_base_is_another_base(hf_model):
    model, _ = load(str(hf_model("llama")[0]), streams=False)
    want = base_fingerprint(model)
    layer = model.layers[-1].mlp.down_proj
    layer.weight = layer.weight * 1.1  # a fine-tune moves the last layer
    assert "down_proj" in fingerprint_mismatch(want, base_fingerprint(model))
    assert fingerprint_mismatch(want, {**want, "hidden_size": 1}).startswith("hidden_size")
    assert "malformed" in fingerprint_mismatch({**want, "tensors": [["norm", "x"]]}, want)


def test_a_trained_adapter_records_its_base(hf_model, tmp_path):
    import json

    from mlx_specstream.train import main as train_main

    path = hf_model("llama")[0]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "def f(x):\n    return x + %d\n" % i}) + "\n" for i in range(8)))
    train_main(
        [
            "--model",
            str(path),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "--iters",
            "2",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--msa-layers",
            "1",
        ]
    )
    cfg = json.loads((tmp_path / "o" / "speculative_streams.json").read_text())
    model, _ = load(str(path), streams=False)
    assert cfg["base"] == json.loads(json.dumps(base_fingerprint(model)))


def test_the_packages_adapter_attaches_by_fingerprint(hf_model, tmp_path, monkeypatch):
    path = hf_model("llama")[0]
    model, _ = load(str(path), streams=False)
    assets = tmp_path / "assets"
    _adapter_for(model, assets / "tiny")
    monkeypatch.setattr(stream_files, "ASSETS", assets)
    m, _ = load(str(path))  # no stream file beside the model: the shipped one for these weights
    assert isinstance(m.drafter, StreamDrafter) and m.drafter.streams.source.parent == assets / "tiny"
    m, _ = load(str(hf_model("llama", seed=1)[0]))  # other weights: nothing attaches
    assert not hasattr(m, "drafter")
    m, _ = load(str(path), streams=False)
    assert not hasattr(m, "drafter")


def test_tune_never_overwrites_the_packages_adapter_unless_named():
    from mlx_specstream.bench.tune import tune

    with pytest.raises(ValueError, match="package's own adapters.*--write-to"):
        tune(None, write=True)


@needs_smollm2
def test_smollm2_gets_its_shipped_streams_and_decodes_exactly_as_plain_greedy():
    from mlx_specstream.loading import resolve_model

    assert (stream_files.ASSETS / "smollm2" / "speculative_streams.json").exists()
    model, tok = load("smollm2")
    assert isinstance(model.drafter, StreamDrafter)
    assert model.drafter.streams.source.parent.name == "smollm2"
    q, _ = load(str(resolve_model("smollm2")), dequantize=False)  # the GGUF by path, kept quantized
    assert isinstance(q.drafter, StreamDrafter)
    for text in ("Write a Python function that reverses a string.", "What is a list comprehension?"):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ar = [t for t, _ in generate_step(mx.array(ids), model.base, max_tokens=24)]
        ar = ar[: next((i for i, t in enumerate(ar) if t in set(tok.eos_token_ids)), len(ar))]  # EOS ends a reply
        for tree in (None, [[0], [0, 0], [0, 0, 0], [1]]):
            sp = [t for r in stream_generate(model, tok, ids, max_tokens=24, tree=tree, lookup=5) for t in r.tokens]
            assert sp == ar, (text, tree)
