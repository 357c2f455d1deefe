"""Decoding: ``generate_step`` (autoregressive), ``stream_generate``, ``generate`` and the
``specstream generate`` verb."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache, make_cache, prepared_cache
from .sample import SamplingParams

DEFAULT_MAX_TOKENS = 256
DEFAULT_PREFILL_STEP = 512


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
    mean_accepted: float = 1.0  # generation_tokens / steps
    acceptance_by_depth: List[float] = field(default_factory=list)  # share of steps reaching level g=1..
    tree_size: int = 1  # nodes verified by this step


def context_limit(model) -> Optional[int]:
    return getattr(model.args, "max_position_embeddings", None)


def _prefill(model, prompt: mx.array, cache: List[KVCache], step: int) -> mx.array:
    """Run all but the last ``1`` prompt tokens through the cache in chunks; return the rest."""
    while prompt.size > step:
        model(prompt[:step][None], cache=cache)
        mx.eval([c.state for c in cache])
        prompt = prompt[step:]
    return prompt


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None,
    prompt_cache: Optional[List[KVCache]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Yield ``(token, logprobs)`` autoregressively. One host sync per token; the next token's
    graph is queued with ``mx.async_eval`` before the current one is read back."""
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    cache = prepared_cache(model, prompt_cache, prompt.size + max_tokens + 1)
    tokens = prompt if logits_processors else None

    def _step(y):
        nonlocal tokens
        logits = model(y[None], cache=cache)[:, -1, :]
        if logits_processors:
            for p in logits_processors:
                logits = p(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tok = sampler(logprobs)
        if logits_processors:
            tokens = mx.concatenate([tokens, tok])
        return tok, logprobs.squeeze(0)

    y = _prefill(model, prompt, cache, prefill_step_size)
    y, logprobs = _step(y)
    mx.async_eval(y, logprobs)
    n = 0
    while n < max_tokens:
        if n + 1 < max_tokens:
            next_y, next_lp = _step(y)
            mx.async_eval(next_y, next_lp)
        yield y.item(), logprobs  # the one host sync per token
        n += 1
        if n < max_tokens:
            y, logprobs = next_y, next_lp


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


def _encode_prompt(tokenizer, prompt: Union[str, List[int], mx.array]) -> mx.array:
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    if prompt.ndim != 1 or prompt.size == 0:
        raise ValueError("prompt must be a non-empty string or 1-D list of token ids")
    return prompt.astype(mx.int32)


def check_prompt_length(model, n_prompt: int, max_tokens: int) -> int:
    """Raise for a prompt that does not fit the model's context; clamp ``max_tokens`` to it."""
    limit = context_limit(model)
    if limit is None:
        return max_tokens
    if n_prompt >= limit:
        raise ValueError(
            f"prompt is {n_prompt} tokens; the model's context is {limit} tokens "
            "(max_position_embeddings): shorten the prompt"
        )
    return min(max_tokens, limit - n_prompt)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, List[int], mx.array],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Optional[Callable] = None,
    stop: Optional[Sequence[str]] = None,
    prompt_cache: Optional[List[KVCache]] = None,
    sampling: Optional[SamplingParams] = None,
    accept: Optional[Callable] = None,
    speculative: Optional[bool] = None,
    tree=None,
    lookup: Optional[int] = None,
    history: Sequence[int] = (),
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    logits_processors: Optional[List[Callable]] = None,
) -> Generator[GenerationResponse, None, None]:
    """Stream a completion, one :class:`GenerationResponse` per decode step.

    Stops at an EOS token (not emitted), at a stop string (cut before it), or at ``max_tokens``.
    ``speculative`` defaults to on when the model carries streams; ``tree`` (rank paths)
    overrides the stream config's tree; ``lookup`` sets how many context drafts (prompt lookup)
    join each tree (default: the stream config's; any model can decode with them), copying also
    from ``history`` (the tokens already in ``prompt_cache``). ``sampling`` sets both the AR sampler and the
    speculative acceptance rule; ``sampler``/``accept`` pass custom callables.
    """
    from .speculative import ROOT_ONLY, lookup_generate_step, speculative_generate_step
    from .tree import build_tree

    streams = getattr(model, "streams", None)
    medusa = getattr(model, "medusa", None)
    if lookup is not None and lookup < 0:
        raise ValueError(f"lookup must be >= 0, got {lookup}")
    if speculative is None:
        speculative = streams is not None or medusa is not None or bool(lookup)
    if speculative and streams is None and medusa is None and not lookup:
        raise ValueError("speculative decoding needs a stream adapter (speculative_streams.json) or "
                         "context drafts (lookup > 0); this model has neither")
    if sampling is not None:
        sampler = sampler or sampling.sampler()
        accept = accept or sampling.acceptance()
    prompt = _encode_prompt(tokenizer, prompt)
    cached = prompt_cache[0].offset if prompt_cache else 0
    max_tokens = check_prompt_length(model, prompt.size + cached, max_tokens)
    tree_decoding = speculative or (streams is not None and model.main_depends_on_streams)
    if tree_decoding and accept is None and sampler is not None and sampler is not _greedy_sampler():
        raise ValueError("speculative sampling needs sampling=SamplingParams(...) or accept=...")
    if tree_decoding and logits_processors:
        raise ValueError("logits_processors are not supported with speculative decoding")
    paths = build_tree(tuple(map(tuple, tree))) if tree is not None else None
    if medusa is not None and speculative:
        from .medusa import medusa_generate_step

        steps = _spec_steps(medusa_generate_step(
            prompt, model.base, medusa, max_tokens=max_tokens, accept=accept, tree=paths,
            prompt_cache=prompt_cache, prefill_step_size=prefill_step_size, context=context_limit(model),
            lookup=lookup or 0, history=history))
    elif streams is not None and tree_decoding:
        steps = _spec_steps(speculative_generate_step(
            prompt, model.base, streams, max_tokens=max_tokens, accept=accept,
            tree=paths if speculative else ROOT_ONLY, prompt_cache=prompt_cache, prefill_step_size=prefill_step_size,
            context=context_limit(model), lookup=lookup if speculative else 0, history=history))
    elif speculative:  # a plain model with context drafts
        steps = _spec_steps(lookup_generate_step(
            prompt, model, lookup=lookup, max_tokens=max_tokens, accept=accept, prompt_cache=prompt_cache,
            prefill_step_size=prefill_step_size, context=context_limit(model), history=history))
    else:
        base = model.base if (streams is not None or medusa is not None) else model
        steps = _ar_steps(base, prompt, max_tokens=max_tokens, sampler=sampler,
                          prompt_cache=prompt_cache, prefill_step_size=prefill_step_size,
                          logits_processors=logits_processors)
    yield from _responses(steps, tokenizer, prompt.size, max_tokens, stop or ())


