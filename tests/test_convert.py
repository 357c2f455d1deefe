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

from convert.pytorch_reference import (
    SpeculativeStreamsTorch,
    forward_with_streams,
    save_streams_torch,
    speculative_greedy,
)  # noqa: E402
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


@pytest.mark.parametrize("keep,rslora", [(False, False), (True, False), (False, True), (True, True)])
def test_peft_lora_merged_and_kept(tmp_path, sp_model_file, keep, rslora):
    import peft

    src = tmp_path / "src"
    hf = make_hf_model("llama", src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[2, 3],
        use_rslora=rslora,
    )  # rsLoRA: alpha / sqrt(r)
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


def _peft_adapter(tmp_path, sp_model_file):
    import peft

    src = tmp_path / "src"
    hf = make_hf_model("llama", src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    return src, tmp_path / "adapter"


def test_peft_config_values_and_shapes_are_checked_before_any_arithmetic(tmp_path, sp_model_file):
    """r 0, a string or list alpha, DoRA, per-module ranks: named errors, not a division by zero,
    a TypeError or a wrong merge; a lora_B of the wrong shape used to broadcast onto every row of
    the weight with exit 0."""
    from safetensors.numpy import load_file, save_file

    src, adapter = _peft_adapter(tmp_path, sp_model_file)
    good = json.loads((adapter / "adapter_config.json").read_text())
    for change, named in [
        ({"r": 0}, "r must be an integer"),
        ({"r": True}, "r must be an integer"),
        ({"lora_alpha": "8"}, "lora_alpha must be"),
        ({"lora_alpha": [8]}, "lora_alpha must be"),
        ({"lora_alpha": 0}, "lora_alpha must be"),
        ({"use_dora": True}, "use_dora"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"use_rslora": "yes"}, "use_rslora"),
        ({"r": 8}, "do not fit r = 8"),
    ]:
        (adapter / "adapter_config.json").write_text(json.dumps({**good, **change}))
        for keep in (False, True):
            dst = tmp_path / f"dst-{keep}"
            with pytest.raises(CheckpointError, match=named):
                convert(src, dst, adapter_path=adapter, keep_lora=keep)
            assert not dst.exists()
    (adapter / "adapter_config.json").write_text(json.dumps(good))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    k = next(k for k in tensors if "lora_B" in k)
    save_file({**tensors, k: tensors[k][:1]}, str(adapter / "adapter_model.safetensors"))  # (1, r): broadcasts
    with pytest.raises(CheckpointError, match=r"lora_B \(1, 4\)"):
        convert(src, tmp_path / "dst-b", adapter_path=adapter)
    save_file({n: t for n, t in tensors.items() if n != k}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="no matching lora_B"):
        convert(src, tmp_path / "dst-c", adapter_path=adapter)


def test_verify_flag_reports_small_difference(tmp_path, sp_model_file, capsys):
    from mlx_specstream.cli import main

    src = tmp_path / "src"
    make_hf_model("phi", src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    assert (
        main(
            ["convert", "--torch-path", str(src), "--mlx-path", str(tmp_path / "dst"), "--verify", "--dtype", "float32"]
        )
        == 0
    )
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


@pytest.mark.parametrize(
    "name,cast",
    [
        ("model.embed_tokens.weight", lambda t: t.view(torch.int32)),
        ("model.layers.0.mlp.up_proj.weight", lambda t: t > 0),
    ],
)
def test_a_bin_weight_of_a_dtype_the_model_cannot_use_is_named(tmp_path, name, cast):
    """A torch ``.bin`` whose float weight is stored as an Int or Bool storage converted with exit
    0 into an integer embedding before."""
    src = tmp_path / "src"
    make_hf_model("llama", src, safe_serialization=False)
    sd = torch.load(src / "pytorch_model.bin", weights_only=True)
    sd[name] = cast(sd[name].float())
    torch.save(sd, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"wrong dtypes: {name}"):
        convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


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
    assert "model.layers.0.mlp.up_proj.weight" in str(e.value) and "model.layers.1.self_attn.q_proj.weight" in str(
        e.value
    )
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
    with pytest.raises(CheckpointError, match="not a folder a conversion wrote"):
        convert(src, tmp_path / "exists", force=True)  # a folder this tool did not write is never replaced
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    convert(src, tmp_path / "ours")
    (tmp_path / "ours" / "stale.txt").write_text("old")
    convert(src, tmp_path / "ours", force=True)
    assert not (tmp_path / "ours" / "stale.txt").exists() and (tmp_path / "ours" / "config.json").exists()
    for d in ("d1", "d2", "d3"):
        assert not (tmp_path / d).exists()


def _crafted_bin(path, size, stride, offset=0, n_floats=4, storage_bytes=None):
    """A torch zip checkpoint whose one tensor claims ``size``/``stride``/``offset`` over a storage
    of ``n_floats`` floats — written by hand, as an attacker would."""
    import collections
    import io
    import pickle
    import zipfile

    storage = object()

    class View:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", n_floats) if obj is storage else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"w": View()})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", storage_bytes if storage_bytes is not None else b"\0" * (4 * n_floats))
    return path


