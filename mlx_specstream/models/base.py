"""Pieces shared by every model family: config parsing, RoPE at explicit positions, attention.

Every layer is called as ``layer(x, mask, cache, positions)``:

- ``x``: (B, L, h) hidden states.
- ``mask``: ``None`` (single query), ``"causal"`` (lower-right aligned over cache + L), or an
  array broadcastable to (B, heads, L, S) — boolean (True = attend) or additive. Trees need it.
- ``cache``: a :class:`mlx_specstream.cache.KVCache` or ``None``.
- ``positions``: ``None`` for contiguous positions starting at the cache offset (the AR fast
  path), or an int array (L,) / (B, L) with one position per query token (trees need it).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
from ..errors import UserError


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict) -> "BaseModelArgs":
        names = inspect.signature(cls).parameters
        missing = [
            n for n, p in names.items() if p.default is inspect.Parameter.empty and n not in params
        ]
        if missing:
            raise UserError(f"config.json is missing required keys for {cls.__module__}: {missing}")
        args = {k: v for k, v in params.items() if k in names}
        for k, v in args.items():
            _check(k, v, str(names[k].annotation))
        return cls(**args)


# Bounds for sizes read from a config: what any model can use, so that a hostile or broken
# config fails by name instead of allocating without end.
_SIZE_LIMITS = {"num_hidden_layers": 1024, "hidden_size": 1 << 16, "intermediate_size": 1 << 18,
                "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 1 << 12,
                "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24}


def _check(key: str, v, annotation: str) -> None:
    """Type and range of one config value, by its field's annotation."""
    if v is None and annotation.startswith("Optional"):
        return
    kind = annotation.removeprefix("Optional[").removesuffix("]")
    if kind == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            raise UserError(f"{key} must be an integer, got {v!r}")
        if key in _SIZE_LIMITS and not 1 <= v <= _SIZE_LIMITS[key]:
            raise UserError(f"{key} = {v} is out of range (1..{_SIZE_LIMITS[key]})")
    elif kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"{key} must be a positive finite number, got {v!r}")
    elif kind == "bool" and not isinstance(v, bool):
        raise UserError(f"{key} must be true or false, got {v!r}")
    elif kind == "str" and not isinstance(v, str):
        raise UserError(f"{key} must be a string, got {v!r}")
    elif kind.startswith("Dict") and v is not None and not isinstance(v, dict):
        raise UserError(f"{key} must be an object, got {v!r}")


def normalize_rope_config(config: dict) -> dict:
    """Fold transformers-5 ``rope_parameters`` into the older ``rope_theta`` / ``rope_scaling`` /
    ``partial_rotary_factor`` keys (which mlx-lm also reads). Older configs pass through."""
    config = dict(config)
    rp = config.get("rope_parameters")
    if isinstance(rp, dict):
        rp = dict(rp)
        if "rope_theta" in rp:
            config.setdefault("rope_theta", rp.pop("rope_theta"))
        if "partial_rotary_factor" in rp:
            config.setdefault("partial_rotary_factor", rp.pop("partial_rotary_factor"))
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        if rope_type != "default" and config.get("rope_scaling") is None:
            config["rope_scaling"] = rp
    rs = config.get("rope_scaling")
    if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default":
        config["rope_scaling"] = None
    return config


def apply_rope(rope, x: mx.array, offset: int, positions: Optional[mx.array]) -> mx.array:
    """RoPE on (B, L, H, D) projections at contiguous positions from ``offset`` or at explicit
    ``positions``; returns the (B, H, L, D) attention layout.

    ``mx.fast.rope`` takes one offset per batch row, so explicit positions lay the L tokens out
    as B*L rows of length 1 — a free reshape of the projection's layout, before the transpose.
    """
    if positions is None:
        return rope(x.transpose(0, 2, 1, 3), offset=offset)
    B, L, H, D = x.shape
    if not (B == 1 and positions.ndim == 1 and positions.dtype == mx.int32):  # else already one per row
        positions = mx.broadcast_to(positions, (B, L)).reshape(-1).astype(mx.int32)
    rows = rope(x.reshape(B * L, H, 1, D), offset=positions)
    return rows.reshape(B, L, H, D).transpose(0, 2, 1, 3)


def attention(queries, keys, values, *, scale: float, mask: Any) -> mx.array:
    if mask is not None and not isinstance(mask, str) and mask.ndim == 2:
        mask = mask[None, None]
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def causal_mask_for(L: int) -> Optional[str]:
    return None if L == 1 else "causal"


class CausalLM:
    """Mixin: the family-independent forward. Families provide ``layers``, ``embed``,
    ``final_norm`` and ``head`` — the same seams the speculative-stream forward uses."""

    def hidden(
        self,
        inputs: mx.array,
        cache: Optional[list] = None,
        *,
        mask: Any = None,
        positions: Optional[mx.array] = None,
    ) -> mx.array:
        """Final-normed hidden states (B, L, h)."""
        h = self.embed(inputs, cache=cache, positions=positions)
        if mask is None:
            mask = causal_mask_for(inputs.shape[1])
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, cache[i] if cache else None, positions)
        return self.final_norm(h)

    def __call__(self, inputs: mx.array, cache: Optional[list] = None, *, mask: Any = None,
                 positions: Optional[mx.array] = None) -> mx.array:
        return self.head(self.hidden(inputs, cache, mask=mask, positions=positions))

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if getattr(self.args, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)
        return weights


def cache_offset(cache: Optional[list]) -> int:
    return cache[0].offset if cache else 0
