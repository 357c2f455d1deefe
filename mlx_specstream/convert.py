"""``specstream convert``: a PyTorch / Hugging Face checkpoint (+ PEFT LoRA, + stream parameters)
-> an mlx-lm-loadable MLX checkpoint plus our stream files.

A straight pipeline: read -> (merge LoRA) -> sanitize -> check -> cast -> (quantize) -> write,
into a temporary folder renamed into place at the end, so a failed conversion leaves nothing
behind and an existing destination is only replaced with ``--force``. ``.bin``/``.pt`` files are
read by a restricted unpickler (no code runs, no torch needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as mlx_lm_load_model

from .checkpoint import (
    DEFAULT_Q_BITS,
    DEFAULT_Q_GROUP_SIZE,
    DTYPES,
    CheckpointError,
    build_checked,
    cast_floats,
    check_names,
    copy_tokenizer_files,
    load_config,
    load_model,
    read_json,
    read_safetensors,
    quantize_model,
    save_adapter,
    save_model,
    weight_files,
)
from .cli import progress_bar
from .errors import notice
from .ggml_types import FLOAT_TYPES
from .gguf import load_gguf, read_gguf, tensor_types
from .loading import resolve_model
from .models import normalize_rope_config
from .streams import SpeculativeStreams
from .streams.files import read_stream_config
from .torch_pickle import load_torch_file, to_mx


def _progress(i: int, n: int, what: str) -> None:
    print(f"\r{progress_bar(i, n)} {i}/{n} {what[:60]:<60}", end="", file=sys.stderr, flush=True)
    if i == n:
        print(file=sys.stderr)


def read_tensors(files, label: str) -> Dict[str, mx.array]:
    out: Dict[str, mx.array] = {}
    for i, f in enumerate(files, 1):
        _progress(i - 1, len(files), f"reading {f.name}")
        if f.suffix == ".safetensors":
            out.update(read_safetensors(f))
        else:
            out.update({k: to_mx(v) for k, v in load_torch_file(f).items()})
        _progress(i, len(files), f"read {f.name}")
    if not out:
        raise CheckpointError(f"no tensors in {label}")
    return out


def _peft_scale(cfg, where: str) -> float:
    """PEFT's scale from ``adapter_config.json``, its values checked before they reach arithmetic:
    ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; what changes the update
    in ways not implemented here (DoRA, per-module ranks or alphas, transposed Conv1D weights) is
    refused by name rather than merged wrongly."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: only LoRA adapters are supported (got peft_type {cfg.get('peft_type')!r})")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= 65536:
        raise CheckpointError(f"{where}: r must be an integer rank in 1..65536, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha == 0:
        raise CheckpointError(f"{where}: lora_alpha must be a finite non-zero number, got {alpha!r}")
    for key in ("use_dora", "fan_in_fan_out"):
        if cfg.get(key) not in (None, False):
            raise CheckpointError(f"{where}: {key} = {cfg[key]!r} is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) not in (None, {}):
            raise CheckpointError(f"{where}: per-module {key} is not supported")
    if cfg.get("use_rslora") not in (None, False, True):
        raise CheckpointError(f"{where}: use_rslora must be true or false, got {cfg['use_rslora']!r}")
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def read_peft(adapter_dir: Path, shapes: Dict[str, Tuple[int, ...]]):
    """A PEFT LoRA adapter: (config, scale, [(module name, A (r, in), B (out, r))]), each pair's
    shapes checked against its config's rank and the base weight's ``shapes`` (a wrong-shaped
    ``lora_B`` would otherwise broadcast onto every row)."""
    cfg = read_json(adapter_dir / "adapter_config.json")
    scale = _peft_scale(cfg, str(adapter_dir / "adapter_config.json"))
    files = sorted(adapter_dir.glob("adapter_model.safetensors")) or sorted(adapter_dir.glob("adapter_model.bin"))
    if not files:
        raise CheckpointError(f"{adapter_dir} has no adapter_model.safetensors/.bin")
    ad = read_tensors(files, str(adapter_dir))
    pairs, r = [], cfg["r"]
    for k, a in ad.items():
        if ".lora_A." not in k:
            continue
        name = k.split(".lora_A.")[0]
        for pre in ("base_model.model.", "base_model."):
            if name.startswith(pre):
                name = name[len(pre) :]
                break
        b = ad.get(k.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise CheckpointError(f"{adapter_dir}: {k} has no matching lora_B")
        w = shapes.get(name + ".weight")
        if w is None:
            raise CheckpointError(f"LoRA adapter targets {name}.weight, which the base checkpoint lacks")
        if a.shape != (r, w[1]) or b.shape != (w[0], r):
            raise CheckpointError(
                f"{adapter_dir}: {name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                f"fit r = {r} and the base weight {tuple(w)} (expected {(r, w[1])} and {(w[0], r)})"
            )
        pairs.append((name, a, b))
    if not pairs:
        raise CheckpointError(f"{adapter_dir}: no lora_A/lora_B tensors found")
    return cfg, scale, pairs


def merge_peft(weights: Dict[str, mx.array], adapter_dir: Path) -> Dict[str, mx.array]:
    """Fuse a PEFT LoRA adapter: ``W += scale · B @ A`` for every adapted linear."""
    _, scale, pairs = read_peft(adapter_dir, {k: tuple(v.shape) for k, v in weights.items()})
    merged = dict(weights)
    for name, a, b in pairs:
        w = merged[name + ".weight"]
        merged[name + ".weight"] = (
            w.astype(mx.float32) + scale * (b.astype(mx.float32) @ a.astype(mx.float32))
        ).astype(w.dtype)
    return merged


def peft_to_mlx_lm_adapter(adapter_dir: Path, dst: Path, num_layers: int, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Keep LoRA separate, in mlx-lm's adapter format (``adapters.safetensors`` +
    ``adapter_config.json``), loadable by ``mlx_lm.utils.load_adapters`` and our ``load``."""
    cfg, scale, pairs = read_peft(adapter_dir, shapes)
    out, keys, layers = {}, set(), set()
    for name, a, b in pairs:
        parts = name.split(".")
        if "layers" not in parts:
            raise CheckpointError(f"--keep-lora adapts decoder layers only; {name} is outside them (use --fuse-lora)")
        li = parts.index("layers")
        layers.add(int(parts[li + 1]))
        keys.add(".".join(parts[li + 2 :]))
        out[f"{name}.lora_a"] = a.T.astype(mx.float32)
        out[f"{name}.lora_b"] = b.T.astype(mx.float32)
    first = min(layers)
    if sorted(layers) != list(range(first, num_layers)):
        raise CheckpointError("--keep-lora needs LoRA on a contiguous run of top layers (use --fuse-lora)")
    mx.save_safetensors(str(dst / "adapters.safetensors"), out)
    (dst / "adapter_config.json").write_text(
        json.dumps(
            {
                "fine_tune_type": "lora",
                "num_layers": num_layers - first,
                "lora_parameters": {"rank": cfg["r"], "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
            },
            indent=2,
        )
    )


def convert_streams(src_json: Path, model, dst: Path, stem: str) -> None:
    """A stream file (PyTorch reference or MLX) checked against ``model`` and written for MLX."""
    config = read_stream_config(src_json)
    weights_file = next(
        (p for p in (src_json.with_suffix(".safetensors"), src_json.with_suffix(".bin")) if p.exists()), None
    )
    if weights_file is None:
        raise CheckpointError(f"{src_json}: no matching .safetensors/.bin with the stream parameters")
    weights = read_tensors([weights_file], str(weights_file))
    streams = SpeculativeStreams(config, model)
    check_names(dict(tree_flatten(streams.parameters())), weights, weights_file, f"{src_json.name} and the model")
    save_adapter(dst, stem, weights, config.to_dict())


PARTIAL = ".specstream-partial-"  # temporary folders of conversions in progress (or killed)
MARKER = ".specstream-converted"  # in every folder a conversion wrote: only such a folder is replaced


def check_destination(src: Path, dst: Path, force: bool) -> None:
    """Refuse, by name, a destination a conversion must not replace: one that is, contains or lies
    inside the source (replacing it would delete the source), the current folder or one above it,
    an existing file, or (with ``--force``) an existing folder this tool did not write."""
    if dst.parent.is_dir():
        _clean_stale(dst)  # first: a model a killed run left hidden is put back before any check
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise CheckpointError(
            f"--mlx-path {dst} is, contains or lies inside the source {src}: refused "
            "(replacing it would delete the source)"
        )
    cwd = Path.cwd().resolve()
    if d == cwd or d in cwd.parents:
        raise CheckpointError(f"--mlx-path {dst} is the current folder or one above it: give a new folder's name")
    if not dst.exists() and not dst.is_symlink():
        return
    if not force:
        raise CheckpointError(f"{dst} exists (use --force to replace it)")
    if not dst.is_dir() or dst.is_symlink():
        raise CheckpointError(f"{dst} exists and is not a folder: refusing to replace it, even with --force")
    if not (dst / MARKER).is_file():
        raise CheckpointError(
            f"{dst} is not a folder a conversion wrote (no {MARKER}): refusing to replace it, "
            "even with --force — remove it yourself or choose another --mlx-path"
        )


def _owner_alive(folder: Path) -> bool:
    try:
        pid = int((folder / ".pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid != os.getpid()


def _clean_stale(dst: Path) -> None:
    """Temporary folders a killed conversion to ``dst`` left beside it (exact names, never another
    destination's, never a running conversion's): a kill between the final renames left the old
    model in an ``-old-`` folder with ``dst`` missing — it is put back; the rest is removed."""
    prefix = f"{PARTIAL}{dst.name}-"
    for stale in sorted(dst.parent.iterdir()):
        rest = stale.name[len(prefix) :] if stale.name.startswith(prefix) else None
        if rest is None or "-" in rest.removeprefix("old-") or not stale.is_dir() or _owner_alive(stale):
            continue
        if rest.startswith("old-") and (stale / "x").is_dir() and not dst.exists():
            (stale / "x").replace(dst)
            print(f"restored {dst} (a conversion was killed while replacing it)", file=sys.stderr)
        shutil.rmtree(stale, ignore_errors=True)


def write_atomically(dst: Path, write) -> None:
    """``write(folder)`` into a temporary folder beside ``dst``, then renamed into place: a
    destination is never left half-written, and a kill at any point leaves the previous copy
    (or its recovery by the next run: :func:`_clean_stale`)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f"{PARTIAL}{dst.name}-", dir=dst.parent))
    try:
        (tmp / ".pid").write_text(str(os.getpid()))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # a normal folder, not mkdtemp's private 0700
        print(f"writing {dst} ...", file=sys.stderr)
        write(tmp)
        (tmp / ".pid").unlink()
        (tmp / MARKER).write_text("written by specstream convert\n")
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{PARTIAL}{dst.name}-old-", dir=dst.parent))
            (old / ".pid").write_text(str(os.getpid()))
            dst.replace(old / "x")
            tmp.replace(dst)
            shutil.rmtree(old)
        else:
            tmp.replace(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_gguf(
    src,
    dst,
    *,
    dtype: Optional[str] = None,
    quantize=False,
    q_bits=DEFAULT_Q_BITS,
    q_group_size=DEFAULT_Q_GROUP_SIZE,
    force=False,
) -> Path:
    """A GGUF file -> a checkpoint folder that we and mlx-lm load: Q4_0/Q4_1/Q8_0 kept as MLX
    affine quantization (group 32); ``dtype`` dequantizes to it; ``quantize`` re-quantizes the
    dequantized weights with our settings."""
    src, dst = resolve_model(src), Path(dst)  # a file, or a known name (smollm2)
    if src.suffix != ".gguf":
        raise CheckpointError(f"--gguf {src} is not a .gguf file")
    check_destination(src, dst, force)
    tic = time.perf_counter()
    g = read_gguf(src)
    dequantize = dtype is not None or quantize
    model, config, tok_folder = load_gguf(src, dequantize=dequantize, dtype=DTYPES[dtype] if dtype else None)
    try:
        config["torch_dtype"] = dtype or "float16"
        if quantize:
            if requantized := [t for t in tensor_types(g) if t not in FLOAT_TYPES]:
                # Measured: SmolLM2-135M's Q4_1 file re-quantized to 4 bits, group 64, decodes
                # garbage ('Blo...b...b') where its kept Q4_1 weights answer; 8 bits keeps it.
                notice(
                    f"[{src.name} is already quantized ({', '.join(requantized)}): re-quantizing "
                    f"compounds the error ({q_bits} bits, group {q_group_size}); a small model can "
                    "lose its answers. Omit -q to keep the file's own quantization]"
                )
            config = quantize_model(model, config, bits=q_bits, group_size=q_group_size)

        def write(tmp: Path) -> None:
            save_model(tmp, model, config)
            for f in tok_folder.iterdir():
                shutil.copy2(f, tmp / f.name)

        write_atomically(dst, write)
    finally:
        shutil.rmtree(tok_folder, ignore_errors=True)
    print(
        f"converted {src.name} ({', '.join(tensor_types(g))}) -> {dst} in {time.perf_counter() - tic:.1f}s",
        file=sys.stderr,
    )
    return dst


def mlx_lm_model(path: Path, dtype: Optional[str]):
    """mlx-lm's model of the same weights: a folder as is; a GGUF converted the way we load it
    (mlx-lm reads folders), into a temporary folder."""
    if path.suffix != ".gguf":
        model = mlx_lm_load_model(path)[0]
        return cast_floats(model, dtype) if dtype else model
    with tempfile.TemporaryDirectory() as tmp:
        on_cpu = mx.default_device() == mx.cpu
        convert_gguf(path, Path(tmp) / "m", dtype=dtype or ("float32" if on_cpu else None))
        model = mlx_lm_load_model(Path(tmp) / "m")[0]
        mx.eval(model.parameters())
    return model


def convert(
    src,
    dst,
    *,
    quantize=False,
    q_bits=DEFAULT_Q_BITS,
    q_group_size=DEFAULT_Q_GROUP_SIZE,
    dtype: Optional[str] = None,
    adapter_path=None,
    keep_lora=False,
    streams_only=False,
    force=False,
    verify=False,
) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"--torch-path {src} is not a folder")
    if not streams_only:
        check_destination(src, dst, force)
    stream_jsons = sorted(src.glob("speculative_streams*.json"))
    if streams_only:
        if src.resolve() == dst.resolve():
            raise CheckpointError(
                f"--streams-only: the destination {dst} is the source: its stream files would be "
                "rewritten from themselves"
            )
        if not (dst / "config.json").exists():
            raise CheckpointError(f"--streams-only needs an already converted base at {dst}")
        if not stream_jsons:
            raise CheckpointError(f"no speculative_streams*.json in {src}")
        model, _ = load_model(dst, lazy=True)
        with tempfile.TemporaryDirectory(dir=dst) as tmp:
            for j in stream_jsons:
                if (dst / j.name).exists() and not force:
                    raise CheckpointError(f"{dst / j.name} exists (use --force to replace it)")
                convert_streams(j, model, Path(tmp), j.stem)
            for f in Path(tmp).iterdir():
                f.replace(dst / f.name)
        return dst
    tic = time.perf_counter()
    config = load_config(src)
    weights = read_tensors(weight_files(src, torch_files=True), str(src))
    adapter = Path(adapter_path) if adapter_path else (src if (src / "adapter_config.json").exists() else None)
    if adapter is not None and not keep_lora:
        weights = merge_peft(weights, adapter)
    model, weights = build_checked(config, weights, src)
    target = DTYPES[dtype] if dtype else None
    if target is None:
        src_dtype = config.get("torch_dtype") or config.get("dtype")
        target = DTYPES.get(src_dtype, next(iter(weights.values())).dtype)
    weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()))
    config = normalize_rope_config(config)
    config["torch_dtype"] = {v: k for k, v in DTYPES.items()}.get(target, "float32")
    if quantize:
        config = quantize_model(model, config, bits=q_bits, group_size=q_group_size)

    def write(tmp: Path) -> None:
        save_model(tmp, model, config)
        copy_tokenizer_files(src, tmp)
        if adapter is not None and keep_lora:
            peft_to_mlx_lm_adapter(adapter, tmp, len(model.layers), {k: tuple(v.shape) for k, v in weights.items()})
        for j in stream_jsons:
            convert_streams(j, model, tmp, j.stem)

    write_atomically(dst, write)
    print(
        f"converted {src} -> {dst} in {time.perf_counter() - tic:.1f}s; peak memory "
        f"{mx.get_peak_memory() / 1e9:.2f} GB",
        file=sys.stderr,
    )
    if verify:
        print(
            f"max |logit difference| vs PyTorch: {verify_against_torch(src, dst, adapter if not keep_lora else None):.3g}"
        )
    return dst