@pytest.mark.parametrize(
    "size,stride,offset,storage_bytes,msg",
    [
        ((1000,), (1,), 0, None, "outside its storage"),  # reads past the end: heap bytes before the fix
        ((2, 2), (1, 10**12), 0, None, "outside its storage"),  # huge stride: a segfault before the fix
        ((4,), (-1,), 3, None, "not a valid view"),  # negative stride
        ((4,), (1,), -2, None, "not a valid view"),  # negative offset
        ((2,), (1,), 3, None, "outside its storage"),  # offset + size past the end
        ((4,), (1,), 0, b"\0" * 15, "whole number"),  # storage not a multiple of the element size
    ],
)
def test_unpickler_refuses_views_outside_their_storage(tmp_path, size, stride, offset, storage_bytes, msg):
    from mlx_specstream.torch_pickle import load_torch_file

    f = _crafted_bin(tmp_path / "w.bin", size, stride, offset, storage_bytes=storage_bytes)
    with pytest.raises(UnsafeCheckpointError, match=msg):
        load_torch_file(f)
    ok = _crafted_bin(tmp_path / "ok.bin", (2, 2), (2, 1))  # the same construction, in bounds, loads
    assert load_torch_file(ok)["w"].shape == (2, 2)


def _crafted_views(path, views, n_floats=4):
    """A torch zip checkpoint of hand-made views: ``views`` maps a name to ``(base, offset, size,
    stride)`` where ``base`` is ``"storage"`` or the name of another view (a view of a view)."""
    import collections
    import io
    import pickle
    import zipfile

    storage = object()
    made = {}

    class View:
        def __init__(self, base, offset, size, stride):
            self.args = (storage if base == "storage" else made[base], offset, size, stride)

        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, self.args + (False, collections.OrderedDict()))

    for name, spec in views.items():
        made[name] = View(*spec)

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", n_floats) if obj is storage else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump(made)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", np.arange(n_floats, dtype=np.float32).tobytes())
    return path


def test_unpickler_refuses_a_view_of_a_view(tmp_path):
    """A rebuilt (2, 8) tensor used as another view's storage: slicing it skips whole rows, so the
    element-count check passed and the view read heap bytes (or segfaulted)."""
    from mlx_specstream.torch_pickle import load_torch_file

    f = _crafted_views(
        tmp_path / "w.bin", {"a": ("storage", 0, (2, 8), (8, 1)), "b": ("a", 1, (16,), (1,))}, n_floats=16
    )
    with pytest.raises(UnsafeCheckpointError, match="view of a view"):
        load_torch_file(f)


