"""Per-layer KV cache: a preallocated buffer and an offset, with trim and gather-compaction; and
:class:`PromptCache`, a cache reused across calls that share a prefix.

Tree steps write every tree node's main-stream K/V after the offset; once the accepted path is
known, :meth:`KVCache.compact` gathers those rows into contiguous slots. Speculative-stream K/V
never enter the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import create_attention_mask

from .errors import UserError

DEFAULT_PREFILL_STEP = 512  # prompt tokens per prefill chunk (bounds the attention scores' memory)
DEFAULT_KV_GROUP_SIZE = 64  # mlx-lm's defaults for a quantized KV cache
DEFAULT_QUANTIZED_KV_START = 5000
DEFAULT_KV_KEEP = 4  # first tokens a windowed cache keeps (mlx-lm's rotating cache: 4)
KV_BITS = (2, 3, 4, 5, 6, 8)


class KVCache:
    """Keys and values of one layer. ``offset``: tokens seen (the next token's position);
    ``rows``: rows held. They differ once a window (``--max-kv-size``) has evicted rows: a token at
    position p then attends to the ``keep`` first tokens and the last ``size - keep`` positions up
    to p (mlx-lm's rotating cache as its decode steps see it), enforced by position in the masks,
    so that a tree node at depth d sees exactly what plain decoding would at its position and an
    evicted row is one no later query can see (:meth:`evict`, between steps only)."""

    step = 256  # growth granularity when not preallocated (as mlx-lm); also the eviction slack

    def __init__(self, reserve: Optional[int] = None):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.evicted = 0
        self.window: Optional[Tuple[int, int]] = None  # (size, keep)
        self._reserve = reserve

    @property
    def rows(self) -> int:
        return self.offset - self.evicted

    def reserve(self, size: int) -> None:
        """Preallocate room for ``size`` rows on the next write (one allocation per generation)."""
        self._reserve = size

    def _grow(self, k: mx.array, v: mx.array, need: int) -> None:
        B, H, _, Dk = k.shape
        Dv = v.shape[3]
        size = max(need, self._reserve or 0)
        size = ((size + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, size, Dk), k.dtype)
        new_v = mx.zeros((B, H, size, Dv), v.dtype)
        if self.keys is not None and self.rows:
            new_k[..., : self.rows, :] = self.keys[..., : self.rows, :]
            new_v[..., : self.rows, :] = self.values[..., : self.rows, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev, L = self.rows, keys.shape[2]
        if self.keys is None or prev + L > self.keys.shape[2] or self.keys.dtype != keys.dtype:
            self._grow(keys, values, prev + L)
        self.keys[..., prev : prev + L, :] = keys
        self.values[..., prev : prev + L, :] = values
        self.offset += L
        return self.keys[..., : self.rows, :], self.values[..., : self.rows, :]

    def is_trimmable(self) -> bool:
        return True

    def key_positions(self) -> mx.array:
        """The position of every held row."""
        if not self.evicted:
            return mx.arange(self.rows)
        keep = self.window[1]
        return mx.concatenate([mx.arange(keep), mx.arange(keep + self.evicted, self.offset)])

    def window_mask(self, mask, q: mx.array) -> mx.array:
        """``mask`` (…, L, held + L) limited to the window for queries at positions ``q``."""
        size, keep = self.window
        k = mx.concatenate([self.key_positions(), q])
        return mask & ((k[None, :] < keep) | (k[None, :] > q[:, None] - (size - keep)))

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None):
        """The mask mlx-lm's models ask their cache for (causal over this cache's rows)."""
        if self.window is None:
            return create_attention_mask(N, self.offset, return_array, window_size)
        q = mx.arange(self.offset, self.offset + N)
        k = mx.concatenate([self.key_positions(), q])
        mask = k[None, :] <= q[:, None]
        if window_size is not None:
            mask = mask & (k[None, :] > q[:, None] - window_size)
        return self.window_mask(mask, q)

    def trim(self, n: int) -> int:
        n = min(self.trim_room(), n)
        self.offset -= n
        return n

    def can_trim_to(self, offset: int) -> bool:
        """Whether the cache can go back to holding exactly the first ``offset`` tokens."""
        return offset >= self.offset - self.trim_room()

    def trim_room(self) -> int:
        """Rows that can be trimmed: all, or once a window evicted rows, all but the kept first ones."""
        return self.rows if not self.evicted else self.rows - self.window[1]

    def reset(self) -> None:
        self.offset = self.evicted = 0

    def evict(self) -> None:
        """Drop the rows no later query can see (window only; at least ``step`` at a time, so the
        copy of the held rows is paid once per ``step`` tokens)."""
        if self.window is None:
            return
        size, keep = self.window
        first_live = self.offset - (size - keep) + 1  # the oldest position the next query sees
        dead = first_live - (keep + self.evicted)
        if dead < self.step:
            return
        live = slice(keep + dead, self.rows)
        n = self.rows - keep - dead
        for store in self._stores():
            store[..., keep : keep + n, :] = store[..., live, :]
        self.evicted += dead

    def _stores(self):
        return (self.keys, self.values)

    def compact(self, start: int, indices) -> None:
        """Keep the rows of positions ``start + indices`` (in that order) at ``start, start+1, ...``;
        drop the rest (``start``: a position at or after every evicted one).

        Example: a 3-node tree written at rows 10..12 whose accepted path is nodes [0, 2]:
        ``compact(10, mx.array([0, 2]))`` leaves rows 10, 11 = old 10, 12 and offset 12.
        """
        n = len(indices)
        row = start - self.evicted
        host = indices if not isinstance(indices, mx.array) else None
        if n and not (host is not None and all(int(i) == j for j, i in enumerate(host))):
            src = mx.array(indices).astype(mx.int32) + row
            for store in self._stores():
                for a in store if isinstance(store, tuple) else (store,):
                    a[..., row : row + n, :] = mx.take(a, src, axis=2)
        self.offset = start + n

    @property
    def state(self):
        if self.keys is None:
            return None, None
        return self.keys[..., : self.rows, :], self.values[..., : self.rows, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class QuantizedKVCache(KVCache):
    """Keys and values quantized per token along the head dimension (mlx-lm's layout: packed
    words, scales, biases), so compaction and eviction move rows of the three arrays alike.
    mlx-lm's attention sees ``bits`` and runs its quantized attention over them."""

    def __init__(self, group_size: int = DEFAULT_KV_GROUP_SIZE, bits: int = 8):
        super().__init__()
        self.group_size, self.bits = group_size, bits

    @classmethod
    def from_cache(cls, c: KVCache, group_size: int, bits: int) -> "QuantizedKVCache":
        q = cls(group_size, bits)
        q._reserve, q.window = c._reserve, c.window
        if c.rows:
            k, v = c.state
            q.update_and_fetch(k, v)
        q.offset, q.evicted = c.offset, c.evicted
        return q

    def _grow(self, k, v, need: int) -> None:
        B, H = k[0].shape[:2]
        size = max(need, self._reserve or 0)
        size = ((size + self.step - 1) // self.step) * self.step
        new = tuple(tuple(mx.zeros((B, H, size, x.shape[-1]), x.dtype) for x in kv) for kv in (k, v))
        if self.keys is not None and self.rows:
            for old, fresh in zip((self.keys, self.values), new):
                for o, f in zip(old, fresh):
                    f[..., : self.rows, :] = o[..., : self.rows, :]
        self.keys, self.values = new

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev, L = self.rows, keys.shape[2]
        qk = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        qv = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        if self.keys is None or prev + L > self.keys[0].shape[2]:
            self._grow(qk, qv, prev + L)
        for store, new in ((self.keys, qk), (self.values, qv)):
            for a, b in zip(store, new):
                a[..., prev : prev + L, :] = b
        self.offset += L
        return self.state

    def _stores(self):
        return (*self.keys, *self.values)

    @property
    def state(self):
        if self.keys is None:
            return None, None
        return tuple(tuple(x[..., : self.rows, :] for x in kv) for kv in (self.keys, self.values))

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(x.nbytes for kv in (self.keys, self.values) for x in kv)


@dataclass(frozen=True)
class KVSettings:
    """How the KV cache is kept, as mlx-lm's flags: ``bits`` / ``group_size`` / ``quantized_start``
    (``--kv-bits``: layers switch to a :class:`QuantizedKVCache` once they hold
    ``quantized_start`` tokens) and ``max_size`` (``--max-kv-size``: a window of the ``keep``
    first and the latest tokens, see :class:`KVCache`)."""

    bits: Optional[int] = None
    group_size: int = DEFAULT_KV_GROUP_SIZE
    quantized_start: int = DEFAULT_QUANTIZED_KV_START
    max_size: Optional[int] = None
    keep: int = DEFAULT_KV_KEEP

    def __post_init__(self):
        if self.bits is not None and self.bits not in KV_BITS:
            raise UserError(f"kv bits must be one of {KV_BITS}, got {self.bits!r}")
        if self.group_size not in (32, 64, 128):
            raise UserError(f"kv group size must be 32, 64 or 128, got {self.group_size!r}")
        for name in ("quantized_start", "keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise UserError(f"{name.replace('_', ' ')} must be an integer >= 0, got {v!r}")
        if self.max_size is not None and (
            isinstance(self.max_size, bool) or not isinstance(self.max_size, int) or self.max_size <= self.keep + 1
        ):
            raise UserError(
                f"max kv size must be an integer > {self.keep + 1} (the {self.keep} kept first tokens "
                f"and at least two more), got {self.max_size!r}"
            )

    def check(self, model) -> None:
        """Refuse, by name, a model whose attention cannot keep the cache this way."""
        if (self.bits is not None or self.max_size is not None) and not getattr(
            getattr(model, "base", model), "kv_options", False
        ):
            flag = "--kv-bits" if self.bits is not None else "--max-kv-size"
            raise UserError(
                f"{flag}: {getattr(model, 'model_type', 'this model')}'s local plugin has no quantized or "
                "windowed attention (mlx-lm's families have)"
            )

    def prepare(self, cache: List[KVCache]) -> None:
        """Give every layer the window (once per decode; a cache with another window is refused)."""
        window = None if self.max_size is None else (self.max_size, self.keep)
        for c in cache:
            if c.window != window and (c.rows or c.evicted):
                raise UserError(
                    f"this cache holds {c.offset} tokens kept with max kv size {c.window}, not {window}: "
                    "start a new one"
                )
            c.window = window

    def apply(self, cache: List[KVCache]) -> None:
        """Between forwards: evict what the window no longer shows; quantize, in place, the layers
        that have reached ``quantized_start``."""
        for i, c in enumerate(cache):
            c.evict()
            # before a forward, what mlx-lm does after the previous one: never before the first
            if (
                self.bits is not None
                and not isinstance(c, QuantizedKVCache)
                and c.offset
                and c.offset >= self.quantized_start
            ):
                cache[i] = QuantizedKVCache.from_cache(c, self.group_size, self.bits)


def make_cache(model, reserve: Optional[int] = None) -> List[KVCache]:
    return [KVCache(reserve) for _ in model.layers]


def prepared_cache(
    model, prompt_cache: Optional[List[KVCache]], rows: int, kv: Optional["KVSettings"] = None, step_rows: int = 1
) -> List[KVCache]:
    """The given cache (or a new one) with room reserved for ``rows`` more rows (a windowed one:
    for the window, a prefill chunk, the eviction slack and a step's ``step_rows``)."""
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    if kv is not None:
        kv.check(model)
        kv.prepare(cache)
    for c in cache:
        need = c.rows + rows
        if c.window is not None:
            need = min(need, c.window[0] + DEFAULT_PREFILL_STEP + c.step + step_rows)
        c.reserve(need)
    return cache


def prefill(
    forward: Callable[[mx.array, list], object],
    tokens: mx.array,
    cache: List[KVCache],
    step: int = DEFAULT_PREFILL_STEP,
    kv: Optional[KVSettings] = None,
) -> None:
    """Run ``tokens`` through ``forward(tokens (1, L), cache)`` in chunks of ``step`` (the cache
    quantized per ``kv`` between chunks, as mlx-lm does)."""
    while tokens.size:
        if kv is not None:
            kv.apply(cache)
        forward(tokens[:step][None], cache)
        mx.eval([c.state for c in cache])
        tokens = tokens[step:]


class PromptCache:
    """A KV cache plus the tokens it holds, reused across calls that share a prefix (chat turns,
    server requests): only the new suffix is prefilled."""

    def __init__(self, model):
        self.cache = make_cache(model)
        self.tokens: List[int] = []

    def prepare(self, prompt: List[int]) -> List[int]:
        """Trim the cache to the longest common prefix with ``prompt`` (keeping at least one
        prompt token to feed) and return the suffix to pass as the prompt."""
        held = self.tokens[: self.cache[0].offset]
        n = 0
        for a, b in zip(held, prompt):
            if a != b:
                break
            n += 1
        if not all(c.can_trim_to(min(n, len(prompt) - 1)) for c in self.cache):
            n = 0  # the prefix diverges inside what a window evicted: start over
            for c in self.cache:
                c.reset()
        n = min(n, len(prompt) - 1)
        for c in self.cache:
            c.trim(c.offset - n)
        self.tokens = list(prompt[:n])
        return list(prompt[n:])

    def record(self, prompt_suffix: List[int], emitted: List[int]) -> None:
        """After a generation: the cache holds (at most) everything fed so far; trim rows past
        the last token we actually kept (a stop may cut a speculative step short)."""
        self.tokens += list(prompt_suffix) + list(emitted)
        for c in self.cache:
            if c.offset > len(self.tokens):
                c.trim(c.offset - len(self.tokens))

    def reset(self) -> None:
        self.cache[:] = [KVCache() for _ in self.cache]  # unquantized and unwindowed again
        self.tokens = []
