"""When does parallel tree pruning pay? Decode tokens/s of the default model's streams over a
tree at several τ, beside plain decoding, in interleaved rounds (same prompts, greedy).

    python benchmarks/pruning.py --tree cartesian:3 --tau 0 0.1 0.3 --rounds 3
"""

import argparse
import statistics

from mlx_specstream import load, stream_generate
from mlx_specstream.bench.prompts import load_prompts
from mlx_specstream.drafters import StreamDrafter
from mlx_specstream.tree import parse_tree_spec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tree", action="append", default=None)
    ap.add_argument("--tau", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--prompts", default="heldout")
    ap.add_argument("--n-prompts", type=int, default=4)
    ap.add_argument("-m", "--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    model, tok = load(args.model)
    streams = model.drafter.streams
    ids = load_prompts(args.prompts, args.n_prompts, tok, model.args.vocab_size)
    setups = {"plain": dict(speculative=False)}
    for spec in args.tree or ["cartesian:3"]:
        paths = parse_tree_spec(spec, streams.config.num_streams)
        for tau in args.tau:
            setups[f"{spec} tau={tau}"] = dict(
                drafter=StreamDrafter(streams, prune_threshold=tau), tree=paths, lookup=0
            )
    runs = {k: [] for k in setups}
    steps = {}
    for r in range(args.rounds + 1):  # the first round warms up
        for name, kw in setups.items():
            n = secs = 0.0
            st = []
            for p in ids:
                *_, last = stream_generate(model.base, tok, p, max_tokens=args.max_tokens, **kw)
                n, secs = n + last.generation_tokens, secs + last.generation_tokens / last.generation_tps
                st.append(last.tokens_per_step)
            if r:
                runs[name].append(n / secs)
                steps[name] = statistics.mean(st)
    plain = statistics.median(runs["plain"])
    out = {}
    for name, v in runs.items():
        med = statistics.median(v)
        out[name] = {
            "tok_s": med,
            "min": min(v),
            "max": max(v),
            "vs_plain": med / plain,
            "tokens_per_step": steps[name],
        }
        print(
            f"{name:28s} {med:7.1f} tok/s ({min(v):.0f}-{max(v):.0f})  {med / plain:5.2f}x plain  "
            f"{steps[name]:.2f} tokens/step"
        )
    return out


if __name__ == "__main__":
    main()