@pytest.mark.parametrize(
    "views,msg",
    [
        ({"a": ("storage", 0, (16384, 32768), (0, 0))}, "overlapping views"),  # 2 GiB from 16 bytes
        ({f"w{i}": ("storage", 0, (1 << 18,), (0,)) for i in range(4000)}, "overlapping views"),  # one storage 4000x
        ({"a": ("storage", 0, (2, 2), (1, 1 << 63))}, "not a valid view"),  # strides past 2**63
    ],
)
def test_unpickler_bounds_what_it_builds(tmp_path, views, msg):
    from mlx_specstream.torch_pickle import load_torch_file

    f = _crafted_views(tmp_path / "w.bin", views)
    with pytest.raises(UnsafeCheckpointError, match=msg):
        load_torch_file(f)


def test_unpickler_refuses_a_deeply_nested_size(tmp_path):
    import struct
    import zipfile

    from mlx_specstream.torch_pickle import load_torch_file

    f = _crafted_views(tmp_path / "w.bin", {"a": ("storage", 0, (12345678,), (1,))})
    with zipfile.ZipFile(f) as zf:
        pkl, data = zf.read("archive/data.pkl"), zf.read("archive/data/0")
    one = b"J" + struct.pack("<i", 12345678) + b"\x85"  # BININT, TUPLE1: the size (12345678,)
    assert pkl.count(one) == 1
    deep = pkl.replace(one, b")" + b"\x85" * 200_000)  # EMPTY_TUPLE wrapped 200,000 times, iteratively
    with zipfile.ZipFile(f, "w") as zf:
        zf.writestr("archive/data.pkl", deep)
        zf.writestr("archive/data/0", data)
    with pytest.raises(UnsafeCheckpointError, match="not a valid view"):
        load_torch_file(f)


def test_unpickler_loads_tied_views_of_one_storage(tmp_path):
    from mlx_specstream.torch_pickle import load_torch_file

    f = _crafted_views(
        tmp_path / "w.bin",
        {"a": ("storage", 0, (2, 4), (4, 1)), "b": ("storage", 0, (2, 4), (4, 1)), "t": ("storage", 0, (4, 2), (1, 4))},
        n_floats=8,
    )
    got = load_torch_file(f)
    np.testing.assert_array_equal(got["a"], np.arange(8).reshape(2, 4))
    np.testing.assert_array_equal(got["t"], np.arange(8).reshape(2, 4).T)


def test_unpickler_refuses_zip_bombs(tmp_path):
    import zipfile

    from mlx_specstream.torch_pickle import load_torch_file

    f = _crafted_bin(tmp_path / "w.bin", (4,), (1,))
    bomb = tmp_path / "bomb.bin"
    with zipfile.ZipFile(f) as src, zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        dst.writestr("archive/data.pkl", src.read("archive/data.pkl"))
        dst.writestr("archive/data/0", b"\0" * (8 << 20))  # 8 MB of zeros in a few KB
    with pytest.raises(UnsafeCheckpointError, match="inflates"):
        load_torch_file(bomb)


def test_convert_never_deletes_the_source_and_leaves_no_hidden_partials(tmp_path):
    import json as _json
    import os
    import shutil

    src = tmp_path / "src"
    make_hf_model("llama", src)
    before = sorted(p.name for p in src.iterdir())
    for dst in (src, tmp_path, src / "inside"):  # is, contains, lies inside the source
        with pytest.raises(CheckpointError, match="delete the source"):
            convert(src, dst, force=True)
        assert sorted(p.name for p in src.iterdir()) == before
    # a killed conversion's temporary folder is named, and removed by the next run
    stale = tmp_path / ".specstream-partial-out-killed"
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"\0" * 1000)
    out = convert(src, tmp_path / "out")
    assert not stale.exists()
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~_umask())
    # links outside the source and absolute shard paths are refused, nothing written
    evil = tmp_path / "evil"
    shutil.copytree(src, evil)
    (evil / "tokenizer_config.json").unlink(missing_ok=True)
    os.symlink("/etc/passwd", evil / "tokenizer_config.json")
    with pytest.raises(CheckpointError, match="links outside"):
        convert(evil, tmp_path / "evil-out")
    assert not (tmp_path / "evil-out").exists()
    (evil / "tokenizer_config.json").unlink()
    shard = next(evil.glob("*.safetensors"))
    (evil / "model.safetensors.index.json").write_text(
        _json.dumps({"weight_map": {"x": "/etc/passwd", "y": shard.name}})
    )
    with pytest.raises(CheckpointError, match="outside its folder"):
        convert(evil, tmp_path / "evil-out")
    assert not (tmp_path / "evil-out").exists()


