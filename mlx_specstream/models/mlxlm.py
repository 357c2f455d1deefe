"""mlx-lm's own model code under the tree protocol of :mod:`mlx_specstream.models.base`.

Any family mlx-lm implements is built from its ``Model`` class, subclassed with
:class:`TreeModel` (parameter names, ``sanitize``, quantization and the plain forward stay
mlx-lm's). Tree steps call its blocks directly, with three seams:

- **positions**: every attention's ``rope`` module is wrapped in :class:`TreeRoPE`; a tree call
  hands the blocks our cache through :class:`_At`, whose ``offset`` is an ``int`` (the prefix, for
  any arithmetic mlx-lm does with it) carrying the per-token positions. The wrapper lays the L
  tokens out as L rows of length 1 — ``mx.fast.rope`` takes one offset per row — so ``nn.RoPE``
  and mlx-lm's Llama-3 / YaRN / SuScaled modules all rotate each node at prefix + depth.
- **masks**: our boolean tree masks go to the blocks as they are; a layer mlx-lm runs with a
  sliding window (its ``make_cache`` gives a ``RotatingKVCache``) gets the mask cut to the window
  by position, and families whose attention reads ``mask.dtype`` get arrays, never ``"causal"``.
- **embed / final norm / head** (what the stream layers and Medusa heads need between blocks):
  generic (``embed_tokens``, ``norm``, ``lm_head`` or tied), with the few families that scale
  embeddings or logits listed in :data:`FAMILIES`.

A family outside :data:`VERIFIED` is checked once at load (:func:`protocol_problem`): the seams
path must give mlx-lm's own logits, else speculation is refused by name (plain decoding runs
mlx-lm's own forward).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache as MlxLmKVCache, RotatingKVCache
from mlx_lm.utils import MODEL_REMAPPING

from ..cache import KVCache, make_cache
from ..errors import UserError


class TreeOffset(int):
    """A cache offset (the prefix length) that also carries a call's per-token positions."""

    def __new__(cls, offset: int, positions: mx.array):
        self = super().__new__(cls, offset)
        self.positions = positions
        return self


class TreeRoPE(nn.Module):
    """An mlx-lm rope module that rotates each token at its own position when the offset it is
    given carries positions (tree steps); otherwise the module itself, unchanged."""

    def __init__(self, rope: nn.Module):
        super().__init__()
        self._rope = rope  # private: not a parameter path (rope modules hold no weights)

    def __call__(self, x, offset=0, **kw):
        positions = getattr(offset, "positions", None)
        if positions is None:
            return self._rope(x, offset=int(offset) if isinstance(offset, TreeOffset) else offset, **kw)
        B, H, L, D = x.shape
        if B > 1:
            positions = mx.broadcast_to(positions, (B, L)).reshape(-1)
        rows = x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, D)  # (B, H, L, D) -> B·L rows of length 1
        rows = self._rope(rows, offset=positions, **kw)
        return rows.reshape(B, L, H, D).transpose(0, 2, 1, 3)


class _At:
    """A cache seen by mlx-lm's attention during a call at explicit positions."""

    def __init__(self, cache, positions: mx.array):
        self._cache, self._positions = cache, positions

    @property
    def offset(self):
        return TreeOffset(self._cache.offset, self._positions)

    def update_and_fetch(self, keys, values):
        return self._cache.update_and_fetch(keys, values)

    def __getattr__(self, name):  # e.g. ``bits`` of a quantized cache
        return getattr(self._cache, name)


@dataclass(frozen=True)
class Family:
    """What a family's ``Model.__call__`` does around its blocks, where it is not the generic
    ``embed_tokens`` → blocks → ``norm`` → ``lm_head`` (or tied embeddings)."""

    embed_scale: Optional[Callable] = None  # (args, dtype) -> multiplier of the embeddings
    logits: Optional[Callable] = None  # (args, logits) -> logits
    array_masks: bool = False  # its attention reads mask.dtype: no "causal" string


def _softcap(cap: float, x: mx.array) -> mx.array:
    return mx.tanh(x / cap) * cap


