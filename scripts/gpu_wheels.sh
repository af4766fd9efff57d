#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine that reaches no package registry, into .whl/ (git-ignored).
# Run it here, where pip works; then carry .whl/ to the GPU machine with the checkout.
#
#   scripts/gpu_wheels.sh            # downloads into .whl/ and prints the total size
#
# The GPU image (torch 2.11, transformers 5.17, accelerate, peft, pytest, rich, pyyaml, scipy, scikit-learn, ...)
# lacks hydra-core, omegaconf (and its antlr4 runtime), datasets, evaluate, gguf and bitsandbytes. The GPU check
# (train / eval / export of a tiny Llama from a local folder) needs only the first three: datasets (hub and
# Parquet files), evaluate (GLUE metrics), gguf (embedded models) and bitsandbytes (model.quantization) are imported
# only by the features that use them. peft is carried in the version the tests here use (the image's is older or
# newer by chance), setuptools >= 77 to build this package there (pyproject's license field needs it).
# Requires-Dist of each (unzip -p .whl/X.whl '*/METADATA' | grep ^Requires-Dist), outside the image:
#   hydra-core: omegaconf, antlr4-python3-runtime==4.9.*, packaging    omegaconf: antlr4-python3-runtime, PyYAML
#   peft: numpy, packaging, psutil, pyyaml, torch, transformers, tqdm, accelerate, safetensors, huggingface_hub
#   (all in the image)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude  # never committed
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Exactly these versions (the ones this project is tested with); a second version of one name breaks the install.
PINS=(hydra-core==1.3.8 omegaconf==2.3.1 peft==0.21.2 setuptools==84.2.1)
rm -f "$DEST"/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST" "${PINS[@]}"
# antlr4-python3-runtime 4.9.3 (what omegaconf 2.3 requires) is published as a source archive only: build its
# pure-Python wheel here (py3-none-any, so it installs on the GPU machine's Python 3.12 as well).
python3 -m pip wheel -q --no-deps --no-binary antlr4-python3-runtime -w "$DEST" antlr4-python3-runtime==4.9.3
ls -l "$DEST"
echo "total: $(du -cb "$DEST"/*.whl | tail -1 | cut -f1) bytes in $(ls "$DEST"/*.whl | wc -l) wheels"
