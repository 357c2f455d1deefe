"""``load()``: a model folder (or hub repo, or the embedded model) and the drafter it carries.
The only module that knows every drafter; a new drafter gets its line here."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import mlx.core as mx

from .checkpoint import (CheckpointError, DTYPES, cast_floats, default_model_path, get_model_path, load_config,
                         load_model, model_dtype, quantize_model)
from .drafters import DEFAULT_NUM_DRAFT, DraftedModel, DraftModelDrafter, MedusaDrafter, StreamDrafter, load_medusa
from .streams import find_stream_file, load_streams
from .tokenizer import load_tokenizer


def default_dtype(path: Path, dtype: Optional[str]) -> Optional[str]:
    """CPUs have no fast half-precision matmul; float32 goes through BLAS (3-4x faster here)."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype is None and mx.default_device() == mx.cpu and "quantization" not in load_config(path):
        return "float32"
    return dtype


def load_base(path_or_hf_repo: Union[str, Path, None] = None, *, revision: Optional[str] = None,
              lazy: bool = False, dtype: Optional[str] = None):
    """``(model, config, path)`` of a folder / hub repo / the embedded model (``None``)."""
    path = default_model_path() if path_or_hf_repo is None else get_model_path(path_or_hf_repo, revision)
    dtype = default_dtype(path, dtype)
    model, config = load_model(path, lazy=lazy, dtype=DTYPES[dtype] if dtype else None)
    return model, config, path


def load_draft_model(path_or_hf_repo: Union[str, Path], target, *, num_draft: int = DEFAULT_NUM_DRAFT,
                     dtype: Optional[str] = None) -> DraftModelDrafter:
    """A draft model for ``target``: same vocabulary, run in the target's float dtype."""
    draft, _, path = load_base(path_or_hf_repo, dtype=dtype)
    if draft.args.vocab_size != target.args.vocab_size:
        raise CheckpointError(f"draft model {path} has a vocabulary of {draft.args.vocab_size} tokens, the target "
                              f"{target.args.vocab_size}: a draft model must share the target's tokenizer")
    if dtype is None:
        cast_floats(draft, model_dtype(target))
    return DraftModelDrafter(draft, num_draft)


def load(
    path_or_hf_repo: Union[str, Path, None] = None,
    *,
    revision: Optional[str] = None,
    lazy: bool = False,
    quantize: Optional[int] = None,
    q_group_size: int = 64,
    streams: Union[str, bool, None] = None,
    medusa: Union[str, bool, None] = None,
    draft_model: Union[str, Path, None] = None,
    num_draft: int = DEFAULT_NUM_DRAFT,
    dtype: Optional[str] = None,
    **stream_overrides,
):
    """Load ``(model, tokenizer)`` from a local folder or a hub repo id (``None``: the embedded
    default model).

    The drafter attached (a :class:`DraftedModel`), first match wins: ``draft_model`` (a folder
    or repo of a small model with the same tokenizer, drafting ``num_draft`` tokens); ``medusa``
    (``True``: the folder's Medusa heads, or a folder holding them); the stream adapter —
    ``streams=None`` attaches ``speculative_streams.json`` when the folder has one, a name picks
    ``speculative_streams-NAME.json``, a path picks that file, ``False`` none; ``stream_overrides``
    (e.g. ``tree=``, ``prune_threshold=``) override its config. No drafter: the plain model.

    ``quantize=4|8`` quantizes a float checkpoint at load time. ``dtype`` (``float32``,
    ``float16``, ``bfloat16``) casts float weights; by default unquantized weights run in float32
    on the CPU and as stored on GPUs.
    """
    model, config, path = load_base(path_or_hf_repo, revision=revision, lazy=lazy, dtype=dtype)
    if quantize:
        if "quantization" in config:
            raise ValueError(f"{path} is already quantized ({config['quantization']})")
        quantize_model(model, config, bits=quantize, group_size=q_group_size)
    tokenizer = load_tokenizer(path, config)
    if draft_model is not None:
        drafter = load_draft_model(draft_model, model, num_draft=num_draft)
    elif medusa:
        drafter = MedusaDrafter(load_medusa(path if medusa is True else Path(medusa), model))
    elif streams is not False and (file := find_stream_file(path, streams)) is not None:
        tau = stream_overrides.pop("prune_threshold", None)
        drafter = StreamDrafter(load_streams(file, model, **stream_overrides), prune_threshold=tau)
    else:
        return model, tokenizer
    return DraftedModel(model, drafter), tokenizer
