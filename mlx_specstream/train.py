"""``specstream train``: train a stream adapter (or Medusa heads, the baseline) on a base model;
the loop is :mod:`mlx_specstream.trainer`."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

from .loading import load_base
from .drafters.medusa import MEDUSA_STEM
from .streams import StreamConfig, find_stream_file, load_streams
from .streams.config import TOKEN_HEAD_SPACES
from .streams.files import stream_stem
from .tokenizer import load_tokenizer
from .trainer import TRAIN_MODES, TrainConfig, load_data, train
from .errors import UserError

OPT_INT = (
    "iters",
    "batch_size",
    "grad_accum",
    "seq_len",
    "segment",
    "warmup",
    "seed",
    "val_every",
    "val_batches",
    "save_every",
    "max_stream_positions",
    "head_sample",
    "full_every",
)
OPT_FLOAT = ("lr", "min_lr_ratio", "weight_decay", "alpha", "time_limit", "embedding_lr")


def setup_arg_parser(parser=None):
    d, s = TrainConfig(), StreamConfig()
    p = parser or argparse.ArgumentParser(description="Train speculative streams (MLX)")
    p.add_argument("--model", default=None, help="base model folder (default: embedded model)")
    p.add_argument("--data", required=True, help="folder with train.jsonl/valid.jsonl, or a train .jsonl")
    p.add_argument("--valid", default=None, help="validation .jsonl (when --data is a file)")
    p.add_argument(
        "--out",
        default=None,
        help="where the stream file goes (default: the model folder; never the package's own assets)",
    )
    p.add_argument(
        "--name",
        default=None,
        help="adapter name: writes speculative_streams-NAME.* (default: the --streams name, else none)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing adapter of that name")
    p.add_argument("--mode", choices=TRAIN_MODES, default=d.mode)
    p.add_argument("--num-streams", type=int, default=s.num_streams)
    p.add_argument("--msa-layers", type=int, default=s.num_msa_layers)
    p.add_argument("--lora-rank", type=int, default=s.lora_rank)
    p.add_argument("--main-sees-streams", action="store_true")
    p.add_argument(
        "--token-head-rank",
        type=int,
        default=s.token_head_rank,
        help="token-conditioned streams: rank of the head that feeds each stream the token before its "
        "target (0: the paper's independent streams)",
    )
    p.add_argument(
        "--token-head-space",
        choices=TOKEN_HEAD_SPACES,
        default=s.token_head_space,
        help="where the head adds: the final norm's output (normed) or the state before it (residual)",
    )
    p.add_argument(
        "--token-head-topk",
        type=int,
        default=s.token_head_topk,
        help="decoding re-scores this many of each stream's unconditioned top tokens (0: the whole vocabulary)",
    )
    for name in OPT_INT:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in OPT_FLOAT:
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--alpha0", type=float, default=None)
    p.add_argument(
        "--medusa",
        type=int,
        default=0,
        metavar="K",
        help="train K Medusa-1 heads on the frozen base instead (the baseline)",
    )
    p.add_argument(
        "--no-cache-bottom",
        action="store_true",
        help="recompute the frozen bottom layers every iteration (default: once per sequence, kept in memory)",
    )
    p.add_argument(
        "--keep-states",
        action="store_true",
        help="keep the frozen layers' outputs in --out (float32: samples x seq-len x hidden, ~1 GB for "
        "1,600 SmolLM2 answers) so --resume reads them instead of computing them again",
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--streams", default=None, help="existing stream file to continue (pruning mode)")
    return p


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    # Train in float32 whatever the checkpoint stores (quantized bases keep their quantized layers).
    model, config, path, tok_folder = load_base(args.model, dtype="float32")
    tokenizer = load_tokenizer(tok_folder, config)
    if path.suffix == ".gguf":
        shutil.rmtree(tok_folder, ignore_errors=True)
        if args.out is None:
            raise UserError("training on a GGUF file needs --out (where the stream file goes)")
    stream_cfg = StreamConfig(
        num_streams=args.num_streams,
        num_msa_layers=args.msa_layers,
        lora_rank=args.lora_rank,
        mode="shared" if args.mode == "shared" else "lossless",
        main_sees_streams=args.main_sees_streams,
        token_head_rank=args.token_head_rank,
        token_head_topk=args.token_head_topk,
        token_head_space=args.token_head_space,
    )
    cfg = TrainConfig(
        mode=args.mode,
        streams=stream_cfg,
        alpha0=args.alpha0,
        medusa=args.medusa,
        cache_bottom=not args.no_cache_bottom,
        keep_states=args.keep_states,
        **{k: getattr(args, k) for k in OPT_INT + OPT_FLOAT},
    )
    out = Path(args.out) if args.out else path
    if Path(__file__).parent.resolve() in [out.resolve(), *out.resolve().parents]:
        raise UserError(
            f"{out} is inside the installed package: its shipped adapters are never overwritten; pass --out"
        )
    name = (
        args.name
        if args.name is not None
        else (args.streams if args.streams and not Path(args.streams).suffix and "/" not in args.streams else None)
    )
    target = out / (f"{MEDUSA_STEM}.json" if args.medusa else f"{stream_stem(name)}.json")
    if target.exists() and not (args.force or args.resume):
        raise UserError(f"{target} exists: pass --force to replace it, --name to write another, or --resume")
    train_data, valid_data = load_data(args, tokenizer)
    streams = None
    if args.mode == "pruning" or args.streams:
        file = find_stream_file(path.parent if path.suffix == ".gguf" else path, args.streams)
        if file is None:
            raise UserError("--mode pruning needs an existing stream file (--streams)")
        streams = load_streams(file, model)
        streams.update(tree_map(lambda p: p.astype(mx.float32), streams.parameters()))
    train(model, tokenizer, train_data, valid_data, cfg, out, streams=streams, resume=args.resume, name=name)
    return 0
