"""KV-cache memory at long contexts: the cache's bytes and the process's peak memory after a
prompt of N tokens and a few decode steps, for the full cache, ``--kv-bits 8|4`` and
``--max-kv-size`` (memory, not speed: a loaded machine does not change it).

    python benchmarks/kv_memory.py --model smollm2 --lengths 4096 8192 --out benchmarks/results/cpu-epyc-2core/kv_memory.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx

from mlx_specstream import load
from mlx_specstream.cache import KVSettings, make_cache
from mlx_specstream.decode import tree_generate_step

SETTINGS = {
    "full": None,
    "kv-bits 8": KVSettings(bits=8, quantized_start=0),
    "kv-bits 4": KVSettings(bits=4, quantized_start=0),
    "max-kv-size 1024": KVSettings(max_size=1024),
    "max-kv-size 1024 + kv-bits 4": KVSettings(bits=4, quantized_start=0, max_size=1024),
}


def measure(model, n: int, kv, decode: int = 16) -> dict:
    base = getattr(model, "base", model)
    prompt = mx.random.randint(3, base.args.vocab_size, (n,), key=mx.random.key(n)).astype(mx.int32)
    cache = make_cache(base)
    mx.clear_cache()
    mx.reset_peak_memory()
    weights = mx.get_active_memory()
    out = [
        t
        for r in tree_generate_step(prompt, base, max_tokens=decode, lookup=4, prompt_cache=cache, kv=kv)
        for t in r.tokens
    ]
    mx.eval([c.state for c in cache])
    return {
        "tokens": n,
        "cache_bytes": sum(c.nbytes for c in cache),
        "rows_held": cache[0].rows,
        "peak_over_weights_bytes": mx.get_peak_memory() - weights,
        "output": out[:decode],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--out", default=None)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = p.parse_args(argv)
    model, _ = load(args.model, streams=False)
    rows = []
    for n in args.lengths:
        for name, kv in ((n, SETTINGS[n]) for n in args.settings):
            r = dict(setting=name, **measure(model, n, kv))
            rows.append(r)
            print(
                f"{n:6d} tokens  {name:30s} cache {r['cache_bytes'] / 2**20:8.1f} MiB  rows {r['rows_held']:6d}  "
                f"peak over weights {r['peak_over_weights_bytes'] / 2**20:8.1f} MiB",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
