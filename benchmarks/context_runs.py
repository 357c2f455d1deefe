"""How far context drafts (prompt lookup) would be accepted, by the run length of their match.

For each prompt: the model's greedy continuation; then at every position of it, the 8 context
drafts ``ContextDrafts`` proposes there and how many of them the continuation confirms — the
acceptance a step verifying all 8 would get. Grouped by ``ContextStats.bin(match)``, each group's
mean accepted count is fitted to a per-draft continuation rate p (sum_{d<=8} p^d = mean): the
priors of :class:`mlx_specstream.sizing.ContextStats`. Fit them on in-distribution sets (``chat``,
``code``), never on the held-out sets the bench reports:

    python benchmarks/context_runs.py --model smollm2 --prompts chat --prompts code --n-prompts 10
    python benchmarks/context_runs.py ... --temp 0.7   # sampling: the priors of CONTEXT_PRIORS[0.7]

Sampling (``--temp``), the continuation is drawn at that temperature and a position's accepted
count is its expectation under the exact rule for a point-mass draft: draft d is accepted with
the law's probability of it given the drafts before it, so E = sum_d prod_{i<=d} p_i (the law's
probabilities over the 8 drafts, one forward of the chain on the position's cache).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import mlx.core as mx

from mlx_specstream import load
from mlx_specstream.bench.prompts import load_prompts
from mlx_specstream.cache import make_cache
from mlx_specstream.decode import generate_step
from mlx_specstream.sample import SamplingParams
from mlx_specstream.drafters.context import ContextDrafts
from mlx_specstream.sizing import RUN_BINS, ContextStats

K = 8  # drafts per position


def rate(mean: float) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        p = (lo + hi) / 2
        lo, hi = (p, hi) if sum(p**d for d in range(1, K + 1)) < mean else (lo, p)
    return p


def expected_accepted(base, cache, params: SamplingParams, last: int, drafts) -> float:
    """E[accepted drafts] of a point-mass chain under the exact sampling rule: the law's
    probabilities along ``[last] + drafts`` after the cache, which is left as it was."""
    if not drafts:
        return 0.0
    start = cache[0].offset
    lp = base(mx.array([[last] + list(drafts)]), cache=cache)[0, : len(drafts)].astype(mx.float32)
    lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
    law = params.law(lp)
    p = mx.exp(mx.take_along_axis(law, mx.array(drafts)[:, None], axis=-1)[:, 0] - mx.logsumexp(law, axis=-1))
    for c in cache:
        c.compact(start, [])  # the chain's rows dropped
    return float(mx.sum(mx.cumprod(p)).item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", action="append", default=None)
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("-m", "--max-tokens", type=int, default=128)
    ap.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    params = SamplingParams(temp=a.temp) if a.temp > 0 else None
    mx.random.seed(a.seed)
    model, tok = load(a.model, streams=False)
    base = getattr(model, "base", model)
    sums = defaultdict(lambda: [0, 0])  # bin -> [positions, accepted drafts]
    for name in a.prompts or ["chat", "code"]:
        for ids in load_prompts(name, a.n_prompts, tok, base.args.vocab_size):
            sampler = params.sampler() if params else None
            steps = generate_step(mx.array(ids), base, max_tokens=a.max_tokens, sampler=sampler)
            out = [t for (t, _), _ in zip(steps, range(a.max_tokens))]
            ctx = ContextDrafts(ids, K)
            cache = None
            if params:  # the cache before a position's last token: the prompt's, then one per output token
                cache = make_cache(base, len(ids) + len(out) + K + 1)
                if len(ids) > 1:
                    base(mx.array(ids[:-1])[None], cache=cache)
            for pos in range(len(out) - 1):
                drafts = ctx.propose()
                if params is None:
                    acc = 0
                    while acc < len(drafts) and pos + acc < len(out) and drafts[acc] == out[pos + acc]:
                        acc += 1
                else:
                    last = out[pos - 1] if pos else ids[-1]
                    acc = expected_accepted(base, cache, params, last, drafts)
                    base(mx.array([[last]]), cache=cache)
                key = ContextStats.bin(ctx.match) if drafts else -1
                sums[key][0] += 1
                sums[key][1] += acc
                ctx.extend([out[pos]])
    print(f"sets {a.prompts or ['chat', 'code']}, {a.n_prompts} prompts each, {a.max_tokens} tokens, temp {a.temp}")
    for key in sorted(sums):
        n, acc = sums[key]
        label = "no match" if key < 0 else f"run {RUN_BINS[key]}+"
        fit = "" if key < 0 else f"  per-draft rate {rate(acc / n):.3f}"
        print(f"{label:9s} positions {n:5d}  mean accepted of {K} {acc / n:.2f}{fit}")


if __name__ == "__main__":
    main()
