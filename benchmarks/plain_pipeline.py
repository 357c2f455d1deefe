"""Plain steps of the tree loop, pipelined (the next plain step queued before the sync on the
current one) or not, against mlx-lm's own loop: median per-token time, interleaved rounds.

    python benchmarks/plain_pipeline.py --model runs/smollm2-q41 -m 40 --rounds 4

Context drafts and streams are off (``tree=[]``, ``lookup=0``): every step is plain, so this
measures only what pipelining buys a plain step on this device (``decode.pipelines_plain_steps``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

PROMPT = "Explain how a bicycle gear system works, step by step, for a child."


def main(argv=None):
    from mlx_lm.generate import generate_step as mlx_lm_step

    from mlx_specstream import load
    from mlx_specstream.decode import tree_generate_step
    from mlx_specstream.drafters import Verifier

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-m", "--max-tokens", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args(argv)
    model, tok = load(args.model, streams=False)
    base = getattr(model, "base", model)
    prompt = mx.array(tok.encode(PROMPT))
    n = args.max_tokens
    loops = {
        "mlx_lm": lambda: (t for t, _ in mlx_lm_step(prompt, base, max_tokens=n)),
        "pipelined": lambda: tree_generate_step(
            prompt, base, Verifier(), max_tokens=n, lookup=0, tree=[], pipeline=True
        ),
        "unpipelined": lambda: tree_generate_step(
            prompt, base, Verifier(), max_tokens=n, lookup=0, tree=[], pipeline=False
        ),
    }
    ms = {k: [] for k in loops}
    for _ in range(args.rounds):
        for k, loop in loops.items():
            t = []
            for _ in loop():
                t.append(time.perf_counter())
            ms[k].append(statistics.median(b - a for a, b in zip(t, t[1:])) * 1e3)
    for k, v in ms.items():
        print(f"{k:>12}: per-token ms median {statistics.median(v):.1f}  rounds {' '.join(f'{x:.1f}' for x in v)}")


if __name__ == "__main__":
    main()
