"""``specstream bench``: on-device benchmark harness.

    specstream bench [--model M] [--quick] [--json out.json] [--csv out.csv] [--plots DIR]
    specstream bench compare A.json B.json
    specstream bench tune [--model M] [--write]

One process, one run, same weights and prompts for every method: our AR, mlx-lm's AR
(``mlx_lm.stream_generate``), our Speculative Streaming (one or more trees), mlx-lm's two-model
speculative decoding when a draft model is given, and Medusa heads when given. Prompt sets and
stored results live under ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

METHOD_FIELDS = ("decode_tps", "prompt_tps", "ttft_s", "latency_ms", "mean_accepted", "acceptance_by_depth",
                 "speedup", "peak_memory_gb", "extra_params", "equal_to_ar", "divergence_rate", "tree_size",
                 "generated_tokens")


# ---------------------------------------------------------------- fingerprint


def blas_in_use() -> str:
    if sys.platform == "darwin":
        return "Accelerate"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    libs = sorted({line.split()[-1] for line in maps.splitlines() if "blas" in line.lower() and "/" in line})
    return ", ".join(libs) or "mlx built-in (reference BLAS)"


def fingerprint() -> dict:
    import mlx_lm

    dev = mx.default_device()
    info = {}
    try:
        info = dict(mx.device_info())
    except Exception:  # noqa: BLE001
        pass
    backend = "cpu" if dev.type == mx.cpu else ("metal" if mx.metal.is_available() else "cuda")
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "backend": backend, "device": info.get("device_name") or info.get("architecture") or str(dev),
        "device_info": {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in info.items()},
        "memory_gb": round(mem, 1) if mem else None, "os": platform.platform(), "python": platform.python_version(),
        "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "blas": blas_in_use() if backend == "cpu" else None,
        "cpu_count": os.cpu_count(),
    }


# ---------------------------------------------------------------- prompts


def builtin_prompts(name: str, n: int, max_chars: int = 600) -> List[str]:
    """``heldout``: functions from the stdlib modules the default model never saw;
    ``sitepackages``: real code from installed third-party packages (not the stdlib at all)."""
    import random

    rng = random.Random(0)
    if name == "heldout":
        from .stdlib_data import eval_prompts

        return [p["prompt"][-max_chars:] for p in eval_prompts(n)]
    if name == "sitepackages":
        import mlx_lm

        root = Path(mlx_lm.__file__).parent.parent
        files = sorted(p for pkg in ("mlx_lm", "huggingface_hub", "numpy") for p in (root / pkg).rglob("*.py"))
        cands = []
        for f in files:
            lines = f.read_text(errors="ignore").splitlines(keepends=True)
            for i, line in enumerate(lines):
                if line.lstrip().startswith("def ") and i + 10 < len(lines):
                    cands.append("".join(lines[max(0, i - 2) : i + 10]))
        rng.shuffle(cands)
        return [c[-max_chars:] for c in cands[:n]]
    raise ValueError(f"unknown prompt set {name!r} (heldout, sitepackages, random:LEN, or a .jsonl file)")


def load_prompts(spec: str, n: int, tokenizer, vocab: int) -> List[List[int]]:
    if spec.startswith("random:"):
        length = int(spec.split(":")[1])
        rng = np.random.RandomState(0)
        return [rng.randint(3, vocab, size=length).tolist() for _ in range(n)]
    if spec.endswith(".jsonl"):
        out = []
        for ln, line in enumerate(Path(spec).read_text().splitlines(), 1):
            if line.strip():
                rec = json.loads(line)
                if "prompt" not in rec:
                    raise ValueError(f"{spec}:{ln}: records need a 'prompt'")
                out.append(rec["prompt"])
        texts = out[:n]
    else:
        texts = builtin_prompts(spec, n)
    return [tokenizer.encode(t) for t in texts]


# ---------------------------------------------------------------- running methods


@dataclass
class Run:
    tokens: List[int]
    arrivals: List[Tuple[float, int]]  # (time since start, tokens delivered)
    depths: List[int] = field(default_factory=list)
    tree_size: int = 1


def _ours(model, tok, prompt, max_tokens, **kw) -> Run:
    from .generate import stream_generate

    tic = time.perf_counter()
    toks, arr, depths, size = [], [], [], 1
    for r in stream_generate(model, tok, prompt, max_tokens=max_tokens, **kw):
        arr.append((time.perf_counter() - tic, len(r.tokens)))
        toks += r.tokens
        size = max(size, r.tree_size)
    # depth of each step's last accepted node: accepted drafts = tokens - 1 (correction)
    depths = [max(n - 1, 0) for _, n in arr[1:]]
    return Run(toks, arr, depths, size)


def _mlx_lm(model, tok, prompt, max_tokens, draft=None, num_draft=3) -> Run:
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    kw = {"draft_model": draft, "num_draft_tokens": num_draft} if draft is not None else {}
    tic = time.perf_counter()
    toks, arr, depths, run_len = [], [], [], 0
    for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=max_tokens, sampler=make_sampler(0.0), **kw):
        if r.finish_reason == "stop" and r.token in tok.eos_token_ids:
            break
        toks.append(int(r.token))
        # mlx-lm streams token by token; a verify pass ends with the target's own token
        # (from_draft False), so group accepted draft tokens with it into one step.
        if draft is not None and getattr(r, "from_draft", False):
            run_len += 1
            continue
        arr.append((time.perf_counter() - tic, run_len + 1))
        if draft is not None and len(arr) > 1:
            depths.append(run_len)
        run_len = 0
    if run_len:
        arr.append((time.perf_counter() - tic, run_len))
    return Run(toks, arr, depths, num_draft + 1 if draft is not None else 1)


def divergence(outputs: List[List[int]], reference: List[List[int]]) -> dict:
    """Per prompt, does a method's output equal our AR output; the share that differ and where
    the first difference falls (token index; None when equal)."""
    first = []
    for a, b in zip(outputs, reference):
        i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is None and len(a) != len(b):
            i = min(len(a), len(b))
        first.append(i)
    n_diff = sum(i is not None for i in first)
    return {"equal_to_ar": n_diff == 0, "divergence_rate": n_diff / max(len(first), 1), "first_divergence": first}


def summarize(runs_by_trial: List[List[Run]], n_prompt_tokens: List[int]) -> dict:
    """Aggregate trials x prompts into the method's metrics (medians over trials)."""
    decode, prefill_tps, ttft, lat = [], [], [], []
    for runs in runs_by_trial:
        d_tok = d_time = 0.0
        for run, npt in zip(runs, n_prompt_tokens):
            if not run.arrivals:
                continue
            t0, n0 = run.arrivals[0]
            ttft.append(t0)
            prefill_tps.append(npt / max(t0, 1e-9))
            prev = t0
            for t, n in run.arrivals[1:]:
                lat.extend([(t - prev) / n * 1e3] * n)
                prev = t
            d_tok += sum(n for _, n in run.arrivals[1:])
            d_time += run.arrivals[-1][0] - t0
        decode.append(d_tok / max(d_time, 1e-9))
    runs = runs_by_trial[0]
    steps = sum(len(r.arrivals) for r in runs)
    total = sum(len(r.tokens) for r in runs)
    depths = [d for r in runs for d in r.depths]
    max_d = max(depths, default=0)
    hist = [sum(d >= g for d in depths) / max(len(depths), 1) for g in range(1, max_d + 1)]

    def spread(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None

    return {
        "decode_tps": spread(decode), "decode_tps_by_trial": decode, "prompt_tps": spread(prefill_tps),
        "ttft_s": spread(ttft),
        "latency_ms": ({f"p{q}": float(np.percentile(lat, q)) for q in (50, 90, 99)} if lat else None),
        "mean_accepted": total / max(steps, 1), "acceptance_by_depth": hist,
        "tree_size": max(r.tree_size for r in runs), "generated_tokens": total,
    }


def run_bench(model_path=None, *, methods: Optional[Sequence[str]] = None, trees: Sequence[str] = ("default",),
              prompts: str = "heldout", n_prompts: int = 8, max_tokens: int = 128, trials: int = 3,
              warmup: int = 1, draft: Optional[str] = None, num_draft: int = 3, medusa: Optional[str] = None,
              seed: int = 0, progress=True, dtype: Optional[str] = None, lookups: Sequence[int] = (),
              streams_name: Optional[str] = None) -> dict:
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from .medusa import MedusaModel, load_medusa
    from .streams import SpecStreamModel
    from .tree import parse_tree_spec
    from .utils import cast_floats, default_model_path, get_model_path, load

    mx.random.seed(seed)
    path = default_model_path() if model_path is None else get_model_path(model_path)
    model, tok = load(str(path), dtype=dtype, streams=streams_name)
    base = model.base if isinstance(model, SpecStreamModel) else model
    streams = getattr(model, "streams", None)
    lm_model, _ = mlx_lm_load_model(path)
    from .streams import find_stream_file, load_streams, model_dtype

    if streams is not None and streams.changes_main:
        # A shared-mode adapter changes the model: the AR baselines decode that model, i.e. the
        # base with the LoRA fused in (ours and mlx-lm's alike).
        if streams.config.main_sees_streams:
            raise ValueError("main_sees_streams adapters have no plain-AR equivalent to benchmark against")
        file = find_stream_file(path, streams_name)
        base = load(str(path), dtype=dtype, streams=False)[0]
        for m in (base, lm_model):
            load_streams(file, m).fuse_lora(m)

    if "quantization" not in json.loads((path / "config.json").read_text()):
        dtype = dtype or {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[model_dtype(base)]
    if dtype:  # the same weights in the same dtype for every peer
        cast_floats(lm_model, dtype)
    ids = load_prompts(prompts, n_prompts, tok, base.args.vocab_size)
    plan: List[Tuple[str, Callable[[List[int]], Run], int]] = []  # (name, fn, extra params)
    plan.append(("ours_ar", lambda p: _ours(base, tok, p, max_tokens, speculative=False), 0))
    plan.append(("mlx_lm_ar", lambda p: _mlx_lm(lm_model, tok, p, max_tokens), 0))
    if streams is not None:
        own = streams.config.lookup
        own = [own] if own and own not in lookups else []
        for spec in trees:
            paths = None if spec == "default" else parse_tree_spec(spec, streams.config.num_streams)
            # ss[...] rows: the streams' drafts alone; +lookup[n] rows add n context drafts (the
            # stream config's own number joins the default tree: what a user of it gets)
            plan.append((f"ss[{spec}]", lambda p, paths=paths: _ours(model, tok, p, max_tokens, tree=paths, lookup=0),
                         streams.num_params))
            for n in list(lookups) + (own if spec == "default" else []):
                plan.append((f"ss[{spec}]+lookup[{n}]",
                             lambda p, paths=paths, n=n: _ours(model, tok, p, max_tokens, tree=paths, lookup=n),
                             streams.num_params))
    for n in lookups:  # context drafts alone (prompt lookup decoding): no trained parameters
        plan.append((f"lookup[{n}]", lambda p, n=n: _ours(base, tok, p, max_tokens, lookup=n), 0))
    if medusa:
        heads = load_medusa(Path(medusa), base)  # cast to the base's dtype
        mm = MedusaModel(base, heads)
        plan.append(("medusa", lambda p: _ours(mm, tok, p, max_tokens), heads.num_params))
    if draft:
        d_model, _ = mlx_lm_load_model(get_model_path(draft))
        if dtype:
            cast_floats(d_model, dtype)
        n_draft = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(d_model.parameters()))
        plan.append((f"mlx_lm_draft[{num_draft}]", lambda p: _mlx_lm(lm_model, tok, p, max_tokens, d_model, num_draft), n_draft))
    if methods:
        plan = [x for x in plan if any(x[0].startswith(m) for m in methods)]
    results = {}
    npt = [len(p) for p in ids]
    total_runs = len(plan) * (warmup + trials)
    done = 0
    for _, fn, _ in plan:
        for _ in range(warmup):
            fn(ids[0])
            done += 1
    # Methods interleave: each prompt runs under every method back to back, so load drift on a
    # shared machine hits all alike; speedups are the median of per-trial ratios (paired runs).
    trial_runs: Dict[str, List[List[Run]]] = {name: [] for name, _, _ in plan}
    peak: Dict[str, float] = {}
    for t in range(trials):
        for name in trial_runs:
            trial_runs[name].append([])
        for p in ids:
            for name, fn, _ in plan:
                mx.reset_peak_memory()
                trial_runs[name][t].append(fn(p))
                peak[name] = max(peak.get(name, 0.0), mx.get_peak_memory() / 1e9)
        for name, _, _ in plan:
            done += 1
            if progress:
                print(f"\r[{'#' * int(24 * done / total_runs):<24}] trial {t + 1}/{trials} {name:<28}", end="",
                      file=sys.stderr, flush=True)
    for name, _, extra in plan:
        res = summarize(trial_runs[name], npt)
        res["peak_memory_gb"] = peak[name]
        res["extra_params"] = extra
        res["_tokens"] = [r.tokens for r in trial_runs[name][0]]
        results[name] = res
    if progress:
        print(file=sys.stderr)
    ref = results.get("ours_ar", {}).get("_tokens")
    for name, res in results.items():
        toks = res.pop("_tokens")
        if ref is not None:
            res.update(divergence(toks, ref))
        res["speedup"] = {b: statistics.median(a / c for a, c in zip(res["decode_tps_by_trial"],
                                                                      results[b]["decode_tps_by_trial"]))
                          for b in ("ours_ar", "mlx_lm_ar") if b in results}
    return {"fingerprint": fingerprint(), "model": str(path),
            "config": {"prompts": prompts, "n_prompts": len(ids), "max_tokens": max_tokens, "trials": trials,
                       "warmup": warmup, "seed": seed, "greedy": True,
                       "stream_config": streams.config.to_dict() if streams is not None else None},
            "methods": results}


# ---------------------------------------------------------------- output


def table(result: dict) -> str:
    fp = result["fingerprint"]
    lines = [f"{fp['backend']} | {fp['device']} | mlx {fp['mlx']} | mlx-lm {fp['mlx_lm']}"
             + (f" | BLAS {fp['blas']}" if fp.get("blas") else "")]
    hdr = f"{'method':<22}{'decode tok/s':>18}{'TTFT ms':>9}{'p50 ms':>8}{'p99 ms':>8}{'acc/step':>9}{'vs AR':>7}{'vs mlx-lm':>10}{'equal':>7}{'extra params':>13}"
    lines += [hdr, "-" * len(hdr)]
    for name, m in result["methods"].items():
        d = m["decode_tps"]
        lat = m["latency_ms"] or {}
        lines.append(
            f"{name:<22}{d['median']:>8.1f} ({d['min']:.0f}-{d['max']:.0f}){m['ttft_s']['median'] * 1e3:>9.1f}"
            f"{lat.get('p50', 0):>8.2f}{lat.get('p99', 0):>8.2f}{m['mean_accepted']:>9.2f}"
            f"{m['speedup'].get('ours_ar', 0):>7.2f}{m['speedup'].get('mlx_lm_ar', 0):>10.2f}"
            f"{str(m.get('equal_to_ar', '-')):>7}{m['extra_params']:>13}")
        if m["acceptance_by_depth"]:
            lines.append(f"{'':<22}levels reached: " + " ".join(f"{a:.2f}" for a in m["acceptance_by_depth"]))
    return "\n".join(lines)


def write_csv(result: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "decode_tps_median", "decode_tps_min", "decode_tps_max", "ttft_s", "prompt_tps",
                    "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "mean_accepted", "speedup_vs_ours_ar",
                    "speedup_vs_mlx_lm_ar", "peak_memory_gb", "extra_params", "equal_to_ar", "divergence_rate"])
        for name, m in result["methods"].items():
            lat = m["latency_ms"] or {}
            w.writerow([name, m["decode_tps"]["median"], m["decode_tps"]["min"], m["decode_tps"]["max"],
                        m["ttft_s"]["median"], m["prompt_tps"]["median"], lat.get("p50"), lat.get("p90"),
                        lat.get("p99"), m["mean_accepted"], m["speedup"].get("ours_ar"),
                        m["speedup"].get("mlx_lm_ar"), m["peak_memory_gb"], m["extra_params"],
                        m.get("equal_to_ar"), m.get("divergence_rate")])


