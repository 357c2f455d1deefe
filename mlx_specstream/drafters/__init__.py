"""Drafters: every way of proposing tokens, behind one interface (:class:`Drafter`) and one
decode loop (:func:`mlx_specstream.decode.tree_generate_step`).

- :class:`Verifier` — none of its own (context drafts only, or plain one-token steps);
- :class:`StreamDrafter` — Speculative Streaming (the method);
- :class:`MedusaDrafter` — Medusa-1 heads (the baseline);
- :class:`DraftModelDrafter` — a separate small draft model (two-model speculative decoding).

:class:`ContextDrafts` (prompt lookup) composes with any of them. A new drafter is a subclass of
:class:`Drafter` in a module here, and a line in :func:`mlx_specstream.loading.load`.
"""

from .base import DraftedModel, Drafter, DraftState, Verified, top_candidates, verify_tree
from .context import ContextDrafts
from .draft_model import DEFAULT_NUM_DRAFT, DraftModelDrafter
from .medusa import MedusaConfig, MedusaDrafter, MedusaHeads, load_medusa, save_medusa
from .plain import Verifier
from .streams import StreamDrafter

__all__ = [
    "Drafter",
    "DraftState",
    "Verified",
    "DraftedModel",
    "verify_tree",
    "top_candidates",
    "ContextDrafts",
    "Verifier",
    "StreamDrafter",
    "MedusaDrafter",
    "MedusaHeads",
    "MedusaConfig",
    "load_medusa",
    "save_medusa",
    "DraftModelDrafter",
    "DEFAULT_NUM_DRAFT",
]
