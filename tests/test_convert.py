import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent))

from convert.pytorch_reference import SpeculativeStreamsTorch, forward_with_streams, save_streams_torch, speculative_greedy  # noqa: E402
from hf_models import CONFIGS, make_hf_model  # noqa: E402
from mlx_specstream.convert import convert  # noqa: E402
from mlx_specstream.decode import tree_generate_step  # noqa: E402
from mlx_specstream.streams import forward_with_streams as mlx_forward_with_streams  # noqa: E402
from mlx_specstream.torch_pickle import UnsafeCheckpointError  # noqa: E402
from mlx_specstream import load
from mlx_specstream.checkpoint import CheckpointError, load_model  # noqa: E402

IDS = [[1, 5, 9, 33, 200, 17, 40, 8, 77]]


def torch_streams(hf, seed=0, **cfg):
    torch.manual_seed(seed)
    s = SpeculativeStreamsTorch({"num_streams": 3, "num_msa_layers": 2, "lora_rank": 4, **cfg}, hf)
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return s


def compare(hf, s, dst, atol=2e-5):
    with torch.no_grad():
        main, strm = forward_with_streams(hf, s, torch.tensor(IDS))
    model, _ = load(str(dst))
    mm, ms = mlx_forward_with_streams(model.base, model.drafter.streams, mx.array(IDS))
    d_main = np.abs(np.array(mm) - main.numpy()).max()
    d_str = np.abs(np.array(ms.astype(mx.float32)) - strm.numpy()).max()
    assert d_main < atol and d_str < atol, (d_main, d_str)
    return d_main, d_str


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["lossless", "shared"])
def test_convert_parity_main_and_streams(tmp_path, sp_model_file, name, mode):
    src = tmp_path / "src"
    hf = make_hf_model(name, src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    s = torch_streams(hf, mode=mode, main_sees_streams=(mode == "shared"))
    save_streams_torch(src, s)
    dst = convert(src, tmp_path / "dst", dtype="float32")
    # stream parameters are stored in float16: compare against the rounded reference
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(p.half().float())
    compare(hf, s, dst, atol=5e-5)


def test_reference_and_mlx_agree_on_speculative_greedy(tmp_path, sp_model_file):
    src = tmp_path / "src"
    hf = make_hf_model("qwen2", src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    s = torch_streams(hf, seed=3, mode="shared", main_sees_streams=True)
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(p.half().float())
    save_streams_torch(src, s)
    dst = convert(src, tmp_path / "dst", dtype="float32")
    model, _ = load(str(dst))
    paths = ((0,), (1,), (0, 0), (0, 0, 0))
    prompt = [1, 5, 9, 33, 200]
    ref = speculative_greedy(hf, s, prompt, 24, tree_paths=paths)
    out = []
    for r in tree_generate_step(mx.array(prompt), model.base, model.drafter, max_tokens=24, tree=paths):
        out += r.tokens
    assert out[:24] == ref


def test_bin_sharded_bf16_tied(tmp_path):
    src = tmp_path / "src"
    hf = make_hf_model("qwen2", src, dtype=torch.bfloat16)  # tied embeddings
    shutil.rmtree(src)
    from hf_models import save_bin

    save_bin(hf, src, shards=3)
    assert (src / "pytorch_model.bin.index.json").exists() and not list(src.glob("*.safetensors"))
    dst = convert(src, tmp_path / "dst")
    model, cfg = load_model(dst)
    assert cfg["torch_dtype"] == "bfloat16" and model.model.embed_tokens.weight.dtype == mx.bfloat16
    with torch.no_grad():
        ref = hf.float()(torch.tensor(IDS)).logits.numpy()
    out = np.array(model(mx.array(IDS)).astype(mx.float32))
    assert np.abs(out - ref).max() < 0.05


@pytest.mark.parametrize("keep", [False, True])
def test_peft_lora_merged_and_kept(tmp_path, sp_model_file, keep):
    import peft

    src = tmp_path / "src"
    hf = make_hf_model("llama", src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          layers_to_transform=[2, 3])
    pm = peft.get_peft_model(hf, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ref = pm(torch.tensor(IDS)).logits.numpy()
    dst = convert(src, tmp_path / "dst", adapter_path=tmp_path / "adapter", keep_lora=keep)
    model, _ = load(str(dst), streams=False)
    out = np.array(model(mx.array(IDS)))
    assert np.abs(out - ref).max() < 1e-4
    assert (dst / "adapters.safetensors").exists() == keep


def test_verify_flag_reports_small_difference(tmp_path, sp_model_file, capsys):
    from mlx_specstream.cli import main

    src = tmp_path / "src"
    make_hf_model("phi", src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    assert main(["convert", "--torch-path", str(src), "--mlx-path", str(tmp_path / "dst"), "--verify", "--dtype", "float32"]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if "max |logit difference|" in l][0]
    assert float(line.split(":")[-1]) < 1e-4


def test_streams_only_into_existing_base(tmp_path, sp_model_file):
    src = tmp_path / "src"
    hf = make_hf_model("llama", src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    dst = convert(src, tmp_path / "dst", dtype="float32")
    assert not (dst / "speculative_streams.json").exists()
    only = tmp_path / "streams"
    s = torch_streams(hf)
    save_streams_torch(only, s, name="code", bin_format=True)
    convert(only, dst, streams_only=True)
    model, _ = load(str(dst), streams="code")
    assert model.drafter.streams.config.num_streams == 3
    with pytest.raises(CheckpointError, match="exists"):
        convert(only, dst, streams_only=True)


def test_quantized_conversion(tmp_path, sp_model_file):
    from mlx_specstream.generate import generate

    src = tmp_path / "src"
    hf = make_hf_model("llama", src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    save_streams_torch(src, torch_streams(hf))
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.numpy()
    q8 = convert(src, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32)
    m8, cfg = load_model(q8)
    assert cfg["quantization"]["bits"] == 8
    assert np.abs(np.array(m8(mx.array(IDS))) - ref).max() < 0.05 * np.abs(ref).max()
    q4 = convert(src, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32)
    model, tok = load(str(q4))
    assert model.drafter.streams.stream_embeddings.dtype == mx.float32  # runs in the model's float dtype
    assert len(generate(model, tok, "def", max_tokens=10)) > 0


# ---------------------------------------------------------------- hostile and broken inputs


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_nothing_runs_or_is_written(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src, safe_serialization=False)
    marker = tmp_path / "pwned"
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    sd["model.norm.weight"] = Evil(marker)
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load global (posix|os).system"):
        convert(src, tmp_path / "dst")
    assert not marker.exists()
    assert not (tmp_path / "dst").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dst")] == []


def test_legacy_raw_pickle_refused(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src, safe_serialization=False)
    marker = tmp_path / "pwned2"
    import pickle

    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil(marker)}))
    with pytest.raises(UnsafeCheckpointError, match="not a torch zip"):
        convert(src, tmp_path / "dst")
    assert not marker.exists() and not (tmp_path / "dst").exists()


def test_broken_inputs_are_named(tmp_path):
    src = tmp_path / "src"
    make_hf_model("llama", src)
    f = src / "model.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[: len(good) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        convert(src, tmp_path / "d1")
    f.write_bytes(good)
    from safetensors.numpy import load_file, save_file

    w = load_file(str(f))
    w["model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    del w["model.layers.1.self_attn.q_proj.weight"]
    save_file(w, str(f))
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "d2")
    assert "model.layers.0.mlp.up_proj.weight" in str(e.value) and "model.layers.1.self_attn.q_proj.weight" in str(e.value)
    f.write_bytes(good)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "bloom"}))
    with pytest.raises(ValueError, match="unsupported model_type 'bloom'"):
        convert(src, tmp_path / "d3")
    (src / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists"):
        convert(src, tmp_path / "exists")
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    convert(src, tmp_path / "exists", force=True)
    assert not (tmp_path / "exists" / "keep.txt").exists() and (tmp_path / "exists" / "config.json").exists()
    for d in ("d1", "d2", "d3"):
        assert not (tmp_path / d).exists()
