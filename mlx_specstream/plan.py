"""What a tree decode precomputes once: :class:`TreePlan`, the tree a drafter fills (plus the
context-draft chain, when on) with its index arrays on the device and the masks built from it.

Built once per decode and passed down (no module-level caches): a plan owns its root-only plan
(the first step and the end of the context) and, bounded, the sub-plans pruning makes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .tree import MAX_LOOKUP, Path, Tree, build_tree
from .errors import UserError

MAX_SUBPLANS = 64  # pruned shapes kept per decode (a few dozen occur in practice)


def lookup_paths(width: int, n: int) -> Tuple[Path, ...]:
    """The context-draft chain as rank paths: rank ``width``, one past the drafter's candidates."""
    return tuple((width,) * d for d in range(1, n + 1))


def lru_get(cache: "OrderedDict", key, build: Callable, bound: int):
    """``cache[key]``, built by ``build()`` on a miss; the least recently used entry past ``bound``
    is dropped (plans per tree shape are built once, their number bounded)."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > bound:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


class TreePlan:
    """A tree with its device arrays; the acceptance rules read ``depth``, ``parent_or_self``,
    ``ancestors``, ``children`` and ``max_depth``.

    ``width``: candidates per level the drafter provides (ranks 0..width-1); ``draft_levels``:
    the depth of the drafter's own nodes; ``lookup``: the context-draft chain's length, its
    nodes at rank ``width``. The next tree's tokens are read from a candidate matrix: the
    drafter's (g ≥ draft_levels, width), or with context drafts (levels, width + 1).

    Example: drafter paths ``[(0,)]``, lookup 2 → nodes ``(), (0,), (1,), (1, 1)``: the drafter's
    top-1 and a 2-token context chain beside it; width 1, levels 2.
    """

    def __init__(self, paths: Sequence[Sequence[int]], *, lookup: int = 0, width: int = 0, levels: int = 0):
        if not 0 <= lookup <= MAX_LOOKUP:
            raise UserError(f"lookup must be in [0, {MAX_LOOKUP}], got {lookup}")
        drafter_tree = build_tree(paths)
        # ``width``/``levels`` floors: per-step plans of one decode share one candidate layout
        # (:class:`mlx_specstream.sizing.AutoTree`) and draft ``levels`` levels for the next step
        self.width = max(drafter_tree.max_rank, 1, width)
        self.lookup = lookup
        self.draft_levels = drafter_tree.max_depth  # levels the drafter's own nodes reach
        self.drafts = max(self.draft_levels, levels)  # levels of drafts a step computes
        self.levels = max(self.drafts, lookup)
        tree = build_tree(drafter_tree.paths[1:] + lookup_paths(self.width, lookup)) if lookup else drafter_tree
        self._set_device(tree)
        self._masks: Dict[tuple, mx.array] = {}
        self._subplans: "OrderedDict[Tuple[int, ...], TreePlan]" = OrderedDict()
        self._root = None

    def _set_device(self, tree: Tree) -> None:
        self.tree = tree
        # A chain in depth order is a plain causal block at contiguous positions: attention and
        # RoPE take their fast paths (no mask array, one offset).
        self.is_chain = bool(np.array_equal(tree.ancestors, np.tril(np.ones((tree.size,) * 2, bool))))
        self.depth = mx.array(tree.depth)
        parent = tree.parent.copy()
        parent[0] = 0  # the root is its own parent
        self.parent_or_self = mx.array(parent)
        self.ancestors = mx.array(tree.ancestors)
        self.children = mx.array(tree.children)
        self.rank = mx.array(tree.rank)

    @property
    def size(self) -> int:
        return self.tree.size

    @property
    def max_depth(self) -> int:
        return self.tree.max_depth

    @property
    def root_only(self) -> "TreePlan":
        """The one-node plan (no drafts verified), sharing this plan's candidate layout."""
        if self.size == 1:
            return self
        if self._root is None:
            self._root = self._derived(build_tree(()))
        return self._root

    def with_lookup(self, k: int) -> "TreePlan":
        """This plan with only the first ``k`` context-draft nodes (``k``: the drafts prompt lookup
        found this step; 0 when nothing matched): rows that cannot be accepted are never verified.
        Built once per ``k`` and kept (a bounded sub-plan). Example: drafter ``[(0,)]``, lookup 2,
        k 0 → nodes ``(), (0,)``; with no drafter nodes either, the root alone (a plain step)."""
        if k >= self.lookup:
            return self
        if k <= 0 and self.draft_levels == 0:
            return self.root_only
        w = self.width
        keep = [i for i, path in enumerate(self.tree.paths) if not (path and path[0] == w and len(path) > k)]
        return self.subplan(np.array(keep))

    def _derived(self, tree: Tree) -> "TreePlan":
        p = object.__new__(TreePlan)
        p.width, p.lookup, p.levels, p.draft_levels = self.width, self.lookup, self.levels, self.draft_levels
        p.drafts = self.drafts
        p._set_device(tree)
        p._masks, p._subplans, p._root = {}, OrderedDict(), None
        return p

    def subplan(self, keep: np.ndarray) -> "TreePlan":
        """The plan of the surviving nodes ``keep`` (sorted indices, root first), e.g. after
        pruning. Node order is preserved, so survivors keep their relative rows."""
        key = tuple(int(i) for i in keep)
        return lru_get(
            self._subplans,
            key,
            lambda: self._derived(build_tree(tuple(self.tree.paths[i] for i in key[1:]))),
            MAX_SUBPLANS,
        )

    def cached(self, key: tuple, build: Callable[[], mx.array]) -> mx.array:
        """A mask or array derived from this plan's shape, built once (e.g. the MSA mask)."""
        m = self._masks.get(key)
        if m is None:
            m = build()
            mx.eval(m)
            self._masks[key] = m
        return m

    def attention_mask(self, prefix: int):
        """Tree nodes see the whole cached prefix and their ancestors: (1, 1, T, prefix + T),
        shaped for attention once per step rather than once per layer; ``"causal"`` (or None for
        one node) for chains."""
        if self.is_chain:
            return "causal" if self.size > 1 else None
        m = self.ancestors
        if prefix:
            m = mx.concatenate([mx.ones((self.size, prefix), dtype=mx.bool_), m], axis=1)
        return m[None, None]

    def positions(self, prefix: int) -> Optional[mx.array]:
        """Each node's position (prefix + depth); None for chains (contiguous from the cache offset)."""
        return None if self.is_chain else self.depth + prefix

    def tokens(self, root: mx.array, candidates: mx.array) -> mx.array:
        """The tree's tokens: the root, then each node's candidate (its level, its rank)."""
        if self.size == 1:
            return root.reshape(1)
        drafts = candidates[self.depth[1:] - 1, self.rank[1:]]
        return mx.concatenate([root.reshape(1), drafts.astype(mx.int32)])

    def empty_candidates(self) -> mx.array:
        return mx.zeros((self.levels, self.width + (1 if self.lookup else 0)), mx.int32)

    def with_context(self, candidates: mx.array, drafts: List[int]) -> mx.array:
        """(g, width) drafter candidates → (levels, width + 1): rows padded with 0 to ``levels``,
        then the context drafts as the last column (0 where there are none: the step's plan,
        :meth:`with_lookup`, then has no node that reads them)."""
        g = candidates.shape[0]
        cand = candidates[:, : self.width]
        if g < self.levels:
            cand = mx.concatenate([cand, mx.zeros((self.levels - g, cand.shape[1]), mx.int32)])
        if cand.shape[1] < self.width:
            cand = mx.concatenate([cand, mx.zeros((self.levels, self.width - cand.shape[1]), mx.int32)], axis=1)
        col = mx.array((list(drafts) + [0] * self.levels)[: self.levels], dtype=mx.int32)[:, None]
        return mx.concatenate([cand[: self.levels], col], axis=1)