def _umask():
    import os

    m = os.umask(0)
    os.umask(m)
    return m


def test_convert_destinations_that_would_lose_data_are_refused(tmp_path, monkeypatch):
    """--force replaces only a folder a conversion wrote; a file, the current folder, the source of
    --streams-only are refused by name; stale-folder clean-up matches exact names only and spares a
    running conversion's folder; a model hidden by a kill between the final renames is put back."""
    import os
    import subprocess

    src = tmp_path / "src"
    make_hf_model("llama", src)
    (tmp_path / "a_file").write_text("precious")
    with pytest.raises(CheckpointError, match="not a folder"):
        convert(src, tmp_path / "a_file", force=True)
    assert (tmp_path / "a_file").read_text() == "precious"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(CheckpointError, match="current folder"):
        convert(src, Path("."), force=True)
    with pytest.raises(CheckpointError, match="current folder|delete the source"):
        convert(src, Path(".."), force=True)
    monkeypatch.chdir(tmp_path)
    out = convert(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match="is the source"):
        convert(out, out, streams_only=True, force=True)
    # another destination's partial ("outX"), a glob-like name, and a running conversion's: kept
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        theirs = [
            tmp_path / ".specstream-partial-outX-abc",
            tmp_path / ".specstream-partial-out-x-abc",
            tmp_path / ".specstream-partial-out-running",
        ]
        for d in theirs:
            d.mkdir()
        (theirs[2] / ".pid").write_text(str(sleeper.pid))
        (tmp_path / "out*").mkdir()
        convert(src, tmp_path / "out", force=True)
        assert all(d.exists() for d in theirs)
    finally:
        sleeper.kill()
    # killed between the renames: the old copy hidden, the destination missing -> put back
    hidden = tmp_path / ".specstream-partial-out-old-k1"
    hidden.mkdir()
    (tmp_path / "out").replace(hidden / "x")
    with pytest.raises(CheckpointError, match="exists"):
        convert(src, tmp_path / "out")  # restored first, then an existing destination
    assert (tmp_path / "out" / "config.json").exists() and not hidden.exists()
    assert os.path.isfile(tmp_path / "out" / ".specstream-converted")


@pytest.mark.parametrize("keep", [False, True])
def test_every_convert_option_gives_a_folder_every_verb_loads(tmp_path, sp_model_file, keep):
    """A PEFT LoRA (merged or kept) with a stream file beside it: the converted folder loads with
    its streams attached and speculates to its own plain greedy output."""
    import peft

    from mlx_specstream.checkpoint import load_model as load_base_model
    from mlx_specstream.decode import generate_step, tree_generate_step
    from mlx_specstream.streams import SpeculativeStreams, StreamConfig, save_streams

    src = tmp_path / "src"
    hf = make_hf_model("llama", src)
    shutil.copy(sp_model_file, src / "tokenizer.model")
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    base, _ = load_base_model(src)
    save_streams(src, SpeculativeStreams(StreamConfig(num_streams=2, num_msa_layers=1, lora_rank=4), base))
    dst = convert(src, tmp_path / "dst", adapter_path=tmp_path / "adapter", keep_lora=keep)
    model, _ = load(str(dst))
    assert hasattr(model, "drafter")
    prompt = mx.array(IDS[0])
    ref = [t for t, _ in generate_step(prompt, model.base, max_tokens=12)]
    got = [t for r in tree_generate_step(prompt, model.base, model.drafter, max_tokens=12) for t in r.tokens]
    assert got[:12] == ref
