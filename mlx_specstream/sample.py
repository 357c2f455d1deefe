"""Samplers: callables ``logprobs (B, V) -> tokens (B,)``. mlx-lm's chain (temperature, top-p,
top-k, min-p) is reused as is; the speculative acceptance rules live beside them."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import make_logits_processors, make_sampler  # noqa: F401  (re-export)


@dataclass(frozen=True)
class SamplingParams:
    """One place for sampling defaults (CLI, API, server)."""

    temp: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0

    def sampler(self):
        return make_sampler(self.temp, top_p=self.top_p, min_p=self.min_p, top_k=self.top_k)


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)
