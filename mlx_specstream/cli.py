"""``specstream <verb>``: one module per verb, each with ``setup_arg_parser()`` and ``main()``."""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "generate": ("mlx_specstream.generate", "generate text from a prompt"),
    "chat": ("mlx_specstream.chat", "chat in the terminal (streaming, KV reuse across turns)"),
    "serve": ("mlx_specstream.server", "OpenAI-compatible HTTP server"),
    "convert": ("mlx_specstream.convert", "convert a PyTorch/HF checkpoint (+ streams, + LoRA) to MLX"),
    "bench": ("mlx_specstream.bench", "benchmark harness: peers side by side; `bench compare`, `bench tune`"),
    "train": ("mlx_specstream.train", "train speculative streams (lossless / shared / pruning)"),
}


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
    module = importlib.import_module(VERBS[argv[0]][0])
    try:
        return module.main(argv[1:]) or 0
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
