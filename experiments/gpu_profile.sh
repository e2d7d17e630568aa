#!/usr/bin/env bash
# The decode step's and the update step's time accounts on a GPU, in one call (~8 minutes):
# the decode loop at batch 64 with a kernel profile and a sweep of the Pallas attention kernel's
# chunk / block lengths; the same loop with XLA's command buffers off and with while loops and
# conditionals captured too; the update step's remat / unrolled-layer variants with a profile;
# one RL step of the paper's config through the trainer. Results: $OUT/*.json and logs.
set -u
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/arca_gpu}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
P=experiments/profile_decode_gpu.py
{
timeout 150 python3 $P --profile --sweep 128:64 256:64 64:64 128:128 256:128 64:32 512:128 --label default
XLA_FLAGS="--xla_gpu_enable_command_buffer=" timeout 50 python3 $P --label cmdbuf_off
XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE --xla_gpu_graph_min_graph_size=1" \
  timeout 70 python3 $P --profile --label cmdbuf_while
} 2>&1 | tee "$OUT/decode.log"
timeout 130 python3 experiments/bench_grpo.py --gpu --steps 4 --budget-s 85 --deadline-s 120 \
  --profile all+remat_proj,all+remat_proj+unrolled \
  --variants all+remat_proj,all+no_remat,all+remat_proj+unrolled,all+no_remat+unrolled 2>&1 | tee "$OUT/grpo.log"
timeout 100 python3 experiments/bench_rl_step.py --steps 3 --skip-plan 2>&1 | tee "$OUT/rl_step.log"
