"""The Speculative Streaming decode loop: every forward pass verifies the previous tree and drafts
the next one from the streams of the last accepted node."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .cache import KVCache, prepared_cache
from .sample import GreedyAcceptance
from .streams import (SpeculativeStreams, bottom_forward, early_exit_logits, main_forward, msa_forward,
                      msa_mask)
from .tree import Tree, build_tree, device_tree, prune

ROOT_ONLY = build_tree(())


@dataclass
class StepResult:
    tokens: List[int]  # accepted drafts, then the correction token
    depth: int  # depth of the last accepted node (= accepted drafts)
    tree_size: int  # nodes verified (after pruning)


@dataclass
class SpecState:
    """What one step leaves for the next: the correction token (root of the next tree, not yet
    cached; the cache holds everything before it) and the top-k candidates of each stream at the
    last accepted node."""

    root: mx.array  # () int32
    candidates: mx.array  # (γ, k) int32, best first


_MASKS: dict = {}


def _msa_mask_for(dt, g: int, main_sees_streams: bool) -> mx.array:
    """The tree's multi-stream mask, built once per (tree shape, streams run, main_sees_streams)."""
    key = (dt.tree.paths, g, main_sees_streams)
    m = _MASKS.get(key)
    if m is None:
        m = msa_mask(dt.ancestors, mx.arange(dt.size), g, main_sees_streams)
        mx.eval(m)
        _MASKS[key] = m
    return m


def top_candidates(logits: mx.array, k: int) -> mx.array:
    """(γ, V) draft logits -> (γ, k) token ids, best first."""
    if k == 1:  # chains: a plain argmax, no partition and sort
        return mx.argmax(logits, axis=-1, keepdims=True).astype(mx.int32)
    cand = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
    order = mx.argsort(-mx.take_along_axis(logits, cand, axis=-1), axis=-1)
    return mx.take_along_axis(cand, order, axis=-1).astype(mx.int32)


def _tree_tokens(dt, state: SpecState) -> mx.array:
    """The tree's tokens: the root, then each node's candidate (its stream, its rank)."""
    if dt.size == 1:
        return state.root.reshape(1)
    drafts = state.candidates[dt.depth[1:] - 1, dt.rank[1:]]
    return mx.concatenate([state.root.reshape(1), drafts.astype(mx.int32)])


def tree_mask(dt, prefix: int) -> mx.array:
    """Tree nodes see the whole cached prefix and their ancestors: (1, 1, T, prefix + T), shaped
    for attention once per step rather than once per layer."""
    m = dt.ancestors
    if prefix:
        m = mx.concatenate([mx.ones((dt.size, prefix), dtype=mx.bool_), m], axis=1)
    return m[None, None]


def commit_step(tree: Tree, dt, tokens, logits, draft_logits: Optional[Callable], cache: List[KVCache],
                prefix: int, accept: Callable, k: int, bottom_rows: Optional[np.ndarray] = None, n_bottom: int = 0):
    """Shared by every drafter: accept on device, draft from the last accepted node, sync once,
    then keep the accepted path's K/V. ``bottom_rows`` maps surviving nodes to the rows the first
    ``n_bottom`` layers wrote (when pruning dropped nodes between them and the rest).
    ``draft_logits`` None: no model drafts (context drafts only)."""
    best, correction = accept(dt, tokens, logits)
    cand = top_candidates(draft_logits(best), k) if draft_logits is not None else mx.zeros((0, k), mx.int32)
    correction = correction.astype(mx.int32)
    mx.eval(best, correction, tokens, cand)  # the one host sync of the step
    path = tree.path_to(best.item())
    toks = np.array(tokens)
    out = [int(toks[i]) for i in path[1:]] + [correction.item()]
    keep = np.array(path, np.int32)
    keep_bottom = keep if bottom_rows is None else bottom_rows[path].astype(np.int32)
    for i, kv in enumerate(cache):
        kv.compact(prefix, keep_bottom if i < n_bottom else keep)
    return StepResult(out, len(path) - 1, tree.size), SpecState(correction, cand)


def verify_step(model, tree: Tree, state: SpecState, cache: List[KVCache], accept: Callable, k: int,
                head_drafter: Optional[Callable] = None) -> Tuple[StepResult, SpecState]:
    """One forward pass of the plain model over the tree; ``head_drafter`` (final hidden state of
    the last accepted node -> (drafts, V) logits, e.g. Medusa heads) drafts the next tree, else
    only context drafts do."""
    P = cache[0].offset
    dt = device_tree(tree)
    tokens = _tree_tokens(dt, state)
    h = model.hidden(tokens[None], cache, mask=tree_mask(dt, P), positions=dt.depth + P)[0]
    draft = (lambda best: head_drafter(h[best])) if head_drafter is not None else None
    return commit_step(tree, dt, tokens, model.head(h), draft, cache, P, accept, k)


