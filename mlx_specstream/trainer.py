"""The trainer: data (JSONL records → token and loss-mask arrays), the optimizer, the loop with
validation, checkpoints and exact resume — for stream adapters and, as the baseline, Medusa
heads. The ``specstream train`` verb is :mod:`mlx_specstream.train`.

Modes:
- ``lossless``: the base is frozen; trained are the stream embeddings, the stream-row-only LoRA
  of the Ns MSA layers and the pruning adapter. Loss ``Σ_j α_j·CE(stream j)`` (α0 = 0) plus the
  pruning adapter's own next-token loss (disjoint parameters).
- ``shared``: additionally ``α0·NTP`` on the main stream, optionally with main rows seeing their
  streams; the model itself changes and the output is verified against the new model.
- ``pruning``: the pruning adapter alone, on next-token loss (for an existing stream file).

Streams are attached only to positions whose next token carries loss (completions), processed in
segments so that training rows grow by γ·segment, not γ·sequence (the paper's segment attention).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from .checkpoint import base_fingerprint, read_json, read_safetensors, save_safetensors_atomically, write_atomically
from .cli import progress_bar
from .drafters.medusa import MEDUSA_STEM, MedusaConfig, MedusaHeads, medusa_loss, save_medusa
from .streams import SpeculativeStreams, StreamConfig, bottom_forward, save_streams
from .streams.files import read_stream_config, stream_stem, vocab_ranking
from .streams.loss import (
    DEFAULT_ALPHA,
    DEFAULT_SEGMENT,
    LossWeights,
    drawing_probabilities,
    head_vocabulary,
    stream_loss,
)
from .chat_template import template_ids
from .errors import UserError
from .sample import derived_seed

TRAIN_MODES = ("lossless", "shared", "pruning")


class DataError(UserError):
    pass


# ---------------------------------------------------------------- data


def _lone_surrogate(obj) -> Optional[str]:
    """The first string in ``obj`` (a parsed record) that UTF-8 cannot encode, if any."""
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, str):
            try:
                o.encode("utf-8")
            except UnicodeEncodeError:
                return o[:40]
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
    return None


def read_jsonl(path: Path, tokenizer, seq_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Records -> (tokens (N, L+1), loss mask (N, L+1): 1 where the token is a training target).

    ``{"text"}``: every token is a target (long texts are cut into windows); ``{"prompt",
    "completion"}`` (or pre-tokenized ``{"prompt_ids", "completion_ids"}``): completion tokens
    only; ``{"messages"}``: the chat template, the last assistant message is the target.
    """
    L = seq_len + 1
    rows, masks = [], []
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{ln}: not UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: not valid JSON ({e.msg})") from e
            except RecursionError:
                raise DataError(f"{path}:{ln}: JSON nested too deeply") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{ln}: expected a JSON object")
            if (bad := _lone_surrogate(rec)) is not None:
                raise DataError(f"{path}:{ln}: {bad!r} holds a lone surrogate (not encodable text)")
            if "text" in rec:
                if not isinstance(rec["text"], str):
                    raise DataError(f"{path}:{ln}: 'text' must be a string")
                ids = tokenizer.encode(rec["text"])
                for s in range(0, max(len(ids) - 1, 1), seq_len):
                    w = ids[s : s + L]
                    if len(w) > 1:
                        rows.append(w)
                        masks.append([0] + [1] * (len(w) - 1))
                continue
            if "prompt_ids" in rec and "completion_ids" in rec:  # pre-tokenized (self-distillation)
                pi, ci = rec["prompt_ids"], rec["completion_ids"]
                if not isinstance(pi, list) or not isinstance(ci, list):
                    raise DataError(f"{path}:{ln}: 'prompt_ids' and 'completion_ids' must be lists of token ids")
                if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(tokenizer) for t in pi + ci):
                    raise DataError(f"{path}:{ln}: token ids must be integers below the vocabulary size")
            elif "prompt" in rec and "completion" in rec:
                p, c = rec["prompt"], rec["completion"]
                if not isinstance(p, str) or not isinstance(c, str):
                    raise DataError(f"{path}:{ln}: 'prompt' and 'completion' must be strings")
                pi = tokenizer.encode(p)
                ci = tokenizer.encode(c, add_special_tokens=False)
            elif "messages" in rec:
                msgs = rec["messages"]
                if (
                    not isinstance(msgs, list)
                    or not msgs
                    or not all(isinstance(m, dict) and "content" in m for m in msgs)
                    or msgs[-1].get("role") != "assistant"
                ):
                    raise DataError(
                        f"{path}:{ln}: 'messages' must be a list of {{role, content}} ending with an assistant turn"
                    )
                if not getattr(tokenizer, "has_chat_template", False):
                    raise DataError(f"{path}:{ln}: 'messages' records need a tokenizer with a chat template")
                pi = template_ids(tokenizer, msgs[:-1], add_generation_prompt=True)
                full = template_ids(tokenizer, msgs)
                ci = full[len(pi) :]
            else:
                raise DataError(f"{path}:{ln}: a record needs 'text', 'prompt'+'completion' or 'messages'")
            w = (pi + ci)[:L]
            if len(w) < 2 or len(pi) >= L or not ci:
                continue  # nothing to learn from: no completion token inside the window
            rows.append(w)
            masks.append([0] * len(pi) + [1] * (len(w) - len(pi)))
    if not rows:
        raise DataError(
            f"{path}: no usable records (every record lacks target tokens, e.g. empty completions, "
            "or its prompt fills the whole --seq-len)"
        )
    toks = np.zeros((len(rows), L), np.int32)
    mask = np.zeros((len(rows), L), np.float32)
    for i, (r, m) in enumerate(zip(rows, masks)):
        toks[i, : len(r)] = r
        mask[i, : len(m)] = m
    return toks, mask


