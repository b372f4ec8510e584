#!/usr/bin/env bash
# The one prepared GPU run for the denoiser: trains a score model there (time-boxed; CONFIG, default
# the wider configs/denoise_gpu.yaml), copies it to $OUT, then times 256^3 denoising. Carry .whl
# (../shared/tools/gpu-wheels.sh) and .gpu/denoise_train.npz, made here with the phantoms included:
#   python benchmarks/train_default_denoiser.py --sharp-phantoms 8 --nested-phantoms 16 --export-npz .gpu/denoise_train.npz
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
python3 benchmarks/train_default_denoiser.py --config "${CONFIG:-configs/denoise_gpu.yaml}" --from-npz .gpu/denoise_train.npz --device cuda \
  --max-minutes "${MINUTES:-6}" --batch-size 16 --out "$OUT/denoiser_default" 2>&1 | grep -v -i "nvimagecodec\|warn"
ls "$OUT/denoiser_default/models"
python3 benchmarks/gpu_denoise.py --model "$OUT/denoiser_default" 2>&1 | grep -v -i "nvimagecodec\|warn"
