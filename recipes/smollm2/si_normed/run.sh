#!/usr/bin/env bash
# #23: token-conditioned streams with the head after the final norm (token_head_space "normed", the
# default since session 16) on the self-instruct data (11,320 train / 614 valid records packed from
# recipes/smollm2/selfinstruct): 400 iterations of batch 8, no time limit (the schedule runs on
# iterations, so pausing the run does not bend it), checkpoints every 25. Kept here: the adapter,
# trainer state and history at iteration 400 (session 17: top-1 32.6/26.0/23.0% per stream on the in-distribution validation), not the frozen states (1.9 GB for the
# 3,200 records the run reads, ~33 min to recompute here). Resume (also makes the data, idempotent):
#   bash recipes/smollm2/si_normed/run.sh
# The default --embedding-lr 0 scales the stream embeddings' rate by the insertion states' RMS (30.8
# here); the control, EMB_LR=1 OUT=runs/si-normed, is the plain rate (session 16: equal at iteration
# 50, a small gain of the same sign on every stream at 100; recipes/smollm2/README.md).
set -euo pipefail
R=recipes/smollm2/si_normed; O=${OUT:-runs/si-emb}
[ -s runs/si-pack/train.jsonl ] || {
  bash recipes/smollm2/selfinstruct/save.sh runs/selfinstruct --restore
  python -m mlx_specstream.selfinstruct --out runs/selfinstruct --pack runs/si-pack
}
mkdir -p "$O" && cp -n $R/speculative_streams-* "$O"/ 2>/dev/null || true
specstream train --model smollm2 --data runs/si-pack --out "$O" --name cond --num-streams 3 --msa-layers 1 \
  --lora-rank 16 --token-head-rank 64 --token-head-topk 64 --token-head-space normed --embedding-lr "${EMB_LR:-0}" \
  --lr 1e-3 --warmup 20 --iters 400 --batch-size 8 --val-every 50 --val-batches 8 --save-every 25 --keep-states --resume
