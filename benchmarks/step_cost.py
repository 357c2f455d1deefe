"""Cost side of Speculative Streaming: one speculative step (verify a T-node tree + draft from every
node) vs one autoregressive step, on the same model and prefix, for several tree sizes.

    python benchmarks/step_cost.py                       # embedded default model, random streams
    python benchmarks/step_cost.py --random 8x512 --num-streams 3 --msa-layers 2

Acceptance is not measured here (random streams); this is the verify-cost curve that a tree's
expected accepted length has to beat.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import mlx.core as mx


def main(argv=None):
    from ar_vs_mlx_lm import random_llama

    from mlx_specstream.bench.tune import measure_cost_curve
    from mlx_specstream.checkpoint import default_model_path, load_model
    from mlx_specstream.drafters import StreamDrafter
    from mlx_specstream.plan import TreePlan
    from mlx_specstream.streams import SpeculativeStreams, StreamConfig
    from mlx_specstream.tree import sparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--random", default=None, help="LAYERSxHIDDEN random Llama")
    ap.add_argument("--num-streams", type=int, default=3)  # defaults: the embedded model's adapter
    ap.add_argument("--msa-layers", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--sizes", default="1,4,8,16,32,64")
    ap.add_argument("--prefix", type=int, default=128)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    path = (
        Path(args.model)
        if args.model
        else (random_llama(args.random, "float32") if args.random else default_model_path())
    )
    # float32 on the CPU (as `load` does there): half-precision matmuls have no fast CPU path
    model, cfg = load_model(path, dtype=mx.float32 if mx.default_device() == mx.cpu else None)
    streams = SpeculativeStreams(
        StreamConfig(num_streams=args.num_streams, num_msa_layers=args.msa_layers, lora_rank=args.lora_rank), model
    )
    sizes = [int(x) for x in args.sizes.split(",")]
    ar_ms = []  # one AR step (one token after the same prefix), timed right after each speculative step
    cost = measure_cost_curve(model, streams, sizes=sizes, prefix=args.prefix, trials=args.trials, ar_ms=ar_ms)
    ar = statistics.median(ar_ms)
    P = args.prefix

    print(f"device {mx.default_device()}  model {path.name}  γ={args.num_streams} Ns={args.msa_layers} prefix={P}")
    print(f"{'tree nodes':>10} {'MSA rows':>9} {'step ms':>9} {'AR ms':>8} {'step/AR':>8}")
    rows = []
    for T, ms in cost.items():
        plan = TreePlan(sparse(args.num_streams, T - 1) if T > 1 else ())
        rows.append(
            {
                "tree_nodes": T,
                "msa_rows": T * (1 + StreamDrafter(streams).streams_run(plan)),
                "step_ms": ms,
                "ar_ms": ar,
                "ratio": ms / ar,
            }
        )
        r = rows[-1]
        print(f"{r['tree_nodes']:>10} {r['msa_rows']:>9} {r['step_ms']:>9.2f} {r['ar_ms']:>8.2f} {r['ratio']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(mx.default_device()), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    main()
