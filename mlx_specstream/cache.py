"""Per-layer KV cache: a preallocated buffer and an offset, with trim and gather-compaction; and
:class:`PromptCache`, a cache reused across calls that share a prefix.

Tree steps write every tree node's main-stream K/V after the offset; once the accepted path is
known, :meth:`KVCache.compact` gathers those rows into contiguous slots. Speculative-stream K/V
never enter the cache.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import mlx.core as mx

DEFAULT_PREFILL_STEP = 512  # prompt tokens per prefill chunk (bounds the attention scores' memory)


class KVCache:
    step = 256  # growth granularity when not preallocated (as mlx-lm)

    def __init__(self, max_size: Optional[int] = None):
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self._reserve = max_size

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
        if self.keys is not None and self.offset:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev, L = self.offset, keys.shape[2]
        if self.keys is None or prev + L > self.keys.shape[2] or self.keys.dtype != keys.dtype:
            self._grow(keys, values, prev + L)
        self.keys[..., prev : prev + L, :] = keys
        self.values[..., prev : prev + L, :] = values
        self.offset = prev + L
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def compact(self, start: int, indices) -> None:
        """Keep rows ``start + indices`` (in that order) at ``start, start+1, ...``; drop the rest.

        Example: a 3-node tree written at rows 10..12 whose accepted path is nodes [0, 2]:
        ``compact(10, mx.array([0, 2]))`` leaves rows 10, 11 = old 10, 12 and offset 12.
        """
        n = len(indices)
        host = indices if not isinstance(indices, mx.array) else None
        if host is not None and all(int(i) == j for j, i in enumerate(host)):
            self.offset = start + n  # already contiguous (e.g. a chain's accepted prefix)
            return
        if n:
            src = mx.array(indices).astype(mx.int32) + start
            k = mx.take(self.keys, src, axis=2)
            v = mx.take(self.values, src, axis=2)
            self.keys[..., start : start + n, :] = k
            self.values[..., start : start + n, :] = v
        self.offset = start + n

    @property
    def state(self):
        if self.keys is None:
            return None, None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(model, max_size: Optional[int] = None) -> List[KVCache]:
    return [KVCache(max_size) for _ in model.layers]


def prepared_cache(model, prompt_cache: Optional[List[KVCache]], rows: int) -> List[KVCache]:
    """The given cache (or a new one) with room reserved for ``rows`` more rows."""
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    for c in cache:
        c.reserve(c.offset + rows)
    return cache


def prefill(forward: Callable[[mx.array, list], object], tokens: mx.array, cache: List[KVCache],
            step: int = DEFAULT_PREFILL_STEP) -> None:
    """Run ``tokens`` through ``forward(tokens (1, L), cache)`` in chunks of ``step``."""
    while tokens.size:
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
        for c in self.cache:
            c.trim(c.offset)
        self.tokens = []