def load_data(args, tokenizer) -> Tuple[Tuple[np.ndarray, np.ndarray], Optional[Tuple[np.ndarray, np.ndarray]]]:
    data = Path(args.data)
    if data.is_dir():
        train, valid = data / "train.jsonl", data / "valid.jsonl"
        if not train.exists():
            raise DataError(f"{data} has no train.jsonl")
    else:
        train, valid = data, Path(args.valid) if args.valid else None
        if valid is not None and not valid.is_file():
            raise DataError(f"--valid {valid}: no such file")
    tr = read_jsonl(train, tokenizer, args.seq_len)
    va = read_jsonl(valid, tokenizer, args.seq_len) if valid is not None and valid.exists() else None
    return tr, va


def batch_indices(n: int, batch_size: int, rng: random.Random) -> Iterator[list]:
    """The records of each shuffled batch, epoch after epoch (what :func:`batches` reads)."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for s in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield order[s : s + batch_size]


def batches(data, batch_size: int, rng: random.Random, bottom=None, skip: int = 0) -> Iterator[tuple]:
    """Shuffled batches ``(tokens, mask, bottom states or None)``, epoch after epoch, after the
    first ``skip`` (a resumed run's: only their order is replayed)."""
    toks, mask = data
    it = batch_indices(len(toks), batch_size, rng)
    for _ in range(skip):
        next(it)
    for idx in it:
        yield mx.array(toks[idx]), mx.array(mask[idx]), None if bottom is None else mx.array(bottom[idx])


def visited(n: int, cfg: "TrainConfig", start: int = 0) -> np.ndarray:
    """The records a run's iterations ``start..iters`` read (sorted): the frozen states of the
    others are never needed."""
    it = batch_indices(n, cfg.batch_size, random.Random(cfg.seed))
    for _ in range(start * cfg.grad_accum):
        next(it)
    seen = set()
    for _ in range((cfg.iters - start) * cfg.grad_accum):
        seen.update(next(it))
        if len(seen) == n:
            break
    return np.array(sorted(seen), np.int64)


class Rows:
    """Frozen states of some records: ``rows[idx]`` by record index (a stored row per record
    in ``which``)."""

    def __init__(self, states: np.ndarray, which: np.ndarray):
        self.states, self.slot = states, {int(r): i for i, r in enumerate(which)}

    def __getitem__(self, idx):
        return self.states[[self.slot[int(i)] for i in idx]]


def bottom_states(model, streams: Optional[SpeculativeStreams], data, batch_size: int = 8, log=print) -> np.ndarray:
    """The bottom N−Ns layers' output for every training input (float32, host memory); with
    ``streams=None``, the whole base's final-normed states (what Medusa heads read). The base is
    frozen in every mode, so these rows never change: computing them once makes an iteration
    cost only the Ns stream layers (or the heads). Rows are batched by length and run only up to
    their last target (later positions are padding no loss term reads; they stay zero)."""
    toks, mask = data
    N, L = toks.shape[0], toks.shape[1] - 1
    ends = np.array([(np.flatnonzero(m).max() if m.any() else 1) for m in mask]) if mask is not None else np.full(N, L)
    order = np.argsort(ends, kind="stable")
    out = np.zeros((N, L, model.args.hidden_size), np.float32)
    tic, done = time.perf_counter(), 0
    for s in range(0, N, batch_size):
        idx = order[s : s + batch_size]
        Lb = int(min(max(ends[idx].max(), 1), L))
        x, kw = mx.array(toks[idx, :Lb]), dict(mask="causal" if Lb > 1 else None, positions=mx.arange(Lb))
        h = bottom_forward(model, streams, x, **kw) if streams is not None else model.hidden(x, **kw)
        out[idx, :Lb] = np.array(h.astype(mx.float32))
        done += len(idx) * Lb
        if log and (s // batch_size) % 20 == 0:
            log(
                f"{progress_bar(s + len(idx), N)} bottom states {s + len(idx)}/{N} "
                f"({done / (time.perf_counter() - tic):.0f} tok/s)"
            )
    return out


def kept_states(model, streams: Optional[SpeculativeStreams], data, batch_size: int, log, folder: Optional[Path]):
    """:func:`bottom_states`, kept in ``folder`` (None: not kept) as a float32 ``.npy`` named by
    a hash of the base's weights, the layers cut and the data — so a resumed run (the next session,
    on this 2-core CPU) reads them instead of computing them again. A file that does not load as the
    expected array is computed again."""
    if folder is None:
        return bottom_states(model, streams, data, batch_size, log)
    toks, mask = data
    h = hashlib.sha256(f"{'final' if streams is None else streams.config.num_msa_layers}".encode())
    for k, v in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(k.encode())
        h.update(memoryview(np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v)).cast("B"))
    h.update(toks.tobytes())
    h.update(mask.tobytes())
    f = Path(folder) / f"states-{h.hexdigest()[:16]}.npy"
    shape = (toks.shape[0], toks.shape[1] - 1, model.args.hidden_size)
    if f.exists():
        try:
            arr = np.load(f, mmap_mode="r")
            if arr.shape == shape and arr.dtype == np.float32:
                if log:
                    log(f"frozen layers' outputs read from {f}")
                return arr
        except (OSError, ValueError):
            pass
        if log:
            log(f"{f} is not the expected array: computing it again")
    arr = bottom_states(model, streams, data, batch_size, log)
    tmp = f.with_name(f.stem + ".partial.npy")
    np.save(tmp, arr)
    tmp.replace(f)  # whole or absent: a killed run never leaves half a file under the final name
    return arr


# ---------------------------------------------------------------- loss


# ---------------------------------------------------------------- trainer


@dataclass
class TrainConfig:
    """Optimisation settings. What is trained — the stream adapter's shape — is a
    :class:`StreamConfig` (its defaults, declared there once)."""

    mode: str = "lossless"  # lossless | shared | pruning
    streams: StreamConfig = field(default_factory=StreamConfig)
    iters: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    segment: int = DEFAULT_SEGMENT
    lr: float = 5e-4
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    alpha0: Optional[float] = None  # default: 0 lossless, 1 shared
    alpha: float = DEFAULT_ALPHA
    seed: int = 0
    val_every: int = 100
    val_batches: int = 8
    save_every: int = 200
    max_stream_positions: int = 64  # streams on at most this many sampled target positions per batch (0 = all)
    cache_bottom: bool = True  # compute the frozen bottom layers' output once per sequence
    keep_states: bool = False  # keep those outputs in the output folder for a resumed run
    medusa: int = 0  # > 0: train that many Medusa-1 heads instead of streams (the baseline)
    time_limit: float = 0.0  # seconds (0 = none): the schedule runs on whichever of iters / time ends first
    head_sample: int = 0  # > 0: stream CE over the batch's targets + this many sampled tokens (0: full vocabulary)
    full_every: int = 0  # with head_sample: every this-many-th iteration over the full vocabulary (0: never)
    # The stream embeddings' learning rate relative to lr; 0: the RMS of the states they are added
    # to. Adam moves a weight ~lr per step whatever its gradient, and on SmolLM2 those states run
    # ~15 per dimension against P's 0.07: at lr 1e-3 P would need ~10^4 steps to tell the streams
    # apart (the session-15 adapters' three streams agree on 94-99% of their top drafts).
    embedding_lr: float = 0.0

    def __post_init__(self):
        ints = {
            "iters": 1,
            "batch_size": 1,
            "grad_accum": 1,
            "seq_len": 2,
            "segment": 1,
            "warmup": 0,
            "seed": 0,
            "val_every": 1,
            "val_batches": 1,
            "save_every": 1,
            "max_stream_positions": 0,
            "medusa": 0,
            "head_sample": 0,
            "full_every": 0,
        }
        for name, lo in ints.items():
            v = getattr(self, name)
            hi = _INT_MAX.get(name, 2**31 - 1)  # MLX's schedules count steps in int32
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise DataError(f"--{name.replace('_', '-')} must be an integer in {lo}..{hi}, got {v!r}")
        floats = {
            "lr": (0.0, False),
            "min_lr_ratio": (0.0, True),
            "weight_decay": (0.0, True),
            "alpha": (0.0, True),
            "time_limit": (0.0, True),
            "embedding_lr": (0.0, True),
        }
        for name, (lo, closed) in floats.items():
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and (v >= lo if closed else v > lo)):
                raise DataError(
                    f"--{name.replace('_', '-')} must be a finite number {'>=' if closed else '>'} {lo}, got {v!r}"
                )
        if self.alpha0 is not None and not (math.isfinite(self.alpha0) and self.alpha0 >= 0):
            raise DataError(f"--alpha0 must be a finite number >= 0, got {self.alpha0!r}")


