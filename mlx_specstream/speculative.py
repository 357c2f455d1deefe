"""The Speculative Streaming decode loop: every forward pass verifies the previous tree and drafts
the next one from the streams of the last accepted node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generator, List, Optional, Tuple

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
    cached) and the top-k candidates of each stream at the last accepted node."""

    root: mx.array  # () int32
    candidates: mx.array  # (γ, k) int32, best first
    prefix: int  # tokens in the cache


_MASKS: dict = {}


def _msa_mask_for(dt, c) -> mx.array:
    """The tree's multi-stream mask, built once per (tree shape, γ, main_sees_streams)."""
    key = (dt.tree.paths, c.num_streams, c.main_sees_streams)
    m = _MASKS.get(key)
    if m is None:
        m = msa_mask(dt.ancestors, mx.arange(dt.size), c.num_streams, c.main_sees_streams)
        mx.eval(m)
        _MASKS[key] = m
    return m


def top_candidates(logits: mx.array, k: int) -> mx.array:
    """(γ, V) draft logits -> (γ, k) token ids, best first."""
    cand = mx.argpartition(-logits, kth=k - 1, axis=-1)[:, :k]
    order = mx.argsort(-mx.take_along_axis(logits, cand, axis=-1), axis=-1)
    return mx.take_along_axis(cand, order, axis=-1).astype(mx.int32)


def _tree_tokens(tree: Tree, state: SpecState) -> mx.array:
    if tree.size == 1:
        return state.root.reshape(1)
    depth, rank = tree.depth[1:] - 1, tree.rank[1:]
    drafts = state.candidates[mx.array(depth), mx.array(rank)]
    return mx.concatenate([state.root.reshape(1), drafts.astype(mx.int32)])


def spec_step(
    model,
    streams: SpeculativeStreams,
    tree: Tree,
    state: SpecState,
    cache: List[KVCache],
    accept: Callable,
    k_candidates: int,
) -> Tuple[StepResult, SpecState]:
    """One forward pass: verify ``tree`` (built from ``state``) and draft from every survivor."""
    c = streams.config
    n_bottom = len(model.layers) - c.num_msa_layers
    P = state.prefix
    tokens = _tree_tokens(tree, state)
    dt = device_tree(tree)
    positions = dt.depth + P
    bottom_mask = mx.concatenate([mx.ones((tree.size, P), dtype=mx.bool_), dt.ancestors], axis=1) if P else dt.ancestors
    h = bottom_forward(model, streams, tokens[None], mask=bottom_mask, positions=positions,
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
    owners = mx.arange(tree.size)
    h_main, h_str = msa_forward(model, streams, h, anc=dt.ancestors, owners=owners, positions=positions,
                                caches=cache[n_bottom:], full_mask=_msa_mask_for(dt, c))
    logits = model.head(model.final_norm(h_main))[0]  # (T, V)
    best, correction = accept(dt, tokens, logits)
    # The next draft: stream logits of the last accepted node only.
    hs = h_str[0].reshape(tree.size, c.num_streams, -1)[best]
    cand = top_candidates(model.head(model.final_norm(hs)), k_candidates)
    correction = correction.astype(mx.int32)
    mx.eval(best, correction, tokens, cand)  # the one host sync of the step
    b = best.item()
    path = tree.path_to(b)
    toks = np.array(tokens)
    out = [int(toks[i]) for i in path[1:]] + [correction.item()]
    # KV: keep the accepted path's rows, contiguous after the prefix; bottom layers saw the whole
    # tree, MSA layers only the survivors.
    keep_msa = np.array(path, np.int32)
    keep_bottom = keep_msa if sel is None else sel[path].astype(np.int32)
    for i, kv in enumerate(cache):
        kv.compact(P, keep_bottom if i < n_bottom else keep_msa)
    return (StepResult(out, len(path) - 1, tree.size),
            SpecState(correction, cand, P + len(path)))


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
) -> Generator[StepResult, None, None]:
    """Yield one :class:`StepResult` per forward pass (the first one comes from the prompt)."""
    accept = accept or GreedyAcceptance()
    tree = tree or build_tree(streams.config.tree_paths)
    k = max(tree.max_rank, 1)
    cache = prepared_cache(model, prompt_cache, prompt.size + max_tokens + tree.size + 1)
    # Prompt: all but the last token as plain main rows; the last one is a one-node tree that
    # yields the first correction token and the first draft.
    rest = prompt[:-1]
    while rest.size:  # chunked; in shared mode the MSA layers' LoRA applies to prompt rows too
        main_forward(model, streams, rest[:prefill_step_size][None], cache)
        mx.eval([c.state for c in cache])
        rest = rest[prefill_step_size:]
    state = SpecState(prompt[-1].astype(mx.int32), mx.zeros((streams.config.num_streams, k), mx.int32),
                      cache[0].offset)
    step_tree = ROOT_ONLY
    n = 0
    while n < max_tokens:
        if context is not None and state.prefix + tree.max_depth + 1 > context:
            step_tree = ROOT_ONLY  # near the end of the context: no room for drafts
        result, state = spec_step(model, streams, step_tree, state, cache, accept, k)
        n += len(result.tokens)
        yield result
        step_tree = tree
