"""``stream_generate`` / ``generate`` (the Python API: the one place that chooses plain or tree
decoding) and the ``specstream generate`` verb."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Generator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.sample_utils import greedy_sampler

from .checkpoint import DEFAULT_Q_BITS, DEFAULT_Q_GROUP_SIZE
from .cache import DEFAULT_PREFILL_STEP, KVCache, KVSettings, PromptCache
from .cli import add_cache_args, add_model_args, add_sampling_args, check_args, kv_settings, load_from_args
from .decode import DEFAULT_MAX_TOKENS, generate_step, tree_generate_step
from .calibrate import cost_curve
from .drafters import DraftModelDrafter, Drafter, Verifier
from .sizing import AUTO_CONTEXT, AUTO_LOOKUP, AUTO_SPECS, AUTO_WIDTH, AutoTree, ContextStats, context_priors
from .responses import GenerationResponse, responses
from .sample import SamplingParams
from .setting import PLAIN
from .tokenizer import chat_ids
from .tree import MAX_LOOKUP, parse_tree_spec
from .errors import UserError, notice


MAX_CHARS_PER_TOKEN = 128  # beyond any tokenizer's longest token


def context_limit(model) -> Optional[int]:
    return getattr(model.args, "max_position_embeddings", None)


def check_prompt_length(model, n_prompt: int, max_tokens: int) -> int:
    """Raise for a prompt that does not fit the model's context; clamp ``max_tokens`` to it."""
    limit = context_limit(model)
    if limit is None:
        return max_tokens
    if n_prompt >= limit:
        raise UserError(
            f"prompt is {n_prompt} tokens; the model's context is {limit} tokens "
            "(max_position_embeddings): shorten the prompt"
        )
    return min(max_tokens, limit - n_prompt)


def _encode_prompt(tokenizer, prompt: Union[str, List[int], mx.array]) -> mx.array:
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    if prompt.ndim != 1 or prompt.size == 0:
        raise UserError("prompt must be a non-empty string or 1-D list of token ids")
    return prompt.astype(mx.int32)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, List[int], mx.array],
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    drafter: Optional[Drafter] = None,
    speculative: Optional[bool] = None,
    tree: Optional[Sequence[Sequence[int]]] = None,
    lookup: Optional[int] = None,
    sampling: Optional[SamplingParams] = None,
    sampler: Optional[Callable] = None,
    accept: Optional[Callable] = None,
    stop: Optional[Sequence[str]] = None,
    prompt_cache: Optional[List[KVCache]] = None,
    cached_tokens: Sequence[int] = (),
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    logits_processors: Optional[List[Callable]] = None,
    kv: Optional[KVSettings] = None,
) -> Generator[GenerationResponse, None, None]:
    """Stream a completion, one :class:`GenerationResponse` per decode step.

    Stops at an EOS token (not emitted), at a stop string (cut before it), or at ``max_tokens``.
    ``drafter`` defaults to the one :func:`mlx_specstream.load` attached to ``model``;
    ``speculative`` (default: on when there is a drafter or ``lookup``) chooses tree decoding;
    ``tree`` (rank paths) overrides the drafter's tree; ``lookup`` sets how many context drafts
    (prompt lookup) join each tree (default: the drafter's; any model can decode with them alone),
    copying also from ``cached_tokens`` (the tokens already in ``prompt_cache``). ``sampling``
    sets both the AR sampler and the tree acceptance rule; ``sampler``/``accept`` pass custom
    callables.
    """
    base = getattr(model, "base", model)
    drafter = drafter if drafter is not None else getattr(model, "drafter", None)
    if lookup is not None and not 0 <= lookup <= MAX_LOOKUP:
        raise UserError(f"lookup must be in [0, {MAX_LOOKUP}], got {lookup}")
    if isinstance(tree, str) and tree not in AUTO_SPECS:
        raise UserError(f"tree must be rank paths or one of {AUTO_SPECS}, got {tree!r}")
    if tree is not None and not isinstance(tree, str) and drafter is None:
        raise UserError("a tree needs a drafter to fill it (stream adapter, Medusa heads or draft model)")
    # The drafter's default setting at this temperature (sampling's when `bench tune --temp T`
    # fitted one) fills what the caller left unset.
    temp = sampling.temp if sampling is not None else 0.0
    setting = drafter.setting_for(temp) if drafter is not None else PLAIN
    if tree is not None:
        setting = setting.replace(tree=tree if isinstance(tree, str) else tuple(tuple(p) for p in tree))
        if isinstance(tree, str) and lookup is None:
            lookup = AUTO_LOOKUP  # sized per step: up to this many context drafts
    if lookup is not None:
        setting = setting.replace(lookup=lookup)
    if speculative is None:
        speculative = not setting.drafts_nothing
    if speculative and drafter is None and not setting.lookup and not setting.auto:
        raise UserError(
            "speculative decoding needs a drafter (a stream adapter, Medusa heads, a draft model) "
            "or context drafts (lookup > 0); this model has none"
        )
    if not speculative:
        setting = PLAIN
    if drafter is not None:
        drafter = drafter.configured(setting)
    if sampling is not None:
        if not 0 <= sampling.top_k < base.args.vocab_size:
            raise UserError(
                f"top_k must be in [0, {base.args.vocab_size}) for this model's vocabulary, got {sampling.top_k}"
            )
        sampler = sampler or sampling.sampler()
        accept = accept or sampling.acceptance()
        if (
            speculative
            and sampling.temp > 0
            and tree is None
            and lookup is None
            and drafter is not None
            and drafter.sampled is None
            and (name := drafter.tuned_for_greedy_only()) is not None
        ):
            # Tuned for greedy decoding only: sampled drafts are accepted less often (on SmolLM2 at
            # T=0.7 its greedy setting ran 0.88x plain decoding: README), so say it once.
            notice(
                f"[{name}: its tree and context drafts "
                "were tuned for greedy decoding; sampling, they are accepted less often and can decode slower "
                "than plain decoding (tune for sampling: specstream bench tune --temp T --write; "
                "plain: --no-speculate)]"
            )
    limit = context_limit(base)
    if isinstance(prompt, str) and limit is not None and len(prompt) > MAX_CHARS_PER_TOKEN * limit:
        # refused before tokenizing: no token is this long, so it cannot fit the context
        raise UserError(
            f"prompt is {len(prompt)} characters; the model's context is {limit} tokens: shorten the prompt"
        )
    prompt = _encode_prompt(tokenizer, prompt)
    cached = prompt_cache[0].offset if prompt_cache else 0
    max_tokens = check_prompt_length(base, prompt.size + cached, max_tokens)
    # Plain decoding of a model whose drafter changes the target (shared-mode streams) still
    # runs the drafter's forward: one-node trees.
    tree_decoding = speculative or (drafter is not None and drafter.changes_main)
    if tree_decoding:
        if accept is None and sampler is not None and sampler is not greedy_sampler:
            raise UserError("speculative sampling needs sampling=SamplingParams(...) or accept=...")
        if logits_processors:
            raise UserError("logits_processors are not supported with speculative decoding")
        auto = setting.auto
        sizer = auto_tree(base, None if auto == AUTO_CONTEXT else drafter, setting.lookup, temp) if auto else None
        steps = (
            (r.tokens, r.depth, r.tree_size, r.logprobs)
            for r in tree_generate_step(
                prompt,
                base,
                drafter,
                max_tokens=max_tokens,
                accept=accept,
                tree=setting.paths,
                lookup=setting.lookup,
                prompt_cache=prompt_cache,
                cached_tokens=cached_tokens,
                prefill_step_size=prefill_step_size,
                max_context=context_limit(base),
                sizer=sizer,
                kv=kv,
            )
        )
    else:
        steps = (
            ([tok], 0, 1, lp[None])
            for tok, lp in generate_step(
                prompt,
                base,
                max_tokens=max_tokens,
                sampler=sampler,
                prompt_cache=prompt_cache,
                prefill_step_size=prefill_step_size,
                logits_processors=logits_processors,
                kv=kv,
            )
        )
    yield from responses(on_generation_stream(steps, base), tokenizer, prompt.size, max_tokens, stop or ())