def _greedy_sampler():
    from mlx_lm.sample_utils import greedy_sampler

    return greedy_sampler


def _ar_steps(model, prompt, **kwargs):
    for tok, _ in generate_step(prompt, model, **kwargs):
        yield [tok], {"depth": 0, "tree_size": 1}


def _spec_steps(results):
    for r in results:
        yield r.tokens, {"depth": r.depth, "tree_size": r.tree_size}


def _responses(steps, tokenizer, n_prompt: int, max_tokens: int, stops: Sequence[str]):
    """Turn a stream of decode steps (lists of tokens) into responses: detokenize, apply stops,
    count, time. A step's tokens are cut at the first EOS/stop/limit inside it."""
    detok = tokenizer.detokenizer
    matcher = StopMatcher(stops)
    eos = tokenizer.eos_token_ids
    tic = time.perf_counter()
    prompt_tps = gen_tic = None
    n = n_steps = 0
    depth_counts: List[int] = []  # depth_counts[d]: steps whose last accepted node had depth d
    for toks, info in steps:
        d = info["depth"]
        depth_counts.extend([0] * (d + 1 - len(depth_counts)))
        depth_counts[d] += 1
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
            mean_accepted=n / n_steps,
            acceptance_by_depth=[sum(depth_counts[g:]) / n_steps for g in range(1, len(depth_counts))],
            tree_size=info["tree_size"],
        )
        if finish is not None:
            return


