"""The decode loops: autoregressive (:func:`generate_step`) and tree decoding for every drafter
(:func:`tree_generate_step`: prefill → forward → accept → commit, one host sync per step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .acceptance import GreedyAcceptance
from .cache import DEFAULT_PREFILL_STEP, KVCache, KVSettings, prefill, prepared_cache
from .drafters import ContextDrafts, Drafter, DraftState, Verified, Verifier, top_candidates
from .plan import TreePlan
from .sizing import AutoTree
from .errors import UserError

DEFAULT_MAX_TOKENS = 256


@dataclass
class StepResult:
    tokens: List[int]  # accepted drafts, then the correction token
    depth: int  # depth of the last accepted node (= accepted drafts)
    tree_size: int  # nodes verified (after pruning)
    path: Tuple[int, ...] = ()  # rank path of the last accepted node
    # (len(tokens), V) the target's log-probabilities each token was verified or drawn against
    # (before temperature and filters, as mlx-lm's): rows of the tree's logits, queued, not read
    logprobs: Optional[mx.array] = None


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable]] = None,
    prompt_cache: Optional[List[KVCache]] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    kv: Optional[KVSettings] = None,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Yield ``(token, logprobs)`` autoregressively. One host sync per token; the next token's
    graph is queued with ``mx.async_eval`` before the current one is read back. ``kv``: how the
    cache is kept (quantized from some length on)."""
    sampler = sampler or (lambda lp: mx.argmax(lp, axis=-1))
    cache = prepared_cache(model, prompt_cache, prompt.size + max_tokens + 1, kv)
    tokens = prompt if logits_processors else None

    def _step(y):
        nonlocal tokens
        if kv is not None:
            kv.apply(cache)
        logits = model(y[None], cache=cache)[:, -1, :]
        if logits_processors:
            for p in logits_processors:
                logits = p(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tok = sampler(logprobs)
        if logits_processors:
            tokens = mx.concatenate([tokens, tok])
        return tok, logprobs.squeeze(0)

    prefill(lambda t, c: model(t, cache=c), prompt[:-1], cache, prefill_step_size, kv)
    y, logprobs = _step(prompt[-1:])
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


def tree_generate_step(
    prompt: mx.array,
    model: nn.Module,
    drafter: Optional[Drafter] = None,
    *,
    max_tokens: int,
    accept: Optional[Callable] = None,
    tree: Optional[Sequence[Sequence[int]]] = None,
    lookup: Optional[int] = None,
    prompt_cache: Optional[List[KVCache]] = None,
    cached_tokens: Sequence[int] = (),
    prefill_step_size: int = DEFAULT_PREFILL_STEP,
    max_context: Optional[int] = None,
    overlap: bool = True,
    sizer: Optional[AutoTree] = None,
    kv: Optional[KVSettings] = None,
    pipeline: Optional[bool] = None,
) -> Generator[StepResult, None, None]:
    """Tree decoding with any drafter; yields one :class:`StepResult` per forward pass.

    All but the last prompt token are prefilled; the last one is a one-node tree that yields the
    first correction token and the first drafts; then every forward verifies the previous drafts
    and proposes the next. ``tree``: rank paths (default: the drafter's). ``lookup``: context
    drafts (prompt lookup) joining every tree (default: the drafter's), copied from
    ``cached_tokens`` (what ``prompt_cache`` already holds, e.g. earlier chat turns), the prompt
    and the output. ``max_context``: near it, steps verify the root alone. ``overlap=False``
    queues each step only after the caller took the previous one (for measuring what the
    overlap buys: ``benchmarks/async_overlap.py``). ``sizer``: every step's tree chosen from the
    drafts' confidence and the cost curve (:class:`mlx_specstream.sizing.AutoTree`; ``tree`` and
    ``lookup`` are then its layout's). ``pipeline``: while steps are plain, queue the next
    plain step before syncing on the current one, as mlx-lm's loop does (default:
    :func:`pipelines_plain_steps`); a plain step accepts nothing, so its commit is known before
    the sync. The price: when a plain step's drafts call for a tree, the step after it is
    already queued plain, so the tree comes one step later.
    """
    if (problem := getattr(model, "tree_problem", None)) is not None:  # found at load (models.mlxlm)
        raise UserError(f"{problem}: speculative decoding is not available for this model; decode with --no-speculate")
    drafter = drafter or Verifier()
    accept = accept or GreedyAcceptance()
    launch = launch_step if kv is None else _kept(launch_step, kv)
    lookup = drafter.setting.lookup if lookup is None else lookup
    if lookup < 0:
        raise UserError(f"lookup must be >= 0, got {lookup}")
    if sizer is not None:
        plan = sizer.layout  # every step's plan reads this candidate layout
        lookup = plan.lookup
    else:
        plan = TreePlan(drafter.setting.paths if tree is None else tree, lookup=lookup)
    if plan.drafts == 0 and not drafter.changes_main:
        drafter = Verifier()  # no drafter nodes in the tree: its drafts would be computed for nothing
    context = list(cached_tokens) + np.array(prompt).tolist()
    ctx = ContextDrafts(context, lookup) if lookup else None
    drafter.reset(context)
    largest = max(plan.size, sizer.max_nodes if sizer is not None else 0)
    cache = prepared_cache(model, prompt_cache, prompt.size + max_tokens + largest + 1, kv, largest + 1)
    prefill(lambda t, c: drafter.prefill(model, t, c), prompt[:-1], cache, prefill_step_size, kv)
    state = DraftState(prompt[-1].astype(mx.int32), plan.empty_candidates())
    confidence = sizer is not None
    pipeline = pipelines_plain_steps(model) if pipeline is None else pipeline
    pipeline = pipeline and overlap and not drafter.drafts_after_commit
    if sizer is not None:
        sizer.pipelined = pipeline  # a plain step then costs what its pipelined timing says
    step_plan, match = plan.root_only, 0
    pending = launch(model, drafter, step_plan, state, cache, accept, confidence)
    plain_next = False  # the latest drafts called for a plain step: the one after is queued early
    n = 0
    while True:
        ahead = None  # a plain step queued behind ``pending`` before its sync
        if (
            pipeline
            and plain_next
            and n + 1 < max_tokens
            and (max_context is None or cache[0].offset + 1 <= max_context)
            and committed_plain(pending, cache)
        ):
            ahead = launch(
                model,
                drafter,
                plan.root_only,
                DraftState(pending.correction, state.candidates),
                cache,
                accept,
                confidence,
            )
        result, cand, conf = finish_step(pending, drafter, cache, committed=ahead is not None)
        if sizer is not None:
            sizer.observe(step_plan, match, result.path)
        drafts = []
        if ctx is not None:
            ctx.extend(result.tokens)
            drafts, match = ctx.propose(), ctx.match
            cand = plan.with_context(cand, drafts)
        if sizer is not None:
            next_plan = sizer.next_plan(conf, drafts, match)
        elif ctx is not None:
            next_plan = plan.with_lookup(len(drafts))  # context rows only for drafts found, never padding
        else:
            next_plan = plan
        n += len(result.tokens)
        plain_next = next_plan.size == 1
        if ahead is not None:  # the next step is already on the device, plain: these drafts are passed over
            pending, step_plan, match = ahead, plan.root_only, 0
            yield result
            if n >= max_tokens:
                return
            continue
        step_plan = next_plan
        state = DraftState(mx.array(result.tokens[-1], mx.int32), cand)
        if max_context is not None and cache[0].offset + max(plan.max_depth, step_plan.max_depth) + 1 > max_context:
            step_plan = plan.root_only  # near the end of the context: the root alone
        if n < max_tokens and overlap:
            # Queue the next step before handing this one over: the device runs it while the
            # caller detokenizes, matches stops, writes (as mlx-lm's generate_step does).
            pending = launch(model, drafter, step_plan, state, cache, accept, confidence)
        yield result
        if n >= max_tokens:
            return
        if not overlap:
            pending = launch(model, drafter, step_plan, state, cache, accept, confidence)


def pipelines_plain_steps(model: nn.Module) -> bool:
    """Whether queueing plain steps early pays on this device: on the CPU only for quantized
    weights. Measured on SmolLM2 (2-core CPU, plain steps, ``benchmarks/plain_pipeline.py``): a
    4-bit folder's plain step 110.1 vs 120.5 ms unpipelined (mlx-lm 112.0); float32 57.4 vs
    56.9 ms (no gain, so the one-step delay of trees would be a pure loss;
    ``benchmarks/results/cpu-epyc-2core/plain_pipeline_*_s15.txt``). On a GPU the step's
    host work (~5 ms of graph building) is of the order of the step itself (unmeasured here)."""
    if mx.default_device() != mx.cpu:
        return True
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def committed_plain(p: "_Pending", cache: List[KVCache]) -> bool:
    """Commit a launched one-node step before its sync (its path is the root whatever the
    verification says); False, committing nothing, for a larger tree."""
    v = p.verified
    if v.plan.size != 1 or (v.bottom_rows is not None and int(v.bottom_rows[0]) != 0):
        return False
    for kv in cache:
        kv.compact(p.prefix, [0])
    return True


def _kept(launch: Callable, kv: KVSettings) -> Callable:
    """``launch`` with the cache kept per ``kv`` first (evicted past its window, quantized once
    long enough): after the previous step's commit, so no draft ever needs an evicted row."""

    def run(model, drafter, plan, state, cache, *a):
        kv.apply(cache)
        return launch(model, drafter, plan, state, cache, *a)

    return run


@dataclass
class _Pending:
    verified: Verified
    best: mx.array
    correction: mx.array
    cand: mx.array
    prefix: int
    conf: Optional[mx.array] = None


def launch_step(
    model: nn.Module,
    drafter: Drafter,
    plan: TreePlan,
    state: DraftState,
    cache: List[KVCache],
    accept: Callable,
    confidence: bool = False,
) -> _Pending:
    """Build one forward pass (verify ``plan``'s tree, accept, draft) and start it on the device.
    ``confidence``: also the drafts' softmax probabilities (g, width), in the same graph (read at
    the step's one sync: what sizes the next tree)."""
    prefix = cache[0].offset
    v = drafter.forward(model, plan, state, cache)
    best, correction = accept(v.plan, v.tokens, v.logits)
    conf = None
    if v.draft is not None:
        logits = v.draft(best, correction.reshape(()))
        cand = top_candidates(logits, plan.width)
        if confidence:
            lp = logits.astype(mx.float32)
            conf = mx.exp(mx.take_along_axis(lp, cand, axis=-1) - mx.logsumexp(lp, axis=-1, keepdims=True))
        if v.draft_ids is not None:
            cand = v.draft_ids[cand]  # positions in the draft vocabulary -> token ids
    else:
        cand = mx.zeros((0, plan.width), mx.int32)
    correction = correction.astype(mx.int32).reshape(())
    mx.async_eval(best, correction, v.tokens, cand, *(() if conf is None else (conf,)))
    return _Pending(v, best, correction, cand, prefix, conf)


def finish_step(
    p: _Pending, drafter: Drafter, cache: List[KVCache], committed: bool = False
) -> Tuple[StepResult, mx.array, Optional[np.ndarray]]:
    """Wait for a launched step, commit the accepted path's K/V (``committed``: done before the
    sync, :func:`committed_plain`); returns the step, the drafter's candidates for the next tree
    and their probabilities (when asked for)."""
    v = p.verified
    path = v.plan.tree.path_to(p.best.item())  # the one host sync of the step
    toks = np.array(v.tokens)
    accepted = [int(toks[i]) for i in path[1:]]
    keep = np.array(path, np.int32)
    keep_bottom = keep if v.bottom_rows is None else v.bottom_rows[path].astype(np.int32)
    if not committed:
        for i, kv in enumerate(cache):
            kv.compact(p.prefix, keep_bottom if i < v.n_bottom else keep)
    rows = v.logits[mx.array(keep)].astype(mx.float32)
    logprobs = rows - mx.logsumexp(rows, axis=-1, keepdims=True)
    mx.async_eval(logprobs)  # computed now (no sync): the tree's logits are then released
    result = StepResult(
        accepted + [int(p.correction.item())], len(path) - 1, v.plan.size, v.plan.tree.paths[path[-1]], logprobs
    )
    late = drafter.after_commit(accepted, result.tokens[-1])
    conf = None if p.conf is None or late is not None else np.array(p.conf)  # computed with ``best``: a read
    return result, late if late is not None else p.cand, conf


def tree_step(
    model: nn.Module, drafter: Drafter, plan: TreePlan, state: DraftState, cache: List[KVCache], accept: Callable
) -> Tuple[StepResult, mx.array]:
    """One forward pass, launched and finished (for measurements)."""
    return finish_step(launch_step(model, drafter, plan, state, cache, accept), drafter, cache)[:2]


def levels_reached(depth_counts: Sequence[int]) -> List[float]:
    """Share of steps whose accepted path reached tree level g = 1, 2, ...; ``depth_counts[d]``:
    steps that accepted ``d`` drafts (a histogram a caller updates in O(1) per step)."""
    n = sum(depth_counts)
    return [sum(depth_counts[g:]) / n for g in range(1, len(depth_counts))] if n else []