_INT_MAX = {"seed": 2**64 - 1, "batch_size": 1 << 16, "seq_len": 1 << 20, "medusa": 64, "head_sample": 1 << 22}


class _Trainable(nn.Module):
    """What the optimizer sees: the streams, or the Medusa heads."""

    def __init__(self, streams=None, medusa=None):
        super().__init__()
        if streams is not None:
            self.streams = streams
        if medusa is not None:
            self.medusa = medusa


@dataclass
class _Job:
    """What a run trains — the streams or the Medusa heads; :func:`_run` runs either."""

    trainable: _Trainable
    loss: Callable  # (trainable, tokens, mask, frozen states, seed) -> scalar loss
    metrics: Callable  # (tokens, mask, frozen states) -> validation metrics (dict of scalars)
    save: Callable[[], None]  # writes the adapter
    state: "_State"
    what: str
    frozen_by: Optional[SpeculativeStreams]  # kept states: these streams' bottom layers; None: final states
    lr_scales: Dict[str, float] = field(default_factory=dict)  # parameter path -> learning-rate multiplier


def train(
    model,
    tokenizer,
    train_data,
    valid_data,
    cfg: TrainConfig,
    out: Path,
    streams: Optional[SpeculativeStreams] = None,
    resume: bool = False,
    log=print,
    stop_at: Optional[int] = None,
    name: Optional[str] = None,
):
    """Train and write the stream file ``speculative_streams[-name]`` (and a resumable trainer
    state) to ``out``; with ``cfg.medusa``, Medusa-1 heads instead (the baseline).

    ``stop_at`` ends the run early at that iteration, as an interruption would (for tests).
    """
    mx.random.seed(cfg.seed)  # before the adapter's initialization: a run is its seed's
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.freeze()
    if cfg.medusa:
        heads, job = _medusa_job(model, cfg, out)
        return heads, _run(model, job, train_data, valid_data, cfg, out, resume, log, stop_at)
    if cfg.mode not in TRAIN_MODES:
        raise UserError(f"mode must be one of {TRAIN_MODES}, got {cfg.mode!r}")
    if streams is None:
        streams = SpeculativeStreams(cfg.streams, model)
    streams.config.base = base_fingerprint(model)  # recorded in the stream file: it attaches to this base only
    shape = {k: v for k, v in streams.config.to_dict().items() if k in _SHAPE_KEYS}
    if streams.config.token_head_rank:  # the same parameters mean another function in the other space
        shape["token_head_space"] = streams.config.token_head_space
    trainable = _Trainable(streams)
    if cfg.mode == "pruning":
        trainable.freeze()
        streams.pruning.unfreeze()
    a0 = cfg.alpha0 if cfg.alpha0 is not None else (1.0 if cfg.mode == "shared" else 0.0)
    weights = LossWeights(ntp=a0, stream=cfg.alpha, pruning=1.0)
    train_streams = cfg.mode != "pruning"
    freq = drawing_probabilities(_target_counts(train_data, model.args.vocab_size)) if cfg.head_sample else None
    if streams.vocab_ranking is None:  # saved with the adapter: what a draft vocabulary is cut from
        streams.vocab_ranking = vocab_ranking(_target_counts(train_data, model.args.vocab_size) - 1)

    def loss(tr, toks, mask, bottom, seed):
        vocab = None
        it = (seed - derived_seed(cfg.seed, 0)) // cfg.grad_accum + 1  # the iteration (1-based) this micro-batch is in
        if freq is not None and not (cfg.full_every and it % cfg.full_every == 0):
            vocab = head_vocabulary(np.array(toks[:, 1:])[np.array(mask[:, 1:]) > 0], freq, cfg.head_sample, seed)
        return stream_loss(
            model,
            tr.streams,
            toks,
            mask,
            weights,
            cfg.segment,
            train_streams,
            max_positions=cfg.max_stream_positions or None,
            sample_seed=seed,
            bottom=bottom,
            vocab=vocab,
        )[0]

    def metrics(toks, mask, bottom):
        return stream_loss(model, streams, toks, mask, weights, cfg.segment, train_streams, bottom=bottom)[1]

    scale = 1.0  # pruning mode trains the pruning adapter alone
    if cfg.mode != "pruning":
        scale = cfg.embedding_lr or insertion_rms(model, streams, train_data, cfg.batch_size)
        log(f"stream embeddings' learning rate: {scale:.3g} x lr")
    job = _Job(
        trainable,
        loss,
        metrics,
        lambda: save_streams(out, streams, name),
        _State(out, stream_stem(name), {"train_mode": cfg.mode, **shape}, streams.config.base),
        f"{cfg.mode} streams",
        streams,
        {} if scale == 1 else {"streams.stream_embeddings": scale},
    )
    return streams, _run(model, job, train_data, valid_data, cfg, out, resume, log, stop_at)


