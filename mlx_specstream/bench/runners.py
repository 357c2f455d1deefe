"""Running every method on the same weights and prompts: our AR, mlx-lm's AR, our tree decoding
with each drafter (streams per tree, with and without context drafts; context drafts alone;
Medusa heads; a draft model) and mlx-lm's two-model decoding; optionally sampled rows at given
temperatures. Methods interleave prompt by prompt so machine-load drift hits all alike; speedups
are medians of paired per-trial ratios. Several prompt sets run in one interleaved run, reported
together and per set."""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten
import numpy as np
from mlx_lm.sample_utils import make_sampler

from ..checkpoint import DTYPES, cast_floats, default_model_path, load_config, model_dtype
from ..cli import progress_bar
from ..convert import mlx_lm_model
from ..device import fingerprint
from ..decode import levels_reached
from ..drafters import DEFAULT_NUM_DRAFT, MedusaDrafter, StreamDrafter, load_medusa
from ..generate import stream_generate
from ..loading import load, load_draft_model, resolve_model
from ..sample import SamplingParams, derived_seed
from ..streams import find_stream_file, load_streams
from ..sizing import AUTO
from ..tree import parse_tree_spec
from .prompts import load_prompts
from ..errors import UserError

METHOD_FIELDS = (
    "decode_tps",
    "prompt_tps",
    "ttft_s",
    "step_latency_ms",
    "inter_token_latency_ms",
    "mean_accepted",
    "acceptance_by_depth",
    "speedup",
    "worst_prompt",
    "plain_step_share",
    "tree_sizes",
    "peak_memory_gb",
    "peak_process_gb",
    "extra_params",
    "equal_to_ar",
    "divergence_rate",
    "tree_size",
    "generated_tokens",
)
# Sampled rows (``temps``): what a chat user gets — the AR baselines and the stream config's own
# tree, alone and with its context drafts.
DEFAULT_TEMP_METHODS = ("ours_ar", "mlx_lm_ar", "ss[default]")


@dataclass
class Run:
    tokens: List[int]
    arrivals: List[Tuple[float, int]]  # (time since start, tokens delivered)
    depths: List[int] = field(default_factory=list)
    tree_size: int = 1
    produced: Optional[float] = None  # tokens the forward passes produced (a cut last step counts whole)
    sizes: List[int] = field(default_factory=list)  # nodes verified per step

    @property
    def decode_tps(self) -> float:
        """This run's decode tokens/s (the first step, which holds the prefill, excluded)."""
        if len(self.arrivals) < 2:
            return 0.0
        return sum(n for _, n in self.arrivals[1:]) / max(self.arrivals[-1][0] - self.arrivals[0][0], 1e-9)


def _ours(model, tok, prompt, max_tokens, temp=0.0, **kw) -> Run:
    tic = time.perf_counter()
    toks, arr, depths, sizes, last = [], [], [], [], None
    for last in stream_generate(model, tok, prompt, max_tokens=max_tokens, sampling=SamplingParams(temp=temp), **kw):
        arr.append((time.perf_counter() - tic, len(last.tokens)))
        toks += last.tokens
        sizes.append(last.tree_size)
    # depth of each step's last accepted node: accepted drafts = tokens - 1 (correction)
    depths = [max(n - 1, 0) for _, n in arr[1:]]
    return Run(
        toks,
        arr,
        depths,
        max(sizes, default=1),
        last.tokens_per_step * last.steps if last is not None else 0.0,
        sizes[1:],
    )


def _mlx_lm(model, tok, prompt, max_tokens, draft=None, num_draft=DEFAULT_NUM_DRAFT, temp=0.0) -> Run:
    kw = {"draft_model": draft, "num_draft_tokens": num_draft} if draft is not None else {}
    tic = time.perf_counter()
    toks, arr, depths, run_len = [], [], [], 0
    for r in mlx_lm.stream_generate(model, tok, prompt, max_tokens=max_tokens, sampler=make_sampler(temp), **kw):
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


