"""No drafter of its own: the target verifies only what context drafts propose (prompt lookup
decoding), or one token per step with none — the baseline every drafter is measured against."""

from __future__ import annotations

from .base import Drafter, DraftState, Verified, verify_tree


class Verifier(Drafter):
    levels = 0

    def forward(self, model, plan, state: DraftState, cache) -> Verified:
        tokens, h = verify_tree(model, plan, state, cache)
        return Verified(plan, tokens, model.head(h))