def insertion_rms(model, streams: SpeculativeStreams, train_data, n: int = 8) -> float:
    """Mean RMS of the states the stream embeddings are added to (the insertion layer's input), over
    the target positions of the first ``n`` training records: deterministic, so a resumed run gets it
    again."""
    toks, mask = np.asarray(train_data[0][:n]), np.asarray(train_data[1][:n])
    L = toks.shape[1] - 1
    h = bottom_forward(model, streams, mx.array(toks[:, :-1]), mask="causal", positions=mx.arange(L))
    rms = np.sqrt(np.mean(np.square(np.array(h.astype(mx.float32))), axis=-1))
    at = mask[:, 1:] > 0
    return float(rms[at].mean()) if at.any() else 1.0


def _target_counts(train_data, vocab_size: int) -> np.ndarray:
    """How often each token is a training target (plus one: every token can be drawn)."""
    toks, mask = np.asarray(train_data[0]), np.asarray(train_data[1])
    return 1 + np.bincount(toks[mask > 0], minlength=vocab_size)[:vocab_size]


def _medusa_job(model, cfg: TrainConfig, out: Path):
    """Medusa-1 heads with the streams' budget: the same batches, iterations and sampled target
    positions per batch (``max_stream_positions``), on cached final states of the frozen base."""
    heads = MedusaHeads(MedusaConfig(num_heads=cfg.medusa), model)
    heads.init_from_lm_head(model)

    def loss(tr, toks, mask, hidden, seed):
        return medusa_loss(
            model,
            tr.medusa,
            toks,
            mask,
            max_positions=cfg.max_stream_positions or None,
            sample_seed=seed,
            hidden=hidden,
        )[0]

    def metrics(toks, mask, hidden):
        return medusa_loss(model, heads, toks, mask, hidden=hidden)[1]

    state = _State(out, MEDUSA_STEM, {"medusa": cfg.medusa}, base_fingerprint(model))
    return heads, _Job(
        _Trainable(medusa=heads), loss, metrics, lambda: save_medusa(out, heads), state, "Medusa heads", None
    )


