#!/usr/bin/env bash
# The update step's and the rollout's time accounts on a GPU, in one call (~6 minutes): the
# paper configs' update (remat "projections", layers unrolled) with a kernel profile; one RL
# step of the paper's config through the trainer; the decode loop of the trainer's rollout shape
# (32 rows, 512 + 512 tokens, top-k 50, top-p 0.95, an r = 64 adapter unmerged) with a kernel
# profile, and without the adapter; the batch-64 decode loop with cuBLAS for every matmul
# (XLA's Triton GEMMs off). Results: $OUT/*.json and logs.
set -u
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/arca_gpu}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
P=experiments/profile_decode_gpu.py
R="--batch 32 --prompt 512 --new-tokens 512 --top-k 50 --top-p 0.95"
{
timeout 50 python3 $P $R --lora-rank 64 --profile --label rollout_lora
timeout 35 python3 $P $R --label rollout_base
XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" timeout 40 python3 $P --profile --label cublas
} 2>&1 | tee "$OUT/decode.log"
timeout 100 python3 experiments/bench_grpo.py --gpu --steps 4 --budget-s 60 --deadline-s 95 \
  --profile all+remat_proj --variants all+remat_proj 2>&1 | tee "$OUT/grpo.log"
timeout 140 python3 experiments/bench_rl_step.py --steps 3 --skip-plan 2>&1 | tee "$OUT/rl_step.log"
