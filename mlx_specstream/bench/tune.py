"""``specstream bench tune``: fit the stream adapter's decode settings to this device — the cost
curve of a step per tree size, the measured acceptance of each stream's ranks, the tree that
maximises expected tokens per second, then end-to-end measurements of candidate settings."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import numpy as np

from ..acceptance import GreedyAcceptance
from ..cache import make_cache
from ..checkpoint import ASSETS, inside, read_json
from ..device import fingerprint, tuned_on
from ..decode import generate_step, tree_step
from ..drafters import DraftState, StreamDrafter
from ..generate import stream_generate
from ..loading import load
from ..plan import TreePlan
from ..sample import SamplingParams
from ..setting import PLAIN, DecodeSetting
from ..sizing import AUTO, AUTO_CONTEXT, AUTO_LOOKUP
from ..streams import forward_with_streams
from ..streams.config import StreamConfig
from ..tree import chain, sparse
from .prompts import load_prompts
from ..errors import UserError


def expected_tokens(paths, rank_accept) -> float:
    """1 (the correction) + Σ over nodes of P(every draft on the path to it is right)."""
    total = 1.0
    for p in paths:
        v = 1.0
        for g, r in enumerate(p):
            v *= rank_accept[g][r] if r < len(rank_accept[g]) else 0.0
        total += v
    return total


def choose_tree(cost_ms: Dict[int, float], rank_accept, num_streams: int, max_nodes: int = 128):
    """The sparse tree maximising expected tokens per second: for each budget the greedy-best
    tree of that size (optimal for a product-form acceptance), scored by E[tokens] / cost(T).
    ``cost_ms[T]``: time of one forward over T nodes (interpolated between measured T)."""
    ts = sorted(cost_ms)

    def cost(t):
        if t <= ts[0]:
            return cost_ms[ts[0]]
        if t >= ts[-1]:
            return cost_ms[ts[-1]] * t / ts[-1]
        i = next(i for i, x in enumerate(ts) if x >= t)
        a, b = ts[i - 1], ts[i]
        return cost_ms[a] + (cost_ms[b] - cost_ms[a]) * (t - a) / (b - a)

    best = (0.0, ())
    for budget in range(0, max_nodes):
        paths = sparse(num_streams, budget, rank_accept) if budget else ()
        if len(paths) < budget:
            break
        rate = expected_tokens(paths, rank_accept) / cost(budget + 1)
        if rate > best[0]:
            best = (rate, paths)
    return best[1], best[0] * 1e3


def measure_cost_curve(
    model, streams, sizes=(1, 2, 4, 8, 16, 32, 64, 128), prefix=128, trials=5, ar_ms: Optional[List[float]] = None
) -> Dict[int, float]:
    """Median ms of one speculative step (verify + draft + accept + commit, as the decode loop
    runs it) per tree size, after ``prefix`` cached tokens; the cache is trimmed back after every
    step. ``ar_ms``: a list that receives the ms of one AR step (same prefix) timed right after
    every speculative one."""
    prompt = mx.random.randint(3, model.args.vocab_size, (prefix,), key=mx.random.key(0)).astype(mx.int32)
    cache = make_cache(model)
    for c in cache:
        c.reserve(prefix + max(sizes) + 8)
    model(prompt[None], cache=cache)
    mx.eval([c.state for c in cache])
    start = cache[0].offset
    drafter = StreamDrafter(streams)
    out = {}
    for T in sizes:
        plan = TreePlan(sparse(streams.config.num_streams, T - 1) if T > 1 else ())
        ts = []
        for i in range(trials + 2):
            state = DraftState(prompt[-1], mx.zeros((streams.config.num_streams, plan.width), mx.int32))
            tic = time.perf_counter()
            tree_step(model, drafter, plan, state, cache, GreedyAcceptance())
            if i >= 2:
                ts.append(time.perf_counter() - tic)
            for c in cache:
                c.trim(c.offset - start)
            if ar_ms is not None and i >= 2:
                tic = time.perf_counter()
                mx.argmax(model(prompt[-1:][None], cache=cache)[0, -1]).item()
                ar_ms.append((time.perf_counter() - tic) * 1e3)
                for c in cache:
                    c.trim(c.offset - start)
        out[plan.size] = statistics.median(ts) * 1e3
    return out


def measure_rank_acceptance(model, streams, tokenizer, prompts: List[List[int]], max_tokens=64, max_rank=8):
    """P(stream g's rank-r candidate is the token the model emits g positions later), measured on
    the model's own greedy continuations of calibration prompts."""
    g = streams.config.num_streams
    counts = np.zeros((g, max_rank))
    n = np.zeros(g)
    for p in prompts:
        cont = [t for t, _ in generate_step(mx.array(p), model, max_tokens=max_tokens)]
        seq = mx.array(p + cont)[None]
        start = len(p) - 1
        owners = mx.arange(start, seq.shape[1])
        _, strm = forward_with_streams(model, streams, seq, owners=owners)
        order = mx.argsort(-strm[0], axis=-1)[..., :max_rank]  # (K, γ, R)
        order = np.array(order)
        full = p + cont
        for i, t in enumerate(range(start, len(full))):
            for j in range(g):
                tgt = t + 2 + j
                if tgt >= len(full):
                    continue
                n[j] += 1
                hit = np.flatnonzero(order[i, j] == full[tgt])
                if hit.size:
                    counts[j, hit[0]] += 1
    return (counts / np.maximum(n[:, None], 1)).tolist()


def beats(rounds: Sequence[float], plain_rounds: Sequence[float]) -> bool:
    """Faster than plain decoding in every round, paired: the rounds are interleaved, so a drift of
    the machine's speed hits both alike (e.g. 20, 25 tokens/s vs plain's 19, 24 beats it, though
    its slowest round is below plain's fastest)."""
    return len(rounds) == len(plain_rounds) > 0 and all(r > p for r, p in zip(rounds, plain_rounds))


# Families of candidate settings `tune` measures beside plain decoding (always measured): fixed
# trees (the cost model's pick, two chains, none) with context drafts and τ, and the two trees sized
# every step. Fewer families, a shorter run.
CANDIDATES = ("fixed", AUTO, AUTO_CONTEXT)


def tune(
    model_path=None,
    *,
    prompts="heldout",
    n_prompts=6,
    write=False,
    quick=False,
    write_to=None,
    streams=None,
    temp: float = 0.0,
    candidates: Sequence[str] = CANDIDATES,
) -> dict:
    """Fit the stream config to this device: the cost model's tree from the measured cost curve
    and rank acceptance, then end-to-end decode speed of candidate (tree, lookup, τ) settings and
    of plain decoding, in interleaved rounds; ``write`` stores the fastest — plain decoding unless
    a setting beats it beyond the noise — with the backend, device and BLAS it was tuned on — into
    the attached adapter's config (``write_to``: that file, named explicitly; the package's own
    adapters are written only so). The adapter measured is the one written: ``streams`` (a name
    or .json, as for ``load``), else ``write_to``, else the attached one. ``temp`` > 0 measures
    sampled decoding at that temperature (the same seeds for every setting) and writes the result
    as the config's ``sampled`` setting, leaving the greedy one as it was. ``candidates``: the
    families of settings measured beside plain decoding (:data:`CANDIDATES`)."""
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown or not candidates:
        raise UserError(f"tune candidates must be among {', '.join(CANDIDATES)}, got {', '.join(candidates) or 'none'}")
    if temp < 0:
        raise UserError(f"temp must be >= 0, got {temp}")
    if streams is not None and write_to is not None and Path(str(streams)).resolve() != Path(write_to).resolve():
        raise UserError(
            f"tune measures one adapter and writes its settings into it: --streams {streams} and "
            f"--write-to {write_to} name different files"
        )
    write = write or write_to is not None
    model, tok = load(model_path, streams=streams if streams is not None else write_to)
    drafter = getattr(model, "drafter", None)
    if not isinstance(drafter, StreamDrafter):
        raise UserError(f"{model_path or 'the embedded model'} has no stream adapter to tune")
    cfg_file = Path(write_to) if write_to else drafter.streams.source
    if write and not write_to and inside(cfg_file, ASSETS):
        raise UserError(
            f"{cfg_file} is one of the package's own adapters: it is not overwritten by default; "
            "name it with --write-to to do so"
        )
    if write and (cfg_file is None or not cfg_file.exists()):
        raise UserError(f"no stream config to write the tuned settings into ({cfg_file})")
    base, streams = model.base, drafter.streams
    ids = load_prompts(prompts, n_prompts, tok, base.args.vocab_size)
    configs, cost, acc, rate = [PLAIN], {}, None, None  # plain decoding: always a candidate
    if "fixed" in candidates:
        sizes = (1, 2, 4, 8, 16, 32) if quick else (1, 2, 4, 8, 16, 32, 64, 128)
        cost = measure_cost_curve(base, streams, sizes=sizes, trials=3 if quick else 7)
        acc = measure_rank_acceptance(base, streams, tok, ids, max_tokens=48 if quick else 96)
        paths, rate = choose_tree(cost, acc, streams.config.num_streams, max_nodes=max(sizes))
        # Then, measured end to end: that tree or none (context drafts only), the number of context
        # drafts joining it (prompt lookup; 0 = none) and the pruning threshold τ.
        # candidate trees: the cost model's pick, the two cheapest chains, and none (context drafts only)
        trees = dict.fromkeys([paths, chain(1), chain(2), ()])
        configs += [
            DecodeSetting(t, n, tau)
            for t in trees
            for n in (0, 3, 5, 8)
            for tau in ((0.0, 0.1) if t else (0.0,))
            if t or n
        ]
    # and trees sized every step (streams and context drafts, or context drafts alone)
    configs += [DecodeSetting(spec, AUTO_LOOKUP) for spec in (AUTO, AUTO_CONTEXT) if spec in candidates]

    sampling = SamplingParams(temp=temp) if temp > 0 else None

    def decode_tps(setting: DecodeSetting):  # decode tokens/s (prefill excluded) over the prompts
        d = StreamDrafter(streams, prune_threshold=setting.prune_threshold)
        kw = (
            {"speculative": False}
            if setting == PLAIN
            else {"drafter": d, "tree": setting.auto or setting.paths, "lookup": setting.lookup}
        )
        n = secs = 0.0
        for i, p in enumerate(ids):
            mx.random.seed(i)  # sampled: every setting decodes from the same seeds
            *_, r = stream_generate(base, tok, p, max_tokens=32 if quick else 96, sampling=sampling, **kw)
            n, secs = n + r.generation_tokens, secs + r.generation_tokens / r.generation_tps
        return n / secs

    for c in configs:  # warm-up: first-use costs (mask shapes, allocations) out of the timings
        decode_tps(c)
    runs = {c: [] for c in configs}
    for _ in range(3 if quick else 5):  # interleaved rounds: load drift hits every config alike
        for c in configs:
            runs[c].append(decode_tps(c))
    measured = {c: float(np.median(v)) for c, v in runs.items()}
    best = max(measured, key=measured.get)
    # A setting is written only if it beats plain decoding beyond the noise; otherwise plain
    # decoding is the tuned setting.
    margin_ok = best == PLAIN or beats(runs[best], runs[PLAIN])
    chosen = (best if margin_ok else PLAIN).replace(tuned_on=tuned_on(), temp=temp if temp > 0 else None)
    result = {
        "fingerprint": fingerprint(),
        "tuned_on": chosen.tuned_on,
        "temp": temp,
        "adapter": str(streams.source),
        "cost_ms": {str(k): v for k, v in cost.items()},
        "rank_acceptance": acc,
        "tree": chosen.auto or [list(p) for p in chosen.paths],
        "tree_size": "per step" if chosen.auto else len(chosen.paths) + 1,
        "expected_tokens_per_s": rate,
        "prune_threshold": chosen.prune_threshold,
        "lookup": chosen.lookup,
        "plain_decoding": chosen.drafts_nothing,
        "beats_plain_beyond_noise": margin_ok and best != PLAIN,
        "measured_tps": {
            f"tree={c.auto or [list(p) for p in c.paths]} lookup={c.lookup} tau={c.prune_threshold}": {
                "median": measured[c],
                "min": min(v),
                "max": max(v),
                "rounds": v,
            }
            for c, v in runs.items()
        },
    }
    if write:
        cfg = StreamConfig.from_dict(read_json(cfg_file)).with_setting(chosen)
        cfg_file.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        result["written_to"] = str(cfg_file)
    return result
