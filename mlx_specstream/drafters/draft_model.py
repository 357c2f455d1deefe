"""Two-model speculative decoding through our verifier: a small model with the target's
tokenizer drafts ``levels`` tokens greedily; any rank-path tree is filled from the top-k of its
distribution at each drafted position (a chain by default, as mlx-lm's ``draft_model``).

The draft model keeps its own KV cache. Its drafting needs the accepted length, so it runs in
:meth:`after_commit` — lazily: the graph is evaluated with the next verify pass, keeping one
host sync per step.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..cache import DEFAULT_PREFILL_STEP, PromptCache, prefill
from ..setting import DecodeSetting
from ..tree import chain
from .base import Drafter, DraftState, Verified, top_candidates, verify_tree
from ..errors import UserError

DEFAULT_NUM_DRAFT = 3  # as mlx-lm's --num-draft-tokens


class DraftModelDrafter(Drafter):
    drafts_after_commit = True

    def __init__(
        self,
        draft_model: nn.Module,
        num_draft: int = DEFAULT_NUM_DRAFT,
        *,
        prefill_step_size: int = DEFAULT_PREFILL_STEP,
    ):
        if num_draft < 1:
            raise UserError(f"num_draft must be >= 1, got {num_draft}")
        self.model, self.levels = draft_model, num_draft
        self.setting = DecodeSetting(chain(num_draft))
        self.num_params = sum(v.size for _, v in tree_flatten(draft_model.parameters()))
        self.prefill_step_size = prefill_step_size
        self.pc = PromptCache(draft_model)  # committed tokens in the draft cache (``pc.tokens``), row by row
        self.spec: List[mx.array] = []  # drafts fed while drafting (the cache rows after ``pc.tokens``), on device
        self.todo: List[int] = []  # committed tokens not fed yet
        self.width = 1

    def reset(self, context: Sequence[int]) -> None:
        """Bring the draft cache to ``context[:-1]``, reusing its common prefix (chat turns)."""
        rest = self.pc.prepare([int(t) for t in context])  # keeps at least the last token to feed
        prefill(
            lambda t, c: self.model(t, cache=c), mx.array(rest[:-1], mx.int32), self.pc.cache, self.prefill_step_size
        )
        self.pc.tokens += rest[:-1]
        self.todo, self.spec = rest[-1:], []

    def forward(self, model, plan, state: DraftState, cache) -> Verified:
        self.width = plan.width  # ranks the next tree reads
        tokens, h = verify_tree(model, plan, state, cache)
        return Verified(plan, tokens, model.head(h))

    def after_commit(self, accepted: List[int], correction: int) -> Optional[mx.array]:
        # Keep the fed drafts the target accepted (evaluated by the loop's sync: .item() is a
        # read, not a sync), feed what the draft model has not seen, then draft lazily.
        drafts = [int(d.item()) for d in self.spec]
        kept = 0
        while kept < min(len(accepted), len(drafts)) and accepted[kept] == drafts[kept]:
            kept += 1
        for c in self.pc.cache:  # drop the fed drafts the target rejected
            c.trim(c.offset - len(self.pc.tokens) - kept)
        feed = self.todo + accepted[kept:] + [correction]
        self.pc.tokens += drafts[:kept] + feed
        x = mx.array(feed, dtype=mx.int32)[None]
        rows, self.spec, self.todo = [], [], []
        for g in range(self.levels):
            logits = self.model(x, cache=self.pc.cache)[0, -1]
            rows.append(logits)
            if g + 1 < self.levels:  # the last draft is not fed: it waits for verification
                x = mx.argmax(logits).astype(mx.int32).reshape(1, 1)
                self.spec.append(x)
        return top_candidates(mx.stack(rows), self.width)
