#!/usr/bin/env bash
# Prepare the GPU stage (gpu_job.sh) for a device machine that takes at most 64 MiB per call:
# MLX's CUDA build (../shared/mlx-cuda/pack.sh → .dev/a, .dev/b, .dev/whl), the 98 MB GGUF in three
# pieces (.dev/g1, .dev/g2, .dev/g3 with its md5), and .dev/job (the prompts, the data so far, the
# gguf and transformers wheels: the machine's transformers 5.17 lacks the GGUF tokenizer module).
#
#   bash recipes/smollm2/gpu_pack.sh DATA_DIR     # DATA_DIR: train.jsonl, valid.jsonl answered so far
#
# Then three calls back to back (the machine stays warm ~30 s), each under 64 MiB with the tree:
#   1. carry .dev/a .dev/g1:   mkdir -p /root/stash && cp .dev/a/part00 .dev/g1/g1 /root/stash/
#   2. carry .dev/g2:          cp .dev/g2/g2 /root/stash/
#   3. carry .dev/b .dev/whl .dev/g3 .dev/job:
#      eval "$(bash .dev/b/install.sh /root/stash/part00)" && python3 -m pip install -q --no-index --no-deps \
#        --target /tmp/site2 .dev/job/*.whl && export PYTHONPATH=$PWD:$PYTHONPATH:/tmp/site2 && mkdir -p /tmp/m \
#        && cat /root/stash/g1 /root/stash/g2 .dev/g3/g3 > /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf \
#        && md5sum -c .dev/g3/md5 && bash recipes/smollm2/gpu_job.sh /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf .dev/job
# The tracked tree itself travels (the embedded models are ~18 MB of it): calls 1 and 2 fit only
# with those untracked for the transfer (`git rm --cached` + .git/info/exclude, restored after).
set -euo pipefail
data=$1
root=$(git rev-parse --show-toplevel)
cd "$root"
[ -f .dev/a/part00 ] || bash ../shared/mlx-cuda/pack.sh
G=$(python -c "from mlx_specstream.loading import resolve_model; print(resolve_model('smollm2'))")
rm -rf .dev/g1 .dev/g2 .dev/g3 .dev/job && mkdir -p .dev/g1 .dev/g2 .dev/g3 .dev/job
head -c 27000000 "$G" > .dev/g1/g1
tail -c +27000001 "$G" | head -c 65000000 > .dev/g2/g2
tail -c +92000001 "$G" > .dev/g3/g3
md5sum "$G" | sed "s#$G#/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf#" > .dev/g3/md5
python -m mlx_specstream.distill --out /tmp/unused --n-train 100000 --n-valid 100000 --write-prompts .dev/job/messages.json
cp "$data/train.jsonl" "$data/valid.jsonl" .dev/job/
python -m pip download -q --no-deps --only-binary=:all: -d .dev/job gguf==0.19.0 transformers==5.24.0
du -sh .dev/*
