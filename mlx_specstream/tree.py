"""Draft trees as data, built by pure functions.

A tree is given by *rank paths* (Medusa's "choices"): the node ``(r1, ..., rg)`` at depth ``g``
holds the ``rg``-th most likely token of stream ``g``, under the node ``(r1, ..., r(g-1))``. The
root ``()`` is the correction token of the previous step. Every level's candidates come from one
node's stream logits, so a child's token depends only on its depth and its own rank.

Worked example, three nodes — root, its top-1 child ``(0,)`` and its top-2 child ``(1,)``::

    paths     = [(), (0,), (1,)]
    depth     = [0, 1, 1]
    parent    = [-1, 0, 0]
    rank      = [0, 0, 1]
    ancestors = [[1, 0, 0],      # node i attends to itself and its ancestors
                 [1, 1, 0],
                 [1, 0, 1]]
    children  = [[1, 2], [-1, -1], [-1, -1]]  # by rank order, padded with -1

Pure numpy: the device copy of a tree (and everything else a decode precomputes once) is
:class:`mlx_specstream.plan.TreePlan`.
"""

from __future__ import annotations

import heapq
import itertools
import json
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
from .errors import UserError

Path = Tuple[int, ...]
DEFAULT_TREE_BUDGET = 12  # non-root nodes of a drafter's default sparse tree
MAX_TREE_NODES = 1024  # far beyond any tree that pays; bounds what a flag or a file can ask for
MAX_LOOKUP = 64  # context drafts per step, likewise


@dataclass(frozen=True)
class Tree:
    """A static tree shape with everything a step needs, precomputed once (numpy, host side)."""

    paths: Tuple[Path, ...]
    depth: np.ndarray  # (T,) int32
    parent: np.ndarray  # (T,) int32, -1 for the root
    rank: np.ndarray  # (T,) int32, the node's rank among its stream's candidates
    ancestors: np.ndarray  # (T, T) bool, row i: ancestors of i and i itself
    children: np.ndarray  # (T, max_children) int32 children by rank order, padded with -1

    @property
    def size(self) -> int:
        return len(self.paths)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def max_rank(self) -> int:
        return int(self.rank.max()) + 1

    def path_to(self, node: int) -> List[int]:
        """Node indices from the root to ``node`` inclusive."""
        return [int(i) for i in np.flatnonzero(self.ancestors[node])]


def normalize_paths(paths: Sequence[Sequence[int]]) -> Tuple[Path, ...]:
    """Root first, then by depth and rank order; every prefix of a path must be present."""
    ps = {tuple(int(r) for r in p) for p in paths}
    ps.discard(())
    for p in ps:
        if any(r < 0 for r in p):
            raise UserError(f"tree path {list(p)} has a negative rank")
        if len(p) > 1 and p[:-1] not in ps:
            raise UserError(f"tree path {list(p)} lacks its parent {list(p[:-1])}")
    return ((),) + tuple(sorted(ps, key=lambda p: (len(p), p)))


def build_tree(paths: Sequence[Sequence[int]]) -> Tree:
    """Build a :class:`Tree` from rank paths (the root ``()`` may be given or not)."""
    paths = normalize_paths(paths)
    if len(paths) > MAX_TREE_NODES + 1:
        raise UserError(f"a tree of {len(paths) - 1} nodes is beyond the {MAX_TREE_NODES} supported")
    index = {p: i for i, p in enumerate(paths)}
    T = len(paths)
    depth = np.array([len(p) for p in paths], np.int32)
    parent = np.array([index[p[:-1]] if p else -1 for p in paths], np.int32)
    rank = np.array([p[-1] if p else 0 for p in paths], np.int32)
    anc = np.zeros((T, T), bool)
    for i, p in enumerate(paths):
        for g in range(len(p) + 1):
            anc[i, index[p[:g]]] = True
    kids = [[j for j in range(T) if parent[j] == i] for i in range(T)]
    kids = [sorted(k, key=lambda j: rank[j]) for k in kids]
    C = max(1, max(len(k) for k in kids))
    children = np.full((T, C), -1, np.int32)
    for i, k in enumerate(kids):
        children[i, : len(k)] = k
    return Tree(paths, depth, parent, rank, anc, children)


def chain(depth: int) -> Tuple[Path, ...]:
    """Top-1 of every stream: ``[(0,), (0, 0), ...]``."""
    return tuple((0,) * g for g in range(1, depth + 1))


def cartesian(depth: int, k: int) -> Tuple[Path, ...]:
    """The paper's full tree: top-``k`` of every stream under every node (``1 + Σ k^g`` nodes)."""
    return tuple(p for g in range(1, depth + 1) for p in itertools.product(range(k), repeat=g))