def _nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


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
    decode, prefill_tps, ttft, step_ms, itl_ms = [], [], [], [], []
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
                step_ms.append((t - prev) * 1e3)  # one decode step, as the caller sees it
                # inter-token latency: a step's tokens reach the caller together, after the step
                itl_ms.extend([(t - prev) * 1e3] + [0.0] * (n - 1))
                prev = t
            d_tok += sum(n for _, n in run.arrivals[1:])
            d_time += run.arrivals[-1][0] - t0
        decode.append(d_tok / max(d_time, 1e-9))
    runs = runs_by_trial[0]
    steps = sum(len(r.arrivals) for r in runs)
    total = sum(len(r.tokens) for r in runs)
    produced = sum(len(r.tokens) if r.produced is None else r.produced for r in runs)
    depths = [d for r in runs for d in r.depths]
    hist = levels_reached(np.bincount(depths).tolist() if depths else [])

    def pct(xs):
        return {f"p{q}": float(np.percentile(xs, q)) for q in (50, 90, 99)} if xs else None

    def spread(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)} if xs else None

    sizes = [t for r in runs for t in r.sizes]
    return {
        "tree_sizes": {int(t): int(c) for t, c in zip(*np.unique(sizes, return_counts=True))} if sizes else None,
        "plain_step_share": sum(t == 1 for t in sizes) / len(sizes) if sizes else None,
        "decode_tps": spread(decode),
        "decode_tps_by_trial": decode,
        "prompt_tps": spread(prefill_tps),
        "ttft_s": spread(ttft),
        "step_latency_ms": pct(step_ms),
        "inter_token_latency_ms": pct(itl_ms),
        "mean_accepted": produced / max(steps, 1),
        "acceptance_by_depth": hist,
        "tree_size": max(r.tree_size for r in runs),
        "generated_tokens": total,
    }


@dataclass(frozen=True)
class Method:
    """A bench row: its name, how it decodes one prompt at a temperature, the parameters it adds,
    and whose weights it runs (mlx-lm's copy or ours: its memory is counted from them)."""

    name: str
    run: Callable[[List[int], float], Run]
    extra_params: int = 0
    mlx_lm_weights: bool = False
    temp: float = 0.0

    @property
    def family(self) -> str:
        return self.name.split("[", 1)[0]

    def at(self, temp: float) -> "Method":
        return Method(f"{self.name}@{temp:g}", self.run, self.extra_params, self.mlx_lm_weights, temp)


def select(methods: List[Method], wanted: Sequence[str], what: Optional[str] = "--methods") -> List[Method]:
    """The rows ``wanted`` names: a whole name (``ss[default]``: that row only, not
    ``ss[default]+lookup[5]``) or a bare family (``ss``, ``lookup``: every row of it)."""

    def named(m: Method, w: str) -> bool:
        return m.name == w or ("[" not in w and m.family == w)

    unknown = [w for w in wanted if not any(named(m, w) for m in methods)]
    if unknown and what:  # what=None: the default list, rows that are absent here are skipped
        raise UserError(f"{what}: no bench row {unknown}; rows here: {[m.name for m in methods]}")
    return [m for m in methods if any(named(m, w) for w in wanted)]


@dataclass
class Measured:
    """Every row's runs ``runs[name][trial][prompt]`` and its peak memory (GB): what it would
    need alone — its weights, extra parameters in the base's dtype, and the most its runs
    allocated above what was resident — and the process's."""

    runs: Dict[str, List[List[Run]]]
    peak: Dict[str, float]
    process_peak: Dict[str, float]