FAMILIES: Dict[str, Family] = {
    "gemma": Family(embed_scale=lambda a, dt: a.hidden_size**0.5),
    "gemma2": Family(
        embed_scale=lambda a, dt: a.hidden_size**0.5,
        array_masks=True,
        logits=lambda a, x: _softcap(a.final_logit_softcapping, x),
    ),
    "gemma3_text": Family(embed_scale=lambda a, dt: mx.array(a.hidden_size**0.5, mx.bfloat16).astype(dt)),
    "granite": Family(embed_scale=lambda a, dt: a.embedding_multiplier, logits=lambda a, x: x / a.logits_scaling),
    "cohere": Family(logits=lambda a, x: x * a.logit_scale),
}

# Families whose seams are tested against mlx-lm's own generate in CI (tests/test_mlx_lm_families.py);
# any other is checked once at load.
VERIFIED = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi",
        "phi3",
        "starcoder2",
        "olmo2",
        "granite",
        "qwen2_moe",
        "mixtral",
    }
)

_FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_norm")


def _windows(model) -> list:
    """Per layer, the sliding window mlx-lm runs it with (None: full attention), read from the
    caches mlx-lm makes for it; a layer whose cache is not a plain KV cache cannot verify trees."""
    if not hasattr(model, "make_cache"):
        return [None] * len(model.layers)
    out = []
    for i, c in enumerate(model.make_cache()):
        if isinstance(c, RotatingKVCache) and not c.keep:
            out.append(c.max_size)
        elif type(c) is MlxLmKVCache:
            out.append(None)
        else:
            raise UserError(
                f"{model.model_type}: layer {i} keeps a {type(c).__name__} (not attention over a "
                "key/value cache): tree decoding cannot run on this family"
            )
    return out


class TreeModel:
    """Mixin over an mlx-lm ``Model`` class: the tree protocol (``embed``, ``run_layer``,
    ``final_norm``, ``head``, ``hidden``, ``__call__`` with ``mask`` / ``positions``)."""

    kv_options = True  # mlx-lm's attention reads quantized caches; run_layer applies cache windows

    def _tree_init(self):
        self._family = FAMILIES.get(self.model_type, Family())
        self._window = _windows(self)
        for _, m in self.named_modules():
            if isinstance(m.get("rope"), nn.Module) and not isinstance(m["rope"], TreeRoPE):
                m.rope = TreeRoPE(m.rope)

    @property
    def _inner(self):
        return self.model

    def embed(self, inputs, cache=None, positions=None):
        h = self._inner.embed_tokens(inputs)
        if self._family.embed_scale is not None:
            h = h * self._family.embed_scale(self.args, h.dtype)
        return h

    def final_norm(self, h):
        for name in _FINAL_NORMS:
            if name in self._inner:
                return self._inner[name](h)
        raise UserError(f"{self.model_type}: no final norm found ({', '.join(_FINAL_NORMS)})")

    def token_embedding(self, ids):
        return self.embed(ids)

    def head_module(self):
        post = None if self._family.logits is None else (lambda x: self._family.logits(self.args, x))
        return (self.lm_head if "lm_head" in self else self._inner.embed_tokens), post

    def head(self, h):
        out = self.lm_head(h) if "lm_head" in self else self._inner.embed_tokens.as_linear(h)
        return out if self._family.logits is None else self._family.logits(self.args, out)

    def run_layer(self, i: int, x, mask, cache, positions, layer=None):
        """Block ``i`` (or ``layer``, a view of it) over ``x``: our mask made what the block reads
        (cut to its window; an array where the family needs one), positions through the cache."""
        layer = self.layers[i] if layer is None else layer
        window = self._window[i]
        if window is not None or self._family.array_masks or getattr(cache, "window", None) is not None:
            mask = _mask_array(mask, x.shape[1], cache, positions, window)
        if positions is not None:
            if cache is None:
                cache = KVCache()  # transient: the positions reach the rope through a cache
            cache = _At(cache, positions)
        return layer(x, mask, cache)

    def hidden(self, inputs, cache=None, *, mask=None, positions=None):
        h = self.embed(inputs)
        if mask is None and inputs.shape[1] > 1:
            mask = "causal"
        for i in range(len(self.layers)):
            h = self.run_layer(i, h, mask, cache[i] if cache else None, positions)
        return self.final_norm(h)

    def __call__(self, inputs, cache=None, *, mask=None, positions=None):
        if mask is None and positions is None:
            return super().__call__(inputs, cache=cache)  # mlx-lm's own forward
        return self.head(self.hidden(inputs, cache, mask=mask, positions=positions))


