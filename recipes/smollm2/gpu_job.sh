#!/usr/bin/env bash
# The GPU stage of the SmolLM2 stream recipe, as one bounded job (run from the repository root with
# MLX importable): greedy divergence per dtype, self-distillation of the remaining prompts, then
# the stream configurations ($CONFIGS) and, with MEDUSA=1, the Medusa baseline, each trained for
# TRAIN_S seconds on the same data. Everything lands in $OUT/results.tgz (+ logs).
#
#   bash recipes/smollm2/gpu_job.sh MODEL.gguf JOB_DIR     # JOB_DIR: messages.json, train/valid.jsonl so far
#
# Budgets (seconds) come from the environment so a CPU dry run can use tiny ones.
set -u
export PYTHONUNBUFFERED=1
G=$1 J=$2
OUT=${OUT:-/tmp/gpu-out}
DIV_S=${DIV_S:-150} DISTILL_S=${DISTILL_S:-130} TRAIN_S=${TRAIN_S:-180} DIV_PROMPTS=${DIV_PROMPTS:-6}
W=${WORK:-/tmp/ss-work}
rm -rf "$W" && mkdir -p "$W/data" "$W/runs" "$OUT"
python3 -c "import mlx.core as mx; print('device', mx.default_device(), mx.array([1.0, 2.0]).sum().item())" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null

echo "== divergence"; date
timeout "$DIV_S" python3 benchmarks/divergence.py --model "$G" --streams recipes/smollm2/speculative_streams.json \
  --variants float32,float16,bfloat16,q8,q4 --n-prompts "$DIV_PROMPTS" -m 64 --json "$W/divergence.json" \
  > "$W/divergence.log" 2>&1
tail -8 "$W/divergence.log"

echo "== distill"; date
cp "$J/train.jsonl" "$J/valid.jsonl" "$W/data/"
timeout "$DISTILL_S" python3 -m mlx_specstream.distill --model "$G" --out "$W/data" --prompts "$J/messages.json" \
  --n-train 100000 --n-valid 100000 --batch-size "${BATCH:-256}" --max-tokens 128 > "$W/distill.log" 2>&1
tr '\r' '\n' < "$W/distill.log" | tail -3
wc -l "$W/data"/*.jsonl

echo "== train"; date
# name:Ns:gamma:rank, one after another: MLX's CUDA allocator in five concurrent trainers ran
# four of them out of memory on the H200 (measured), so runs share the budget in turn.
for c in ${CONFIGS:-ns1g3r16:1:3:16}; do
  IFS=: read -r name ns g r <<< "$c"
  timeout $((TRAIN_S + 120)) python3 -m mlx_specstream.cli train --model "$G" --data "$W/data" --out "$W/runs/$name" \
    --num-streams "$g" --msa-layers "$ns" --lora-rank "$r" --lr 1e-3 --warmup 50 --iters 100000 \
    --time-limit "$TRAIN_S" --batch-size 16 --max-stream-positions 512 --val-every 250 --save-every 250 \
    > "$W/runs/$name.log" 2>&1
done
if [ -n "${MEDUSA:-}" ]; then  # the baseline's heads (~170 MB) are too big to come back: its history does
  timeout $((TRAIN_S + 120)) python3 -m mlx_specstream.cli train --model "$G" --data "$W/data" --out "$W/runs/medusa3" \
    --medusa 3 --lr 1e-3 --warmup 50 --iters 100000 --time-limit "$TRAIN_S" --batch-size 16 --val-every 250 \
    --save-every 250 > "$W/runs/medusa3.log" 2>&1
fi
for f in "$W"/runs/*.log; do echo "-- $f"; tr '\r' '\n' < "$f" | grep -v '^$' | tail -2; done
date
find "$W/runs" \( -name "*.trainer_state-*.safetensors" -o -name medusa_heads.safetensors \) -delete  # what fits back
tar czf "$OUT/results.tgz" --ignore-failed-read -C "$W" data runs divergence.json divergence.log distill.log
ls -la "$OUT"
