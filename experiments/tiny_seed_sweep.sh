#!/usr/bin/env bash
# The multi-seed tiny sweep: the seven arms of experiments/configs/tiny/ and four arms with
# bfloat16 logits (experiments/configs/tiny_bf16_logits/), seeds 1337, 1338, 1339, seed-major (every
# arm of one seed before the next seed), then the report with intervals. Finished runs are skipped,
# so rerunning continues a partial sweep; the run directories under ROOT are committed as logs
# (checkpoints/ and tb/ are git-ignored).
#
#   bash experiments/tiny_seed_sweep.sh [ROOT]      # ~3-4 min per run on two free cores, 33 runs
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-experiments/results/tiny_sweep_seeds/runs}
PY=${PYTHON:-python}
for seed in 1337 1338 1339; do
  "$PY" -m arca_jax.cli sweep experiments/configs/tiny/*.yaml experiments/configs/tiny_bf16_logits/*.yaml \
      --root "$ROOT" --seeds "$seed"
done
"$PY" -m arca_jax.cli report "$ROOT"/* --out "$(dirname "$ROOT")/report"
