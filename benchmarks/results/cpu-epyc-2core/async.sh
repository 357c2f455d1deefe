. /work/main/.venv/bin/activate
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
OUT=/work/main/benchmarks/results/cpu-epyc-2core/async_overlap
mkdir -p $OUT
for round in 1 2; do
  for which in before after; do
    if [ $which = before ]; then cd /tmp/preasync; else cd /work/main; fi
    PYTHONPATH=$PWD python -m mlx_specstream bench --prompts heldout --n-prompts 6 -m 96 --trials 3 --lookup 5 --methods ours_ar,ss[default]+lookup,lookup,draft --json $OUT/${which}_$round.json > $OUT/${which}_$round.txt 2>/dev/null
  done
done
