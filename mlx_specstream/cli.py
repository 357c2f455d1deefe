"""``specstream <verb>``: one module per verb, each with ``setup_arg_parser()`` and ``main()``;
and the options several verbs share, declared once."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Optional

import mlx.core as mx

from .cache import KVSettings
from .checkpoint import DTYPES
from .drafters import DEFAULT_NUM_DRAFT
from .tree import MAX_TREE_NODES

MAX_NUM_DRAFT = MAX_TREE_NODES  # a draft model's chain is a tree like any other
from .loading import load
from .sample import SamplingParams
from .errors import UserError, plain_notices

VERBS = {
    "generate": ("mlx_specstream.generate", "generate text from a prompt"),
    "chat": ("mlx_specstream.chat", "chat in the terminal (streaming, KV reuse across turns)"),
    "serve": ("mlx_specstream.server", "OpenAI-compatible HTTP server"),
    "convert": ("mlx_specstream.convert", "convert a PyTorch/HF checkpoint (+ streams, + LoRA) to MLX"),
    "bench": ("mlx_specstream.bench", "benchmark harness: peers side by side; `bench compare`, `bench tune`"),
    "train": ("mlx_specstream.train", "train speculative streams (lossless / shared / pruning) or Medusa heads"),
}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model and drafter options every serving verb shares."""
    parser.add_argument(
        "--model",
        default=None,
        help="model folder, .gguf file, hub repo, or a known name: smollm2 (default: embedded model)",
    )
    parser.add_argument(
        "--streams", default=None, help="stream adapter: a name (speculative_streams-NAME.json) or a .json path"
    )
    parser.add_argument(
        "--force-streams", action="store_true", help="attach the stream adapter even if it records another base model"
    )
    parser.add_argument("--medusa", default=None, help="folder with medusa_heads.json: draft with Medusa heads")
    parser.add_argument(
        "--draft-model",
        default=None,
        help="a small model with the same tokenizer drafting for the target (two-model decoding)",
    )
    parser.add_argument(
        "--num-draft", type=int, default=DEFAULT_NUM_DRAFT, help="tokens the draft model drafts per step"
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="cast weights at load (default: float32 on CPUs, as stored on GPUs)",
    )
    parser.add_argument(
        "--keep-quantized",
        action="store_true",
        help="keep a quantized GGUF's weights quantized on the CPU (default there: dequantize to float32)",
    )


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    parser.add_argument("--temp", type=float, default=d.temp, help="sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--top-k", type=int, default=d.top_k)
    parser.add_argument("--min-p", type=float, default=d.min_p)
    parser.add_argument("--seed", type=int, default=None)


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    d = KVSettings()
    parser.add_argument(
        "--kv-bits",
        type=int,
        default=d.bits,
        help="quantize the KV cache to this many bits (as mlx-lm; default: not quantized)",
    )
    parser.add_argument("--kv-group-size", type=int, default=d.group_size, help="group size of the quantized KV cache")
    parser.add_argument(
        "--quantized-kv-start",
        type=int,
        default=d.quantized_start,
        help="tokens a layer's cache holds before it is quantized (with --kv-bits)",
    )
    parser.add_argument(
        "--max-kv-size",
        type=int,
        default=d.max_size,
        help=f"keep at most this many tokens in the KV cache: the {d.keep} first and the latest "
        "(as mlx-lm's rotating cache; default: all)",
    )


def kv_settings(args: argparse.Namespace) -> Optional[KVSettings]:
    """The cache settings the flags ask for (None: the default full-precision cache)."""
    kv = KVSettings(args.kv_bits, args.kv_group_size, args.quantized_kv_start, args.max_kv_size)
    return None if kv == KVSettings() else kv


def check_args(args: argparse.Namespace) -> None:
    """Check the shared options (nonsense is an error, not ignored) and apply the seed."""
    for name, ok, want in (
        ("max_tokens", lambda v: v >= 1, "at least 1"),
        ("temp", lambda v: v >= 0 and v == v and v != float("inf"), "a finite number >= 0"),
        ("top_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("top_k", lambda v: v >= 0, ">= 0"),
        ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("num_draft", lambda v: 1 <= v <= MAX_NUM_DRAFT, f"in 1..{MAX_NUM_DRAFT}"),
        ("seed", lambda v: 0 <= v < 2**64, "in [0, 2**64)"),
        ("n_prompts", lambda v: 1 <= v <= 100_000, "in 1..100000"),
        ("trials", lambda v: v >= 1, "at least 1"),
        ("warmup", lambda v: v >= 0, ">= 0"),
    ):
        v = getattr(args, name, None)
        for x in v if isinstance(v, list) else [v]:  # repeatable flags (bench --temp) check each value
            if x is not None and not ok(x):
                raise UserError(f"--{name.replace('_', '-')} must be {want}, got {x}")
    if getattr(args, "seed", None) is not None:
        mx.random.seed(args.seed)


def load_from_args(args: argparse.Namespace, **kwargs):
    return load(
        args.model,
        streams=args.streams,
        medusa=args.medusa,
        draft_model=args.draft_model,
        num_draft=args.num_draft,
        dtype=args.dtype,
        dequantize=False if args.keep_quantized else None,
        force_streams=args.force_streams,
        **kwargs,
    )


def progress_bar(done: int, total: int, width: int = 24) -> str:
    n = int(width * done / max(total, 1))
    return "[" + "#" * n + "-" * (width - n) + "]"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        width = max(map(len, VERBS))
        print("usage: specstream <verb> [options]\n\nverbs:")
        for name, (_, help_) in VERBS.items():
            print(f"  {name:<{width}}  {help_}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown verb {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    plain_notices()
    module = importlib.import_module(VERBS[argv[0]][0])
    try:
        return module.main(argv[1:]) or 0
    except (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:  # bad input, named
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - anything else is a bug: the traceback, and a line saying so
        traceback.print_exc()
        print(
            "error: the above is a bug in mlx-specstream, not a problem with your input: please report it "
            "with the traceback",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
