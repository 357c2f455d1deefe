"""Autoregressive decode speed: ours vs mlx-lm's on identical weights, in one run.

    python benchmarks/ar_vs_mlx_lm.py                    # embedded default model
    python benchmarks/ar_vs_mlx_lm.py --model PATH [-q]  # any checkpoint both can load
    python benchmarks/ar_vs_mlx_lm.py --random 8x512     # random Llama (layers x hidden)

Both sides get the same prompt tokens and decode greedily; decode tokens/s is timed from the first
generated token to the last (prefill excluded), trials alternate between the two, medians reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx.core as mx


def random_llama(spec: str, dtype: str) -> Path:
    from mlx_specstream.models import build_model
    from mlx_specstream.checkpoint import cast_floats, save_model

    layers, hidden = (int(x) for x in spec.split("x"))
    cfg = {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": int(hidden * 2.75) // 64 * 64,
        "num_attention_heads": max(hidden // 64, 1),
        "num_key_value_heads": max(hidden // 128, 1),
        "vocab_size": 32000,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "max_position_embeddings": 4096,
    }
    model = build_model(cfg)
    cast_floats(model, dtype)
    path = Path(tempfile.mkdtemp()) / f"llama-{spec}"
    save_model(path, model, cfg)
    return path


def time_decode(step_iter, n: int) -> float:
    it = iter(step_iter)
    next(it)  # first token: includes prefill
    tic = time.perf_counter()
    for _ in range(n - 1):
        next(it)
    return (n - 1) / (time.perf_counter() - tic)


def main(argv=None):
    from mlx_lm.generate import generate_step as lm_generate_step
    from mlx_lm.utils import load_model as mlx_lm_load

    from mlx_specstream.decode import generate_step
    from mlx_specstream.checkpoint import cast_floats, default_model_path, load_model, quantize_model, save_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--random", default=None, help="LAYERSxHIDDEN random Llama")
    ap.add_argument("--dtype", default="float32", help="dtype both sides run in (and of a random model)")
    ap.add_argument("-q", "--quantize", type=int, default=0, help="quantize both to 4 or 8 bits")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("-m", "--max-tokens", type=int, default=128)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)

    path = (
        Path(args.model)
        if args.model
        else (random_llama(args.random, args.dtype) if args.random else default_model_path())
    )
    ours, cfg = load_model(path)
    if not args.quantize:
        cast_floats(ours, args.dtype)
    if args.quantize:
        cfg = quantize_model(ours, cfg, bits=args.quantize, group_size=64)
        path = Path(tempfile.mkdtemp()) / "quantized"
        save_model(path, ours, cfg)
    theirs, _ = mlx_lm_load(path)
    if not args.quantize:
        cast_floats(theirs, args.dtype)  # the same weights in the same dtype on both sides
    prompt = mx.array(mx.random.randint(3, cfg["vocab_size"], (args.prompt_len,), key=mx.random.key(0)))
    n = args.max_tokens

    def run_ours():
        return time_decode((t for t, _ in generate_step(prompt, ours, max_tokens=n)), n)

    def run_theirs():
        return time_decode((t for t, _ in lm_generate_step(prompt, theirs, max_tokens=n)), n)

    run_ours(), run_theirs()  # warm-up
    a, b = [], []
    for _ in range(args.trials):
        a.append(run_ours())
        b.append(run_theirs())
    res = {
        "model": str(path),
        "device": str(mx.default_device()),
        "mlx": mx.__version__,
        "quantize": args.quantize,
        "prompt_len": args.prompt_len,
        "max_tokens": n,
        "ours_tps": statistics.median(a),
        "mlx_lm_tps": statistics.median(b),
        "ours_all": a,
        "mlx_lm_all": b,
    }
    res["ratio"] = res["ours_tps"] / res["mlx_lm_tps"]
    print(f"{'':12}{'decode tok/s (median)':>24}{'min':>10}{'max':>10}")
    print(f"{'ours':12}{res['ours_tps']:>24.1f}{min(a):>10.1f}{max(a):>10.1f}")
    print(f"{'mlx-lm':12}{res['mlx_lm_tps']:>24.1f}{min(b):>10.1f}{max(b):>10.1f}")
    print(f"ratio ours/mlx-lm: {res['ratio']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
