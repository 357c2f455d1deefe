"""Checkpoints in mlx-lm's layout (HF tensor names, config.json): finding, reading, strict
loading, casting, quantizing, saving; and the small adapter files drafters keep beside a base.

Imports only the model plugins: drafters and verbs build on this module, never the reverse.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub import snapshot_download
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import save_model as save_mlx_lm_weights

from .models import UnsupportedModelError, build_model, normalize_rope_config
from .errors import UserError

DEFAULT_Q_BITS = 4  # weight quantization (convert -q, load(quantize=...)), as mlx-lm's
DEFAULT_Q_GROUP_SIZE = 64
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointError(UserError):
    """A checkpoint that cannot be used: the message names the file or tensor at fault."""


# ---------------------------------------------------------------- finding


def get_model_path(path_or_hf_repo: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id fetched with ``snapshot_download``."""
    path = Path(path_or_hf_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; expected a model folder")
        return path
    repo = str(path_or_hf_repo)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise FileNotFoundError(f"model folder {repo!r} does not exist (and is not a hub repo id)")
    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=["*.json", "model*.safetensors", "*.model", "*.txt", "*.jinja", "speculative_streams*"],
            )
        )
    except Exception as e:  # offline, unknown repo, auth...: say which and why
        raise CheckpointError(
            f"could not fetch {repo!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine is offline, pass a local model folder instead."
        ) from e


ASSETS = Path(__file__).resolve().parent / "assets"  # the package's embedded models and shipped adapters


def default_model_path(name: str = "default") -> Path:
    """An embedded model: ``default`` (the 7M model with its streams) or ``draft`` (its draft)."""
    path = ASSETS / name
    if not (path / "config.json").exists():
        raise CheckpointError(f"the embedded {name} model is missing from {path}; pass --model")
    return path


