#!/usr/bin/env bash
# The batch-64 decode step (Qwen3-1.7B shapes, bf16, 128 + 512 tokens, "pallas") under XLA:GPU
# options aimed at what keeps it under 0.6 of the nominal bound (experiments/NOTES_sampling.md,
# "Where a decode step's time goes on the H200"): the small GEMMs' rate (a layer's o projection
# reads 8.4 MB in 7.5 us, 1.1 TB/s) and ~390 small fusions per step. One process per set of
# options, the default first; an option this jaxlib does not know is reported and skipped (XLA
# aborts on unknown flags), and the Pallas kernel's chunk lengths (fewer parallel parts of the
# cache, so fewer partial results to combine). About 30 s per variant, 2 min for the chunks; a
# second device call after gpu_profile.sh.
# Results: $OUT/flags_<label>.json and $OUT/flags.log. EXTRA: more options of profile_decode_gpu.py
# (`EXTRA=--tiny bash experiments/gpu_decode_flags.sh` checks the script on any backend).
set -u
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/arca_gpu}"; mkdir -p "$OUT"
BASE="${XLA_FLAGS:-}"
run() {  # label, then XLA options
  local label=$1; shift
  local flags
  flags="$(echo "$BASE $*" | xargs)"  # trimmed: XLA reads XLA_FLAGS=" " as a file name
  if ! XLA_FLAGS="$flags" timeout 60 python3 -c "import jax; jax.numpy.ones(1).block_until_ready()" \
       > /dev/null 2>&1; then
    echo "[$label] skipped: XLA refused '$*'"
    return
  fi
  XLA_FLAGS="$flags" timeout 90 python3 experiments/profile_decode_gpu.py --label "$label" \
    --json "$OUT/flags_$label.json" ${EXTRA:-}
}
{
run default
# the Pallas kernel's chunks (the cache split into 5, 3, 2 or 1 parallel parts at 640 slots):
# its attention alone, then the two best in the whole loop
timeout 180 python3 experiments/profile_decode_gpu.py --label chunks --json "$OUT/flags_chunks.json" \
  --sweep 256:64 512:64 1024:64 1024:128 ${EXTRA:-}
run tiling --xla_gpu_exhaustive_tiling_search=true
run block_rewriter --xla_gpu_experimental_enable_fusion_block_level_rewriter=true
run triton_any --xla_gpu_triton_gemm_any=true
run tiling_rewriter --xla_gpu_exhaustive_tiling_search=true \
  --xla_gpu_experimental_enable_fusion_block_level_rewriter=true
run cmdbuf_while "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE" \
  --xla_gpu_exhaustive_tiling_search=true
} 2>&1 | tee "$OUT/flags.log"
