"""Speculative Streaming: one forward pass verifies the tree and drafts the next one from the
streams of every node (the multi-stream-attention layers, :mod:`mlx_specstream.streams`)."""

from __future__ import annotations

import copy
from typing import Optional

import mlx.core as mx
import numpy as np

from ..models.base import head_scores, sub_head
from ..plan import TreePlan
from ..streams import SpeculativeStreams, bottom_forward, early_exit_logits, main_forward, msa_forward, msa_mask
from ..tree import prune
from ..setting import DecodeSetting
from .base import Drafter, DraftState, Verified


JOINT_HEAD_ROWS = 24  # stream rows up to which main and stream logits share one head pass


def conditioned_drafts(
    model, streams, states: mx.array, free: mx.array, correction: mx.array, ids: Optional[mx.array] = None, short=None
) -> mx.array:
    """(g, V) draft logits of token-conditioned streams for one node: stream 1 conditioned on the
    correction token, stream j on stream j-1's top draft, in the step's graph (no host sync).
    ``states`` (g, h): the node's stream states before the final norm; ``free`` (g, V): their
    unconditioned logits. With ``token_head_topk`` K the conditioned scores are those of the K
    tokens each stream ranks first unconditioned (K gathered head rows, not a second head pass);
    every other token keeps its unconditioned logit minus a margin, so ranks below K stay the
    unconditioned order. ``ids`` (V',): drafts over that vocabulary (columns of ``free`` and of
    the result are its positions), ``short`` its head (:func:`sub_head`)."""
    c = streams.config
    out, tok = [], correction.reshape(1)
    for j in range(states.shape[0]):
        x = streams.token_head(states[j : j + 1], model.token_embedding(tok[None])[0], model.final_norm)
        if c.token_head_topk and c.token_head_topk < free.shape[-1]:
            at = mx.argpartition(-free[j], kth=c.token_head_topk - 1)[: c.token_head_topk]
            scores = head_scores(model, x[0], at if ids is None else ids[at])
            row = mx.put_along_axis(free[j] - _BELOW, at, scores.astype(free.dtype), axis=0)
        else:
            row = (model.head(x) if short is None else short(x))[0]
        out.append(row)
        tok = mx.argmax(row).reshape(1).astype(mx.int32)
        if ids is not None:
            tok = ids[tok]
    return mx.stack(out)


_BELOW = 1e4  # puts tokens outside the conditioned top-K below every conditioned one


class StreamDrafter(Drafter):
    """``prune_threshold`` (τ) overrides the stream config's for this drafter (greedy and sampled)."""

    def __init__(self, streams: SpeculativeStreams, *, prune_threshold: Optional[float] = None):
        self.streams = streams
        c = streams.config
        self.levels, self.setting, self.sampled = c.num_streams, c.setting, c.sampled_setting
        if prune_threshold is not None:  # τ given: it holds when sampling too
            self.setting = self.setting.replace(prune_threshold=prune_threshold)
            self.sampled = self.sampled and self.sampled.replace(prune_threshold=prune_threshold)
        self.prune_threshold = self.setting.prune_threshold  # what forward() prunes with
        self.changes_main = c.changes_main
        self.num_params = streams.num_params
        self.draft_ids = streams.draft_ids()  # None: drafts over the whole vocabulary
        self._short = None

    def configured(self, setting: DecodeSetting) -> "StreamDrafter":
        if setting.prune_threshold == self.prune_threshold:
            return self
        other = copy.copy(self)
        other.prune_threshold = setting.prune_threshold
        return other

    def tuned_for_greedy_only(self) -> Optional[str]:
        if not self.streams.config.tuned_on:
            return None
        src = self.streams.source
        return src.name if src else "the stream adapter"

    def streams_run(self, plan: TreePlan) -> int:
        """Streams a step computes: as deep as the tree's stream drafts go (stream j never sees
        streams > j, so the first g are exact), or all γ when main rows see them."""
        c = self.streams.config
        return c.num_streams if c.main_sees_streams else min(max(plan.drafts, 1), c.num_streams)

    def prefill(self, model, tokens, cache) -> None:
        main_forward(model, self.streams, tokens, cache)  # shared mode: the MSA layers' LoRA on prompt rows too

    def forward(self, model, plan: TreePlan, state: DraftState, cache) -> Verified:
        streams, c = self.streams, self.streams.config
        g = self.streams_run(plan)
        n_bottom = len(model.layers) - c.num_msa_layers
        prefix = cache[0].offset  # positions; the masks' columns are the rows held
        tokens = plan.tokens(state.root, state.candidates)
        positions = plan.depth + prefix
        bottom_pos = plan.positions(prefix) if n_bottom else positions  # None: contiguous from the bottom caches
        h = bottom_forward(
            model,
            streams,
            tokens[None],
            mask=plan.attention_mask(cache[0].rows),
            positions=bottom_pos,
            caches=cache[:n_bottom] + [None] * c.num_msa_layers,
        )
        sel = None
        if self.prune_threshold > 0 and plan.size > 1:
            # Parallel tree pruning: a child's early-exit probability under its parent. The surviving
            # shape must be known on the host to shrink the MSA rows: a second sync, only when τ > 0.
            logp = early_exit_logits(model, streams, h[0])
            logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
            child_lp = logp[plan.parent_or_self, tokens]
            keep = prune(plan.tree, np.exp(np.array(child_lp.astype(mx.float32))), self.prune_threshold)
            if not keep.all():
                sel = np.flatnonzero(keep)
                idx = mx.array(sel.astype(np.int32))
                h, tokens, positions = h[:, idx], tokens[idx], positions[idx]
                plan = plan.subplan(sel)
        mask = plan.cached(
            ("msa", g, c.main_sees_streams),
            lambda: msa_mask(plan.ancestors, mx.arange(plan.size), g, c.main_sees_streams),
        )
        h_main, h_str = msa_forward(
            model,
            streams,
            h,
            anc=plan.ancestors,
            owners=mx.arange(plan.size),
            positions=positions,
            caches=cache[n_bottom:],
            full_mask=mask,
            num_streams=g,
        )
        T = plan.size
        states = h_str[0].reshape(T, g, -1)
        ids, short = self.draft_ids, None
        if ids is not None:
            # A draft vocabulary: the main rows' full head, then the accepted node's stream rows
            # over the shortlist alone (a fraction of the head's weights read per step).
            logits = model.head(model.final_norm(h_main))[0]
            short = self._sub_head(model)

            def independent(best):
                return short(model.final_norm(states[best]))

        elif T * g <= JOINT_HEAD_ROWS:
            # Small trees: one pass of the LM head over main and stream rows. The head's weights
            # are read once (a step is memory-bound there); two passes cost ~20% of a step.
            out = model.head(model.final_norm(mx.concatenate([h_main, h_str], axis=1)))[0]
            logits, strm = out[:T], out[T:].reshape(T, g, -1)

            def independent(best):
                return strm[best]
        else:
            logits = model.head(model.final_norm(h_main))[0]  # (T, V)

            def independent(best):  # the next drafts: stream logits of the last accepted node only
                return model.head(model.final_norm(states[best]))

        def draft(best, correction):
            if "token_head" not in streams:
                return independent(best)
            return conditioned_drafts(model, streams, states[best], independent(best), correction, ids, short)

        return Verified(plan, tokens, logits, draft, sel, n_bottom, draft_ids=ids)

    def _sub_head(self, model):
        """The LM head over the draft vocabulary, built once per model (its rows copied)."""
        if self._short is None or self._short[0] is not model:
            self._short = (model, sub_head(model, self.draft_ids))
        return self._short[1]
