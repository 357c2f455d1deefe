"""Sampling settings, declared once: :class:`SamplingParams` gives the autoregressive sampler
(mlx-lm's chain — temperature, top-p, top-k, min-p — reused as is: a callable ``logprobs (B, V) ->
tokens (B,)``) and the matching tree acceptance rule (:mod:`mlx_specstream.acceptance`)."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.sample_utils import make_sampler

from .acceptance import GreedyAcceptance, SamplingAcceptance


@dataclass(frozen=True)
class SamplingParams:
    """One place for sampling defaults (CLI, API, server)."""

    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0

    def sampler(self):
        return make_sampler(self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)

    def acceptance(self):
        if self.temp == 0:
            return GreedyAcceptance()
        return SamplingAcceptance(self.temp, self.top_p, self.top_k, self.min_p)
