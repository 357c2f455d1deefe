#!/usr/bin/env bash
# #23's equal-iterations comparison on SmolLM2: the paper's independent streams vs token-conditioned
# streams (token head rank 64, decode re-scoring the top 64), same data (the 1,600 stdlib-template
# answers + 834 self-instruct records, shuffled), seed, schedule (150 iterations, cosine), frozen
# states (computed once into runs/cmp/out, ~45 min here for the 1,200 records the run reads).
# Kept here: the independent streams finished (150, session 10), the conditioned ones at 100 (session
# 10: 50 -> 100; the machine went to the bench and tests); this resumes them from these states:
#   bash recipes/smollm2/token_head/run.sh
set -euo pipefail
R=recipes/smollm2/token_head; O=runs/cmp/out
mkdir -p "$O" && cp -n $R/speculative_streams-* "$O"/
gunzip -c $R/train.jsonl.gz > runs/cmp/train.jsonl && gunzip -c $R/valid.jsonl.gz > runs/cmp/valid.jsonl
COMMON="--model smollm2 --data runs/cmp/train.jsonl --valid runs/cmp/valid.jsonl --out $O --num-streams 3 --msa-layers 1 --lora-rank 16 --lr 1e-3 --warmup 20 --iters 150 --batch-size 8 --val-every 50 --save-every 25 --keep-states --embedding-lr 1 --resume"
specstream train $COMMON --name indep
specstream train $COMMON --name cond --token-head-rank 64 --token-head-topk 64 --token-head-space residual
