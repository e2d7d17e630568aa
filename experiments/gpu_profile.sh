#!/usr/bin/env bash
# Accounts of where the GPU time goes, in one call (under 8 minutes), most wanted first: the
# draw's cost per sampling setting and the top-k candidate search both ways (`bench_draw.py`);
# the decode loop of the trainer's rollout shape (32 rows, 512 + 512 tokens, top-k 50, top-p
# 0.95) with an r = 64 adapter unmerged, with a kernel profile, and without the adapter; one RL
# step of the paper's config with the update's layers unrolled and remat "projections"
# (`--set`), the 46% MFU setting of 2026-12-04. Earlier rounds (2026-12-04, results in
# experiments/results/h200_2026-12-04/): the batch-64 decode profile, command buffers, cuBLAS,
# the update's remat / unrolled variants. Results: $OUT/*.json and logs.
set -u
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/arca_gpu}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 60 python3 experiments/bench_draw.py 2>&1 | tee "$OUT/draw.log"
P=experiments/profile_decode_gpu.py
R="--batch 32 --prompt 512 --new-tokens 512 --top-k 50 --top-p 0.95"
{
timeout 100 python3 $P $R --lora-rank 64 --profile --label rollout_lora
timeout 45 python3 $P $R --label rollout_base
} 2>&1 | tee "$OUT/decode.log"
timeout 170 python3 experiments/bench_rl_step.py --steps 3 --skip-plan --set grpo.remat=projections \
  --set grpo.scan_layers=false 2>&1 | tee "$OUT/rl_step_unrolled.log"