def weight_files(path: Path, torch_files: bool = False) -> List[Path]:
    """The weight files of a checkpoint folder: those a shard index lists, else
    ``model*.safetensors`` (and, with ``torch_files``, ``pytorch_model*.bin`` / ``*.pt``)."""
    for name in SHARD_INDEXES if torch_files else SHARD_INDEXES[:1]:
        index = path / name
        if index.exists():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise CheckpointError(f"{index} is malformed: {e}") from e
            unsafe = [n for n in names if not isinstance(n, str) or Path(n).is_absolute() or ".." in Path(n).parts]
            if unsafe:
                raise CheckpointError(f"{index} names shards outside its folder: {unsafe[:3]}")
            missing = [n for n in names if not (path / n).exists()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {missing}")
            return _regular([path / n for n in names], index)
    files = sorted(path.glob("model*.safetensors"))
    if not files and torch_files:
        files = sorted(path.glob("pytorch_model*.bin")) + sorted(path.glob("*.pt"))
    if not files:
        hint = (
            "no model*.safetensors, pytorch_model*.bin or *.pt"
            if torch_files
            else "no model*.safetensors (PyTorch .bin/.pt checkpoints: run `specstream convert`)"
        )
        raise CheckpointError(f"{hint} in {path}")
    return _regular(files, path)


def _regular(files: List[Path], where: Path) -> List[Path]:
    """Weight files must be regular files: a FIFO would block a read forever, a directory (or a
    shard index naming ".") is no weight file."""
    bad = [f for f in files if not f.is_file()]
    if bad:
        kinds = ", ".join(f"{f.name or f} ({'a directory' if f.is_dir() else 'not a regular file'})" for f in bad[:3])
        raise CheckpointError(f"weight files of {where} must be regular files: {kinds}")
    return files


# ---------------------------------------------------------------- reading


def read_json(file: Path) -> Any:
    if Path(file).exists() and not Path(file).is_file():  # a FIFO would block the read forever
        raise CheckpointError(f"{file} is not a regular file")
    try:
        return json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    except ValueError as e:  # e.g. an integer past Python's 4,300-digit limit
        raise CheckpointError(f"{file}: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{file}: JSON nested too deeply") from None


def load_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{file} not found: a model folder needs config.json")
    config = read_json(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return config


_ST_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


def check_safetensors(file: Path) -> None:
    """Check a safetensors header against the file before MLX views a byte of it (MLX's reader
    accepts duplicate names and overlapping spans, i.e. wrong weights): one entry per name, known
    dtypes, every span inside the data, sized by its shape, spans neither overlapping nor leaving gaps."""

    def fail(why):
        raise CheckpointError(f"cannot read {file}: corrupt or truncated safetensors ({why})")

    size = Path(file).stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            fail("no header")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_SAFETENSORS_HEADER):
            fail(f"a header of {n} bytes in a file of {size}")
        raw = f.read(n)

    def no_duplicates(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            fail(f"the header names {sorted({k for k in names if names.count(k) > 1})[:3]} more than once")
        return dict(pairs)

    try:
        header = json.loads(raw, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        fail(f"the header is not JSON: {e}")
    if not isinstance(header, dict):
        fail("the header is not an object")
    data_len, spans = size - 8 - n, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (
            isinstance(info, dict)
            and info.get("dtype") in _ST_ITEMSIZE
            and isinstance(info.get("shape"), list)
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
            and isinstance(info.get("data_offsets"), list)
            and len(info["data_offsets"]) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"])
        ):
            fail(f"tensor {name!r}: dtype, shape or data_offsets malformed")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_len or end - begin != math.prod(info["shape"]) * _ST_ITEMSIZE[info["dtype"]]:
            fail(
                f"tensor {name!r}: bytes {begin}..{end} do not hold its shape {info['shape']} "
                f"{info['dtype']} inside {data_len} bytes of data"
            )
        spans.append((begin, end, name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            fail(f"tensor {name!r} {'overlaps the one before it' if begin < at else 'leaves a gap before it'}")
        at = end


def read_safetensors(file: Path) -> Dict[str, mx.array]:
    check_safetensors(file)
    try:
        return mx.load(str(file))
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: corrupt or truncated safetensors ({e})") from e


def load_weights(path: Path) -> Dict[str, mx.array]:
    weights: Dict[str, mx.array] = {}
    for f in weight_files(path):
        weights.update(read_safetensors(f))
    return weights


def _is_float(a) -> bool:
    return mx.issubdtype(a.dtype, mx.floating)


def check_names(expected: Mapping[str, mx.array], weights: Mapping[str, mx.array], where, against: str) -> None:
    """Strict name and shape check of ``weights`` against a module's parameters, every problem
    named: ``weights in WHERE do not match AGAINST: missing ... | unexpected ... | wrong shapes``."""
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    # a dtype the model cannot use: a float weight stored (or declared) as integers or booleans
    # has the same byte count, so only its kind tells (packed quantized weights are integers in both)
    kinds = [
        f"{k}: checkpoint {weights[k].dtype} where the model needs a {'float' if _is_float(v) else str(v.dtype)} tensor"
        for k, v in expected.items()
        if k in weights and _is_float(weights[k]) != _is_float(v)
    ]
    problems = []
    if kinds:
        problems.append("wrong dtypes: " + "; ".join(kinds[:8]))
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"weights in {where} do not match {against}: " + " | ".join(problems))


def _quant_predicate(config_q: dict, weights: dict) -> Callable:
    def predicate(p, m):
        if p in config_q:  # per-layer override (mlx-lm's mixed recipes)
            return config_q[p]
        return hasattr(m, "to_quantized") and f"{p}.scales" in weights

    return predicate


def build_checked(config: dict, weights: Dict[str, mx.array], where: Path) -> Tuple[nn.Module, dict]:
    """The family's model for ``config``, its sanitized weights checked strictly (not loaded)."""
    if "tie_word_embeddings" not in config:
        config["tie_word_embeddings"] = "lm_head.weight" not in weights
    eos = config.get("eos_token_id")
    vocab = config.get("vocab_size")
    ids = eos if isinstance(eos, list) else [eos]
    if eos is not None and not (
        ids
        and all(
            isinstance(e, int) and not isinstance(e, bool) and 0 <= e < (vocab if isinstance(vocab, int) else 1 << 22)
            for e in ids
        )
    ):
        raise CheckpointError(
            f"{where / 'config.json'}: eos_token_id must be a token id (0..vocab_size-1) or a "
            f"non-empty list of them, got {eos!r}"
        )
    td = config.get("torch_dtype", config.get("dtype"))
    if td is not None and td not in DTYPES:
        raise CheckpointError(f"{where / 'config.json'}: torch_dtype {td!r} is not a float type ({', '.join(DTYPES)})")
    try:
        model = build_model(config)
    except UnsupportedModelError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{where / 'config.json'}: {e}") from e
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}  # recomputed, never loaded
    if hasattr(model, "sanitize"):  # the family's own renames and drops (mlx-lm's, where it has one)
        weights = model.sanitize(weights)
    if (q := config.get("quantization")) is not None:
        if (
            not isinstance(q, dict)
            or q.get("bits") not in QUANT_BITS + (2, 3, 5, 6)
            or q.get("group_size") not in QUANT_GROUP_SIZES
        ):
            raise CheckpointError(
                f"{where / 'config.json'}: quantization {q!r} is not {{bits: 2..8, group_size: "
                f"{'/'.join(map(str, QUANT_GROUP_SIZES))}}}"
            )
        if not any(k.endswith(".scales") for k in weights):
            raise CheckpointError(
                f"{where / 'config.json'} declares quantization {q!r} but the weights are not "
                "quantized (no .scales): remove the key"
            )
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"], class_predicate=_quant_predicate(q, weights))
    check_names(dict(tree_flatten(model.parameters())), weights, where, "config.json")
    return model, weights


def load_model(path: Path, *, lazy: bool = False, dtype: Optional[mx.Dtype] = None) -> Tuple[nn.Module, dict]:
    """The base model of a converted folder (strict: every tensor present, named, shaped)."""
    config = load_config(path)
    model, weights = build_checked(config, load_weights(path), path)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=False)
    if (path / "adapter_config.json").exists() and (path / "adapters.safetensors").exists():
        # A kept (unfused) LoRA in mlx-lm's adapter format, applied with mlx-lm's own loader.
        load_adapters(model, str(path))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def model_dtype(model) -> mx.Dtype:
    """The model's float dtype (a quantized model's scales tell it); adapters run in it."""
    for _, v in tree_flatten(model.parameters()):
        if v.dtype in DTYPES.values():
            return v.dtype
    return mx.float16


# ---------------------------------------------------------------- transforming


def cast_floats(model: nn.Module, dtype: Union[str, mx.Dtype]) -> nn.Module:
    """Cast a model's float parameters in place (quantized weights and int tensors untouched)."""
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    return model


def quantize_model(
    model: nn.Module,
    config: dict,
    *,
    bits: int = DEFAULT_Q_BITS,
    group_size: int = DEFAULT_Q_GROUP_SIZE,
    recipe: Optional[str] = None,
) -> dict:
    """Affine-quantize ``model`` in place; return the config with mlx-lm's ``quantization`` keys.

    ``recipe="mixed_4_8"`` keeps embeddings and the LM head at 8 bits, the rest at ``bits``.
    Layers whose input width is not a multiple of ``group_size`` stay in float.
    """
    if bits not in QUANT_BITS:
        raise UserError(f"bits must be one of {QUANT_BITS}, got {bits}")
    if group_size not in QUANT_GROUP_SIZES:
        raise UserError(f"group_size must be one of {QUANT_GROUP_SIZES}, got {group_size}")
    if recipe not in (None, "mixed_4_8"):
        raise UserError(f"unknown quantization recipe {recipe!r} (known: mixed_4_8)")
    config = copy.deepcopy(config)
    q: Dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}

    def predicate(p, m):
        if not hasattr(m, "to_quantized") or m.weight.shape[-1] % group_size:
            return False
        if recipe == "mixed_4_8" and (p.endswith("embed_tokens") or p.endswith("lm_head")):
            q[p] = {"group_size": group_size, "bits": 8}
            return q[p]
        return True

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    config["quantization"] = q
    config["quantization_config"] = q
    return config


# ---------------------------------------------------------------- writing


def save_model(path: Union[str, Path], model: nn.Module, config: dict) -> None:
    """Write weights (sharded if large, with index) and config.json as mlx-lm does."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_mlx_lm_weights(path, model)
    # Older rope keys at top level too: mlx-lm (and older transformers) read only those.
    config = normalize_rope_config(config)
    config.pop("_name_or_path", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside ``folder``."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            if not inside(src / name, src):
                raise CheckpointError(f"{src / name} links outside {src}: refused")
            shutil.copy2(src / name, dst / name)


# ---------------------------------------------------------------- adapter files


def save_adapter(folder: Path, stem: str, weights: Mapping[str, mx.array], config: dict) -> Path:
    """``STEM.safetensors`` (float weights stored as float16: a few thousand to a few million
    parameters, whatever the base is quantized to) and ``STEM.json``. Returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = {k: v.astype(mx.float16) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    save_safetensors_atomically(folder / f"{stem}.safetensors", half, {"format": "mlx"})
    write_atomically(folder / f"{stem}.json", json.dumps(config, indent=2) + "\n")
    return folder / f"{stem}.json"


def write_atomically(file: Path, text: str) -> None:
    """A file written whole or not at all: a temporary file beside it, renamed over it."""
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def save_safetensors_atomically(file: Path, arrays: Mapping[str, mx.array], metadata: Optional[dict] = None) -> None:
    tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.safetensors")  # MLX appends .safetensors otherwise
    mx.save_safetensors(str(tmp), dict(arrays), metadata=metadata or {})
    os.replace(tmp, file)


def load_adapter_weights(
    module: nn.Module, weights_file: Path, against: str, dtype: mx.Dtype, extra: Sequence[str] = ()
) -> Dict[str, mx.array]:
    """Load an adapter's weights into ``module`` strictly, cast to the base's ``dtype``; returns
    the tensors named in ``extra`` (not parameters, e.g. a token ranking) found in the file."""
    if not Path(weights_file).exists():
        raise CheckpointError(f"{weights_file} not found (adapter config without its weights)")
    weights = read_safetensors(weights_file)
    found = {k: weights.pop(k) for k in extra if k in weights}
    check_names(dict(tree_flatten(module.parameters())), weights, weights_file, against)
    bad = [
        k
        for k, v in sorted(weights.items())
        if mx.issubdtype(v.dtype, mx.floating) and not mx.all(mx.isfinite(v)).item()
    ]
    if bad:
        raise CheckpointError(
            f"{weights_file}: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} hold NaN or "
            "infinite values (a diverged training run?): refusing to attach the adapter"
        )
    module.load_weights([(k, v.astype(dtype)) for k, v in weights.items()])
    mx.eval(module.parameters())
    return found


# ---------------------------------------------------------------- base fingerprint

# Tensors whose statistics identify a base: the embedding, the first and last layers (the last
# moves most in fine-tuning) and the final norm; HF names, found in every supported family.
_FINGERPRINT_TENSORS = (
    "embed_tokens",
    "layers.0.self_attn.q_proj",
    "layers.{last}.self_attn.o_proj",
    "layers.{last}.mlp.down_proj",
    "norm",
)
FINGERPRINT_RTOL = 0.03  # 4-bit requantization moves a tensor's RMS by ~1%; another fine-tune by more


def base_fingerprint(model) -> dict:
    """What identifies the weights an adapter was trained on, in any format they come in (GGUF,
    float32/float16 folder, re-quantized): the shape of the model and, for a few tensors, the RMS
    and mean of their (dequantized) values."""
    args = model.args
    inner = dict(model.named_modules())
    sig = []
    for pattern in _FINGERPRINT_TENSORS:
        name = pattern.format(last=args.num_hidden_layers - 1)
        m = next((mod for path, mod in inner.items() if path == name or path.endswith("." + name)), None)
        if m is None:
            continue
        w = m.weight
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(w, m.scales, m.biases, m.group_size, m.bits)
        w = w.astype(mx.float32)
        sig.append([name, round(mx.sqrt(mx.mean(w * w)).item(), 6), round(mx.mean(w).item(), 7)])
    return {
        "model_type": getattr(args, "model_type", None),
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "vocab_size": args.vocab_size,
        "tensors": sig,
    }


def fingerprint_mismatch(want: Mapping, have: Mapping) -> Optional[str]:
    """None when ``have`` (a model's fingerprint) matches ``want`` (an adapter's record), else what differs."""
    for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        if want.get(k) != have.get(k):
            return f"{k} {have.get(k)!r}, trained on {want.get(k)!r}"
    got = {name: (rms, mean) for name, rms, mean in have.get("tensors", [])}
    try:
        for name, rms, mean in want.get("tensors", []):
            if name not in got:
                return f"no tensor {name}"
            r, m = got[name]
            if abs(r - rms) > FINGERPRINT_RTOL * rms or abs(m - mean) > FINGERPRINT_RTOL * rms:
                return f"{name} RMS {r:.4g} / mean {m:.3g}, trained on {rms:.4g} / {mean:.3g}"
    except (TypeError, ValueError):
        return "the recorded base fingerprint is malformed"
    return None
