#!/usr/bin/env bash
# Every measurement quoted in the closing notes, on the default model, in one go.
# Usage: bash benchmarks/run_all.sh [OUT_DIR]   (Linux CPU: preload OpenBLAS first, see README)
set -euo pipefail
OUT=${1:-benchmarks/results/$(hostname)-$(date +%Y%m%d)}
mkdir -p "$OUT"
python benchmarks/ar_vs_mlx_lm.py --trials 5 -m 128 --json "$OUT/ar_default.json" | tee "$OUT/ar_default.txt"
python benchmarks/ar_vs_mlx_lm.py --random 8x512 --trials 5 -m 128 --json "$OUT/ar_random8x512.json" | tee "$OUT/ar_random8x512.txt"
python benchmarks/step_cost.py --json "$OUT/step_cost.json" | tee "$OUT/step_cost.txt"
specstream bench tune --json "$OUT/tune.json" | tee "$OUT/tune.txt"
for P in sitepackages heldout; do
  specstream bench --prompts $P --n-prompts 8 -m 128 --trials 5 --tree chain:1 --tree chain:2 --tree sparse:7 \
    --lookup 5 --medusa build/default/medusa --json "$OUT/bench_$P.json" --csv "$OUT/bench_$P.csv" --plots "$OUT/plots_$P" \
    | tee "$OUT/bench_$P.txt"
done
