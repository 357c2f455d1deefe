"""The stream training loss: per-stream CE on answer tokens (segments bound the rows), the
pruning adapter's next-token loss and, in shared mode, the main stream's NTP loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.base import head_scores
from .msa import bottom_forward, early_exit_logits, msa_forward


DEFAULT_SEGMENT = 64  # positions per stream segment in training (memory vs. speed)
DEFAULT_ALPHA = 0.1  # α_j: the stream losses' weight


@dataclass
class LossWeights:
    ntp: float = 0.0  # α0
    stream: float = DEFAULT_ALPHA  # α_j, every stream
    pruning: float = 1.0


def sample_positions(m: mx.array, max_positions: Optional[int], seed: int) -> np.ndarray:
    """Positions (int32, in order) whose next token is a target in some row of the batch (``m``:
    (B, L) weights), at most ``max_positions`` of them sampled without replacement (seeded)."""
    pos = np.flatnonzero(np.array(m).sum(0) > 0).astype(np.int32)
    if max_positions and len(pos) > max_positions:
        pos = np.sort(np.random.default_rng(seed).choice(pos, max_positions, replace=False))
    return pos


def drawing_probabilities(counts: np.ndarray) -> np.ndarray:
    """What :func:`head_vocabulary` draws from: token counts flattened by ^0.75 (rarer tokens
    compete too), normalized — computed once per run."""
    p = counts.astype(np.float64) ** 0.75
    return p / p.sum()


def head_vocabulary(targets: np.ndarray, probs: np.ndarray, n: int, seed: int) -> Tuple[mx.array, mx.array]:
    """A restricted softmax's tokens for one batch: every target of the batch plus ``n`` tokens
    drawn (seeded) from ``probs`` (:func:`drawing_probabilities`). Returns ``(ids (V,), remap
    (vocab,))``: ``remap[t]`` is t's column."""
    drawn = np.random.default_rng(seed).choice(len(probs), size=n, p=probs) if n else np.zeros(0, np.int64)
    ids = np.unique(np.concatenate([targets.ravel(), drawn])).astype(np.int32)
    remap = np.zeros(len(probs), np.int32)
    remap[ids] = np.arange(len(ids), dtype=np.int32)
    return mx.array(ids), mx.array(remap)


def stream_loss(
    model,
    streams,
    tokens,
    mask,
    weights: LossWeights,
    segment: int = DEFAULT_SEGMENT,
    train_streams: bool = True,
    max_positions: Optional[int] = None,
    sample_seed: int = 0,
    bottom: Optional[mx.array] = None,
    vocab: Optional[Tuple[mx.array, mx.array]] = None,
):
    """Loss of one batch. ``tokens``/``mask`` (B, L+1): inputs are ``tokens[:, :-1]``, the target
    of position t is ``tokens[:, t+1]`` with weight ``mask[:, t+1]``. ``max_positions``: attach
    streams to at most that many target positions, sampled (seeded) — an unbiased estimate of the
    stream loss at a fraction of the cost, since stream rows dominate the compute. ``bottom``
    (B, L, h): the bottom N−Ns layers' output for these inputs, when precomputed (the base is
    frozen, so it never changes during training).

    Token-conditioned streams (``token_head``): each stream also conditioned on the true token
    before its target (teacher forcing), its CE added to the unconditioned one (whose top-K are
    the candidates decoding re-scores).

    ``vocab``: ``(ids, remap)`` from :func:`head_vocabulary` — the streams' CE over those tokens
    alone (every target among them), at a fraction of the head's cost; None: the full vocabulary.

    Returns (loss, metrics: per stream mean CE and top-1 accuracy — unconditioned, conditioned,
    and as decoding reads it — each an mx scalar; restricted to ``vocab`` when given).
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
    conditioned = "token_head" in streams
    topk = streams.config.token_head_topk if conditioned else 0
    sums, hits, counts = {}, {}, [mx.array(0.0) for _ in range(g)]

    def add(j, kind, ce, acc, w):
        if ce is not None:
            sums[j, kind] = sums.get((j, kind), 0.0) + ce.sum()
        hits[j, kind] = hits.get((j, kind), 0.0) + mx.stop_gradient(acc).sum()
        if kind == "":
            counts[j] = counts[j] + w.sum()

    main_logits = None

    def head(hn):  # stream logits: the full head, or the restricted one
        return model.head(hn) if vocab is None else head_scores(model, hn, vocab[0], shared=True)

    def column(t):
        return t if vocab is None else vocab[1][t]

    for s in range(0, max(len(owners_np), 1), segment):
        owners = mx.array(owners_np[s : s + segment])
        if owners.size == 0:
            break
        h_main, h_str = msa_forward(model, streams, h, anc=anc, owners=owners, positions=positions)
        if main_logits is None and weights.ntp:
            main_logits = model.head(model.final_norm(h_main))
        logits = head(model.final_norm(h_str)).reshape(B, owners.size, g, -1)
        states = h_str.reshape(B, owners.size, g, -1)
        for j in range(g):
            tgt_pos = owners + 1 + j  # stream j at owner t predicts y[t+1+j] = tokens[t+2+j]
            ok = tgt_pos < L
            tp = mx.minimum(tgt_pos, L - 1)
            tgt = column(y[:, tp])
            w = m[:, tp] * ok
            ce = nn.losses.cross_entropy(logits[:, :, j], tgt) * w
            acc = (mx.argmax(logits[:, :, j], axis=-1) == tgt) * w
            add(j, "", ce, acc, w)
            if conditioned:
                # teacher-forced: conditioned on the true token before the target, y[t+j]
                prev = y[:, mx.minimum(owners + j, L - 1)]
                cond = head(streams.token_head(states[:, :, j], model.token_embedding(prev), model.final_norm))
                add(j, "_cond", nn.losses.cross_entropy(cond, tgt) * w, (mx.argmax(cond, axis=-1) == tgt) * w, w)
                if topk and vocab is None:  # what decoding reads: the conditioned best of the unconditioned top-K
                    ids = mx.argpartition(-mx.stop_gradient(logits[:, :, j]), kth=topk - 1, axis=-1)[..., :topk]
                    pick = mx.take_along_axis(
                        ids, mx.argmax(mx.take_along_axis(cond, ids, axis=-1), axis=-1)[..., None], -1
                    )
                    add(j, "_decode", None, (pick[..., 0] == tgt) * w, w)
    for j in range(g):
        for kind in ("", "_cond"):
            if (j, kind) not in sums:
                continue
            lj = sums[j, kind] / mx.maximum(counts[j], 1)
            metrics[f"stream{j + 1}{kind}"] = lj
            total = total + weights.stream * lj
        for kind in ("", "_cond", "_decode"):
            if (j, kind) in hits:
                metrics[f"top1_stream{j + 1}{kind}"] = hits[j, kind] / mx.maximum(counts[j], 1)
    if weights.ntp and main_logits is not None:
        ce = nn.losses.cross_entropy(main_logits, y) * m
        ntp = ce.sum() / mx.maximum(m.sum(), 1)
        metrics["ntp"] = ntp
        total = total + weights.ntp * ntp
    return total, metrics
