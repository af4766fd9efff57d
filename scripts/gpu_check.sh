#!/usr/bin/env bash
# The GPU path in one command (under 8 minutes on one H200): the cuda tests, then one training step of a
# 7B-shaped model (4 layers of 4096 / 11008, bf16, batch 8 x 512): frozen floor / NeuroAda k=1 and k=20 /
# reference / LoRA, step time and peak CUDA memory as ratios, and the delta-gradient kernels on this device.
#
#   scripts/gpu_check.sh [OUT_DIR]       # default gpu_check/; writes cuda_tests.txt, bench.json, bench.txt
#
# Needs a Python with CUDA torch, transformers, peft, pytest and this package importable (pip install -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
python - <<'PY'
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
timeout 150 python -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.txt" || status=1
timeout 270 python scripts/bench_gpu_step.py --kernels --save "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1
echo "gpu_check: results in $OUT/ (status $status)"
exit $status