def _run(model, job: _Job, train_data, valid_data, cfg: TrainConfig, out: Path, resume: bool, log, stop_at):
    """Batch order, optimizer, resume, frozen states, then the loop: the same for every job."""
    rng = random.Random(cfg.seed)
    opt, sched = _optimizer(cfg)
    start = job.state.load(job.trainable, opt, log) if resume else 0
    train_frozen, valid_frozen = _frozen_states(model, job.frozen_by, train_data, valid_data, cfg, start, out, log)
    on_eval = None if valid_data is None else (lambda: evaluate(job.metrics, valid_data, cfg, valid_frozen))
    return _loop(
        job,
        cfg,
        opt=opt,
        sched=sched,
        data=train_data,
        frozen=train_frozen,
        start=start,
        rng=rng,
        on_eval=on_eval,
        log=log,
        stop_at=stop_at,
    )


def _frozen_states(model, streams, train_data, valid_data, cfg: TrainConfig, start: int, out: Path, log):
    """The frozen layers' outputs (``streams=None``: the final states) for the training set —
    kept in ``out`` with ``keep_states`` — and for the validation batches; ``(None, None)`` when
    they are recomputed every iteration, or when a resumed run has no iteration left."""
    if not cfg.cache_bottom or start >= cfg.iters:
        return None, None
    # only the records the run reads (a kept file: those of the whole run, so a resumed run finds it)
    which = visited(len(train_data[0]), cfg, 0 if cfg.keep_states else start)
    part = (train_data[0][which], train_data[1][which])
    train = Rows(kept_states(model, streams, part, cfg.batch_size, log, out if cfg.keep_states else None), which)
    if valid_data is None:
        return train, None
    n_val = min(len(valid_data[0]), cfg.val_batches * cfg.batch_size)
    return train, bottom_states(model, streams, (valid_data[0][:n_val], valid_data[1][:n_val]), cfg.batch_size, None)


