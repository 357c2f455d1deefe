"""Sampling settings, declared once: :class:`SamplingParams` gives the law a token is drawn
from (mlx-lm's filter chain — top-p, min-p, top-k on the log-probabilities, in ``make_sampler``'s
order — then the temperature), the autoregressive sampler that draws from it (a callable
``logprobs (B, V) -> tokens (B,)``) and the tree acceptance rule that preserves it
(:mod:`mlx_specstream.acceptance`): one function, so the two cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_sampler

from .acceptance import GreedyAcceptance, SamplingAcceptance

SEED_STRIDE = 1_000_003  # a prime: the seeds derived from two run seeds never meet for k < stride


def derived_seed(seed: int, k: int) -> int:
    """The ``k``-th seed derived from a run's ``seed`` (a micro-batch's, a prompt's, a batch's)."""
    return seed * SEED_STRIDE + k


@dataclass(frozen=True)
class SamplingParams:
    """One place for sampling defaults (CLI, API, server)."""

    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0

    def law(self, logprobs: mx.array) -> mx.array:
        """Logits of the distribution plain decoding samples from, given (..., V) log-probabilities:
        exactly what mlx-lm's ``make_sampler`` computes before its categorical draw (the filters
        see the untempered log-probabilities; the temperature divides what they keep)."""
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        return logprobs * (1.0 / self.temp)

    def sampler(self):
        """Plain decoding's draw from :meth:`law`: mlx-lm's own sampler for these settings, so plain
        sampling runs what mlx-lm runs (its categorical draw compiled)."""
        return make_sampler(self.temp, self.top_p, self.min_p, top_k=self.top_k)

    def acceptance(self):
        if self.temp == 0:
            return GreedyAcceptance()
        return SamplingAcceptance(self.law)