def drafts_needed(config, tree: Tree) -> int:
    """Streams a step must run: the tree's depth (deeper streams draft nothing it uses), unless
    main rows see their streams (then every stream shapes the main logits)."""
    return config.num_streams if config.main_sees_streams else max(tree.max_depth, 1)


def spec_step(
    model,
    streams: SpeculativeStreams,
    tree: Tree,
    state: SpecState,
    cache: List[KVCache],
    accept: Callable,
    k_candidates: int,
    num_drafts: Optional[int] = None,
) -> Tuple[StepResult, SpecState]:
    """One forward pass: verify ``tree`` (built from ``state``) and draft ``num_drafts`` levels
    (default γ) from every survivor."""
    c = streams.config
    g = num_drafts or c.num_streams
    n_bottom = len(model.layers) - c.num_msa_layers
    P = cache[0].offset
    dt = device_tree(tree)
    tokens = _tree_tokens(dt, state)
    positions = dt.depth + P
    h = bottom_forward(model, streams, tokens[None], mask=tree_mask(dt, P), positions=positions,
                       caches=cache[:n_bottom] + [None] * c.num_msa_layers)
    sel = None
    if c.prune_threshold > 0 and tree.size > 1:
        # Parallel tree pruning: a child's early-exit probability under its parent. The surviving
        # shape must be known on the host to shrink the MSA rows: a second sync, only when τ > 0.
        logp = early_exit_logits(model, streams, h[0])
        logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
        child_lp = logp[dt.parent_or_self, tokens]
        keep = prune(tree, np.exp(np.array(child_lp.astype(mx.float32))), c.prune_threshold)
        if not keep.all():
            sel = np.flatnonzero(keep)
            sub = build_tree(tuple(tree.paths[i] for i in sel[1:]))
            idx = mx.array(sel.astype(np.int32))
            h, tokens, positions = h[:, idx], tokens[idx], positions[idx]
            tree, dt = sub, device_tree(sub)
    h_main, h_str = msa_forward(model, streams, h, anc=dt.ancestors, owners=mx.arange(tree.size),
                                positions=positions, caches=cache[n_bottom:],
                                full_mask=_msa_mask_for(dt, g, c.main_sees_streams), num_streams=g)
    logits = model.head(model.final_norm(h_main))[0]  # (T, V)
    # The next draft: stream logits of the last accepted node only.
    streams_at = lambda best: model.head(model.final_norm(h_str[0].reshape(tree.size, g, -1)[best]))  # noqa: E731
    return commit_step(tree, dt, tokens, logits, streams_at, cache, P, accept, k_candidates, sel, n_bottom)


class ContextDrafts:
    """Drafts copied from the context (prompt lookup): the ``n`` tokens that followed the most
    recent earlier occurrence of the current suffix, longest match of ``max_ngram``..1 tokens. A
    continuation that runs into the present repeats itself (a loop of period < n). Host side,
    O(max_ngram) per token: every n-gram maps to where its latest continuation starts.

    Example: history ``a b c a b`` → suffix ``a b`` last continued at ``c`` → ``c a b c ...``.
    """

    def __init__(self, tokens: Sequence[int], n: int, max_ngram: int = 3):
        self.n, self.max_ngram = n, max_ngram
        self.hist: List[int] = []
        self.next_at: List[dict] = [{} for _ in range(max_ngram + 1)]
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        h = self.hist
        for t in tokens:
            i = len(h)
            for m in range(1, min(self.max_ngram, i) + 1):
                self.next_at[m][tuple(h[i - m : i])] = i
            h.append(int(t))

    def propose(self) -> List[int]:
        h = self.hist
        for m in range(min(self.max_ngram, len(h)), 0, -1):
            pos = self.next_at[m].get(tuple(h[-m:]))
            if pos is not None:
                out: List[int] = []
                for j in range(self.n):
                    i = pos + j
                    out.append(h[i] if i < len(h) else out[i - len(h)])
                return out
        return []


def lookup_paths(k: int, n: int) -> Tuple[Tuple[int, ...], ...]:
    """The context-draft chain as rank paths: rank ``k`` (one past the model's k candidates)."""
    return tuple((k,) * d for d in range(1, n + 1))


def _with_context_column(cand: mx.array, drafts: List[int], depth: int) -> mx.array:
    """(γ, k) model candidates -> (depth, k+1): rows padded with 0 to ``depth``, then the
    context drafts as the last column (0 where there are none; a wrong draft only costs a node)."""
    g, k = cand.shape
    if g < depth:
        cand = mx.concatenate([cand, mx.zeros((depth - g, k), mx.int32)])
    col = mx.array((drafts + [0] * depth)[:depth], dtype=mx.int32)[:, None]
    return mx.concatenate([cand[:depth], col], axis=1)


