"""The drafter interface: what the one decode loop (:mod:`mlx_specstream.decode`) asks of every
way of proposing tokens.

Each step the loop hands the drafter a :class:`~mlx_specstream.plan.TreePlan` and the
:class:`DraftState` (the previous step's correction token, the tree's root, and the candidate
matrix its other nodes are read from). The drafter runs the target model over the tree — and, in
the same pass if it can, its own drafting — and returns :class:`Verified`. The loop accepts,
syncs once, commits the accepted path's K/V, then asks for the next candidates: from
``Verified.draft`` (device-side, computed before the sync: streams, heads) or from
:meth:`Drafter.after_commit` (a separate draft model, which needs the accepted length first).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import UserError
from ..plan import TreePlan
from ..setting import PLAIN, DecodeSetting

Paths = Tuple[Tuple[int, ...], ...]


class DraftState(NamedTuple):
    root: mx.array  # () int32: the correction token, the next tree's root (not yet cached)
    candidates: mx.array  # (levels, ranks) int32: token of level g, rank r; best first


@dataclass
class Verified:
    """One forward pass over a tree, as the loop needs it."""

    plan: TreePlan  # the tree verified (a sub-plan when pruning dropped nodes)
    tokens: mx.array  # (T,) int32
    logits: mx.array  # (T, V) the target's logits at every node
    # (best node, its correction token) -> (g, V) logits of the next drafts
    draft: Optional[Callable[[mx.array, mx.array], mx.array]] = None
    bottom_rows: Optional[np.ndarray] = None  # pruning: rows the first ``n_bottom`` layers wrote per node
    n_bottom: int = 0
    # (V',) the token ids ``draft``'s columns stand for (a draft vocabulary); None: the whole vocabulary
    draft_ids: Optional[mx.array] = None


class Drafter(ABC):
    """Base class of every drafter. Subclasses set ``levels`` and ``setting`` and implement
    :meth:`forward`; the rest has defaults that suit drafters without state of their own."""

    levels: int = 0  # levels of drafts per step (the deepest tree it can fill)
    setting: DecodeSetting = PLAIN  # its default tree, context drafts and τ (greedy decoding)
    sampled: Optional[DecodeSetting] = None  # the one tuned for sampling (temp > 0), if any
    changes_main: bool = False  # True: the target's own logits need this drafter's forward
    drafts_after_commit: bool = False  # True: its candidates need the accepted path (:meth:`after_commit`)
    num_params: int = 0  # parameters it adds to the target

    def prefill(self, model: nn.Module, tokens: mx.array, cache: list) -> None:
        """Run prompt tokens (1, L) through the target's cache."""
        model(tokens, cache=cache)

    def reset(self, context: Sequence[int]) -> None:
        """Called once before a decode with every token of the context (cached history and
        prompt, the last one being the first tree's root)."""

    @abstractmethod
    def forward(self, model: nn.Module, plan: TreePlan, state: DraftState, cache: list) -> Verified:
        """Run the target over ``plan``'s tree built from ``state`` (and draft, if it can)."""

    def setting_for(self, temp: float) -> DecodeSetting:
        """The default setting at this temperature: sampling's when one was tuned, else greedy's."""
        return self.sampled if temp > 0 and self.sampled is not None else self.setting

    def configured(self, setting: DecodeSetting) -> "Drafter":
        """This drafter decoding with ``setting``'s τ (a drafter that prunes returns a copy)."""
        return self

    def tuned_for_greedy_only(self) -> Optional[str]:
        """The name of this drafter's default setting when it was tuned for greedy decoding only
        (what a sampling user is told), else None."""
        return None

    def after_commit(self, accepted: List[int], correction: int) -> Optional[mx.array]:
        """After the sync: the accepted drafts and the correction. A drafter that cannot draft
        before knowing them returns the next (g, ranks) candidates here (lazily)."""
        return None


def verify_tree(model: nn.Module, plan: TreePlan, state: DraftState, cache: list) -> Tuple[mx.array, mx.array]:
    """The plain target over the tree: (tokens (T,), final-normed hidden states (T, h))."""
    tokens = plan.tokens(state.root, state.candidates)
    # mask columns: the rows held; positions: tokens seen (they differ once a window evicted rows)
    h = model.hidden(
        tokens[None], cache, mask=plan.attention_mask(cache[0].rows), positions=plan.positions(cache[0].offset)
    )
    return tokens, h[0]


def top_candidates(logits: mx.array, k: int) -> mx.array:
    """(g, V) draft logits -> (g, k) token ids, best first."""
    if k == 1:  # chains: a plain argmax, no partition and sort
        return mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
    cand = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
    order = mx.argsort(-mx.take_along_axis(logits, cand, axis=-1), axis=-1)
    return mx.take_along_axis(cand, order, axis=-1).astype(mx.int32)


class DraftedModel(nn.Module):
    """A target model with its drafter attached (what :func:`mlx_specstream.load` returns when
    the folder has one): forwards the family seams and the plain forward to the base, which is
    shared, never copied."""

    def __init__(self, base: nn.Module, drafter: Drafter):
        super().__init__()
        self.base = base
        self.drafter = drafter

    @property
    def args(self):
        return self.base.args

    @property
    def layers(self):
        return self.base.layers

    def embed(self, *a, **kw):
        return self.base.embed(*a, **kw)

    def final_norm(self, h):
        return self.base.final_norm(h)

    def head(self, h):
        return self.base.head(h)

    def hidden(self, *a, **kw):
        return self.base.hidden(*a, **kw)

    def run_layer(self, *a, **kw):
        return self.base.run_layer(*a, **kw)

    def token_embedding(self, ids):
        return self.base.token_embedding(ids)

    def head_module(self):
        return self.base.head_module()

    def __call__(self, inputs, cache=None, *, mask=None, positions=None):
        """The target's logits. Exactly the base model's unless the drafter changes them (a
        shared-mode stream adapter): then decode with ``stream_generate``."""
        if self.drafter.changes_main:
            raise UserError(
                "this model's main stream depends on its stream adapter: decode it with "
                "stream_generate (speculative or not), not a plain forward"
            )
        return self.base(inputs, cache, mask=mask, positions=positions)
