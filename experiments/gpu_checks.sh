#!/usr/bin/env bash
# All GPU checks in one call (H100/H200 class, under ~9 minutes with compilation), most important
# first, each under its own time limit: the sampler's decode against both bandwidth bounds at
# batch 64 and 256 and the paper's rollout; one full RL step of the paper's config through the
# trainer with `arca-jax plan`'s estimate beside it; the GRPO update step's MFU with a profile
# account. Results: $OUT/*.json and logs.
set -u
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/arca_gpu}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 200 python3 experiments/bench_sampling.py --gpu --runs 2 --time-budget 150 2>&1 | tee "$OUT/sampling.log"
timeout 220 python3 experiments/bench_rl_step.py --steps 3 --plan-timeout 90 2>&1 | tee "$OUT/rl_step.log"
timeout 120 python3 experiments/bench_grpo.py --gpu --steps 4 --budget-s 60 --deadline-s 95 \
  --variants all,all+remat_proj,all+remat_proj+cublas,uniform+remat_proj 2>&1 | tee "$OUT/grpo.log"
