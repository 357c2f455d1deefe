"""Trees sized every step (host side, pure): from the drafts' own confidence and this device's
cost curve, the nodes worth verifying this step — none at all (a plain step) when nothing is.

Each node's estimated acceptance is the probability that every draft on its path is right: for a
drafter's candidates the product of their calibrated probabilities (stream g's rank r), for the
context-draft chain the running acceptance of matches of that run length at that depth. Nodes
join in order of that estimate (a node never before its parent: a child's estimate is at most
its parent's) while the expected tokens per unit of step time, ``(1 + Σ a) / cost(T)``, still
rise. The shape depends only on drafts, never on the target's logits, so acceptance stays exact.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import UserError
from .plan import TreePlan, lru_get
from .tree import AUTO, AUTO_CONTEXT, AUTO_SPECS  # noqa: F401 - the tree specs sizing serves

Path = Tuple[int, ...]
AUTO_WIDTH = 3  # drafter ranks per level a step may verify
AUTO_LOOKUP = 8  # context drafts a step may verify


@dataclass(frozen=True)
class CostCurve:
    """A step's time per tree size ``T`` (nodes verified), relative to one plain AR step;
    linear between measured sizes and proportional beyond the largest. ``plain``: a plain step's
    time when the loop queues plain steps early (``decode.pipelines_plain_steps``), which
    ``cost(1)``, timed step by step, overprices (None: not measured)."""

    sizes: Tuple[int, ...]
    cost: Tuple[float, ...]  # step time / AR step time
    plain: Optional[float] = None

    def __post_init__(self):
        if (
            not self.sizes
            or len(self.sizes) != len(self.cost)
            or list(self.sizes) != sorted(set(self.sizes))
            or self.sizes[0] != 1
            or not all(np.isfinite(c) and c > 0 for c in self.cost + ((self.plain,) if self.plain is not None else ()))
        ):
            raise UserError(
                "a cost curve needs increasing sizes from 1 and positive finite costs, got "
                f"{self.sizes} / {self.cost} (plain {self.plain})"
            )

    def __call__(self, t: int) -> float:
        s, c = self.sizes, self.cost
        if t >= s[-1]:
            return c[-1] * t / s[-1]
        return float(np.interp(t, s, c))

    def to_dict(self) -> dict:
        d = {"sizes": list(self.sizes), "cost": [round(x, 4) for x in self.cost]}
        if self.plain is not None:
            d["plain"] = round(self.plain, 4)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CostCurve":
        try:
            plain = d.get("plain")
            return cls(
                tuple(int(x) for x in d["sizes"]),
                tuple(float(x) for x in d["cost"]),
                None if plain is None else float(plain),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"malformed cost curve {d!r}: {e}") from None


@dataclass(frozen=True)
class Calibration:
    """Raw draft probability → measured acceptance, per depth, binned (``bench tune`` fits it);
    depths past the table use its last row; no table: the raw probability."""

    edges: Tuple[float, ...] = ()
    by_depth: Tuple[Tuple[float, ...], ...] = ()

    def __call__(self, p: np.ndarray, depth: int) -> np.ndarray:
        if not self.by_depth:
            return p
        row = np.asarray(self.by_depth[min(depth, len(self.by_depth) - 1)])
        return row[np.clip(np.searchsorted(self.edges, p, side="right") - 1, 0, len(row) - 1)]


RUN_BINS = (1, 2, 3, 4, 8, 16)  # a match's run length (ContextDrafts.match): bin i holds RUN_BINS[i]..
# Per-draft continuation rates of context drafts by run bin, fitted by benchmarks/context_runs.py
# on the in-distribution sets (chat, code; 128 tokens), by temperature (its --temp: the expected
# acceptance of a point-mass draft under the exact sampling rule): greedy on 10 prompts each, 0.7 on
# 8. Sampling uses the nearest fit; the running statistics correct it.
CONTEXT_PRIORS = {
    0.0: (0.39, 0.65, 0.7, 0.79, 0.85, 0.96),
    0.7: (0.304, 0.54, 0.642, 0.732, 0.834, 0.914),
}


def context_priors(temp: float) -> Tuple[float, ...]:
    return CONTEXT_PRIORS[min(CONTEXT_PRIORS, key=lambda t: abs(t - temp))]


@dataclass
class ContextStats:
    """Running acceptance of context drafts by the run length of their match (binned, see
    :data:`RUN_BINS`): of steps that verified a chain reaching depth ``d``, how many accepted
    ``d`` or more. A Beta prior, ``prior[bin]`` per draft, keeps an unseen depth worth trying. The
    priors are per-draft continuation rates measured on the in-distribution sets (``chat``,
    ``code``: the stdlib generator's prompts), never on the held-out sets the bench reports
    (:data:`CONTEXT_PRIORS`, per temperature)."""

    prior: Tuple[float, ...] = CONTEXT_PRIORS[0.0]  # greedy's; context_priors(temp) when sampling
    weight: float = 2.0
    tried: Dict[Tuple[int, int], float] = field(default_factory=dict)
    hit: Dict[Tuple[int, int], float] = field(default_factory=dict)

    @staticmethod
    def bin(run: int) -> int:
        return max(0, int(np.searchsorted(RUN_BINS, max(run, 1), side="right")) - 1)

    def estimate(self, run: int, k: int) -> List[float]:
        """P(at least d drafts accepted), d = 1..k, for a match that has run ``run`` tokens."""
        b = self.bin(run)
        out, last = [], 1.0
        p0 = self.prior[min(b, len(self.prior) - 1)]
        for d in range(1, k + 1):
            n, h = self.tried.get((b, d), 0.0), self.hit.get((b, d), 0.0)
            last = min(last, (h + self.weight * p0**d) / (n + self.weight))
            out.append(last)
        return out

    def update(self, run: int, verified: int, accepted: int) -> None:
        b = self.bin(run)
        for d in range(1, verified + 1):
            self.tried[(b, d)] = self.tried.get((b, d), 0.0) + 1
            if accepted >= d:
                self.hit[(b, d)] = self.hit.get((b, d), 0.0) + 1


@dataclass
class DraftStats:
    """Online calibration of a drafter's confidence: per depth and probability bin, how often a
    verified candidate whose parent was accepted was accepted too. Raw softmax probabilities of
    stream drafts overstate acceptance several-fold (SmolLM2: 8-node trees chosen for drafts right
    in 20% of steps); ``weight`` pseudo-counts at the raw value keep an unseen bin at it."""

    edges: Tuple[float, ...] = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9)
    weight: float = 4.0
    tried: Dict[Tuple[int, int], float] = field(default_factory=dict)
    hit: Dict[Tuple[int, int], float] = field(default_factory=dict)

    def _bin(self, p: float) -> int:
        return int(np.searchsorted(self.edges, p, side="right")) - 1

    def __call__(self, p: np.ndarray, depth: int) -> np.ndarray:
        out = np.empty_like(p, dtype=np.float64)
        for i, x in enumerate(np.asarray(p, dtype=np.float64).ravel()):
            key = (depth, self._bin(x))
            out.flat[i] = (self.hit.get(key, 0.0) + self.weight * x) / (self.tried.get(key, 0.0) + self.weight)
        return out

    def update(self, depth: int, p: float, accepted: bool) -> None:
        key = (depth, self._bin(p))
        self.tried[key] = self.tried.get(key, 0.0) + 1
        if accepted:
            self.hit[key] = self.hit.get(key, 0.0) + 1


def choose_tree(
    conf: Optional[np.ndarray],
    context: Sequence[float],
    cost: CostCurve,
    *,
    max_nodes: int = 16,
    plain: Optional[float] = None,
) -> Tuple[Tuple[Path, ...], int]:
    """The nodes worth verifying: ``(drafter paths, context drafts)``.

    ``conf`` (levels, K): calibrated probability that the drafter's rank-r candidate at level g is
    right given the level before it was (None: no drafter nodes). ``context``: P(≥ d context drafts
    accepted), d = 1.. (non-increasing). Nodes are added best first while the rate
    ``(1 + Σ a) / cost(1 + n)`` rises; the best prefix wins (possibly none: a plain step, costing
    ``plain`` when given, else ``cost(1)``).

    Example: conf ``[[0.9, 0.05]]``, context ``[0.2]``, cost 1, 1.1, 1.2 for T = 1, 2, 3 → rates
    1.0, 1.73, 1.75: both nodes, ``(((0,),), 1)``.
    """
    heap: List[Tuple[float, int, tuple]] = []  # (-a, depth, node); node: ("d", path) or ("c", depth)
    if conf is not None and conf.size:
        for r in range(conf.shape[1]):
            heapq.heappush(heap, (-float(conf[0, r]), 1, ("d", (r,))))
    for d, a in enumerate(context[:1], 1):
        heapq.heappush(heap, (-float(a), d, ("c", d)))
    total, best, picked = 1.0, (1.0 / (plain or cost(1)), 0), []
    while heap and len(picked) < max_nodes - 1:
        neg_a, depth, node = heapq.heappop(heap)
        a = -neg_a
        if a <= 0:
            break
        picked.append(node)
        total += a
        rate = total / cost(len(picked) + 1)
        if rate > best[0]:
            best = (rate, len(picked))
        kind, where = node
        if kind == "d" and conf is not None and depth < conf.shape[0]:
            for r in range(conf.shape[1]):
                heapq.heappush(heap, (-(a * float(conf[depth, r])), depth + 1, ("d", where + (r,))))
        elif kind == "c" and where < len(context):
            heapq.heappush(heap, (-float(context[where]), where + 1, ("c", where + 1)))
    chosen = picked[: best[1]]
    paths = tuple(sorted((p for k, p in chosen if k == "d"), key=lambda p: (len(p), p)))
    k = max((d for kind, d in chosen if kind == "c"), default=0)
    return paths, k


MAX_PLANS = 256  # tree shapes kept per decode (LRU): plans and their masks are built once each


class AutoTree:
    """Per-step tree sizing for one decode: the candidate layout every step's plan reads (the
    drafter's ``width`` ranks over ``levels`` levels, ``lookup`` context drafts beside them), the
    cost curve, the calibration and the running context-draft statistics.

    ``next_plan`` picks the step's plan from the drafts; ``observe`` learns from what it accepted.
    """

    def __init__(
        self,
        cost: CostCurve,
        *,
        width: int = 3,
        levels: int = 0,
        lookup: int = 0,
        max_nodes: int = 16,
        calibration: Calibration = Calibration(),
        context: Optional[ContextStats] = None,
    ):
        if width < 1 or levels < 0 or max_nodes < 1:
            raise UserError(f"auto tree: width {width}, levels {levels}, max_nodes {max_nodes} out of range")
        self.cost, self.calibration, self.max_nodes = cost, calibration, max_nodes
        self.context = context or ContextStats()
        self.drafts = DraftStats()  # learnt while decoding, after the static calibration
        self._conf: Optional[np.ndarray] = None  # the raw confidences the pending plan was chosen from
        self.width, self.levels, self.lookup = width, levels, lookup
        self.layout = TreePlan((), lookup=lookup, width=width, levels=levels)
        self._plans: "OrderedDict[tuple, object]" = OrderedDict()
        self.sizes: Dict[int, int] = {}  # tree size -> steps (the bench's distribution)
        self.pipelined = False  # the loop queues plain steps early (it sets this): plain steps cost cost.plain

    def plan(self, paths: Tuple[Path, ...], k: int):
        return lru_get(
            self._plans,
            (paths, k),
            lambda: (
                TreePlan(paths, lookup=k, width=self.width, levels=self.levels) if paths or k else self.layout.root_only
            ),
            MAX_PLANS,
        )

    def next_plan(self, conf: Optional[np.ndarray], drafts: Sequence[int], match: int):
        """The step's plan: ``conf`` (levels, width) the drafter's raw candidate probabilities
        (None: no drafter), ``drafts`` the context drafts found, ``match`` their match's run length."""
        cal = None
        self._conf = conf
        if conf is not None and self.levels:
            cal = np.stack(
                [self.drafts(self.calibration(conf[g], g), g) for g in range(min(self.levels, conf.shape[0]))]
            )
        ctx = self.context.estimate(match, min(len(drafts), self.lookup)) if drafts else []
        plain = self.cost.plain if self.pipelined else None
        paths, k = choose_tree(cal, ctx, self.cost, max_nodes=self.max_nodes, plain=plain)
        plan = self.plan(paths, k)
        self.sizes[plan.size] = self.sizes.get(plan.size, 0) + 1
        return plan

    def observe(self, plan, match: int, best_path: Path) -> None:
        """After a step: which of the ``plan``'s drafter nodes whose parent was accepted were
        accepted too, and how many of its context drafts were (the accepted path's leading run of
        the context rank)."""
        conf = self._conf
        if conf is not None and plan.draft_levels:
            for path in plan.tree.paths[1:]:
                if path[0] == self.width or path[:-1] != best_path[: len(path) - 1]:
                    continue  # a context node, or one whose parent was not accepted: no evidence
                d = len(path) - 1
                raw = float(self.calibration(np.array([conf[d, path[-1]]]), d)[0])
                self.drafts.update(d, raw, best_path[: len(path)] == path)
        if plan.lookup and match:
            acc = 0
            for r in best_path:
                if r != self.width:
                    break
                acc += 1
            self.context.update(match, plan.lookup, acc)
