"""Loading, saving and quantizing checkpoints in mlx-lm's layout (HF tensor names, config.json)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .models import UnsupportedModelError, build_model, normalize_rope_config

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json",
)
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file or tensor at fault."""


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
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=["*.json", "model*.safetensors", "*.model", "*.txt", "*.jinja",
                                "speculative_streams*"],
            )
        )
    except Exception as e:  # offline, unknown repo, auth...: say which and why
        raise CheckpointError(
            f"could not fetch {repo!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine is offline, pass a local model folder instead."
        ) from e


def load_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise CheckpointError(f"{file} not found: a model folder needs config.json")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    return config


def load_safetensors(file: Path) -> Dict[str, mx.array]:
    try:
        return mx.load(str(file))
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: corrupt or truncated safetensors ({e})") from e


def load_weights(path: Path) -> Dict[str, mx.array]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index} is malformed: {e}") from e
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are missing: {missing}")
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no model*.safetensors in {path} (PyTorch .bin/.pt checkpoints: run `specstream convert`)"
        )
    weights = {}
    for f in files:
        weights.update(load_safetensors(f))
    return weights


def _quant_predicate(config_q: dict, weights: dict) -> Callable:
    def predicate(p, m):
        if p in config_q:  # per-layer override (mlx-lm's mixed recipes)
            return config_q[p]
        return hasattr(m, "to_quantized") and f"{p}.scales" in weights

    return predicate


def check_weights(model: nn.Module, weights: Dict[str, mx.array], where: Path) -> None:
    """Strict name and shape check, with every problem named."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and tuple(weights[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:8]))
    if problems:
        raise CheckpointError(f"weights in {where} do not match config.json: " + " | ".join(problems))


def load_model(
    path: Path, *, lazy: bool = False, dtype: Optional[mx.Dtype] = None
) -> Tuple[nn.Module, dict]:
    config = load_config(path)
    weights = load_weights(path)
    if "tie_word_embeddings" not in config:
        config["tie_word_embeddings"] = "lm_head.weight" not in weights
    try:
        model = build_model(config)
    except UnsupportedModelError:
        raise
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from e
    weights = model.sanitize(weights)
    if (q := config.get("quantization")) is not None:
        nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                    class_predicate=_quant_predicate(q, weights))
    check_weights(model, weights, path)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=False)
    if (path / "adapter_config.json").exists() and (path / "adapters.safetensors").exists():
        # A kept (unfused) LoRA in mlx-lm's adapter format, applied with mlx-lm's own loader.
        from mlx_lm.tuner.utils import load_adapters

        load_adapters(model, str(path))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def cast_floats(model: nn.Module, dtype: Union[str, mx.Dtype]) -> nn.Module:
    """Cast a model's float parameters in place (quantized weights and int tensors untouched)."""
    dtype = getattr(mx, dtype) if isinstance(dtype, str) else dtype
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    return model


def quantize_model(
    model: nn.Module,
    config: dict,
    *,
    bits: int = 4,
    group_size: int = 64,
    recipe: Optional[str] = None,
) -> dict:
    """Affine-quantize ``model`` in place; return the config with mlx-lm's ``quantization`` keys.

    ``recipe="mixed_4_8"`` keeps embeddings and the LM head at 8 bits, the rest at ``bits``.
    Layers whose input width is not a multiple of ``group_size`` stay in float.
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits}")
    if group_size not in QUANT_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {QUANT_GROUP_SIZES}, got {group_size}")
    if recipe not in (None, "mixed_4_8"):
        raise ValueError(f"unknown quantization recipe {recipe!r} (known: mixed_4_8)")
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


def save_model(path: Union[str, Path], model: nn.Module, config: dict) -> None:
    """Write weights (sharded if large, with index) and config.json as mlx-lm does."""
    from mlx_lm.utils import save_model as _save_weights

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _save_weights(path, model)
    # Older rope keys at top level too: mlx-lm (and older transformers) read only those.
    config = normalize_rope_config(config)
    config.pop("_name_or_path", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def load(
    path_or_hf_repo: Union[str, Path, None] = None,
    *,
    revision: Optional[str] = None,
    lazy: bool = False,
    quantize: Optional[int] = None,
    q_group_size: int = 64,
    streams: Union[str, bool, None] = None,
    medusa: bool = False,
    dtype: Optional[str] = None,
    **stream_overrides,
):
    """Load ``(model, tokenizer)`` from a local folder or a hub repo id.

    ``None`` loads the embedded default model. ``quantize=4|8`` quantizes a float checkpoint at
    load time. ``streams``: ``None`` attaches ``speculative_streams.json`` when the folder has
    one, a name picks ``speculative_streams-NAME.json``, a path picks that file, ``False`` loads
    the base alone. ``stream_overrides`` (e.g. ``tree=``, ``prune_threshold=``) override the
    stream config. With streams the model is a :class:`SpecStreamModel`. ``medusa=True`` attaches
    the folder's Medusa heads instead (the baseline). ``dtype`` (``float32``, ``float16``,
    ``bfloat16``) casts float weights at load; by default unquantized weights run in float32 on
    the CPU (no fast half-precision matmul there) and as stored on GPUs.
    """
    from .tokenizer import load_tokenizer

    path = default_model_path() if path_or_hf_repo is None else get_model_path(path_or_hf_repo, revision)
    if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    if dtype is None and mx.default_device() == mx.cpu and "quantization" not in load_config(path):
        # CPUs have no fast half-precision matmul; float32 goes through BLAS (3-4x faster here).
        dtype = "float32"
    model, config = load_model(path, lazy=lazy, dtype=getattr(mx, dtype) if dtype else None)
    if quantize:
        if "quantization" in config:
            raise ValueError(f"{path} is already quantized ({config['quantization']})")
        quantize_model(model, config, bits=quantize, group_size=q_group_size)
    tokenizer = load_tokenizer(path, config)
    if medusa:
        from .medusa import MedusaModel, load_medusa

        return MedusaModel(model, load_medusa(path, model)), tokenizer
    if streams is not False:
        from .streams import SpecStreamModel, find_stream_file, load_streams

        file = find_stream_file(path, streams)
        if file is not None:
            model = SpecStreamModel(model, load_streams(file, model, **stream_overrides))
    return model, tokenizer


def default_model_path() -> Path:
    path = Path(__file__).parent / "assets" / "default"
    if not (path / "config.json").exists():
        raise CheckpointError(f"the embedded default model is missing from {path}; pass --model")
    return path