def sparse(depth: int, budget: int, rank_accept: Sequence[Sequence[float]] | None = None) -> Tuple[Path, ...]:
    """The ``budget`` non-root nodes of highest expected acceptance.

    ``rank_accept[g][r]`` is the probability that stream ``g+1``'s rank-``r`` candidate is the right
    token; a path's value is the product along it (independence assumed). Without measurements, a
    geometric prior (top-1 strongly preferred, deeper levels less reliable) is used.
    """
    if rank_accept is None:
        rank_accept = [[0.6 * 0.8**g * 0.35**r for r in range(8)] for g in range(depth)]
    cand: list = []  # max-heap of (-value, path) over children of chosen nodes

    def push(p: Path, v: float) -> None:
        if len(p) < depth:
            for r, a in enumerate(rank_accept[len(p)]):
                heapq.heappush(cand, (-(v * a), p + (r,)))

    chosen: List[Path] = []
    push((), 1.0)
    while cand and len(chosen) < budget:
        nv, p = heapq.heappop(cand)
        chosen.append(p)
        push(p, -nv)
    return normalize_paths(chosen)[1:]


def prune(tree: Tree, child_prob: np.ndarray, threshold: float) -> np.ndarray:
    """Survivor mask: drop every node whose probability under its parent is below ``threshold``,
    with its whole subtree. ``child_prob[i]`` is node i's (early-exit) probability under its
    parent; the root always survives.
    """
    keep = child_prob >= threshold
    keep[0] = True
    # A node survives iff it and all its ancestors pass.
    return ~((tree.ancestors & ~keep[None, :]).any(axis=1))


AUTO = "auto"  # a tree sized every step from the drafter's and the context drafts' confidence
AUTO_CONTEXT = "auto:context"  # the same over context drafts alone (the drafter's own drafts unused)
AUTO_SPECS = (AUTO, AUTO_CONTEXT)


@dataclass
class TreeSetting:
    """The tree fields every drafter config shares (declared once): explicit rank paths, or the
    default sparse tree of ``tree_budget`` nodes over the drafter's ``draft_depth`` levels."""

    tree: Optional[List[List[int]]] = None  # rank paths; None: a sparse default tree
    tree_budget: int = DEFAULT_TREE_BUDGET

    draft_depth = 0  # levels the drafter can fill (overridden by a property)

    def check_tree(self) -> None:
        if isinstance(self.tree, str):
            if self.tree not in AUTO_SPECS:
                raise UserError(f"tree must be rank paths or one of {AUTO_SPECS}, got {self.tree!r}")
            return
        if self.tree is not None:
            paths = normalize_paths(self.tree)
            deepest = max((len(p) for p in paths), default=0)
            if deepest > self.draft_depth:
                raise UserError(f"tree depth {deepest} exceeds the {self.draft_depth} levels this drafter drafts")
            self.tree = [list(p) for p in paths[1:]]

    @property
    def tree_auto(self) -> Optional[str]:
        """``auto`` or ``auto:context`` when every step's tree is sized, else None."""
        return self.tree if isinstance(self.tree, str) else None

    @property
    def tree_paths(self) -> Tuple[Path, ...]:
        if self.tree_auto:
            return ()  # no fixed tree: sized per step
        if self.tree is not None:
            return tuple(tuple(p) for p in self.tree)
        return sparse(self.draft_depth, self.tree_budget)


def parse_tree_spec(spec: str, num_streams: int) -> Tuple[Path, ...]:
    """CLI tree spec: ``chain``, ``chain:D``, ``cartesian:K`` (or ``cartesian:K:D``),
    ``sparse:N`` (N nodes of the default prior), or a JSON list of rank paths."""
    spec = spec.strip()
    if spec.startswith("["):
        if len(spec) > 64 * MAX_TREE_NODES:
            raise UserError(f"--tree: {len(spec)} characters is beyond any tree of at most {MAX_TREE_NODES} nodes")
        try:
            paths = normalize_paths(json.loads(spec))[1:]
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise UserError(f"--tree: not a JSON list of rank paths: {e}") from e
        except RecursionError:
            raise UserError("--tree: nested too deeply to be a list of rank paths") from None
    else:
        kind, *nums = spec.split(":")
        try:
            nums = [int(x) for x in nums]
        except ValueError:
            raise UserError(f"--tree: bad number in {spec!r}") from None
        if any(x < 1 for x in nums) or len(nums) > 2:
            raise UserError(f"--tree: {spec!r} needs one or two positive numbers")
        n_nodes = (
            nums[0] ** (nums[1] if len(nums) > 1 else num_streams)
            if kind == "cartesian" and nums
            else nums[0]
            if nums
            else num_streams
        )
        if n_nodes > MAX_TREE_NODES:
            raise UserError(f"--tree: {spec!r} asks for about {n_nodes} nodes; at most {MAX_TREE_NODES}")
        if kind == "chain":
            paths = chain(nums[0] if nums else num_streams)
        elif kind == "cartesian" and nums:
            paths = cartesian(nums[1] if len(nums) > 1 else num_streams, nums[0])
        elif kind == "sparse" and nums:
            paths = sparse(num_streams, nums[0])
        else:
            raise UserError(f"--tree: unknown spec {spec!r} (chain[:D], cartesian:K[:D], sparse:N, or JSON)")
    if paths and max(len(p) for p in paths) > num_streams:
        raise UserError(f"--tree: depth exceeds the {num_streams} streams of this adapter")
    return paths
