"""This device's cost curve for per-step tree sizing: a step's time per tree size relative to a
plain AR step, measured once per machine, model shape and drafter (a few seconds), kept in the
user's cache folder (``$XDG_CACHE_HOME/mlx-specstream``) so later runs start at once."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn

from .acceptance import GreedyAcceptance
from .cache import make_cache
from .decode import pipelines_plain_steps, tree_generate_step, tree_step
from .device import tuned_on
from .drafters import Drafter, DraftState, Verifier
from .plan import TreePlan
from .sizing import AutoTree, CostCurve

COST_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
PLAIN_RUN = 6  # plain steps per calibration round when the loop pipelines them


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx-specstream"


def _shape_key(model: nn.Module, drafter: Drafter, width: int, levels: int) -> str:
    """What a step's cost depends on: the device, the model's shape, dtype and quantization, the
    drafter's kind and shape — not the weights' values."""
    args = model.args
    lin = next((m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))), None)
    quant = getattr(lin, "bits", None) if isinstance(lin, nn.QuantizedLinear) else None
    dtype = str(lin.weight.dtype) if lin is not None else None
    shape = {
        "device": tuned_on(),
        "model": [
            getattr(args, "model_type", None),
            args.hidden_size,
            args.num_hidden_layers,
            args.vocab_size,
            dtype,
            quant,
        ],
        "drafter": type(drafter).__name__,
        "width": width,
        "levels": levels,
    }
    streams = getattr(drafter, "streams", None)
    if streams is not None:
        c = streams.config
        shape["streams"] = [c.num_streams, c.num_msa_layers, c.lora_rank, c.mode, c.main_sees_streams]
    return hashlib.sha1(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]


def measure_cost(
    model: nn.Module,
    drafter: Drafter,
    *,
    width: int,
    levels: int,
    sizes: Sequence[int] = COST_SIZES,
    prefix: int = 128,
    trials: int = 7,
    pipelined: bool = False,
) -> CostCurve:
    """Median time of one tree step (verify, accept, draft, commit, as the decode loop runs it)
    per size, over the median of AR steps timed between them, after ``prefix`` cached tokens.
    ``pipelined``: also a plain step's time in the decode loop queueing plain steps early (a few
    plain steps per round; :attr:`CostCurve.plain`)."""
    prompt = mx.random.randint(3, model.args.vocab_size, (prefix,), key=mx.random.key(0)).astype(mx.int32)
    cache = make_cache(model)
    for c in cache:
        c.reserve(prefix + max(sizes) + 8)
    drafter.prefill(model, prompt[None, :-1], cache)
    mx.eval([c.state for c in cache])
    start = cache[0].offset

    def trim():
        for c in cache:
            c.trim(c.offset - start)

    plans = {}
    for T in sizes:
        if levels == 0:  # context drafts only: a chain of them
            plans[T] = TreePlan((), lookup=T - 1, width=width) if T > 1 else TreePlan((), width=width)
        else:  # the drafter's nodes, best-first over ranks (the shapes sizing picks)
            plans[T] = TreePlan(_first_paths(T - 1, width, levels), width=width, levels=levels)
    never = CostCurve((1, 2), (1.0, 1e9))  # a sizer that always picks the plain step
    step, ar, plain = {T: [] for T in sizes}, [], []
    for i in range(trials + 2):  # sizes interleaved within each round: drift hits all alike
        if pipelined:
            sizer = AutoTree(never, width=width, levels=levels)
            t = [
                time.perf_counter()
                for _ in tree_generate_step(
                    prompt[-1:], model, drafter, max_tokens=PLAIN_RUN, prompt_cache=cache, sizer=sizer, pipeline=True
                )
            ]
            if i >= 2:
                plain += [b - a for a, b in zip(t[1:], t[2:])]  # from the second step: the first is unqueued
            trim()
        for T, plan in plans.items():
            cand = mx.zeros((max(plan.levels, 1), plan.width + (1 if plan.lookup else 0)), mx.int32)
            tic = time.perf_counter()
            tree_step(model, drafter, plan, DraftState(prompt[-1], cand), cache, GreedyAcceptance())
            dt = time.perf_counter() - tic
            trim()
            tic = time.perf_counter()
            mx.argmax(model(prompt[-1:][None], cache=cache)[0, -1]).item()
            if i >= 2:  # the first rounds build each shape's masks and warm the allocator
                step[T].append(dt)
                ar.append(time.perf_counter() - tic)
            trim()
    step = {T: statistics.median(v) for T, v in step.items()}
    base = statistics.median(ar)
    costs = [step[T] / base for T in sizes]
    for i in range(1, len(costs)):  # a larger tree never costs less (timing noise aside)
        costs[i] = max(costs[i], costs[i - 1])
    return CostCurve(tuple(sizes), tuple(costs), statistics.median(plain) / base if plain else None)


def _first_paths(n: int, width: int, levels: int):
    out, frontier = [], [()]
    while len(out) < n and frontier:
        nxt = []
        for p in frontier:
            for r in range(width):
                if len(out) < n and len(p) < levels:
                    out.append(p + (r,))
                    nxt.append(p + (r,))
        frontier = nxt
    return tuple(out)


def cost_curve(model: nn.Module, drafter: Drafter, *, width: int, levels: int) -> CostCurve:
    """The cached curve for this device, model shape and drafter, measured (and kept) if none."""
    drafter = drafter if levels else Verifier()
    file = _cache_dir() / f"cost-{_shape_key(model, drafter, width, levels)}.json"
    pipelined = pipelines_plain_steps(model)
    try:
        curve = CostCurve.from_dict(json.loads(file.read_text()))
        if curve.plain is not None or not pipelined:  # a curve from before plain steps were pipelined: again
            return curve
    except (OSError, ValueError):
        pass
    print(
        "[measuring this device's step cost per tree size, once for this model shape (a few seconds)]", file=sys.stderr
    )
    curve = measure_cost(model, drafter, width=width, levels=levels, pipelined=pipelined)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(curve.to_dict()))
        tmp.replace(file)
    except OSError:
        pass  # a read-only home: measured again next time
    return curve
