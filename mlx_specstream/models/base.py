"""Pieces shared by every model family: config parsing, RoPE at explicit positions, attention.

Every layer is called as ``layer(x, mask, cache, positions)``:

- ``x``: (B, L, h) hidden states.
- ``mask``: ``None`` (single query), ``"causal"`` (lower-right aligned over cache + L), or an
  array broadcastable to (B, heads, L, S) — boolean (True = attend) or additive. Trees need it.
- ``cache``: a :class:`mlx_specstream.cache.KVCache` or ``None``.
- ``positions``: ``None`` for contiguous positions starting at the cache offset (the AR fast
  path), or an int array (L,) / (B, L) with one position per query token (trees need it).

Callers run blocks through ``model.run_layer(i, x, mask, cache, positions)``: local plugins'
blocks take that signature, mlx-lm's are adapted (:mod:`.mlxlm`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict) -> "BaseModelArgs":
        names = inspect.signature(cls).parameters
        missing = [n for n, p in names.items() if p.default is inspect.Parameter.empty and n not in params]
        if missing:
            raise UserError(f"config.json is missing required keys for {cls.__module__}: {missing}")
        args = {k: v for k, v in params.items() if k in names}
        for k, v in args.items():
            _check(k, v, str(names[k].annotation))
        return cls(**args)


# Bounds for sizes read from a config: what any model can use, so that a hostile or broken
# config fails by name instead of allocating without end.
_SIZE_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1 << 12,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
    "rope_scaling.original_max_position_embeddings": 1 << 24,
}


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


_FLOAT_KEYS = (
    "rope_theta",
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "norm_eps",
    "partial_rotary_factor",
)
_BOOL_KEYS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
_SILU_ONLY = ("llama", "mistral", "qwen2", "qwen3")  # mlx-lm runs these with SiLU whatever the config says


def check_config(config: dict) -> None:
    """Types and ranges of the config keys every family reads, by name, before any family's own
    arguments see them (mlx-lm's families take them as they come)."""
    for key in _SIZE_LIMITS:
        if config.get(key) is not None:
            _check(key, config[key], "int")
    for key in _FLOAT_KEYS:
        if config.get(key) is not None:
            _check(key, config[key], "float")
    if (f := config.get("partial_rotary_factor")) is not None and f > 1:
        raise UserError(f"partial_rotary_factor must be in (0, 1], got {f!r}")
    rs = config.get("rope_scaling")
    if rs is not None:
        if not isinstance(rs, dict):
            raise UserError(f"rope_scaling must be an object, got {rs!r}")
        if "factor" in rs:
            _check("rope_scaling.factor", rs["factor"], "float")
        if rs.get("rope_type", rs.get("type")) == "llama3":
            lo, hi = rs.get("low_freq_factor"), rs.get("high_freq_factor")
            _check("rope_scaling.low_freq_factor", lo, "float")
            _check("rope_scaling.high_freq_factor", hi, "float")
            if not lo < hi:  # the smoothing between them divides by (hi - lo)
                raise UserError(f"rope_scaling: low_freq_factor ({lo}) must be below high_freq_factor ({hi})")
            _check("rope_scaling.original_max_position_embeddings", rs.get("original_max_position_embeddings"), "int")
    for key in _BOOL_KEYS:
        if config.get(key) is not None:
            _check(key, config[key], "bool")
    if (w := config.get("sliding_window")) is not None:
        _check("sliding_window", w, "int")
        if w < 1:
            raise UserError(f"sliding_window must be >= 1 (or null), got {w}")
    act = config.get("hidden_act")
    if config.get("model_type") in _SILU_ONLY and act not in (None, "silu"):
        raise UserError(f"{config['model_type']}: hidden_act {act!r} is not supported (silu only)")


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
        for i in range(len(self.layers)):
            h = self.run_layer(i, h, mask, cache[i] if cache else None, positions)
        return self.final_norm(h)

    def run_layer(self, i: int, x, mask, cache, positions, layer=None):
        """Block ``i`` (or ``layer``, a view of it, e.g. with stream LoRA) over ``x``."""
        return (self.layers[i] if layer is None else layer)(x, mask, cache, positions)

    def __call__(
        self, inputs: mx.array, cache: Optional[list] = None, *, mask: Any = None, positions: Optional[mx.array] = None
    ) -> mx.array:
        return self.head(self.hidden(inputs, cache, mask=mask, positions=positions))

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if getattr(self.args, "tie_word_embeddings", False):
            weights.pop("lm_head.weight", None)
        return weights


def head_scores(model, h: mx.array, ids: mx.array, *, shared: bool = False) -> mx.array:
    """The logits of tokens ``ids`` (…, K) alone for final-normed states ``h`` (…, d): the LM
    head's rows gathered (dequantized when the head is quantized), its bias and the family's
    logit transform applied — what a full head pass gives at those ids, at the cost of K rows.
    ``shared``: ``ids`` (V,) is one set for every state, giving (…, V) (a restricted softmax)."""
    module, post = model.head_module()
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        w = mx.dequantize(
            module.weight[ids], module.scales[ids], module.biases[ids], group_size=module.group_size, bits=module.bits
        )
    else:
        w = module.weight[ids]
    w = w.astype(h.dtype)
    scores = h @ w.T if shared else (w @ h[..., None])[..., 0]
    if "bias" in module:
        scores = scores + module.bias[ids]
    return scores if post is None else post(scores)


def sub_head(model, ids: mx.array) -> Callable[[mx.array], mx.array]:
    """The LM head restricted to tokens ``ids`` (K,), its rows copied once (kept quantized when
    the head is): final-normed states (…, d) -> (…, K) logits, bias and logit transform applied.
    A step then reads K rows of the head instead of all V (drafts over a shortlist)."""
    module, post = model.head_module()
    rows = {k: module[k][ids] for k in ("weight", "scales", "biases", "bias") if k in module}
    mx.eval(rows)
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):

        def matmul(h):
            return mx.quantized_matmul(
                h,
                rows["weight"],
                scales=rows["scales"],
                biases=rows.get("biases"),
                transpose=True,
                group_size=module.group_size,
                bits=module.bits,
                mode=getattr(module, "mode", "affine"),
            )
    else:

        def matmul(h):
            return h @ rows["weight"].astype(h.dtype).T

    def head(h: mx.array) -> mx.array:
        scores = matmul(h)
        if "bias" in rows:
            scores = scores + rows["bias"]
        return scores if post is None else post(scores)

    return head


def cache_offset(cache: Optional[list]) -> int:
    return cache[0].offset if cache else 0
