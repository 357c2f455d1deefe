import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from hf_models import VOCAB
from mlx_specstream.models import UnsupportedModelError
from mlx_specstream import load
from mlx_specstream.checkpoint import CheckpointError, get_model_path, load_model, quantize_model, save_model


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_load_returns_model_and_sentencepiece_tokenizer(hf_model):
    path, _ = hf_model("llama")
    model, tok = load(str(path))
    ids = tok.encode("def main():\n    return 1\n")
    assert ids[0] == tok.bos_token_id and max(ids) < VOCAB
    assert tok.decode(ids) == "def main():\n    return 1\n"
    assert tok.eos_token_ids == {2}
    assert not tok.has_chat_template


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path)


def test_missing_weights(hf_model, tmp_path):
    d = _copy(hf_model("llama")[0], tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model\\*.safetensors"):
        load_model(d)


def test_corrupt_safetensors_is_named(hf_model, tmp_path):
    d = _copy(hf_model("llama")[0], tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt or truncated"):
        load_model(d)


def test_unknown_family(hf_model, tmp_path):
    d = _copy(hf_model("llama")[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mamba9"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="mamba9.*mlx-lm.*does not implement"):
        load_model(d)


def test_wrong_shapes_and_missing_tensors_are_named(hf_model, tmp_path):
    d = _copy(hf_model("llama")[0], tmp_path / "m")
    w = mx.load(str(d / "model.safetensors"))
    w["model.layers.0.mlp.up_proj.weight"] = mx.zeros((7, 7))
    del w["model.layers.1.self_attn.k_proj.weight"]
    mx.save_safetensors(str(d / "model.safetensors"), w)
    with pytest.raises(CheckpointError) as e:
        load_model(d)
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "(7, 7)" in msg
    assert "model.layers.1.self_attn.k_proj.weight" in msg


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("model.embed_tokens.weight", mx.int32),
        ("model.norm.weight", mx.uint32),
        ("model.layers.0.mlp.up_proj.weight", mx.bool_),
    ],
)
def test_a_weight_of_a_dtype_the_model_cannot_use_is_named(hf_model, tmp_path, name, dtype):
    """A float weight declared as integers (same byte count: the header's dtype is all that says
    so) or booleans loaded with exit 0 into an integer embedding before."""
    d = _copy(hf_model("llama")[0], tmp_path / "m")
    w = mx.load(str(d / "model.safetensors"))
    w[name] = w[name].view(dtype) if dtype != mx.bool_ else w[name] > 0
    mx.save_safetensors(str(d / "model.safetensors"), w)
    with pytest.raises(CheckpointError, match=f"wrong dtypes: {name}: checkpoint"):
        load_model(d)


def test_bad_config_json(hf_model, tmp_path):
    d = _copy(hf_model("llama")[0], tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(d)
    (d / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CheckpointError, match="nested too deeply"):
        load_model(d)


def test_missing_required_config_key(hf_model, tmp_path):
    d = _copy(hf_model("llama")[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_model(d)


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline"):
        get_model_path("someone/not-a-local-folder")


def test_local_path_that_does_not_exist():
    with pytest.raises(FileNotFoundError):
        get_model_path("./no/such/dir")


def test_sharded_checkpoint_with_index(hf_model, tmp_path):
    path, _ = hf_model("qwen2")
    w = mx.load(str(path / "model.safetensors"))
    keys = sorted(w)
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(path / "config.json", d / "config.json")
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    wmap = {}
    for name, ks in halves.items():
        mx.save_safetensors(str(d / name), {k: w[k] for k in ks})
        wmap.update({k: name for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    a, _ = load_model(path)
    b, _ = load_model(d)
    ids = mx.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(np.array(a(ids)), np.array(b(ids)))
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(d)


@pytest.mark.parametrize("group_size", [32, 64])
def test_8bit_close_to_float_and_round_trips(hf_model, tmp_path, group_size):
    path, _ = hf_model("llama")
    ref_model, cfg = load_model(path)
    ids = mx.array([[3, 50, 7, 99, 12, 400, 8]])
    ref = np.array(ref_model(ids))
    qm, qcfg = load_model(path)
    qcfg = quantize_model(qm, qcfg, bits=8, group_size=group_size)
    out = np.array(qm(ids))
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()
    save_model(tmp_path / "q8", qm, qcfg)
    back, bcfg = load_model(tmp_path / "q8")
    assert bcfg["quantization"]["bits"] == 8
    np.testing.assert_array_equal(np.array(back(ids)), out)


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi", "opt"])
def test_4bit_generates(hf_model, name):
    from mlx_specstream.decode import generate_step

    path, _ = hf_model(name)
    model, cfg = load_model(path)
    quantize_model(model, cfg, bits=4, group_size=32)
    toks = [t for t, _ in generate_step(mx.array([1, 5, 9]), model, max_tokens=8)]
    assert len(toks) == 8 and all(0 <= t < VOCAB for t in toks)


def test_mixed_recipe_and_bad_quant_args(hf_model, tmp_path):
    path, _ = hf_model("llama")
    model, cfg = load_model(path)
    with pytest.raises(ValueError, match="bits"):
        quantize_model(model, cfg, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(model, cfg, group_size=48)
    qcfg = quantize_model(model, cfg, bits=4, group_size=32, recipe="mixed_4_8")
    assert qcfg["quantization"]["lm_head"]["bits"] == 8
    save_model(tmp_path / "mixed", model, qcfg)
    back, _ = load_model(tmp_path / "mixed")
    assert back.lm_head.bits == 8 and back.model.layers[0].mlp.up_proj.bits == 4


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi"])
def test_quantized_output_loads_in_mlx_lm(hf_model, tmp_path, name):
    from mlx_lm.utils import load_model as mlx_lm_load

    path, _ = hf_model(name)
    model, cfg = load_model(path)
    qcfg = quantize_model(model, cfg, bits=4, group_size=32)
    save_model(tmp_path / "q4", model, qcfg)
    theirs, _ = mlx_lm_load(tmp_path / "q4")
    ids = mx.array([[3, 50, 7, 99]])
    np.testing.assert_allclose(np.array(theirs(ids)), np.array(model(ids)), atol=1e-4)


@pytest.mark.parametrize(
    "key,value,msg",
    [
        ("num_attention_heads", 0, "num_attention_heads = 0 is out of range"),
        ("head_dim", 0, "head_dim = 0 is out of range"),
        ("hidden_size", "64", "hidden_size must be an integer"),
        ("hidden_size", 64.5, "hidden_size must be an integer"),
        ("rope_scaling", "linear", "rope_scaling must be an object"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps must be a positive finite number"),
        ("num_hidden_layers", 10**7, "num_hidden_layers = 10000000 is out of range"),
        ("quantization", "4bit", "quantization '4bit' is not"),
        ("eos_token_id", "2", "eos_token_id must be a token id"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_are_named(hf_model, tmp_path, key, value, msg):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(hf_model("llama")[0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=msg):
        load_model(d)


@pytest.mark.parametrize(
    "content,msg", [("[1, 2]", "must hold a JSON object"), ('{"num_streams": 2.5}', "num_streams must be int")]
)
def test_stream_files_of_the_wrong_shape_are_named(hf_model, tmp_path, content, msg):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(hf_model("llama")[0], d)
    (d / "speculative_streams.json").write_text(content)
    (d / "speculative_streams.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=msg):
        load(str(d))


@pytest.mark.parametrize(
    "header,data,msg",
    [
        (
            '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
            '"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}',
            16,
            "names \\['a'\\] more than once",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            12,
            "'b' overlaps the one before it",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4, "do not hold its shape"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "do not hold its shape"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, 8, "malformed"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "leaves a gap"),
    ],
)
def test_safetensors_headers_are_checked_before_any_byte_is_viewed(tmp_path, header, data, msg):
    from mlx_specstream.checkpoint import read_safetensors

    f = tmp_path / "w.safetensors"
    raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    f.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data))
    with pytest.raises(CheckpointError, match=msg):
        read_safetensors(f)
    f.write_bytes((10**12).to_bytes(8, "little") + raw)
    with pytest.raises(CheckpointError, match="a header of"):
        read_safetensors(f)


def test_weight_and_config_files_must_be_regular_files(hf_model, tmp_path):
    """A FIFO named model.safetensors (or config.json) would block a read forever; a directory of
    that name, or a shard index naming ".", is no weight file: each refused by name, no hang."""
    import os
    import shutil

    from mlx_specstream.checkpoint import CheckpointError, load_model

    src, _ = hf_model("llama")
    for case in ("fifo", "dir", "index_dot", "config_fifo"):
        d = tmp_path / case
        shutil.copytree(src, d)
        if case in ("fifo", "dir"):
            (d / "model.safetensors").unlink()
            os.mkfifo(d / "model.safetensors") if case == "fifo" else (d / "model.safetensors").mkdir()
        elif case == "index_dot":
            (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "."}}))
        else:
            (d / "config.json").unlink()
            os.mkfifo(d / "config.json")
        with pytest.raises(CheckpointError, match="regular file"):
            load_model(d)


CONFIG_NONSENSE = [
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2}}, "factor"),
    ({"quantization": {"bits": 3, "group_size": 7}}, "quantization"),
    ({"quantization": {"bits": 4, "group_size": 0}}, "quantization"),
    ({"quantization": {"bits": 4, "group_size": -64}}, "quantization"),
    ({"quantization": {"bits": 4, "group_size": 10**9}}, "quantization"),
    ({"quantization": {"bits": 4, "group_size": 64}}, "not quantized"),  # on a float checkpoint
    ({"eos_token_id": -1}, "eos_token_id"),
    ({"eos_token_id": 10**30}, "eos_token_id"),
    ({"eos_token_id": []}, "eos_token_id"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"hidden_size": True}, "hidden_size"),
]


@pytest.mark.parametrize("change,named", CONFIG_NONSENSE)
def test_config_nonsense_is_refused_by_name(hf_model, tmp_path, change, named):
    src, _ = hf_model("llama")
    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError if "quantiz" in named or named in ("eos_token_id", "torch_dtype") else Exception, match=named
    ):
        load_model(d)


def test_json_with_a_huge_integer_names_the_file(hf_model, tmp_path):
    src, _ = hf_model("llama")
    d = tmp_path / "m"
    shutil.copytree(src, d)
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text.replace("{", '{"unused": ' + "9" * 5000 + ", ", 1))
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(d)


@pytest.mark.parametrize(
    "change", [{"pruning_rank": 0}, {"lora_targets": [["x"]]}, {"lora_targets": []}, {"lora_scale": float("inf")}]
)
def test_stream_config_nonsense_is_refused_by_name(change):
    from mlx_specstream.errors import UserError
    from mlx_specstream.streams import StreamConfig

    with pytest.raises(UserError, match=next(iter(change))):
        StreamConfig(**change)