def measure(rows: List[Method], ids, *, trials: int, warmup: int, seed: int, weight_bytes, progress) -> Measured:
    """Methods interleave: each prompt runs under every method back to back, so load drift on a
    shared machine hits all alike. Sampled rows draw from one seed per (trial, prompt), the same
    for every method. ``weight_bytes(method)``: the resident weights it uses."""
    total, done = len(rows) * (warmup + trials), 0
    for m in rows:
        for _ in range(warmup):
            m.run(ids[0], m.temp)
            done += 1
    out = Measured({m.name: [] for m in rows}, {}, {})
    own = {m.name: weight_bytes(m) for m in rows}
    for k in range(trials):
        for m in rows:
            out.runs[m.name].append([])
        for j, p in enumerate(ids):
            for m in rows:
                if m.temp:
                    mx.random.seed(derived_seed(seed, k * 1_009 + j))
                mx.reset_peak_memory()
                resident = mx.get_active_memory()
                out.runs[m.name][k].append(m.run(p, m.temp))
                top = mx.get_peak_memory()
                out.peak[m.name] = max(out.peak.get(m.name, 0.0), (own[m.name] + top - resident) / 1e9)
                out.process_peak[m.name] = max(out.process_peak.get(m.name, 0.0), top / 1e9)
        for m in rows:
            done += 1
            if progress:
                print(
                    f"\r{progress_bar(done, total)} trial {k + 1}/{trials} {m.name:<28}",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
    if progress:
        print(file=sys.stderr)
    return out


def run_bench(
    model_path=None,
    *,
    methods: Optional[Sequence[str]] = None,
    trees: Sequence[str] = ("default",),
    prompts: Union[str, Sequence[str]] = "heldout",
    n_prompts: int = 8,
    max_tokens: int = 128,
    trials: int = 3,
    warmup: int = 1,
    draft: Optional[str] = None,
    num_draft: int = DEFAULT_NUM_DRAFT,
    medusa: Optional[str] = None,
    seed: int = 0,
    progress=True,
    dtype: Optional[str] = None,
    lookups: Sequence[int] = (),
    streams_name: Optional[str] = None,
    temps: Sequence[float] = (),
    temp_methods: Sequence[str] = DEFAULT_TEMP_METHODS,
) -> dict:
    """Every method on the same weights and prompts, interleaved; see the module docstring.
    ``prompts``: one set or several (``n_prompts`` from each); ``temps``: also run the
    ``temp_methods`` rows sampled at each temperature (rows ``name@T``, compared with the AR
    baselines at the same temperature)."""
    sets = [prompts] if isinstance(prompts, str) else list(prompts)
    if not sets:
        raise UserError("no prompt set given")
    for t in temps:
        if not (math.isfinite(t) and t > 0):
            raise UserError(f"temperatures must be finite and > 0 (greedy rows always run), got {t}")
    mx.random.seed(seed)
    path = default_model_path() if model_path is None else resolve_model(model_path)
    model, tok = load(str(path), dtype=dtype, streams=streams_name)
    base = getattr(model, "base", model)
    drafter = getattr(model, "drafter", None)
    streams = drafter.streams if isinstance(drafter, StreamDrafter) else None
    lm_model = mlx_lm_model(path, dtype)
    folder = path.parent if path.suffix == ".gguf" else path
    if streams is not None and streams.changes_main:
        # A shared-mode adapter changes the model: the AR baselines decode that model, i.e. the
        # base with the LoRA fused in (ours and mlx-lm's alike).
        if streams.config.main_sees_streams:
            raise UserError("main_sees_streams adapters have no plain-AR equivalent to benchmark against")
        file = find_stream_file(folder, streams_name)
        base = load(str(path), dtype=dtype, streams=False)[0]
        for m in (base, lm_model):
            load_streams(file, m).fuse_lora(m)
    if path.suffix == ".gguf" or "quantization" not in load_config(path):
        dtype = dtype or {v: k for k, v in DTYPES.items()}[model_dtype(base)]
    if dtype:  # the same weights in the same dtype for every peer
        cast_floats(lm_model, dtype)
    ids, set_of = [], []
    for spec in sets:
        got = load_prompts(spec, n_prompts, tok, base.args.vocab_size)
        ids += got
        set_of += [spec] * len(got)
    plan: List[Method] = []
    plan.append(Method("ours_ar", lambda p, t: _ours(base, tok, p, max_tokens, t, speculative=False)))
    plan.append(Method("mlx_lm_ar", lambda p, t: _mlx_lm(lm_model, tok, p, max_tokens, temp=t), mlx_lm_weights=True))
    own = [n for n in ([streams.config.lookup] if streams is not None else []) if n and n not in lookups]
    if streams is not None:
        for spec in trees:
            if spec == "config":  # the adapter as a user gets it: its own setting, greedy or sampled
                plan.append(Method("ss[config]", lambda p, t: _ours(model, tok, p, max_tokens, t), streams.num_params))
                continue
            paths = (
                None
                if spec == "default"
                else AUTO
                if spec == AUTO
                else parse_tree_spec(spec, streams.config.num_streams)
            )
            # ss[...] rows: the streams' drafts alone; +lookup[n] rows add n context drafts (the
            # stream config's own number joins the default tree — what a user of it gets — and
            # runs alone below, so the shipped setting always has its two components beside it)
            plan.append(
                Method(
                    f"ss[{spec}]",
                    lambda p, t, paths=paths: _ours(model, tok, p, max_tokens, t, tree=paths, lookup=0),
                    streams.num_params,
                )
            )
            for n in list(lookups) + (own if spec == "default" else []):
                plan.append(
                    Method(
                        f"ss[{spec}]+lookup[{n}]",
                        lambda p, t, paths=paths, n=n: _ours(model, tok, p, max_tokens, t, tree=paths, lookup=n),
                        streams.num_params,
                    )
                )
    for n in list(lookups) + own:  # context drafts alone (prompt lookup decoding): no trained parameters
        plan.append(Method(f"lookup[{n}]", lambda p, t, n=n: _ours(base, tok, p, max_tokens, t, lookup=n)))
    if AUTO in trees:  # context drafts alone, each step's chain sized from their running acceptance
        plan.append(Method(f"lookup[{AUTO}]", lambda p, t: _ours(base, tok, p, max_tokens, t, tree=AUTO)))
    if medusa:
        md = MedusaDrafter(load_medusa(Path(medusa), base))  # cast to the base's dtype
        for spec in (t for t in trees if t != "config"):  # the streams' trees: tokens per step compare like for like
            paths = None if spec == "default" else AUTO if spec == AUTO else parse_tree_spec(spec, md.levels)
            plan.append(
                Method(
                    "medusa" if spec == "default" else f"medusa[{spec}]",
                    lambda p, t, paths=paths: _ours(base, tok, p, max_tokens, t, drafter=md, tree=paths),
                    md.num_params,
                )
            )
    if draft:
        # Two-model decoding: our loop with the draft model as its drafter, beside mlx-lm's own.
        dd = load_draft_model(draft, base, num_draft=num_draft)
        plan.append(
            Method(f"draft[{num_draft}]", lambda p, t: _ours(base, tok, p, max_tokens, t, drafter=dd), dd.num_params)
        )
        d_model = mlx_lm_model(resolve_model(draft), dtype)
        plan.append(
            Method(
                f"mlx_lm_draft[{num_draft}]",
                lambda p, t: _mlx_lm(lm_model, tok, p, max_tokens, d_model, num_draft, temp=t),
                dd.num_params,
                mlx_lm_weights=True,
            )
        )
    if methods:
        plan = select(plan, methods)
    rows = plan + [
        m.at(t)
        for t in temps
        for m in select(plan, temp_methods, "--temp-methods" if temp_methods != DEFAULT_TEMP_METHODS else None)
    ]
    npt = [len(p) for p in ids]
    itemsize = next(v for _, v in tree_flatten(base.parameters())).dtype.size
    measured = measure(
        rows,
        ids,
        trials=trials,
        warmup=warmup,
        seed=seed,
        progress=progress,
        weight_bytes=lambda m: _nbytes(lm_model if m.mlx_lm_weights else base) + m.extra_params * itemsize,
    )
    trial_runs, peak, process_peak = measured.runs, measured.peak, measured.process_peak
    temp_of = {m.name: m.temp for m in rows}
    extra_of = {m.name: m.extra_params for m in rows}

    def report(idx: List[int]) -> Dict[str, dict]:
        """The rows' metrics over the prompts ``idx``."""
        out = {}
        for name in trial_runs:
            res = summarize([[runs[i] for i in idx] for runs in trial_runs[name]], [npt[i] for i in idx])
            res["peak_memory_gb"], res["peak_process_gb"], res["extra_params"] = (
                peak[name],
                process_peak[name],
                extra_of[name],
            )
            out[name] = res
        for name, res in out.items():
            t = temp_of[name]
            suffix = f"@{t:g}" if t else ""
            d = (
                divergence(
                    [trial_runs[name][0][i].tokens for i in idx], [trial_runs["ours_ar"][0][i].tokens for i in idx]
                )
                if "ours_ar" in out
                else {}
            )
            if not t:  # greedy rows must reproduce our AR exactly
                res.update(d)
            else:  # sampled rows follow other random paths: equality does not apply
                res.update({"equal_to_ar": None, "divergence_rate": None, "left_greedy_path": d.get("divergence_rate")})
            res["speedup"] = {
                b: statistics.median(
                    a / c for a, c in zip(res["decode_tps_by_trial"], out[b + suffix]["decode_tps_by_trial"])
                )
                for b in ("ours_ar", "mlx_lm_ar")
                if b + suffix in out
            }
            # per prompt: the median over trials of this prompt's paired ratio; the worst one named
            res["speedup_by_prompt"] = {
                b: [
                    statistics.median(
                        trial_runs[name][k][i].decode_tps / max(trial_runs[b + suffix][k][i].decode_tps, 1e-9)
                        for k in range(trials)
                    )
                    for i in idx
                ]
                for b in ("ours_ar", "mlx_lm_ar")
                if b + suffix in out
            }
            res["worst_prompt"] = {
                b: {"speedup": min(v), "prompt": idx[int(np.argmin(v))]}
                for b, v in res["speedup_by_prompt"].items()
                if v
            }
            res["temperature"] = t
        return out

    results = report(list(range(len(ids))))
    if len(sets) > 1:
        per_set = {spec: report([i for i, s in enumerate(set_of) if s == spec]) for spec in sets}
        for name, res in results.items():
            res["by_set"] = {spec: per_set[spec][name] for spec in sets}
    return {
        "fingerprint": fingerprint(),
        "model": str(path),
        "config": {
            "prompts": sets if len(sets) > 1 else sets[0],
            "n_prompts": len(ids),
            "n_prompts_by_set": {spec: set_of.count(spec) for spec in sets},
            "max_tokens": max_tokens,
            "trials": trials,
            "warmup": warmup,
            "seed": seed,
            "greedy": True,
            "temperatures": list(temps),
            "stream_config": streams.config.to_dict() if streams is not None else None,
        },
        "methods": results,
    }
