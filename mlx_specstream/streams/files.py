"""Stream files: ``speculative_streams[-NAME].json`` (the config) and ``.safetensors`` (the
parameters) beside a base checkpoint; several named adapters can share one base."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..checkpoint import (
    ASSETS,
    CheckpointError,
    base_fingerprint,
    fingerprint_mismatch,
    load_adapter_weights,
    model_dtype,
    read_json,
    save_adapter,
)
from ..errors import UserError
from .config import StreamConfig
from .params import SpeculativeStreams

STREAMS_STEM = "speculative_streams"
STREAMS_CONFIG = STREAMS_STEM + ".json"


_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


def stream_stem(name: Optional[str] = None) -> str:
    """``speculative_streams[-name]``: a name is one file-name component (letters, digits, ``._-``),
    so an adapter is always written beside its model, never elsewhere through ``../``."""
    if name is not None and not _NAME.fullmatch(name):
        raise UserError(f"adapter name {name!r} must be 1-100 letters, digits or ._- (not starting with '.')")
    return STREAMS_STEM + (f"-{name}" if name else "")


RANKING = "draft_vocab"  # the adapter file's token ranking (int32, most frequent first), not a parameter


def save_streams(path: Path, streams: SpeculativeStreams, name: Optional[str] = None) -> Path:
    """Write ``speculative_streams[-name].json/.safetensors`` into ``path``."""
    weights = dict(tree_flatten(streams.parameters()))
    if streams.vocab_ranking is not None:
        weights[RANKING] = mx.array(streams.vocab_ranking.astype(np.int32))
    return save_adapter(path, stream_stem(name), weights, streams.config.to_dict())


def find_stream_file(model_path: Path, streams: Optional[str]) -> Optional[Path]:
    """``streams``: None (the default ``speculative_streams.json`` if present), a name (``-name``
    variant next to the base), or a path to a ``.json`` stream config (or a folder with one)."""
    if streams is None:
        p = model_path / STREAMS_CONFIG
        return p if p.exists() else None
    p = Path(streams)
    if p.suffix == ".json" and p.exists():
        return p
    if p.is_dir() and (p / STREAMS_CONFIG).exists():
        return p / STREAMS_CONFIG
    q = model_path / f"{stream_stem(streams)}.json" if _NAME.fullmatch(streams) else None
    if q is not None and q.exists():
        return q
    available = sorted(x.name for x in model_path.glob(STREAMS_STEM + "*.json"))
    raise FileNotFoundError(f"stream file {streams!r} not found (in {model_path}: {available or 'none'})")


def shipped_stream_file(model) -> Optional[Path]:
    """The package's own adapter trained on ``model``'s weights (its recorded base matches), if any:
    how a known base (e.g. SmolLM2, by name, GGUF file or converted folder) gets its streams."""
    have = None
    for file in sorted(ASSETS.glob(f"*/{STREAMS_CONFIG}")):
        cfg = read_json(file)
        base = cfg.get("base") if isinstance(cfg, dict) else None
        if not isinstance(base, dict) or base.get("vocab_size") != model.args.vocab_size:
            continue
        have = have or base_fingerprint(model)
        if fingerprint_mismatch(base, have) is None:
            return file
    return None


def read_stream_config(config_file: Path, **overrides) -> StreamConfig:
    """A stream config file, with ``overrides`` (None values ignored) applied; named errors."""
    cfg = read_json(config_file)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg.get("token_head_rank") and "token_head_space" not in cfg:
        cfg["token_head_space"] = "residual"  # written before the field: the head of sessions 10-15
    try:
        return StreamConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from e


def load_streams(config_file: Path, model, force: bool = False, **overrides) -> SpeculativeStreams:
    """The stream adapter of ``config_file`` for ``model``, loaded strictly in the model's dtype.
    An adapter that records the base it was trained on is refused on another base unless ``force``
    (its drafts would be noise: never wrong output, only slower decoding)."""
    config_file = Path(config_file)
    cfg = read_stream_config(config_file, **overrides)
    if cfg.base is not None and not force and (why := fingerprint_mismatch(cfg.base, base_fingerprint(model))):
        raise CheckpointError(
            f"{config_file} was trained on another base model ({why}): attaching it would only "
            "slow decoding down; pass --force-streams (force_streams=True) to attach it anyway"
        )
    streams = SpeculativeStreams(cfg, model)
    weights = config_file.with_suffix(".safetensors")
    extra = load_adapter_weights(
        streams, weights, f"{config_file.name} and the base model", model_dtype(model), extra=(RANKING,)
    )
    if RANKING in extra:
        streams.vocab_ranking = checked_ranking(np.array(extra[RANKING]), model.args.vocab_size, weights)
    streams.source = config_file
    streams.draft_ids()  # a draft_vocab the file cannot serve is refused here, by name
    return streams


def vocab_ranking(counts: np.ndarray) -> np.ndarray:
    """Token ids seen (count > 0), most frequent first; ties by id (deterministic)."""
    counts = np.asarray(counts)
    seen = np.flatnonzero(counts > 0)
    return seen[np.argsort(-counts[seen], kind="stable")].astype(np.int32)


def checked_ranking(r: np.ndarray, vocab_size: int, where) -> np.ndarray:
    """A token ranking: distinct ids of the vocabulary, one dimension."""
    if r.ndim != 1 or r.size == 0 or not np.issubdtype(r.dtype, np.integer):
        raise CheckpointError(f"{where}: {RANKING} must be a non-empty 1-D integer array, got {r.dtype} {r.shape}")
    if r.min() < 0 or r.max() >= vocab_size or np.unique(r).size != r.size:
        raise CheckpointError(f"{where}: {RANKING} must hold distinct token ids below {vocab_size}")
    return r.astype(np.int32)
