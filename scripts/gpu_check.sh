#!/usr/bin/env bash
# The GPU path in one command (under 8 minutes on one H200):
#   1. the `cuda` tests: the NeuroAda layer under bf16/fp16 autocast, every delta-gradient kernel, merge/unmerge,
#      a training step, and the CLI on the GPU: train (3 steps, bf16, packing, chunked loss, eval after training),
#      eval run=DIR (generation and log-likelihood) and export, each asserting every tensor it sees is on the GPU;
#   2. one training step of a 7B-shaped model (4 layers of 4096 / 11008, bf16, batch 8 x 512): frozen floor /
#      NeuroAda k=1 and k=20 / reference / LoRA, step time and peak CUDA memory as ratios, and the delta-gradient
#      kernels on this device (scripts/bench_gpu_step.py --kernels).
#
#   scripts/gpu_check.sh [OUT_DIR]       # default gpu_check/; writes versions.txt, cuda_tests.txt, bench.json, bench.txt
#
# Offline machines: the packages a GPU image may lack (hydra-core, omegaconf, antlr4 runtime; peft and setuptools
# in tested versions) come from .whl/ in the repository root, made beforehand where pip works by
# scripts/gpu_wheels.sh. This package itself is built from the checkout into the same folder (no registry needed),
# and the tests run from outside the checkout so that they import that installed copy (its configs and recipes
# are package data).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT="${1:-gpu_check}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SITE="${NEUROADA_GPU_SITE:-/tmp/neuroada-gpu-site}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
started=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
STAGE=$(mktemp -d)  # built from a copy: the build leaves no build/ or egg-info in the checkout
cp -r pyproject.toml README.md neuroada_cli configs recipes "$STAGE"/
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$STAGE" >"$OUT/install.txt" 2>&1; then
    cat "$OUT/install.txt"; echo "gpu_check: building neuroada failed (is .whl/ there? scripts/gpu_wheels.sh)"; exit 1
fi
rm -rf "$STAGE"
(cd /tmp && python3 - <<'PY') 2>&1 | tee "$OUT/versions.txt"
import sys
import accelerate, hydra, omegaconf, peft, torch, transformers
import neuroada_cli
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name()}; transformers {transformers.__version__}, peft {peft.__version__}, "
      f"accelerate {accelerate.__version__}, hydra {hydra.__version__}, omegaconf {omegaconf.__version__}")
print(f"neuroada_cli from {neuroada_cli.__file__}")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

status=0
(cd /tmp && timeout 180 python3 -m pytest -q -m cuda -p no:cacheprovider -c "$REPO/pyproject.toml" \
    --rootdir "$REPO" "$REPO/tests/test_cuda.py") 2>&1 | tee "$OUT/cuda_tests.txt" || status=1
timeout 270 python3 scripts/bench_gpu_step.py --kernels --save "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt" || status=1
echo "gpu_check: results in $OUT/ (status $status, $(( $(date +%s) - started )) s)"
exit $status
