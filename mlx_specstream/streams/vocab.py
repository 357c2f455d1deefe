"""Draft vocabularies: the tokens streams draft from, ranked by how often the training data has
them as targets. The trainer stores the ranking in every adapter it writes; this tool ranks an
adapter trained before that (or re-ranks it) from a data folder, and can set ``draft_vocab``:

    python -m mlx_specstream.streams.vocab --model smollm2 --data runs/si-pack \\
        --streams runs/si-emb/speculative_streams-cond.json --size 8192

It prints the share of the training targets (and of ``valid.jsonl``'s, when there is one) each
size covers, the figure to pick a size by. Never rank from an evaluation set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from ..checkpoint import read_safetensors, save_safetensors_atomically, write_atomically
from ..errors import UserError
from ..loading import load
from ..trainer import _target_counts, read_jsonl
from .config import StreamConfig
from .files import RANKING, vocab_ranking

COVERAGE_SIZES = (2048, 4096, 8192, 16384, 32768)


def coverage(ranking: np.ndarray, targets: np.ndarray, n: int) -> float:
    """Share of ``targets`` (token ids) among the first ``n`` of ``ranking``."""
    if targets.size == 0:
        return float("nan")
    return float(np.isin(targets, ranking[:n]).mean())


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the base the adapter was trained on (its tokenizer reads the data)")
    ap.add_argument("--data", required=True, help="training data folder (train.jsonl, optional valid.jsonl)")
    ap.add_argument("--streams", required=True, help="the adapter's .json")
    ap.add_argument("--size", type=int, default=None, help="also set the adapter's draft_vocab (0: whole vocabulary)")
    ap.add_argument("--seq-len", type=int, default=1024)
    args = ap.parse_args(argv)
    cfg_file = Path(args.streams)
    if cfg_file.suffix != ".json" or not cfg_file.exists():
        raise UserError(f"--streams {cfg_file}: not an adapter .json")
    model, tok = load(args.model, streams=False)
    V = model.args.vocab_size
    data = Path(args.data)
    if not (data / "train.jsonl").exists():
        raise UserError(f"{data} has no train.jsonl")
    train = read_jsonl(data / "train.jsonl", tok, args.seq_len)
    ranking = vocab_ranking(_target_counts(train, V) - 1)
    shares = {"train": np.asarray(train[0])[np.asarray(train[1]) > 0]}
    if (data / "valid.jsonl").exists():
        va = read_jsonl(data / "valid.jsonl", tok, args.seq_len)
        shares["valid (in-distribution)"] = np.asarray(va[0])[np.asarray(va[1]) > 0]
    print(f"{len(ranking)} of {V} tokens are targets in {data / 'train.jsonl'}")
    for n in COVERAGE_SIZES:
        if n < len(ranking):
            print(f"  {n:>6}: " + ", ".join(f"{k} {coverage(ranking, t, n):.2%}" for k, t in shares.items()))
    cfg = json.loads(cfg_file.read_text())
    if args.size is not None:
        if not 0 <= args.size <= len(ranking):
            raise UserError(f"--size {args.size}: the data ranks {len(ranking)} tokens")
        cfg["draft_vocab"] = args.size
        StreamConfig.from_dict(cfg)  # checked before anything is written
    weights_file = cfg_file.with_suffix(".safetensors")
    weights = read_safetensors(weights_file)
    weights[RANKING] = mx.array(ranking)
    save_safetensors_atomically(weights_file, weights, {"format": "mlx"})
    write_atomically(cfg_file, json.dumps(cfg, indent=2) + "\n")
    print(f"ranking written into {weights_file}; draft_vocab {cfg.get('draft_vocab', 0)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
