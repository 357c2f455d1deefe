"""Greedy divergence rate: how often speculative greedy output differs from plain greedy output of
the same weights, per dtype / quantization. On a GPU, a verify step runs several rows through
matrix kernels that may round differently from the one-row kernels of plain decoding, so low
precision can make the two decodes part ways (on the CPU the suite asserts equality).

    python benchmarks/divergence.py --model smollm2 --streams recipes/smollm2/speculative_streams.json \
        --variants float32,float16,bfloat16,q8,q4 --n-prompts 8 -m 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx


def main(argv=None):
    from mlx_specstream.bench.prompts import load_prompts
    from mlx_specstream.bench.runners import divergence
    from mlx_specstream.generate import stream_generate
    from mlx_specstream.loading import load

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--streams", default=None, help="stream adapter (.json) to attach")
    ap.add_argument("--variants", default="float32,float16,bfloat16,q8,q4")
    ap.add_argument("--prompts", default="chat")
    ap.add_argument("--n-prompts", type=int, default=8)
    ap.add_argument("-m", "--max-tokens", type=int, default=64)
    ap.add_argument("--lookup", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    results = {"device": str(mx.default_device()), "variants": {}}
    for v in args.variants.split(","):
        q = int(v[1:]) if v.startswith("q") else None
        dtype = None if q else v
        model, tok = load(args.model, streams=args.streams or None, quantize=q, dtype=dtype)
        prompts = load_prompts(args.prompts, args.n_prompts, tok, model.args.vocab_size)
        tic = time.perf_counter()
        ar = [
            [t for r in stream_generate(model, tok, p, max_tokens=args.max_tokens, speculative=False) for t in r.tokens]
            for p in prompts
        ]
        sp = [
            [
                t
                for r in stream_generate(model, tok, p, max_tokens=args.max_tokens, lookup=args.lookup)
                for t in r.tokens
            ]
            for p in prompts
        ]
        d = divergence(sp, ar)
        results["variants"][v] = {**d, "prompts": len(prompts), "seconds": round(time.perf_counter() - tic, 1)}
        print(
            f"{v}: divergence rate {d['divergence_rate']:.2f} over {len(prompts)} prompts "
            f"(first differences at {[i for i in d['first_divergence'] if i is not None]})",
            flush=True,
        )
        del model
        mx.clear_cache()
        if args.json:  # after each variant: a run cut short keeps what it measured
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
