"""Tree acceptance rules: which drafted tokens the target model keeps.

A rule is a callable ``rule(plan, tokens, logits) -> (best, correction)``: ``plan`` a
:class:`mlx_specstream.plan.TreePlan` (``depth``, ``parent_or_self``, ``ancestors``, ``children``,
``max_depth``), ``tokens`` (T,) the tree's tokens, ``logits`` (T, V) the target's logits at every
node. ``best`` is the last accepted node (device scalar; its root path is the accepted path) and
``correction`` the token the target emits after it. Everything stays on the device: the decode
loop syncs once per step. A new rule is a new class here, passed as ``accept=``.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx


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

    ``law`` maps a node's log-probabilities to the logits of the distribution plain decoding
    draws from (:meth:`mlx_specstream.sample.SamplingParams.law`: mlx-lm's filters on the
    log-probabilities, then the temperature — the one function the plain sampler uses too). At a
    node with that distribution ``p`` the children are tried in rank order: child ``x`` is
    accepted with probability ``p(x)``; if rejected, ``p(x)`` is set to 0 and ``p`` renormalised
    before the next sibling (so a later sibling carrying the same token is never accepted); if
    every child is rejected the correction token is drawn from what remains. Each emitted token is
    therefore distributed exactly as plain decoding's sample (the multi-draft rule of SpecInfer
    with point-mass drafts), unlike per-path rejection against the stream distribution.
    """

    def __init__(self, law: Callable[[mx.array], mx.array]):
        self.law = law

    def target_probs(self, logits: mx.array) -> mx.array:
        lp = logits.astype(mx.float32)
        return mx.softmax(self.law(lp - mx.logsumexp(lp, axis=-1, keepdims=True)), axis=-1)

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
