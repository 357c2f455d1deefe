"""What queueing the next tree step before handing the current one to the caller buys: the same
code decoding with ``overlap`` on and off, interleaved, same prompts, greedy (outputs checked
equal). Reports decode tokens/s and the median time per step of each.

    python benchmarks/async_overlap.py --model smollm2 --rounds 3      # default: the embedded model
"""

import argparse
import statistics
import time

import mlx.core as mx


def main(argv=None):
    from mlx_specstream import load
    from mlx_specstream.bench.prompts import load_prompts
    from mlx_specstream.decode import tree_generate_step
    from mlx_specstream.responses import responses

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", default=None, help="default: heldout (embedded model), chat (any other)")
    ap.add_argument("--n-prompts", type=int, default=6)
    ap.add_argument("-m", "--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    model, tok = load(args.model)
    base, drafter = model.base, model.drafter
    spec = args.prompts or ("heldout" if args.model is None else "chat")
    ids = load_prompts(spec, args.n_prompts, tok, base.args.vocab_size)
    tps = {True: [], False: []}
    step_ms = {True: [], False: []}
    outputs = {}
    for r in range(args.rounds + 1):  # the first round warms up
        for overlap in (True, False):
            n, secs, steps = 0, 0.0, []
            for i, p in enumerate(ids):
                gen = tree_generate_step(mx.array(p), base, drafter, max_tokens=args.max_tokens, overlap=overlap)
                steps_iter = ((s.tokens, s.depth, s.tree_size) for s in gen)
                toks, last_t = [], None
                for resp in responses(steps_iter, tok, len(p), args.max_tokens, ()):  # the caller's work included
                    now = time.perf_counter()
                    if last_t is not None:
                        steps.append(now - last_t)
                    last_t = now
                    toks += resp.tokens
                n += resp.generation_tokens
                secs += resp.generation_tokens / resp.generation_tps
                outputs.setdefault(i, toks)
                assert outputs[i] == toks, "overlap changed the output"
            if r:
                tps[overlap].append(n / secs)
                step_ms[overlap].append(1000 * statistics.median(steps))
    for overlap in (True, False):
        print(
            f"overlap={str(overlap):<5}  {statistics.median(tps[overlap]):7.1f} tok/s "
            f"({min(tps[overlap]):.1f}-{max(tps[overlap]):.1f})  step p50 {statistics.median(step_ms[overlap]):.2f} ms "
            f"({min(step_ms[overlap]):.2f}-{max(step_ms[overlap]):.2f})"
        )
    print(f"overlap on / off: {statistics.median(tps[True]) / statistics.median(tps[False]):.3f}x tokens/s")


if __name__ == "__main__":
    main()
