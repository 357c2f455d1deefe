"""What the decode loop adds to a forward pass: a tree step over T rows (context drafts, the
Verifier drafter: launch, accept, commit) against mlx-lm's own forward of the same T rows with
its own cache, interleaved, medians of ``--trials``; both relative to mlx-lm's 1-row forward (a
plain AR step). The gap between the rows is the loop's overhead; the growth with T is the device's.

    python benchmarks/step_overhead.py --model smollm2
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mlx_specstream import decode
from mlx_specstream import load
from mlx_specstream.acceptance import GreedyAcceptance
from mlx_specstream.cache import prefill, prepared_cache
from mlx_specstream.drafters import DraftState, Verifier
from mlx_specstream.plan import TreePlan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sizes", default="1,2,3,4,8")
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--trials", type=int, default=30)
    a = ap.parse_args()
    model, _ = load(a.model, streams=False)
    base = getattr(model, "base", model)
    prompt = mx.array(np.random.RandomState(0).randint(3, base.args.vocab_size, a.prefix), mx.int32)
    accept, verifier, runs = GreedyAcceptance(), Verifier(), {}
    for T in (int(x) for x in a.sizes.split(",")):
        lm_cache = make_prompt_cache(base)
        mx.eval(base(prompt[None], cache=lm_cache))

        def bare(c=lm_cache, x=prompt[None, :T], T=T):
            mx.eval(base(x, cache=c))
            for layer in c:
                layer.offset -= T  # the same prefix every time

        plan = TreePlan((), lookup=T - 1)
        cache = prepared_cache(base, None, a.prefix + 2 * T + 2, None, T + 1)
        prefill(lambda t, c: verifier.prefill(base, t, c), prompt, cache, 512, None)
        cand = plan.with_context(plan.empty_candidates(), [5] * (T - 1)) if T > 1 else plan.empty_candidates()
        state = DraftState(mx.array(7, mx.int32), cand)

        def ours(plan=plan, state=state, cache=cache):
            off = cache[0].offset
            decode.finish_step(decode.launch_step(base, verifier, plan, state, cache, accept), verifier, cache)
            for kv in cache:
                kv.offset = off

        runs[f"mlx-lm forward, {T} rows"], runs[f"our tree step, {T} rows"] = bare, ours
    times = collections.defaultdict(list)
    for f in runs.values():  # warm-up
        f()
    for _ in range(a.trials):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    one = statistics.median(times[next(iter(runs))])
    for k in runs:
        m = statistics.median(times[k])
        print(f"{k:28s} {1e3 * m:8.2f} ms  {m / one:.3f}x a plain step")


if __name__ == "__main__":
    main()