def verify_against_torch(src: Path, dst: Path, adapter: Optional[Path] = None, prompts=None) -> float:
    """Run the transformers model and the converted MLX model on a few prompts."""
    try:
        import torch
        import transformers
    except ImportError:
        raise CheckpointError("--verify needs torch and transformers (pip install -e '.[torch]')") from None
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    if adapter is not None:
        import peft

        hf = peft.PeftModel.from_pretrained(hf, adapter).merge_and_unload()
    ours, cfg = load_model(dst)
    rng = np.random.RandomState(0)
    prompts = prompts or [rng.randint(3, cfg["vocab_size"], size=n).tolist() for n in (5, 17, 33)]
    worst = 0.0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits.float().numpy()
        out = np.array(ours(mx.array([p])).astype(mx.float32))
        worst = max(worst, float(np.abs(out - ref).max()))
    return worst


def setup_arg_parser(parser=None):
    p = parser or argparse.ArgumentParser(description="Convert a PyTorch/HF checkpoint to MLX")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--torch-path", help="HF model folder (+ speculative_streams*, + PEFT adapter)")
    src.add_argument("--gguf", help="a GGUF file (Q4_0, Q4_1, Q8_0, F16, BF16, F32 tensors)")
    p.add_argument("--mlx-path", required=True, help="destination folder")
    p.add_argument("-q", "--quantize", action="store_true")
    p.add_argument("--q-bits", type=int, default=DEFAULT_Q_BITS, choices=[4, 8])
    p.add_argument("--q-group-size", type=int, default=DEFAULT_Q_GROUP_SIZE, choices=[32, 64, 128])
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the source's dtype")
    p.add_argument("--adapter-path", default=None, help="PEFT LoRA adapter folder (default: in --torch-path)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fuse-lora", action="store_true", help="merge the LoRA into the base (default)")
    g.add_argument("--keep-lora", action="store_true", help="write the LoRA as an mlx-lm adapter instead")
    p.add_argument("--streams-only", action="store_true", help="convert only stream files into an existing base")
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--verify", action="store_true", help="compare logits with PyTorch after converting")
    return p


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    if args.gguf:
        convert_gguf(
            args.gguf,
            args.mlx_path,
            dtype=args.dtype,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            force=args.force,
        )
        return 0
    convert(
        args.torch_path,
        args.mlx_path,
        quantize=args.quantize,
        q_bits=args.q_bits,
        q_group_size=args.q_group_size,
        dtype=args.dtype,
        adapter_path=args.adapter_path,
        keep_lora=args.keep_lora,
        streams_only=args.streams_only,
        force=args.force,
        verify=args.verify,
    )
    return 0