def _optimizer(cfg: TrainConfig):
    sched = optim.join_schedules(
        [
            optim.linear_schedule(cfg.lr * 1e-2, cfg.lr, max(cfg.warmup, 1)),
            optim.cosine_decay(cfg.lr, max(cfg.iters - cfg.warmup, 1), cfg.lr * cfg.min_lr_ratio),
        ],
        [max(cfg.warmup, 1)],
    )
    # The rate is set each iteration from the schedule at the run's progress (iterations or time).
    return optim.AdamW(learning_rate=float(sched(0)), weight_decay=cfg.weight_decay), sched


def _loop(
    job: _Job,
    cfg: TrainConfig,
    *,
    opt,
    sched,
    data,
    frozen,
    start: int,
    rng: random.Random,
    on_eval: Optional[Callable],
    log,
    stop_at: Optional[int],
) -> list:
    trainable = job.trainable
    value_and_grad = nn.value_and_grad(trainable, job.loss)
    it = batches(data, cfg.batch_size, rng, frozen, skip=start * cfg.grad_accum)  # the order continues
    n_params = sum(v.size for _, v in tree_flatten(trainable.trainable_parameters()))
    log(f"training {n_params} parameters ({job.what}), {cfg.iters} iterations")
    history = job.state.history(start)  # a resumed run keeps the records of the iterations before it
    tic, tokens_seen = time.perf_counter(), 0
    last = min(cfg.iters, stop_at or cfg.iters)
    for i in range(start, last):
        # With a time limit the schedule advances by whichever is further along: iterations or
        # time, so a run cut by the clock still ends with its learning rate decayed.
        elapsed = time.perf_counter() - tic
        step = i if not cfg.time_limit else max(i, start + round((cfg.iters - start) * elapsed / cfg.time_limit))
        opt.learning_rate = mx.array(sched(mx.array(min(step, cfg.iters))), mx.float32)
        final = i + 1 == last or (cfg.time_limit > 0 and step >= cfg.iters - 1)
        grads_acc, loss_acc = None, 0.0
        for a in range(cfg.grad_accum):
            toks, mask, b = next(it)
            # the micro-batch's own seed for the target positions it samples (streams and Medusa alike)
            loss, grads = value_and_grad(trainable, toks, mask, b, derived_seed(cfg.seed, i * cfg.grad_accum + a))
            grads_acc = grads if grads_acc is None else tree_map(lambda a, b: a + b, grads_acc, grads)
            loss_acc = loss_acc + loss
            tokens_seen += int(mask.sum())  # target tokens, not padding
        if cfg.grad_accum > 1:
            grads_acc = tree_map(lambda g: g / cfg.grad_accum, grads_acc)
        before = {k: v for k, v in tree_flatten(trainable.trainable_parameters()) if k in job.lr_scales}
        opt.update(trainable, grads_acc)
        if before:  # a multiplier on the step AdamW took (its state is untouched): that parameter's own rate
            now = dict(tree_flatten(trainable.trainable_parameters()))
            trainable.update(tree_unflatten([(k, v + job.lr_scales[k] * (now[k] - v)) for k, v in before.items()]))
        finite = mx.all(mx.array([mx.all(mx.isfinite(v)) for _, v in tree_flatten(trainable.trainable_parameters())]))
        mx.eval(trainable.parameters(), opt.state, loss_acc, finite)
        if not (finite.item() and math.isfinite(float(loss_acc))):
            # never save a diverged adapter: it would break losslessness checks and decode nothing
            raise DataError(
                f"training diverged at iteration {i + 1} (loss {float(loss_acc) / cfg.grad_accum}, "
                f"parameters {'finite' if finite.item() else 'not finite'}): nothing saved from it; "
                "lower --lr (the last saved adapter and state are kept)"
            )
        rec = {
            "iter": i + 1,
            "loss": round(float(loss_acc) / cfg.grad_accum, 4),
            "lr": round(float(opt.learning_rate), 8),
            "tok_s": round(tokens_seen / (time.perf_counter() - tic)),
            "peak_gb": round(mx.get_peak_memory() / 1e9, 2),
        }
        if on_eval is not None and ((i + 1) % cfg.val_every == 0 or final):
            rec["valid"] = on_eval()
        history.append(rec)
        if (i + 1) % cfg.save_every == 0 or final:
            job.save()
            job.state.save(trainable, opt, i + 1, history)  # with the history: a killed run keeps it
        _progress(rec, cfg.iters, log)
        if final:
            break
    return history