def generate(model: nn.Module, tokenizer, prompt, *, verbose: bool = False, **kwargs) -> str:
    """The whole completion as a string (see :func:`stream_generate` for the options)."""
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        text += last.text
        if verbose:
            print(last.text, end="", flush=True)
    if verbose and last is not None:
        print()
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s")
        print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s")
        print(f"Peak memory: {last.peak_memory:.3f} GB")
    return text


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    parser.add_argument("--temp", type=float, default=d.temp, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--min-p", type=float, default=d.min_p)
    parser.add_argument("--seed", type=int, default=None)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model options every serving verb shares."""
    parser.add_argument("--model", default=None, help="model folder or hub repo (default: embedded model)")
    parser.add_argument("--streams", default=None,
                        help="stream adapter: a name (speculative_streams-NAME.json) or a .json path")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="cast weights at load (default: float32 on CPUs, as stored on GPUs)")


def setup_arg_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description="Generate text")
    add_model_args(parser)
    parser.add_argument("--revision", default=None)
    parser.add_argument("--prompt", "-p", default="-", help="prompt text ('-' reads stdin)")
    parser.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    add_sampling_args(parser)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat-template", action="store_true",
                        help="wrap the prompt as a user message with the tokenizer's chat template")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize at load time")
    parser.add_argument("--q-bits", type=int, default=4)
    parser.add_argument("--q-group-size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print one JSON object with text and stats")
    parser.add_argument("--no-speculate", action="store_true",
                        help="decode autoregressively (same model, streams unused for drafting)")
    parser.add_argument("--tree", default=None,
                        help="draft tree: chain[:D] | cartesian:K[:D] | sparse:N | JSON rank paths")
    parser.add_argument("--prune-threshold", type=float, default=None, help="τ for tree pruning (0 = off)")
    parser.add_argument("--lookup", type=int, default=None,
                        help="context drafts (prompt lookup) per step, verified with the model's (default: stream config)")
    return parser


def main(argv=None) -> int:
    from .utils import load

    args = setup_arg_parser().parse_args(argv)
    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = load(args.model, revision=args.revision,
                            quantize=args.q_bits if args.quantize else None,
                            q_group_size=args.q_group_size, streams=args.streams, dtype=args.dtype,
                            prune_threshold=args.prune_threshold)
    streams = getattr(model, "streams", None)
    tree = None
    if args.tree:
        if streams is None:
            raise ValueError("--tree needs a model with a stream adapter")
        from .tree import parse_tree_spec

        tree = parse_tree_spec(args.tree, streams.config.num_streams)
    if args.chat_template:
        if not tokenizer.has_chat_template:
            raise SystemExit("error: this model's tokenizer has no chat template")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    sampling = SamplingParams(args.temp, args.top_p, args.top_k, args.min_p)
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens,
                                sampling=sampling, stop=args.stop, tree=tree, lookup=args.lookup,
                                speculative=False if args.no_speculate else None):
        text += last.text
        if not args.json:
            print(last.text, end="", flush=True)
    stats = {} if last is None else {
        k: getattr(last, k) for k in ("prompt_tokens", "prompt_tps", "generation_tokens",
                                      "generation_tps", "peak_memory", "finish_reason",
                                      "steps", "mean_accepted", "acceptance_by_depth")
    }
    stats["speculative"] = (streams is not None or bool(args.lookup)) and not args.no_speculate
    if args.json:
        print(json.dumps({"text": text, **stats}))
    else:
        print()
        if last is not None:
            print("=" * 10, file=sys.stderr)
            print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s\n"
                  f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s\n"
                  f"Peak memory: {last.peak_memory:.3f} GB", file=sys.stderr)
            if stats["speculative"]:
                depth = ", ".join(f"{a:.2f}" for a in last.acceptance_by_depth)
                print(f"Speculative: {last.mean_accepted:.2f} tokens/step over {last.steps} steps; "
                      f"levels reached: [{depth}]", file=sys.stderr)
    return 0


class PromptCache:
    """A KV cache plus the tokens it holds, reused across calls that share a prefix (chat turns,
    server requests): only the new suffix is prefilled."""

    def __init__(self, model):
        self.cache = make_cache(model)
        self.tokens: List[int] = []

    def prepare(self, prompt: List[int]) -> List[int]:
        """Trim the cache to the longest common prefix with ``prompt`` (keeping at least one
        prompt token to feed) and return the suffix to pass as the prompt."""
        held = self.tokens[: self.cache[0].offset]
        n = 0
        for a, b in zip(held, prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(prompt) - 1)
        for c in self.cache:
            c.trim(c.offset - n)
        self.tokens = list(prompt[:n])
        return list(prompt[n:])

    def record(self, prompt_suffix: List[int], emitted: List[int]) -> None:
        """After a generation: the cache holds (at most) everything fed so far; trim rows past
        the last token we actually kept (a stop may cut a speculative step short)."""
        self.tokens += list(prompt_suffix) + list(emitted)
        for c in self.cache:
            if c.offset > len(self.tokens):
                c.trim(c.offset - len(self.tokens))

    def reset(self) -> None:
        for c in self.cache:
            c.trim(c.offset)
        self.tokens = []