def on_generation_stream(steps, model):
    """mlx-lm's Metal practice around a decode: every step's graph built on its dedicated
    ``generation_stream``, and the weights wired (kept resident) for the whole generation —
    no-ops where Metal is absent (unmeasured here: no Apple GPU). The caller's code between
    steps runs on the default stream, as with mlx-lm's ``stream_generate``."""
    with wired_limit(model, [generation_stream]):
        it = iter(steps)
        while True:
            with mx.stream(generation_stream):
                step = next(it, None)
            if step is None:
                return
            yield step


def auto_tree(base: nn.Module, drafter: Optional[Drafter], lookup: Optional[int], temp: float = 0.0) -> AutoTree:
    """Per-step tree sizing for ``drafter`` (None: context drafts alone) on this device: up to
    ``lookup`` context drafts (default :data:`AUTO_LOOKUP`) beside the drafter's candidates, their
    acceptance first estimated from the priors fitted at the temperature nearest ``temp``."""
    if isinstance(drafter, DraftModelDrafter):
        raise UserError(
            "tree 'auto' sizes trees from drafts computed in the verify pass (streams, Medusa "
            "heads, context drafts); a draft model drafts after the commit: give it a tree"
        )
    levels = drafter.levels if drafter is not None else 0
    lookup = AUTO_LOOKUP if lookup is None else lookup
    width = AUTO_WIDTH if levels else 1
    cost = cost_curve(base, drafter if drafter is not None else Verifier(), width=width, levels=levels)
    return AutoTree(cost, width=width, levels=levels, lookup=lookup, context=ContextStats(context_priors(temp)))


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


def cached_stream_generate(model, tokenizer, pcache: PromptCache, prompt: List[int], **kwargs):
    """:func:`stream_generate` over a :class:`PromptCache` (chat turns, server requests): only
    the suffix the cache lacks is prefilled, and the cache records what was kept even when the
    caller stops early."""
    suffix = pcache.prepare(prompt)
    emitted: List[int] = []
    try:
        for r in stream_generate(
            model, tokenizer, suffix, prompt_cache=pcache.cache, cached_tokens=pcache.tokens, **kwargs
        ):
            emitted += r.tokens
            yield r
    finally:
        pcache.record(suffix, emitted)