def evaluate(metrics_of: Callable, data, cfg: TrainConfig, bottom: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Mean of ``metrics_of(tokens, mask, bottom or None)`` (a dict of scalars) over the first
    validation batches."""
    toks, mask = data
    sums: Dict[str, float] = {}
    n = 0
    for s in range(0, min(len(toks), cfg.val_batches * cfg.batch_size), cfg.batch_size):
        b = None if bottom is None else mx.array(bottom[s : s + cfg.batch_size])
        for k, v in metrics_of(
            mx.array(toks[s : s + cfg.batch_size]), mx.array(mask[s : s + cfg.batch_size]), b
        ).items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {k: round(v / max(n, 1), 4) for k, v in sums.items()}


def _progress(rec, total, log):
    extra = f" valid {rec['valid']}" if "valid" in rec else ""
    log(
        f"{progress_bar(rec['iter'], total)} {rec['iter']}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tok_s']} target tok/s peak {rec['peak_gb']} GB{extra}"
    )


# What a resumed run must share with the run that saved the state (else its parameters do not fit)
_SHAPE_KEYS = (
    "num_streams",
    "num_msa_layers",
    "lora_rank",
    "lora_targets",
    "mode",
    "main_sees_streams",
    "pruning_rank",
    "stream_positions",
)


class _State:
    """An adapter's resumable trainer state in ``out``, per adapter stem (two adapters trained into
    one folder never share it): the parameters and optimizer state at step k
    (``STEM.trainer_state-k.safetensors``), the history (``STEM.train_history.json``), and last,
    the manifest (``STEM.trainer_state.json``: step, file, run shape, base fingerprint). Every file
    is written whole (temporary file, rename) and the manifest switches to a new step only once
    its files are in place, so a kill at any point leaves the previous adapter and state whole
    and a resumed run exact."""

    def __init__(self, out: Path, stem: str, shape: dict, base: dict):
        self.out, self.stem, self.shape, self.base = Path(out), stem, shape, base
        self.manifest = self.out / f"{stem}.trainer_state.json"
        self.history_file = self.out / f"{stem}.train_history.json"

    def _weights(self, step: int) -> Path:
        return self.out / f"{self.stem}.trainer_state-{step}.safetensors"

    def save(self, trainable, opt, step: int, history: list) -> None:
        flat = dict(tree_flatten(trainable.parameters()))
        flat.update({f"__opt__.{k}": v for k, v in tree_flatten(opt.state)})
        save_safetensors_atomically(self._weights(step), flat)
        write_atomically(self.history_file, json.dumps(history, indent=1))
        # The data order is replayed from the seed on resume, so no RNG state is needed.
        write_atomically(
            self.manifest,
            json.dumps({"step": step, "state": self._weights(step).name, "shape": self.shape, "base": self.base}),
        )
        prefix = f"{self.stem}.trainer_state-"
        for old in self.out.iterdir():  # exact names: another adapter's states are never touched
            rest = old.name[len(prefix) :] if old.name.startswith(prefix) else ""
            if rest.removesuffix(".safetensors").isdigit() and old.name != self._weights(step).name:
                old.unlink(missing_ok=True)

    def load(self, trainable, opt, log) -> int:
        """The step to resume from (0: nothing saved yet), the parameters and optimizer state
        loaded strictly; a state of another run shape or base, or an adapter without its state,
        refused by name."""
        adapter = self.out / f"{self.stem}.json"
        if not self.manifest.exists():
            if adapter.exists():
                raise UserError(
                    f"--resume: {adapter} exists but its trainer state ({self.manifest.name}) does not: "
                    "it cannot be resumed (--force trains it again from the start)"
                )
            log(f"--resume: no trainer state for {self.stem} in {self.out}: starting at iteration 0")
            return 0
        meta = read_json(self.manifest)
        if (
            not isinstance(meta, dict)
            or not isinstance(meta.get("step"), int)
            or not isinstance(meta.get("state"), str)
        ):
            raise UserError(f"{self.manifest} is not a trainer state manifest")
        saved = dict(meta.get("shape") or {})
        if "token_head_space" in self.shape and "token_head_space" not in saved and adapter.exists():
            saved["token_head_space"] = read_stream_config(adapter).token_head_space  # saved before the key
        if saved != self.shape:
            diff = sorted(k for k in set(self.shape) | set(saved) if saved.get(k) != self.shape.get(k))
            raise UserError(
                f"--resume: {self.manifest.name} was saved by a run with other settings ({', '.join(diff)}: "
                f"{[saved.get(k) for k in diff]} there, {[self.shape.get(k) for k in diff]} "
                "now): pass the same settings, or --force to start again"
            )
        if meta.get("base") != self.base:
            raise UserError(f"--resume: {self.manifest.name} was trained on another base model")
        flat = read_safetensors(self.out / Path(meta["state"]).name)
        params = [(k, v) for k, v in flat.items() if not k.startswith("__opt__.")]
        trainable.load_weights(params, strict=True)
        opt.init(trainable.trainable_parameters())
        opt.state = tree_unflatten([(k[len("__opt__.") :], v) for k, v in flat.items() if k.startswith("__opt__.")])
        log(f"resumed at iteration {meta['step']}")
        return meta["step"]

    def history(self, start: int) -> list:
        if not start or not self.history_file.exists():
            return []
        return [r for r in read_json(self.history_file) if isinstance(r, dict) and r.get("iter", 0) <= start]
