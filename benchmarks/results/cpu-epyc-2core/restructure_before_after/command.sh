. /work/main/.venv/bin/activate
export LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
for round in 1 2; do
  for which in old new; do
    if [ $which = old ]; then cd /tmp/old; else cd /work/main; fi
    PYTHONPATH=$PWD python -m mlx_specstream bench --prompts heldout --n-prompts 6 -m 96 --trials 3 --methods ours_ar,mlx_lm_ar,ss,mlx_lm_draft --json /tmp/bb/ba_${which}_$round.json > /tmp/bb/ba_${which}_$round.txt 2>/dev/null
  done
done
echo done > /tmp/bb/ba_done
