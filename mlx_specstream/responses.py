"""Decode steps → :class:`GenerationResponse` objects: detokenizing, stop strings, counts and
timing, shared by every decoder (one response per decode step)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

from .decode import levels_reached


@dataclass
class GenerationResponse:
    """One streamed piece of output (mlx-lm's fields, plus speculation stats)."""

    text: str
    token: Optional[int]
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    finish_reason: Optional[str] = None  # "stop" | "length" | None while running
    tokens: List[int] = field(default_factory=list)  # tokens emitted by this response
    accepted: int = 1  # tokens emitted by the decode step that produced this response
    steps: int = 0  # decode forward passes so far (the prompt's pass included)
    # tokens per forward pass so far: (accepted drafts + correction tokens) / steps — the correction
    # counts, so plain decoding is 1.0 (README: "Tokens per step")
    tokens_per_step: float = 1.0
    acceptance_by_depth: List[float] = field(default_factory=list)  # share of steps reaching level g=1..
    tree_size: int = 1  # nodes verified by this step
    # (len(tokens), V): row i the target's log-probabilities at tokens[i] (mlx-lm's `logprobs`,
    # one row per token of the step; before temperature and filters)
    logprobs: Optional[mx.array] = None
    from_draft: List[bool] = field(default_factory=list)  # tokens[i] was an accepted draft (mlx-lm's field)

    @property
    def mean_accepted(self) -> float:
        """The earlier name of :attr:`tokens_per_step` (it counts the correction token too)."""
        return self.tokens_per_step


class StopMatcher:
    """Cuts streamed text at stop strings and holds back a possible partial match."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.emitted = 0

    def feed(self, text: str) -> Tuple[str, bool]:
        """Given the full text so far, return (new safe text, stopped)."""
        best = None
        for s in self.stops:
            i = text.find(s, max(0, self.emitted - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        if best is not None:
            out = text[self.emitted : best]
            self.emitted = max(self.emitted, best)
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.emitted, len(text) - hold)
        out = text[self.emitted : end]
        self.emitted = end
        return out, False

    def flush(self, text: str) -> str:
        out = text[self.emitted :]
        self.emitted = len(text)
        return out


def responses(steps, tokenizer, n_prompt: int, max_tokens: int, stops: Sequence[str]):
    """Turn decode steps ``(tokens, depth, tree_size, logprobs)`` into responses: detokenize, apply stops,
    count, time. A step's tokens are cut at the first EOS/stop/limit inside it."""
    detok = tokenizer.detokenizer
    matcher = StopMatcher(stops)
    eos = tokenizer.eos_token_ids
    tic = time.perf_counter()
    prompt_tps = gen_tic = None
    n = n_steps = 0
    depth_counts: List[int] = []  # depth_counts[d]: steps that accepted d drafts
    produced = 0  # tokens the forward passes produced (a step's last ones may be cut: EOS, stop, limit)
    for toks, depth, tree_size, logprobs in steps:
        depth_counts.extend([0] * (depth + 1 - len(depth_counts)))
        depth_counts[depth] += 1
        produced += len(toks)
        if gen_tic is None:
            prompt_tps = n_prompt / max(time.perf_counter() - tic, 1e-9)
            gen_tic = time.perf_counter()
        n_steps += 1
        emitted, finish, text, by_string = [], None, "", False
        for t in toks:
            if t in eos:
                finish = "stop"
                break
            emitted.append(t)
            n += 1
            detok.add_token(t)
            piece, by_string = matcher.feed(detok.text)
            text += piece
            if by_string:
                finish = "stop"
                break
            if n >= max_tokens:
                finish = "length"
                break
        if finish is not None and not by_string:
            detok.finalize()  # flushes bytes held for an incomplete character
            piece, by_string = matcher.feed(detok.text)
            text += piece if by_string else piece + matcher.flush(detok.text)
        elapsed = max(time.perf_counter() - gen_tic, 1e-9)
        yield GenerationResponse(
            text=text,
            token=emitted[-1] if emitted else None,
            tokens=emitted,
            prompt_tokens=n_prompt,
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=n / elapsed,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish,
            accepted=len(emitted),
            steps=n_steps,
            tokens_per_step=produced / n_steps,
            acceptance_by_depth=levels_reached(depth_counts),
            tree_size=tree_size,
            logprobs=None if logprobs is None else logprobs[: len(emitted)],
            from_draft=[i < depth for i in range(len(emitted))],  # a step's drafts come before its correction
        )
        if finish is not None:
            return