def decode_trees(
    prompt: mx.array,
    model,
    step: Callable,
    prefill: Callable,
    *,
    num_drafts: int,
    tree: Tree,
    max_tokens: int,
    prompt_cache: Optional[List[KVCache]] = None,
    prefill_step_size: int = 512,
    context: Optional[int] = None,
    lookup: int = 0,
    history: Sequence[int] = (),
) -> Generator[StepResult, None, None]:
    """The loop every drafter shares. All but the last prompt token go through ``prefill(tokens,
    cache)`` in chunks; the last one is a one-node tree that yields the first correction token and
    the first draft; then each ``step(tree, state, cache, k)`` verifies the previous draft and
    drafts the next. Yields one :class:`StepResult` per forward pass.

    ``lookup`` > 0 adds a chain of that many context drafts (:class:`ContextDrafts`) to every
    tree, verified in the same forward as the model's drafts; they copy from ``history`` (the
    tokens already in ``prompt_cache``, e.g. earlier chat turns), the prompt and the output."""
    k = max(tree.max_rank, 1)
    ctx, depth = None, num_drafts
    if lookup:
        tree = build_tree(tree.paths[1:] + lookup_paths(k, lookup))
        depth = max(num_drafts, lookup)
        ctx = ContextDrafts(list(history) + np.array(prompt).tolist(), lookup)
    cache = prepared_cache(model, prompt_cache, prompt.size + max_tokens + tree.size + 1)
    rest = prompt[:-1]
    while rest.size:
        prefill(rest[:prefill_step_size][None], cache)
        mx.eval([c.state for c in cache])
        rest = rest[prefill_step_size:]
    state = SpecState(prompt[-1].astype(mx.int32), mx.zeros((depth, k + (ctx is not None)), mx.int32))
    step_tree = ROOT_ONLY
    n = 0
    while n < max_tokens:
        if context is not None and cache[0].offset + tree.max_depth + 1 > context:
            step_tree = ROOT_ONLY  # near the end of the context: no room for drafts
        result, state = step(step_tree, state, cache, k)
        n += len(result.tokens)
        if ctx is not None:
            ctx.extend(result.tokens)
            state = SpecState(state.root, _with_context_column(state.candidates, ctx.propose(), depth))
        yield result
        step_tree = tree


def speculative_generate_step(
    prompt: mx.array,
    model,
    streams: SpeculativeStreams,
    *,
    max_tokens: int,
    accept: Optional[Callable] = None,
    tree: Optional[Tree] = None,
    prompt_cache: Optional[List[KVCache]] = None,
    prefill_step_size: int = 512,
    context: Optional[int] = None,
    lookup: Optional[int] = None,
    history: Sequence[int] = (),
) -> Generator[StepResult, None, None]:
    """Speculative Streaming: yield one :class:`StepResult` per forward pass. ``lookup``: context
    drafts per step (default: the stream config's)."""
    accept = accept or GreedyAcceptance()
    tree = tree or build_tree(streams.config.tree_paths)
    lookup = streams.config.lookup if lookup is None else lookup
    if tree.size == 1 and lookup and not streams.changes_main:
        # No stream drafts in the tree: the streams would be computed for nothing.
        return lookup_generate_step(prompt, model, lookup=lookup, max_tokens=max_tokens, accept=accept,
                                    prompt_cache=prompt_cache, prefill_step_size=prefill_step_size,
                                    context=context, history=history)
    g = drafts_needed(streams.config, tree)
    return decode_trees(
        prompt, model,
        lambda t, st, cache, k: spec_step(model, streams, t, st, cache, accept, k, g),
        # in shared mode the MSA layers' LoRA applies to prompt rows too
        lambda toks, cache: main_forward(model, streams, toks, cache),
        num_drafts=g, tree=tree, max_tokens=max_tokens, prompt_cache=prompt_cache,
        prefill_step_size=prefill_step_size, context=context, lookup=lookup, history=history)


def lookup_generate_step(
    prompt: mx.array,
    model,
    *,
    lookup: int,
    max_tokens: int,
    accept: Optional[Callable] = None,
    prompt_cache: Optional[List[KVCache]] = None,
    prefill_step_size: int = 512,
    context: Optional[int] = None,
    history: Sequence[int] = (),
) -> Generator[StepResult, None, None]:
    """Context drafts only (prompt lookup decoding), for any model: the baseline that tells how
    much of a drafter's gain copying from the context alone would give."""
    accept = accept or GreedyAcceptance()
    step = lambda t, state, cache, k: verify_step(model, t, state, cache, accept, k)  # noqa: E731
    return decode_trees(prompt, model, step, lambda toks, cache: model(toks, cache=cache), num_drafts=0,
                        tree=ROOT_ONLY, max_tokens=max_tokens, prompt_cache=prompt_cache,
                        prefill_step_size=prefill_step_size, context=context, lookup=lookup, history=history)