def plots(result: dict, out: Path, cost_curve: Optional[dict] = None) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ms = result["methods"]
    names = list(ms)
    files = []

    def save(fig, name):
        fig.tight_layout()
        files.append(out / name)
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [ms[n]["speedup"].get("mlx_lm_ar", 0) for n in names], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("decode speedup vs mlx-lm AR")
    ax.set_title(result["fingerprint"]["device"])
    ax.tick_params(axis="x", labelrotation=20)
    save(fig, "speedup.png")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, [(ms[n]["latency_ms"] or {}).get("p50", 0) for n in names], label="p50")
    ax.scatter(names, [(ms[n]["latency_ms"] or {}).get("p99", 0) for n in names], color="tab:red", label="p99", zorder=3)
    ax.set_ylabel("per-token latency (ms)")
    ax.legend()
    ax.tick_params(axis="x", labelrotation=20)
    save(fig, "latency.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n in names:
        acc = ms[n]["acceptance_by_depth"]
        if acc:
            ax.plot(range(1, len(acc) + 1), acc, marker="o", label=n)
    ax.set_xlabel("tree level")
    ax.set_ylabel("share of steps reaching it")
    ax.set_ylim(0, 1)
    if ax.lines:
        ax.legend()
    save(fig, "acceptance.png")
    if cost_curve:
        curve = {int(t): v for t, v in cost_curve.items()}  # JSON keys are strings
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(sorted(curve), [curve[t] for t in sorted(curve)], marker="o")
        ax.set_xlabel("query tokens per forward (tree nodes)")
        ax.set_ylabel("forward time (ms)")
        ax.set_xscale("log", base=2)
        save(fig, "verify_cost.png")
    return files


def compare(a: dict, b: dict) -> str:
    lines = []
    for k in ("backend", "device", "mlx", "mlx_lm", "blas"):
        if a["fingerprint"].get(k) != b["fingerprint"].get(k):
            lines.append(f"fingerprint {k}: {a['fingerprint'].get(k)} -> {b['fingerprint'].get(k)}")
    lines.append(f"{'method':<22}{'A tok/s':>10}{'B tok/s':>10}{'B/A':>7}{'A acc':>7}{'B acc':>7}")
    for name in sorted(set(a["methods"]) | set(b["methods"])):
        ma, mb = a["methods"].get(name), b["methods"].get(name)
        if ma is None or mb is None:
            lines.append(f"{name:<22}{'only in ' + ('B' if ma is None else 'A'):>20}")
            continue
        ta, tb = ma["decode_tps"]["median"], mb["decode_tps"]["median"]
        lines.append(f"{name:<22}{ta:>10.1f}{tb:>10.1f}{tb / ta:>7.2f}{ma['mean_accepted']:>7.2f}{mb['mean_accepted']:>7.2f}")
        if ma.get("equal_to_ar") != mb.get("equal_to_ar"):
            lines.append(f"{'':<22}equal_to_ar: {ma.get('equal_to_ar')} -> {mb.get('equal_to_ar')}")
    return "\n".join(lines)


# ---------------------------------------------------------------- tuning


def expected_tokens(paths, rank_accept) -> float:
    """1 (the correction) + Σ over nodes of P(every draft on the path to it is right)."""
    total = 1.0
    for p in paths:
        v = 1.0
        for g, r in enumerate(p):
            v *= rank_accept[g][r] if r < len(rank_accept[g]) else 0.0
        total += v
    return total


def choose_tree(cost_ms: Dict[int, float], rank_accept, num_streams: int, max_nodes: int = 128):
    """The sparse tree maximising expected tokens per second: for each budget the greedy-best
    tree of that size (optimal for a product-form acceptance), scored by E[tokens] / cost(T).
    ``cost_ms[T]``: time of one forward over T nodes (interpolated between measured T)."""
    from .tree import sparse

    ts = sorted(cost_ms)

    def cost(t):
        if t <= ts[0]:
            return cost_ms[ts[0]]
        if t >= ts[-1]:
            return cost_ms[ts[-1]] * t / ts[-1]
        i = next(i for i, x in enumerate(ts) if x >= t)
        a, b = ts[i - 1], ts[i]
        return cost_ms[a] + (cost_ms[b] - cost_ms[a]) * (t - a) / (b - a)

    best = (0.0, ())
    for budget in range(0, max_nodes):
        paths = sparse(num_streams, budget, rank_accept) if budget else ()
        if len(paths) < budget:
            break
        rate = expected_tokens(paths, rank_accept) / cost(budget + 1)
        if rate > best[0]:
            best = (rate, paths)
    return best[1], best[0] * 1e3


def measure_cost_curve(model, streams, sizes=(1, 2, 4, 8, 16, 32, 64, 128), prefix=128, trials=5,
                       ar_ms: Optional[List[float]] = None) -> Dict[int, float]:
    """Median ms of one speculative step (verify + draft) per tree size, after ``prefix`` cached
    tokens; the cache is trimmed back after every step. ``ar_ms``: a list that receives the ms of
    one AR step (same prefix) timed right after every speculative one."""
    from .cache import make_cache
    from .sample import GreedyAcceptance
    from .speculative import SpecState, drafts_needed, spec_step
    from .tree import build_tree, sparse

    prompt = mx.random.randint(3, model.args.vocab_size, (prefix,), key=mx.random.key(0)).astype(mx.int32)
    cache = make_cache(model)
    for c in cache:
        c.reserve(prefix + max(sizes) + 8)
    model(prompt[None], cache=cache)
    mx.eval([c.state for c in cache])
    P = cache[0].offset
    out = {}
    for T in sizes:
        tree = build_tree(sparse(streams.config.num_streams, T - 1)) if T > 1 else build_tree(())
        k = max(tree.max_rank, 1)
        ts = []
        for i in range(trials + 2):
            state = SpecState(prompt[-1], mx.zeros((streams.config.num_streams, k), mx.int32))
            tic = time.perf_counter()
            spec_step(model, streams, tree, state, cache, GreedyAcceptance(), k, drafts_needed(streams.config, tree))
            if i >= 2:
                ts.append(time.perf_counter() - tic)
            for c in cache:
                c.trim(c.offset - P)
            if ar_ms is not None and i >= 2:
                tic = time.perf_counter()
                mx.argmax(model(prompt[-1:][None], cache=cache)[0, -1]).item()
                ar_ms.append((time.perf_counter() - tic) * 1e3)
                for c in cache:
                    c.trim(c.offset - P)
        out[tree.size] = statistics.median(ts) * 1e3
    return out


def measure_rank_acceptance(model, streams, tokenizer, prompts: List[List[int]], max_tokens=64, max_rank=8):
    """P(stream g's rank-r candidate is the token the model emits g positions later), measured on
    the model's own greedy continuations of calibration prompts."""
    from .generate import generate_step
    from .streams import forward_with_streams

    g = streams.config.num_streams
    counts = np.zeros((g, max_rank))
    n = np.zeros(g)
    for p in prompts:
        cont = [t for t, _ in generate_step(mx.array(p), model, max_tokens=max_tokens)]
        seq = mx.array(p + cont)[None]
        start = len(p) - 1
        owners = mx.arange(start, seq.shape[1])
        _, strm = forward_with_streams(model, streams, seq, owners=owners)
        order = mx.argsort(-strm[0], axis=-1)[..., :max_rank]  # (K, γ, R)
        order = np.array(order)
        full = p + cont
        for i, t in enumerate(range(start, len(full))):
            for j in range(g):
                tgt = t + 2 + j
                if tgt >= len(full):
                    continue
                n[j] += 1
                hit = np.flatnonzero(order[i, j] == full[tgt])
                if hit.size:
                    counts[j, hit[0]] += 1
    return (counts / np.maximum(n[:, None], 1)).tolist()


def tune(model_path=None, *, prompts="heldout", n_prompts=6, write=False, quick=False) -> dict:
    from .streams import STREAMS_CONFIG, SpecStreamModel
    from .tree import build_tree
    from .utils import default_model_path, get_model_path, load

    path = default_model_path() if model_path is None else get_model_path(model_path)
    model, tok = load(str(path))
    if not isinstance(model, SpecStreamModel):
        raise ValueError(f"{path} has no stream file to tune")
    base, streams = model.base, model.streams
    sizes = (1, 2, 4, 8, 16, 32) if quick else (1, 2, 4, 8, 16, 32, 64, 128)
    cost = measure_cost_curve(base, streams, sizes=sizes, trials=3 if quick else 7)
    ids = load_prompts(prompts, n_prompts, tok, base.args.vocab_size)
    acc = measure_rank_acceptance(base, streams, tok, ids, max_tokens=48 if quick else 96)
    paths, rate = choose_tree(cost, acc, streams.config.num_streams, max_nodes=max(sizes))
    # Then, measured end to end: that tree or none (context drafts only), the number of context
    # drafts joining it (prompt lookup; 0 = none) and the pruning threshold τ.
    from .generate import stream_generate

    from .tree import chain

    # candidate trees: the cost model's pick, the two cheapest chains, and none (context drafts only)
    trees = dict.fromkeys([paths, chain(1), chain(2), ()])
    configs = [(t, n, tau) for t in trees for n in (0, 3, 5, 8)
               for tau in ((0.0, 0.1) if t else (0.0,)) if t or n]  # (tree, lookup, τ); some drafts

    def decode_tps(tree_paths, lookup, tau):  # decode tokens/s (prefill excluded) over the prompts
        streams.config.prune_threshold = tau
        n = secs = 0.0
        for p in ids:
            *_, r = stream_generate(model, tok, p, max_tokens=32 if quick else 96, tree=tree_paths, lookup=lookup)
            n, secs = n + r.generation_tokens, secs + r.generation_tokens / r.generation_tps
        return n / secs

    for c in configs:  # warm-up: first-use costs (mask shapes, allocations) out of the timings
        decode_tps(*c)
    runs = {c: [] for c in configs}
    for _ in range(2 if quick else 3):  # interleaved rounds: load drift hits every config alike
        for c in configs:
            runs[c].append(decode_tps(*c))
    measured = {c: float(np.median(v)) for c, v in runs.items()}
    paths, best_lookup, best_tau = max(measured, key=measured.get)
    result = {"fingerprint": fingerprint(), "cost_ms": {str(k): v for k, v in cost.items()},
              "rank_acceptance": acc, "tree": [list(p) for p in paths], "tree_size": build_tree(paths).size,
              "expected_tokens_per_s": rate, "prune_threshold": best_tau, "lookup": best_lookup,
              "measured_tps": {f"tree={[list(p) for p in t]} lookup={n} tau={tau}": v
                               for (t, n, tau), v in measured.items()}}
    if write:
        cfg_file = path / STREAMS_CONFIG
        cfg = json.loads(cfg_file.read_text())
        cfg["tree"], cfg["prune_threshold"], cfg["lookup"] = result["tree"], best_tau, best_lookup
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
        result["written_to"] = str(cfg_file)
    return result


# ---------------------------------------------------------------- CLI


def setup_arg_parser(parser=None):
    p = parser or argparse.ArgumentParser(description="On-device benchmark harness")
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", default="heldout", help="heldout | sitepackages | random:LEN | file.jsonl")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("-m", "--max-tokens", type=int, default=128)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tree", action="append", default=None, help="SS tree(s) to run (default: the stream config's)")
    p.add_argument("--methods", default=None, help="comma list of method prefixes to run")
    p.add_argument("--draft-model", default=None, help="draft model for mlx-lm's speculative decoding")
    p.add_argument("--num-draft", type=int, default=3)
    p.add_argument("--streams", default=None, help="stream adapter to bench (a name or .json; default: the model's)")
    p.add_argument("--medusa", default=None, help="folder with medusa_heads.json")
    p.add_argument("--lookup", type=int, action="append", default=[],
                   help="also run context drafts (prompt lookup) of this length, alone and with the streams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="cast every peer's weights (CPU: float32 is fastest)")
    p.add_argument("--quick", action="store_true", help="small run (~1 minute on 2 CPU cores)")
    p.add_argument("--json", default=None)
    p.add_argument("--csv", default=None)
    p.add_argument("--plots", default=None, help="folder for PNG plots")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        if len(argv) != 3:
            raise ValueError("usage: specstream bench compare A.json B.json")
        print(compare(json.loads(Path(argv[1]).read_text()), json.loads(Path(argv[2]).read_text())))
        return 0
    if argv and argv[0] == "tune":
        ap = argparse.ArgumentParser(description="tune the tree to this device")
        ap.add_argument("--model", default=None)
        ap.add_argument("--prompts", default="heldout")
        ap.add_argument("--n-prompts", type=int, default=6)
        ap.add_argument("--write", action="store_true", help="write the tree into the stream config")
        ap.add_argument("--quick", action="store_true")
        ap.add_argument("--json", default=None)
        a = ap.parse_args(argv[1:])
        res = tune(a.model, prompts=a.prompts, n_prompts=a.n_prompts, write=a.write, quick=a.quick)
        print(json.dumps({k: v for k, v in res.items() if k != "fingerprint"}, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
        return 0
    args = setup_arg_parser().parse_args(argv)
    if args.quick:
        args.n_prompts, args.max_tokens, args.trials, args.warmup = min(args.n_prompts, 3), min(args.max_tokens, 48), 1, 1
    draft = args.draft_model
    if draft is None and args.model is None:
        from .utils import default_model_path

        d = default_model_path().parent / "draft"
        draft = str(d) if (d / "config.json").exists() else None
    res = run_bench(args.model, methods=args.methods.split(",") if args.methods else None,
                    trees=args.tree or ["default"], prompts=args.prompts, n_prompts=args.n_prompts,
                    max_tokens=args.max_tokens, trials=args.trials, warmup=args.warmup, draft=draft,
                    num_draft=args.num_draft, medusa=args.medusa, seed=args.seed, dtype=args.dtype,
                    lookups=args.lookup, streams_name=args.streams)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    if args.csv:
        write_csv(res, Path(args.csv))
    if args.plots:
        for f in plots(res, Path(args.plots)):
            print(f"wrote {f}")
    return 0