def _mask_array(mask, L: int, cache, positions, window: Optional[int]):
    """``mask`` (None, "causal" or a boolean (…, L, S) array) as an array, limited to keys within
    the layer's sliding ``window`` of each query and to the cache's own window (``--max-kv-size``),
    by position (keys: the cache's held rows, then this call's L rows)."""
    kv_window = getattr(cache, "window", None)
    if mask is None and window is None and kv_window is None:
        return None  # one query, full attention
    held, offset = (cache.rows, cache.offset) if cache is not None else (0, 0)
    q = positions if positions is not None else mx.arange(offset, offset + L)
    k = mx.concatenate([cache.key_positions(), q]) if cache is not None and held else q
    if mask is None:
        mask = mx.ones((L, held + L), dtype=mx.bool_)
    elif isinstance(mask, str):
        mask = k[None, :] <= q[:, None]
    if window is not None:
        mask = mask & (k[None, :] > q[:, None] - window)
    if kv_window is not None:
        mask = cache.window_mask(mask, q)
    return mask


_CLASSES: Dict[type, type] = {}


def model_class(model_type: str):
    """(tree-protocol Model class, ModelArgs) of mlx-lm's implementation of ``model_type``."""
    try:
        arch = importlib.import_module(f"mlx_lm.models.{MODEL_REMAPPING.get(model_type, model_type)}")
    except ImportError:
        return None
    base = arch.Model
    if base not in _CLASSES:
        _CLASSES[base] = type(base.__name__, (TreeModel, base), {"__module__": base.__module__})
    return _CLASSES[base], arch.ModelArgs


# Config options a family's checkpoints may set that mlx-lm's implementation does not read: refused
# by name rather than run as another model.
IGNORED_OPTIONS = {"phi": {"qk_layernorm": True}}


def build(config: dict):
    for key, value in IGNORED_OPTIONS.get(config["model_type"], {}).items():
        if config.get(key) == value:
            raise UserError(
                f"{config['model_type']}: {key}={value!r} is not implemented by mlx-lm's {config['model_type']} "
                "(its weights would be ignored)"
            )
    cls, args_cls = model_class(config["model_type"])
    model = cls(args_cls.from_dict(config))
    if not hasattr(model, "args"):
        model.args = (
            model.model.args if "model" in model and hasattr(model.model, "args") else args_cls.from_dict(config)
        )
    model._tree_init()
    return model


def protocol_problem(model, n: int = 8) -> Optional[str]:
    """Why tree decoding cannot run on ``model`` (None: it can). A family outside :data:`VERIFIED`
    is checked here, once: the seams path (whole sequence; a prefix, then the rest at explicit
    positions under a mask) must give mlx-lm's own logits."""
    if not isinstance(model, TreeModel) or model.model_type in VERIFIED:
        return None
    ids = (mx.arange(3, 3 + n)[None] % model.args.vocab_size).astype(mx.int32)
    m = n // 2
    try:
        ref = model(ids).astype(mx.float32)
        cache = make_cache(model)
        model(ids[:, :m], cache=cache)
        mask = mx.arange(n)[None] <= mx.arange(m, n)[:, None]
        tree = model(ids[:, m:], cache=cache, mask=mask, positions=mx.arange(m, n).astype(mx.int32))
        whole = model.head(model.hidden(ids))
        close = [
            bool(mx.allclose(a.astype(mx.float32), b, atol=1e-2, rtol=1e-2))
            for a, b in ((tree, ref[:, m:]), (whole, ref))
        ]
    except Exception as e:  # any failure of the seams on this family is the same verdict
        return f"{model.model_type}: tree decoding fails on this family ({type(e).__name__}: {e})"
    if not all(close):
        return f"{model.model_type}: tree decoding does not reproduce mlx-lm's forward for this family"
    return None
