#!/usr/bin/env bash
# #23: token-conditioned streams (head rank 64, decode re-scoring the top 64) trained on the
# self-instruct data (11,320 train / 614 valid records packed from recipes/smollm2/selfinstruct),
# 400 iterations of batch 8, checkpoints every 25. Kept here: the adapter, trainer state and history
# at iteration 200 (session 15), not the frozen states (1.9 GB for the 3,200 records the
# run reads; ~33 min to recompute here). Resume (also makes the data, idempotent):
#   bash recipes/smollm2/si_cond/run.sh
# Superseded by ../si_normed (the head after the final norm). Next here: the paper's independent streams on the same data and schedule (NAME=indep HEAD=0) for the
# equal-iterations comparison.
set -euo pipefail
R=recipes/smollm2/si_cond; O=runs/si-cond; NAME=${NAME:-cond}; HEAD=${HEAD:-64}
[ -s runs/si-pack/train.jsonl ] || {
  bash recipes/smollm2/selfinstruct/save.sh runs/selfinstruct --restore
  python -m mlx_specstream.selfinstruct --out runs/selfinstruct --pack runs/si-pack
}
mkdir -p "$O" && cp -n $R/speculative_streams-* "$O"/ 2>/dev/null || true
HEADOPTS=""; [ "$HEAD" = 0 ] || HEADOPTS="--token-head-rank $HEAD --token-head-topk 64 --token-head-space residual"
specstream train --model smollm2 --data runs/si-pack --out "$O" --name "$NAME" --num-streams 3 --msa-layers 1 \
  --lora-rank 16 $HEADOPTS --lr 1e-3 --warmup 20 --iters 400 --batch-size 8 --val-every 50 --val-batches 8 \
  --save-every 25 --keep-states --embedding-lr 1 --resume ${TIME_LIMIT:+--time-limit $TIME_LIMIT}
