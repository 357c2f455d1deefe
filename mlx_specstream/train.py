"""``specstream train``: fine-tune speculative streams in MLX.

Modes:
- ``lossless``: the base is frozen; trained are the stream embeddings ``P``, the stream-row-only
  LoRA of the Ns MSA layers and the pruning adapter. Loss ``Σ_j α_j·CE(stream j)`` (α0 = 0) plus
  the pruning adapter's own next-token loss (disjoint parameters).
- ``shared``: additionally ``α0·NTP`` on the main stream, optionally with main rows seeing their
  streams; the model itself changes and the output is verified against the new model.
- ``pruning``: the pruning adapter alone, on next-token loss (for an existing stream file).

Streams are attached only to positions whose next token carries loss (completions), processed in
segments so that training rows grow by γ·segment, not γ·sequence (the paper's segment attention).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .streams import (SpeculativeStreams, StreamConfig, bottom_forward, early_exit_logits,
                      msa_forward, save_streams)


class DataError(ValueError):
    pass


# ---------------------------------------------------------------- data


def read_jsonl(path: Path, tokenizer, seq_len: int) -> Tuple[np.ndarray, np.ndarray]:
    """Records -> (tokens (N, L+1), loss mask (N, L+1): 1 where the token is a training target).

    ``{"text"}``: every token is a target (long texts are cut into windows); ``{"prompt",
    "completion"}`` (or pre-tokenized ``{"prompt_ids", "completion_ids"}``): completion tokens
    only; ``{"messages"}``: the chat template, the last assistant message is the target.
    """
    L = seq_len + 1
    rows, masks = [], []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{ln}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{ln}: expected a JSON object")
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
                if not all(isinstance(t, int) and 0 <= t < len(tokenizer) for t in pi + ci):
                    raise DataError(f"{path}:{ln}: token ids must be integers below the vocabulary size")
            elif "prompt" in rec and "completion" in rec:
                p, c = rec["prompt"], rec["completion"]
                if not isinstance(p, str) or not isinstance(c, str):
                    raise DataError(f"{path}:{ln}: 'prompt' and 'completion' must be strings")
                pi = tokenizer.encode(p)
                ci = tokenizer.encode(c, add_special_tokens=False)
            elif "messages" in rec:
                msgs = rec["messages"]
                if (not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "content" in m for m in msgs)
                        or msgs[-1].get("role") != "assistant"):
                    raise DataError(f"{path}:{ln}: 'messages' must be a list of {{role, content}} ending with an assistant turn")
                if not getattr(tokenizer, "has_chat_template", False):
                    raise DataError(f"{path}:{ln}: 'messages' records need a tokenizer with a chat template")
                pi = tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True)
                full = tokenizer.apply_chat_template(msgs)
                ci = full[len(pi):]
            else:
                raise DataError(f"{path}:{ln}: a record needs 'text', 'prompt'+'completion' or 'messages'")
            w = (pi + ci)[:L]
            if len(w) < 2 or len(pi) >= L:
                continue
            rows.append(w)
            masks.append([0] * len(pi) + [1] * (len(w) - len(pi)))
    if not rows:
        raise DataError(f"{path}: no usable records")
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
    tr = read_jsonl(train, tokenizer, args.seq_len)
    va = read_jsonl(valid, tokenizer, args.seq_len) if valid is not None and valid.exists() else None
    return tr, va


def batches(data, batch_size: int, rng: random.Random) -> Iterator[Tuple[mx.array, mx.array]]:
    toks, mask = data
    while True:
        order = list(range(len(toks)))
        rng.shuffle(order)
        for s in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            idx = order[s : s + batch_size]
            yield mx.array(toks[idx]), mx.array(mask[idx])


# ---------------------------------------------------------------- loss


@dataclass
class LossWeights:
    ntp: float = 0.0  # α0
    stream: float = 0.1  # α_j, every stream
    pruning: float = 1.0


def stream_loss(model, streams, tokens, mask, weights: LossWeights, segment: int = 64, train_streams: bool = True,
                max_positions: Optional[int] = None, sample_seed: int = 0):
    """Loss of one batch. ``tokens``/``mask`` (B, L+1): inputs are ``tokens[:, :-1]``, the target
    of position t is ``tokens[:, t+1]`` with weight ``mask[:, t+1]``. ``max_positions``: attach
    streams to at most that many target positions, sampled (seeded) — an unbiased estimate of the
    stream loss at a fraction of the cost, since stream rows dominate the compute.

    Returns (loss, metrics dict of per-head mean CE, each an mx scalar).
    """
    x, y, m = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
    B, L = x.shape
    g = streams.config.num_streams
    positions = mx.arange(L)
    h = bottom_forward(model, streams, x, mask="causal", positions=positions)
    if streams.config.mode == "lossless" or not weights.ntp:
        h = mx.stop_gradient(h)
    total, metrics = mx.array(0.0), {}
    # Pruning adapter: next-token prediction from the insertion layer.
    if weights.pruning:
        ce = nn.losses.cross_entropy(early_exit_logits(model, streams, mx.stop_gradient(h)), y) * m
        pl = ce.sum() / mx.maximum(m.sum(), 1)
        total = total + weights.pruning * pl
        metrics["pruning"] = pl
    if not train_streams:
        return total, metrics
    # Streams only on rows whose next token is a target (union over the batch), in segments.
    owners_np = np.flatnonzero(np.array(m).sum(0) > 0)
    if max_positions and len(owners_np) > max_positions:
        owners_np = np.sort(np.random.default_rng(sample_seed).choice(owners_np, max_positions, replace=False))
    anc = mx.tril(mx.ones((L, L), dtype=mx.bool_))
    sums = [mx.array(0.0) for _ in range(g)]
    counts = [mx.array(0.0) for _ in range(g)]
    main_logits = None
    for s in range(0, max(len(owners_np), 1), segment):
        owners = mx.array(owners_np[s : s + segment].astype(np.int32))
        if owners.size == 0:
            break
        h_main, h_str = msa_forward(model, streams, h, anc=anc, owners=owners, positions=positions)
        if main_logits is None and weights.ntp:
            main_logits = model.head(model.final_norm(h_main))
        logits = model.head(model.final_norm(h_str)).reshape(B, owners.size, g, -1)
        for j in range(g):
            tgt_pos = owners + 1 + j  # stream j at owner t predicts y[t+1+j] = tokens[t+2+j]
            ok = tgt_pos < L
            tp = mx.minimum(tgt_pos, L - 1)
            tgt = y[:, tp]
            w = m[:, tp] * ok
            ce = nn.losses.cross_entropy(logits[:, :, j], tgt) * w
            sums[j] = sums[j] + ce.sum()
            counts[j] = counts[j] + w.sum()
    for j in range(g):
        lj = sums[j] / mx.maximum(counts[j], 1)
        metrics[f"stream{j + 1}"] = lj
        total = total + weights.stream * lj
    if weights.ntp and main_logits is not None:
        ce = nn.losses.cross_entropy(main_logits, y) * m
        ntp = ce.sum() / mx.maximum(m.sum(), 1)
        metrics["ntp"] = ntp
        total = total + weights.ntp * ntp
    return total, metrics


# ---------------------------------------------------------------- trainer


@dataclass
class TrainConfig:
    mode: str = "lossless"  # lossless | shared | pruning
    num_streams: int = 3
    num_msa_layers: int = 2
    lora_rank: int = 8
    main_sees_streams: bool = False
    iters: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    segment: int = 64
    lr: float = 5e-4
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    alpha0: Optional[float] = None  # default: 0 lossless, 1 shared
    alpha: float = 0.1
    seed: int = 0
    val_every: int = 100
    val_batches: int = 8
    save_every: int = 200
    stream_positions: int = 64  # streams on at most this many sampled target positions per batch (0 = all)
    medusa: int = 0  # > 0: train that many Medusa-1 heads instead of streams (the baseline)


class _Trainable(nn.Module):
    """What the optimizer sees: the streams, or the Medusa heads."""

    def __init__(self, streams=None, medusa=None):
        super().__init__()
        if streams is not None:
            self.streams = streams
        if medusa is not None:
            self.medusa = medusa


def train(model, tokenizer, train_data, valid_data, cfg: TrainConfig, out: Path,
          streams: Optional[SpeculativeStreams] = None, resume: bool = False, log=print,
          stop_at: Optional[int] = None):
    """Train and write the stream file (and a resumable trainer state) to ``out``.

    ``stop_at`` ends the run early at that iteration, as an interruption would (for tests).
    """
    mx.random.seed(cfg.seed)
    rng = random.Random(cfg.seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.freeze()
    if cfg.medusa:
        return _train_medusa(model, train_data, valid_data, cfg, out, resume, log, stop_at)
    if streams is None:
        streams = SpeculativeStreams(StreamConfig(
            num_streams=cfg.num_streams, num_msa_layers=cfg.num_msa_layers,
            mode="shared" if cfg.mode == "shared" else "lossless",
            main_sees_streams=cfg.main_sees_streams, lora_rank=cfg.lora_rank), model)
    trainable = _Trainable(streams)
    if cfg.mode == "pruning":
        trainable.freeze()
        streams.pruning.unfreeze()
    a0 = cfg.alpha0 if cfg.alpha0 is not None else (1.0 if cfg.mode == "shared" else 0.0)
    weights = LossWeights(ntp=a0, stream=cfg.alpha, pruning=1.0)
    train_streams = cfg.mode != "pruning"
    opt, sched = _optimizer(cfg)
    start = 0
    if resume and (out / "trainer_state.safetensors").exists():
        start = _load_state(out, trainable, opt)
        log(f"resumed at iteration {start}")

    step = {"i": start}

    def loss_fn(tr, toks, mask):
        loss, _ = stream_loss(model, tr.streams, toks, mask, weights, cfg.segment, train_streams,
                              max_positions=cfg.stream_positions or None,
                              sample_seed=cfg.seed * 1_000_003 + step["i"])
        step["i"] += 1
        return loss

    def on_save():
        save_streams(out, streams)

    def on_eval():
        return evaluate(model, streams, valid_data, cfg, weights, train_streams)

    history = _loop(trainable, loss_fn, opt, sched, train_data, valid_data, cfg, out, start, rng,
                    on_save, on_eval, log, stop_at, f"{cfg.mode} streams")
    return streams, history


def _train_medusa(model, train_data, valid_data, cfg, out, resume, log, stop_at):
    from .medusa import MedusaConfig, MedusaHeads, medusa_loss, save_medusa

    rng = random.Random(cfg.seed)
    heads = MedusaHeads(MedusaConfig(num_heads=cfg.medusa), model)
    heads.init_from_lm_head(model)
    trainable = _Trainable(medusa=heads)
    opt, sched = _optimizer(cfg)
    start = _load_state(out, trainable, opt) if resume and (out / "trainer_state.safetensors").exists() else 0

    def loss_fn(tr, toks, mask):
        return medusa_loss(model, tr.medusa, toks, mask)[0]

    def on_eval():
        toks, mask = valid_data
        sums, n = {}, 0
        for s in range(0, min(len(toks), cfg.val_batches * cfg.batch_size), cfg.batch_size):
            _, m = medusa_loss(model, heads, mx.array(toks[s : s + cfg.batch_size]), mx.array(mask[s : s + cfg.batch_size]))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {k: round(v / max(n, 1), 4) for k, v in sums.items()}

    history = _loop(trainable, loss_fn, opt, sched, train_data, valid_data, cfg, out, start, rng,
                    lambda: save_medusa(out, heads), on_eval, log, stop_at, "Medusa heads")
    return heads, history


def _optimizer(cfg: TrainConfig):
    sched = optim.join_schedules(
        [optim.linear_schedule(cfg.lr * 1e-2, cfg.lr, max(cfg.warmup, 1)),
         optim.cosine_decay(cfg.lr, max(cfg.iters - cfg.warmup, 1), cfg.lr * cfg.min_lr_ratio)],
        [max(cfg.warmup, 1)])
    return optim.AdamW(learning_rate=sched, weight_decay=cfg.weight_decay), sched


def _loop(trainable, loss_fn, opt, sched, train_data, valid_data, cfg, out, start, rng,
          on_save, on_eval, log, stop_at, what):
    value_and_grad = nn.value_and_grad(trainable, loss_fn)
    it = batches(train_data, cfg.batch_size, rng)
    for _ in range(start * cfg.grad_accum):
        next(it)  # the data order continues where it stopped
    n_params = sum(v.size for _, v in tree_flatten(trainable.trainable_parameters()))
    log(f"training {n_params} parameters ({what}), {cfg.iters} iterations")
    history = []
    tic, tokens_seen = time.perf_counter(), 0
    for i in range(start, min(cfg.iters, stop_at or cfg.iters)):
        grads_acc, loss_acc = None, 0.0
        for _ in range(cfg.grad_accum):
            toks, mask = next(it)
            loss, grads = value_and_grad(trainable, toks, mask)
            grads_acc = grads if grads_acc is None else tree_map(lambda a, b: a + b, grads_acc, grads)
            loss_acc = loss_acc + loss
            tokens_seen += int(toks.size)
        if cfg.grad_accum > 1:
            grads_acc = tree_map(lambda g: g / cfg.grad_accum, grads_acc)
        opt.update(trainable, grads_acc)
        mx.eval(trainable.parameters(), opt.state, loss_acc)
        rec = {"iter": i + 1, "loss": round(float(loss_acc) / cfg.grad_accum, 4),
               "lr": float(sched(opt.step)), "tok_s": round(tokens_seen / (time.perf_counter() - tic))}
        if valid_data is not None and ((i + 1) % cfg.val_every == 0 or i + 1 == cfg.iters):
            rec["valid"] = on_eval()
        if (i + 1) % cfg.save_every == 0 or i + 1 == cfg.iters:
            on_save()
            _save_state(out, trainable, opt, i + 1)
        history.append(rec)
        _progress(rec, cfg.iters, log)
    (out / "train_history.json").write_text(json.dumps(history, indent=1))
    return history


def evaluate(model, streams, data, cfg: TrainConfig, weights: LossWeights, train_streams=True) -> Dict[str, float]:
    toks, mask = data
    sums: Dict[str, float] = {}
    n = 0
    for s in range(0, min(len(toks), cfg.val_batches * cfg.batch_size), cfg.batch_size):
        _, metrics = stream_loss(model, streams, mx.array(toks[s : s + cfg.batch_size]),
                                 mx.array(mask[s : s + cfg.batch_size]), weights, cfg.segment, train_streams)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {k: round(v / max(n, 1), 4) for k, v in sums.items()}


def _progress(rec, total, log):
    width = 24
    done = int(width * rec["iter"] / total)
    bar = "#" * done + "-" * (width - done)
    extra = f" valid {rec['valid']}" if "valid" in rec else ""
    log(f"[{bar}] {rec['iter']}/{total} loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tok_s']} tok/s{extra}")


def _save_state(out: Path, trainable, opt, step: int):
    flat = dict(tree_flatten(trainable.parameters()))
    flat.update({f"__opt__.{k}": v for k, v in tree_flatten(opt.state)})
    mx.save_safetensors(str(out / "trainer_state.safetensors"), flat)
    # The data order is replayed from the seed on resume, so no RNG state is needed.
    (out / "trainer_state.json").write_text(json.dumps({"step": step}))


def _load_state(out: Path, trainable, opt) -> int:
    from mlx.utils import tree_unflatten

    flat = mx.load(str(out / "trainer_state.safetensors"))
    params = [(k, v) for k, v in flat.items() if not k.startswith("__opt__.")]
    trainable.load_weights(params, strict=False)
    opt_state = tree_unflatten([(k[len("__opt__."):], v) for k, v in flat.items() if k.startswith("__opt__.")])
    opt.init(trainable.trainable_parameters())
    opt.state = opt_state
    meta = json.loads((out / "trainer_state.json").read_text())
    return int(meta["step"])


# ---------------------------------------------------------------- CLI


def setup_arg_parser(parser=None):
    d = TrainConfig()
    p = parser or argparse.ArgumentParser(description="Train speculative streams (MLX)")
    p.add_argument("--model", default=None, help="base model folder (default: embedded model)")
    p.add_argument("--data", required=True, help="folder with train.jsonl/valid.jsonl, or a train .jsonl")
    p.add_argument("--valid", default=None, help="validation .jsonl (when --data is a file)")
    p.add_argument("--out", default=None, help="where the stream file goes (default: the model folder)")
    p.add_argument("--mode", choices=["lossless", "shared", "pruning"], default=d.mode)
    p.add_argument("--num-streams", type=int, default=d.num_streams)
    p.add_argument("--msa-layers", type=int, default=d.num_msa_layers)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--main-sees-streams", action="store_true")
    for name in ("iters", "batch_size", "grad_accum", "seq_len", "segment", "warmup", "seed", "val_every",
                 "val_batches", "save_every", "stream_positions"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "alpha"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--alpha0", type=float, default=None)
    p.add_argument("--medusa", type=int, default=0, metavar="K",
                   help="train K Medusa-1 heads on the frozen base instead (the baseline)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--streams", default=None, help="existing stream file to continue (pruning mode)")
    return p


def main(argv=None) -> int:
    from .streams import find_stream_file, load_streams
    from .utils import default_model_path, get_model_path, load_model
    from .tokenizer import load_tokenizer

    args = setup_arg_parser().parse_args(argv)
    path = default_model_path() if args.model is None else get_model_path(args.model)
    # Train in float32 whatever the checkpoint stores (quantized bases keep their quantized layers).
    model, config = load_model(path, dtype=mx.float32)
    tokenizer = load_tokenizer(path, config)
    cfg = TrainConfig(mode=args.mode, num_streams=args.num_streams, num_msa_layers=args.msa_layers,
                      lora_rank=args.lora_rank, main_sees_streams=args.main_sees_streams,
                      **{k: getattr(args, k) for k in ("iters", "batch_size", "grad_accum", "seq_len", "segment",
                                                       "warmup", "seed", "val_every", "val_batches", "save_every",
                                                       "stream_positions", "lr", "min_lr_ratio", "weight_decay", "alpha", "alpha0", "medusa")})
    train_data, valid_data = load_data(args, tokenizer)
    streams = None
    if args.mode == "pruning" or args.streams:
        file = find_stream_file(path, args.streams)
        if file is None:
            raise ValueError("--mode pruning needs an existing stream file (--streams)")
        streams = load_streams(file, model)
        streams.update(tree_map(lambda p: p.astype(mx.float32), streams.parameters()))
    train(model, tokenizer, train_data, valid_data, cfg, Path(args.out) if args.out else path,
          streams=streams, resume=args.resume)
    return 0
