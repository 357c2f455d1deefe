"""The stream training loss: per-stream CE on answer tokens (segments bound the rows), the
pruning adapter's next-token loss and, in shared mode, the main stream's NTP loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .msa import bottom_forward, early_exit_logits, msa_forward


@dataclass
class LossWeights:
    ntp: float = 0.0  # α0
    stream: float = 0.1  # α_j, every stream
    pruning: float = 1.0


def sample_positions(m: mx.array, max_positions: Optional[int], seed: int) -> np.ndarray:
    """Positions (int32, in order) whose next token is a target in some row of the batch (``m``:
    (B, L) weights), at most ``max_positions`` of them sampled without replacement (seeded)."""
    pos = np.flatnonzero(np.array(m).sum(0) > 0).astype(np.int32)
    if max_positions and len(pos) > max_positions:
        pos = np.sort(np.random.default_rng(seed).choice(pos, max_positions, replace=False))
    return pos


def stream_loss(model, streams, tokens, mask, weights: LossWeights, segment: int = 64, train_streams: bool = True,
                max_positions: Optional[int] = None, sample_seed: int = 0, bottom: Optional[mx.array] = None):
    """Loss of one batch. ``tokens``/``mask`` (B, L+1): inputs are ``tokens[:, :-1]``, the target
    of position t is ``tokens[:, t+1]`` with weight ``mask[:, t+1]``. ``max_positions``: attach
    streams to at most that many target positions, sampled (seeded) — an unbiased estimate of the
    stream loss at a fraction of the cost, since stream rows dominate the compute. ``bottom``
    (B, L, h): the bottom N−Ns layers' output for these inputs, when precomputed (the base is
    frozen, so it never changes during training).

    Returns (loss, metrics dict of per-head mean CE, each an mx scalar).
    """
    x, y, m = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    B, L = x.shape
    g = streams.config.num_streams
    positions = mx.arange(L)
    h = bottom if bottom is not None else bottom_forward(model, streams, x, mask="causal", positions=positions)
    if streams.config.mode == "lossless" or not weights.ntp:
        h = mx.stop_gradient(h)
    total, metrics = mx.array(0.0), {}
    # Streams only on rows whose next token is a target (union over the batch), in segments.
    owners_np = sample_positions(m, max_positions, sample_seed)
    # Pruning adapter: next-token prediction from the insertion layer, on the same sampled
    # positions (its vocabulary head over every row would cost more than the streams).
    if weights.pruning:
        at = mx.array(owners_np) if max_positions else mx.arange(L)
        ce = nn.losses.cross_entropy(early_exit_logits(model, streams, mx.stop_gradient(h[:, at])), y[:, at]) * m[:, at]
        pl = ce.sum() / mx.maximum(m[:, at].sum(), 1)
        total = total + weights.pruning * pl
        metrics["pruning"] = pl
    if not train_streams:
        return total, metrics
    anc = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    sums = [mx.array(0.0) for _ in range(g)]
    counts = [mx.array(0.0) for _ in range(g)]
    main_logits = None
    for s in range(0, max(len(owners_np), 1), segment):
        owners = mx.array(owners_np[s : s + segment])
        if owners.size == 0:
            break
        h_main, h_str = msa_forward(model, streams, h, anc=anc, owners=owners, positions=positions)
        if main_logits is None and weights.ntp:
            main_logits = model.head(model.final_norm(h_main))
        logits = model.head(model.final_norm(h_str)).reshape(B, owners.size, g, -1)
        for j in range(g):
            tgt_pos = owners + 1 + j  # stream j at owner t predicts y[t+1+j] = tokens[t+2+j]
            ok = tgt_pos < L
            tp = mx.minimum(tgt_pos, L - 1)
            tgt = y[:, tp]
            w = m[:, tp] * ok
            ce = nn.losses.cross_entropy(logits[:, :, j], tgt) * w
            sums[j] = sums[j] + ce.sum()
            counts[j] = counts[j] + w.sum()
    for j in range(g):
        lj = sums[j] / mx.maximum(counts[j], 1)
        metrics[f"stream{j + 1}"] = lj
        total = total + weights.stream * lj
    if weights.ntp and main_logits is not None:
        ce = nn.losses.cross_entropy(main_logits, y) * m
        ntp = ce.sum() / mx.maximum(m.sum(), 1)
        metrics["ntp"] = ntp
        total = total + weights.ntp * ntp
    return total, metrics
