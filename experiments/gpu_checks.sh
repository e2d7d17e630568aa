#!/usr/bin/env bash
# All GPU checks in one call (H100/H200 class): sampler decode throughput against the HBM bound,
# then GRPO step MFU and peak memory for Qwen3-1.7B shapes. Results: $OUT/*.json and logs.
set -u
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/arca_gpu}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 300 python3 experiments/bench_sampling.py --gpu 2>&1 | tee "$OUT/sampling.log"
timeout 240 python3 experiments/bench_grpo.py --gpu 2>&1 | tee "$OUT/grpo.log"
