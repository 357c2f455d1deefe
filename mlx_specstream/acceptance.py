"""Tree acceptance rules: which drafted tokens the target model keeps.

A rule is a callable ``rule(plan, tokens, logits) -> (best, correction)``: ``plan`` a
:class:`mlx_specstream.plan.TreePlan` (``depth``, ``parent_or_self``, ``ancestors``, ``children``,
``max_depth``), ``tokens`` (T,) the tree's tokens, ``logits`` (T, V) the target's logits at every
node. ``best`` is the last accepted node (device scalar; its root path is the accepted path) and
``correction`` the token the target emits after it. Everything stays on the device: the decode
loop syncs once per step. A new rule is a new class here, passed as ``accept=``.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


class GreedyAcceptance:
    """Accept a child iff it is the argmax of its parent's logits; the longest such path wins.
    Gives exactly the tokens of plain greedy decoding."""

    def __call__(self, tree, tokens: mx.array, logits: mx.array):
        pred = mx.argmax(logits, axis=-1)
        ok = (tokens == pred[tree.parent_or_self]) | (tree.depth == 0)  # the root is given
        accepted = ~mx.any(tree.ancestors & ~ok[None, :], axis=1)
        best = mx.argmax(mx.where(accepted, tree.depth, -1))
        return best, pred[best]


class SamplingAcceptance:
    """Distribution-preserving acceptance over a tree of deterministic (top-k) drafts.

    At a node with target distribution ``p`` (temperature, top-k, top-p, min-p applied) the
    children are tried in rank order: child ``x`` is accepted with probability ``p(x)``; if
    rejected, ``p(x)`` is set to 0 and ``p`` renormalised before the next sibling (so a later
    sibling carrying the same token is never accepted); if every child is rejected the
    correction token is drawn from what remains. Each emitted token is therefore
    distributed exactly as the target's sample (the multi-draft rule of SpecInfer with point-mass
    drafts), unlike per-path rejection against the stream distribution.
    """

    def __init__(self, temp: float = 1.0, top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0):
        if temp <= 0:
            raise ValueError("SamplingAcceptance needs temp > 0 (use GreedyAcceptance)")
        self.temp, self.top_p, self.top_k, self.min_p = temp, top_p, top_k, min_p

    def target_probs(self, logits: mx.array) -> mx.array:
        lp = logits.astype(mx.float32) / self.temp
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        if 0 < self.top_p < 1.0:
            lp = apply_top_p(lp, self.top_p)
        if self.min_p:
            lp = apply_min_p(lp, self.min_p)
        if self.top_k > 0:
            lp = apply_top_k(lp, self.top_k)
        return mx.softmax(lp, axis=-1)

    @staticmethod
    def child_mass(p: mx.array, child_tok: mx.array, valid: mx.array) -> mx.array:
        """(T, C) target mass of each child's token, 0 for a token an earlier sibling already
        carries: once that sibling is rejected its token's mass is gone (two drafters, e.g.
        streams and context drafts, often propose the same token)."""
        C = child_tok.shape[1]
        earlier = mx.tril(mx.ones((C, C), dtype=mx.bool_), k=-1)  # (k, j): j < k
        dup = mx.any((child_tok[:, :, None] == child_tok[:, None, :]) & earlier[None] & valid[:, None, :], axis=2)
        return mx.take_along_axis(p, child_tok, axis=1) * (valid & ~dup)

    def __call__(self, tree, tokens: mx.array, logits: mx.array, key: mx.array | None = None):
        T = tokens.shape[0]
        p = self.target_probs(logits)  # (T, V)
        valid = tree.children >= 0  # (T, C)
        child_tok = tokens[mx.maximum(tree.children, 0)]
        pc = self.child_mass(p, child_tok, valid)
        remaining = 1.0 - (mx.cumsum(pc, axis=1) - pc)  # mass left when child k is tried
        k1, k2 = mx.random.split(key) if key is not None else (None, None)
        u = mx.random.uniform(shape=pc.shape, key=k1)
        take = valid & (u * mx.maximum(remaining, 1e-20) < pc)
        any_take = mx.any(take, axis=1)
        first = mx.argmax(take, axis=1)
        chosen = mx.where(any_take, mx.take_along_axis(tree.children, first[:, None], axis=1)[:, 0], -1)
        cur = mx.array(0)
        for _ in range(tree.max_depth):
            nxt = chosen[cur]
            cur = mx.where(nxt >= 0, nxt, cur)
        # Residual at the stopping node: its children's tokens all rejected (none for a leaf).
        rows = mx.broadcast_to(mx.arange(T)[:, None], child_tok.shape)
        resid = p.at[rows, child_tok].add(-pc)
        r = mx.maximum(resid[cur], 0.0)
        correction = mx.random.categorical(mx.log(r), key=k2)
        return cur, correction
