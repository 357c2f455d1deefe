"""How far context drafts (prompt lookup) would be accepted, by the run length of their match.

For each prompt: the model's greedy continuation; then at every position of it, the 8 context
drafts ``ContextDrafts`` proposes there and how many of them the continuation confirms — the
acceptance a step verifying all 8 would get. Grouped by ``ContextStats.bin(match)``, each group's
mean accepted count is fitted to a per-draft continuation rate p (sum_{d<=8} p^d = mean): the
priors of :class:`mlx_specstream.sizing.ContextStats`. Fit them on in-distribution sets (``chat``,
``code``), never on the held-out sets the bench reports:

    python benchmarks/context_runs.py --model smollm2 --prompts chat --prompts code --n-prompts 10
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import mlx.core as mx

from mlx_specstream import load
from mlx_specstream.bench.prompts import load_prompts
from mlx_specstream.decode import generate_step
from mlx_specstream.drafters.context import ContextDrafts
from mlx_specstream.sizing import RUN_BINS, ContextStats

K = 8  # drafts per position


def rate(mean: float) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        p = (lo + hi) / 2
        lo, hi = (p, hi) if sum(p**d for d in range(1, K + 1)) < mean else (lo, p)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", action="append", default=None)
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("-m", "--max-tokens", type=int, default=128)
    a = ap.parse_args()
    model, tok = load(a.model, streams=False)
    base = getattr(model, "base", model)
    sums = defaultdict(lambda: [0, 0])  # bin -> [positions, accepted drafts]
    for name in a.prompts or ["chat", "code"]:
        for ids in load_prompts(name, a.n_prompts, tok, base.args.vocab_size):
            out = [
                t for (t, _), _ in zip(generate_step(mx.array(ids), base, max_tokens=a.max_tokens), range(a.max_tokens))
            ]
            ctx = ContextDrafts(ids, K)
            for pos in range(len(out) - 1):
                drafts = ctx.propose()
                acc = 0
                while acc < len(drafts) and pos + acc < len(out) and drafts[acc] == out[pos + acc]:
                    acc += 1
                key = ContextStats.bin(ctx.match) if drafts else -1
                sums[key][0] += 1
                sums[key][1] += acc
                ctx.extend([out[pos]])
    print(f"sets {a.prompts or ['chat', 'code']}, {a.n_prompts} prompts each, {a.max_tokens} tokens")
    for key in sorted(sums):
        n, acc = sums[key]
        label = "no match" if key < 0 else f"run {RUN_BINS[key]}+"
        fit = "" if key < 0 else f"  per-draft rate {rate(acc / n):.3f}"
        print(f"{label:9s} positions {n:5d}  mean accepted of {K} {acc / n:.2f}{fit}")


if __name__ == "__main__":
    main()