def setup_arg_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(description="Generate text")
    add_model_args(parser)
    parser.add_argument("--revision", default=None)
    parser.add_argument("--prompt", "-p", default="-", help="prompt text ('-' reads stdin)")
    parser.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS)
    add_sampling_args(parser)
    add_cache_args(parser)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="use the prompt as raw text (default: a user message in the tokenizer's chat template, when it has one)",
    )
    parser.add_argument("--system-prompt", default=None, help="system message (with the chat template)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize at load time")
    parser.add_argument("--q-bits", type=int, default=DEFAULT_Q_BITS)
    parser.add_argument("--q-group-size", type=int, default=DEFAULT_Q_GROUP_SIZE)
    parser.add_argument("--json", action="store_true", help="print one JSON object with text and stats")
    parser.add_argument(
        "--no-speculate", action="store_true", help="decode autoregressively (same model, its drafter unused)"
    )
    parser.add_argument(
        "--tree",
        default=None,
        help="draft tree: auto (sized every step from the drafts' confidence and this device's "
        "cost) | auto:context (the same over context drafts alone) | chain[:D] | cartesian:K[:D] | sparse:N | JSON rank paths",
    )
    parser.add_argument("--prune-threshold", type=float, default=None, help="τ for tree pruning (0 = off)")
    parser.add_argument(
        "--lookup",
        type=int,
        default=None,
        help="context drafts (prompt lookup) per step, verified with the drafter's (default: its own)",
    )
    return parser


def _read_stdin() -> str:
    data = sys.stdin.buffer.read(MAX_PROMPT_BYTES + 1)
    if len(data) > MAX_PROMPT_BYTES:
        raise UserError(f"the prompt on stdin is over {MAX_PROMPT_BYTES >> 20} MB: beyond any model's context")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"the prompt on stdin is not UTF-8 text (byte {e.start}: {data[e.start : e.start + 1]!r})"
        ) from None


MAX_PROMPT_BYTES = 64 << 20  # far past any context; what is read before the model's own limit is known


def _checked_text(prompt: str) -> str:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise UserError(f"--prompt is not UTF-8 text (at character {e.start})") from None
    return prompt


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    check_args(args)
    if args.no_speculate and (args.tree or args.lookup or args.prune_threshold is not None):
        raise UserError(
            "--tree, --lookup and --prune-threshold shape speculative decoding; --no-speculate turns it off"
        )
    prompt = _read_stdin() if args.prompt == "-" else _checked_text(args.prompt)
    model, tokenizer = load_from_args(
        args,
        revision=args.revision,
        quantize=args.q_bits if args.quantize else None,
        q_group_size=args.q_group_size,
        prune_threshold=args.prune_threshold,
    )
    drafter = getattr(model, "drafter", None)
    tree = None
    if args.tree and args.tree.strip() in AUTO_SPECS:
        tree = args.tree.strip()  # sized every step; with no drafter, over context drafts alone
    elif args.tree:
        if drafter is None:
            raise UserError("--tree needs a drafter (a stream adapter, --medusa or --draft-model)")
        tree = parse_tree_spec(args.tree, drafter.levels)
    if tokenizer.has_chat_template and not args.ignore_chat_template:  # as mlx-lm's generate does
        messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        prompt = chat_ids(tokenizer, messages + [{"role": "user", "content": prompt}])
    sampling = SamplingParams(args.temp, args.top_p, args.top_k, args.min_p)
    text, last, drafted = "", None, False
    for last in stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=args.max_tokens,
        sampling=sampling,
        stop=args.stop,
        tree=tree,
        lookup=args.lookup,
        speculative=False if args.no_speculate else None,
        kv=kv_settings(args),
    ):
        text += last.text
        drafted = drafted or last.tree_size > 1
        if not args.json:
            print(last.text, end="", flush=True)
    stats = (
        {}
        if last is None
        else {
            k: getattr(last, k)
            for k in (
                "prompt_tokens",
                "prompt_tps",
                "generation_tokens",
                "generation_tps",
                "peak_memory",
                "finish_reason",
                "steps",
                "mean_accepted",
                "acceptance_by_depth",
            )
        }
    )
    # whether drafts were verified: a setting may decode plainly (sampling, reference BLAS)
    stats["speculative"] = drafted
    if args.json:
        print(json.dumps({"text": text, **stats}))
    else:
        print()
        if last is not None:
            print("=" * 10, file=sys.stderr)
            print(
                f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s\n"
                f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s\n"
                f"Peak memory: {last.peak_memory:.3f} GB",
                file=sys.stderr,
            )
            if stats["speculative"]:
                depth = ", ".join(f"{a:.2f}" for a in last.acceptance_by_depth)
                print(
                    f"Speculative: {last.tokens_per_step:.2f} tokens/step over {last.steps} steps; "
                    f"levels reached: [{depth}]",
                    file=sys.stderr,
                )
    return 0
