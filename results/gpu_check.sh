#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device; run from the repository root:
#   OUT=gpu-out DATA_DIR=/path/with/fashion-mnist bash results/gpu_check.sh
# 1. the CUDA perf test: real early exit on the GPU equals the simulation (12-block ViT, random weights), and its
#    wall-clock against the static backbone at batch 256;
# 2. fashion-mnist, three seeds, the five ViT methods and the MSDNet family, trained and timed on the GPU
#    (--device cuda --timing).
# Each run's metrics.csv, run.json and summary.md land in $OUT/runs.tar.gz; `bench report DIR... --page PAGE`
# turns them into a results page. Logs: $OUT/*.log.
set -uo pipefail
OUT=${OUT:-gpu-out}
DATA_DIR=${DATA_DIR:-}
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
data=(); [ -n "$DATA_DIR" ] && data=(--data-dir "$DATA_DIR")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1

"$PY" -m pytest tests/benchmarks/test_perf.py -m perf -k cuda -p no:cacheprovider -s -q 2>&1 | tee "$OUT/cuda_perf.log"

pack() {  # keep what `bench report` reads (the decisions file is left behind: it is large)
  (cd "$WORK" && tar czf "$OUT_ABS/runs.tar.gz" ./*/metrics.csv ./*/run.json ./*/summary.md 2>/dev/null)
}
OUT_ABS=$(cd "$OUT" && pwd)
"$PY" -m bench run --methods jeidnn,threshold,entropy,patience,oracle --dataset fashion-mnist --seeds 0,1,2 \
  --budgets 0.4,0.6,0.8 --device cuda --timing "${data[@]}" --cache-dir "$WORK/cache" \
  --out "$WORK/fashion-mnist-vit-gpu" 2>&1 | grep -v "it/s\]\|epoch/s\]\|batch/s\]\|job/s\]\|exit/s\]" \
  | tee "$OUT/fashion_vit.log"
pack
"$PY" -m bench run --methods msdnet,boostednet,threshold,jeidnn --backbone msdnet --dataset fashion-mnist \
  --seeds 0,1,2 --budgets 0.25,0.5,0.75 --device cuda --timing "${data[@]}" --cache-dir "$WORK/cache" \
  --out "$WORK/fashion-mnist-msdnet-gpu" 2>&1 | grep -v "it/s\]\|epoch/s\]\|batch/s\]\|job/s\]\|exit/s\]" \
  | tee "$OUT/fashion_msdnet.log"
pack
ls -la "$OUT"
