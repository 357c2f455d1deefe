"""The multi-stream-attention (MSA) forward. The base model is never modified: it calls the base
model's own layers with the masks of DESIGN.md §1:

- main token ``t``: the cached prefix and its tree ancestors (itself included); in *shared* mode
  with ``main_sees_streams`` also its own streams ``(t, 1..γ)``;
- stream ``(t, j)``: the cached prefix, the ancestors of ``t`` (and ``t``), and ``(t, 1..j)``.

Only main rows are ever written to the KV cache.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from .params import SpeculativeStreams


def msa_mask(anc: mx.array, owners: mx.array, num_streams: int, main_sees_streams: bool) -> mx.array:
    """Boolean (R, R) mask over rows ``[main (T) ; streams (K·γ)]``, stream rows owner-major.

    ``anc`` (T, T): main-to-main visibility (a causal mask for whole sequences, the ancestor mask
    for a tree). ``owners`` (K,): the main rows that carry streams. Example, T=2 causal, streams on
    row 1, γ=2 (rows: m0, m1, s(1,1), s(1,2))::

        m0     1 0 0 0
        m1     1 1 0 0        (1 1 1 1 with main_sees_streams)
        s(1,1) 1 1 1 0
        s(1,2) 1 1 1 1
    """
    T, K, g = anc.shape[0], owners.shape[0], num_streams
    owner_of = mx.repeat(owners, g)  # (Kγ,)
    j = mx.tile(mx.arange(g), K)  # (Kγ,)
    same_owner = owner_of[:, None] == owner_of[None, :]
    s2s = same_owner & (j[None, :] <= j[:, None])
    s2m = anc[owner_of]
    if main_sees_streams:
        m2s = mx.arange(T)[:, None] == owner_of[None, :]
    else:
        m2s = mx.zeros((T, K * g), dtype=mx.bool_)
    top = mx.concatenate([anc, m2s], axis=1)
    bottom = mx.concatenate([s2m, s2s], axis=1)
    return mx.concatenate([top, bottom], axis=0)


def stream_positions(pos_main: mx.array, owners: mx.array, num_streams: int, policy: str) -> mx.array:
    pos = mx.repeat(pos_main[owners], num_streams)
    if policy == "parent_plus_j":
        pos = pos + mx.tile(mx.arange(1, num_streams + 1), owners.shape[0])
    return pos


def insert_streams(
    streams: SpeculativeStreams, h: mx.array, owners: mx.array, num_streams: Optional[int] = None
) -> mx.array:
    """(B, T, h) main hidden states -> (B, K·γ, h) stream states ``H_t + P_j``, owner-major
    (the first ``num_streams`` streams only, when given)."""
    B, _, d = h.shape
    emb = streams.stream_embeddings[:num_streams] if num_streams else streams.stream_embeddings
    s = h[:, owners][:, :, None, :] + emb[None, None].astype(h.dtype)
    return s.reshape(B, -1, d)


class _MainRowsCache:
    """A joint main+stream call: cache only the first n (main) rows; stream K/V live for this
    forward only. ``finite``: stream K/V made finite first — a masked attention weight is exactly
    0, but 0 x NaN (or inf) is NaN, so in lossless mode a stream's non-finite value would
    otherwise reach the main rows that never attend to it."""

    def __init__(self, cache: KVCache, n_main: int, finite: bool = False):
        self.cache, self.n, self.offset, self.finite = cache, n_main, cache.offset, finite

    def update_and_fetch(self, k, v):
        ck, cv = self.cache.update_and_fetch(k[:, :, : self.n], v[:, :, : self.n])
        ks, vs = k[:, :, self.n :], v[:, :, self.n :]
        if self.finite:
            ks, vs = mx.nan_to_num(ks), mx.nan_to_num(vs)
        if isinstance(ck, tuple):  # a quantized cache: the stream rows quantized alike, for this call only
            g, b = self.cache.group_size, self.cache.bits
            qk, qv = mx.quantize(ks, group_size=g, bits=b), mx.quantize(vs, group_size=g, bits=b)
            return (
                tuple(mx.concatenate([a, x], axis=2) for a, x in zip(ck, qk)),
                tuple(mx.concatenate([a, x], axis=2) for a, x in zip(cv, qv)),
            )
        return mx.concatenate([ck, ks], axis=2), mx.concatenate([cv, vs], axis=2)

    def __getattr__(self, name):  # ``bits``/``group_size`` of a quantized cache, for mlx-lm's attention
        if name == "cache":
            raise AttributeError(name)
        return getattr(self.cache, name)


def _with_prefix(mask: mx.array, prefix: int) -> mx.array:
    if not prefix:
        return mask
    return mx.concatenate([mx.ones((mask.shape[0], prefix), dtype=mx.bool_), mask], axis=1)


def msa_forward(
    model: nn.Module,
    streams: SpeculativeStreams,
    h_main: mx.array,
    *,
    anc: mx.array,
    owners: mx.array,
    positions: mx.array,
    caches: Optional[List[KVCache]] = None,
    full_mask: Optional[mx.array] = None,
    num_streams: Optional[int] = None,
) -> Tuple[mx.array, mx.array]:
    """Insert streams on ``owners`` and run the top Ns layers. Returns hidden states (before the
    final norm) of main rows (B, T, h) and stream rows (B, K·γ, h).

    ``caches``: the MSA layers' caches (decode: the prefix is cached and this step's main rows
    are appended); ``None`` for whole sequences (training), using transient caches.
    ``full_mask``: :func:`msa_mask` of (anc, owners), when the caller has it precomputed.
    ``num_streams``: run only the first streams (stream j attends to streams ≤ j only, so the
    first g streams are exactly what all γ would give them): a tree drafting g levels needs no more.
    """
    c = streams.config
    g = num_streams or c.num_streams
    layers = model.layers[len(model.layers) - c.num_msa_layers :]
    caches = caches if caches is not None else [KVCache() for _ in layers]
    prefix = caches[0].rows  # mask columns before this call's rows
    T = h_main.shape[1]
    full = full_mask if full_mask is not None else msa_mask(anc, owners, g, c.main_sees_streams)
    pos_s = stream_positions(positions, owners, g, c.stream_positions)
    h_str = insert_streams(streams, h_main, owners, g)
    joint_mask = _with_prefix(full, prefix)[None, None]  # shaped for attention once, not per layer
    pos_joint = mx.concatenate([positions, pos_s])
    # One call per layer over [main ; streams] rows, caching main rows only. The mask keeps main
    # rows off the streams (unless main_sees_streams); in lossless mode the LoRA views touch stream
    # rows only, so main rows are exactly the base model's.
    x = mx.concatenate([h_main, h_str], axis=1)
    row_scale, lossless = None, not c.changes_main
    if c.mode == "lossless" and c.lora_rank:
        row_scale = (mx.arange(x.shape[1]) >= T).astype(x.dtype)[:, None] * c.lora_scale
    n_bottom = len(model.layers) - c.num_msa_layers
    for i, (layer, cache) in enumerate(zip(layers, caches)):
        x = model.run_layer(
            n_bottom + i,
            x,
            joint_mask,
            _MainRowsCache(cache, T, lossless),
            pos_joint,
            layer=streams.stream_layer(layer, i, row_scale),
        )
    h_main, h_str = x[:, :T], x[:, T:]
    return h_main, h_str


def bottom_forward(model, streams, tokens, *, mask, positions, caches=None) -> mx.array:
    """Embeddings and the bottom N−Ns layers (main rows only)."""
    n_bottom = len(model.layers) - streams.config.num_msa_layers
    h = model.embed(tokens, cache=caches, positions=positions)
    for i in range(n_bottom):
        h = model.run_layer(i, h, mask, caches[i] if caches else None, positions)
    return h


def main_forward(model, streams, tokens, cache, *, mask="causal") -> mx.array:
    """Main rows only (no streams attached), e.g. prompt prefill: base layers, except that in
    shared mode the MSA layers carry their (shared) LoRA. Returns the top layer's hidden states
    at every position (before the final norm)."""
    n_bottom = len(model.layers) - streams.config.num_msa_layers
    h = model.embed(tokens, cache=cache)
    for i, layer in enumerate(model.layers):
        if i >= n_bottom and streams.config.mode == "shared":
            layer = streams.stream_layer(layer, i - n_bottom)
        h = model.run_layer(i, h, mask if tokens.shape[1] > 1 else None, cache[i] if cache else None, None, layer=layer)
    return h


def early_exit_logits(model, streams, h: mx.array) -> mx.array:
    return model.head(model.final_norm(streams.pruning(h)))


def forward_with_streams(
    model, streams, tokens: mx.array, owners: Optional[mx.array] = None
) -> Tuple[mx.array, mx.array]:
    """Training-shaped forward over whole sequences (B, L): main logits (B, L, V) and stream
    logits (B, K, γ, V) for streams on ``owners`` (default: every position)."""
    L = tokens.shape[1]
    positions = mx.arange(L)
    owners = mx.arange(L) if owners is None else owners
    h = bottom_forward(model, streams, tokens, mask="causal" if L > 1 else None, positions=positions)
    anc = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    h_main, h_str = msa_forward(model, streams, h, anc=anc, owners=owners, positions=positions)
    main = model.head(model.final_norm(h_main))
    strm = model.head(model.final_norm(h_str))
    B = tokens.shape[0]
    return main, strm.reshape(B, owners.shape[0], streams.config.num_streams, -1)
