#!/usr/bin/env bash
# The one prepared GPU run (see README): installs the carried wheels, then prints the LDM GPU
# figures (gpu_check.py) and ours-vs-plain loop speed at GPU scale (train_ldm.py, ct config).
# Run on the device machine from the repo root with .whl/ carried (../shared/tools/gpu-wheels.sh).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmarks/gpu_check.py --steps "${STEPS:-150}" 2>&1 | grep -v -i "nvimagecodec\|warn"
python3 benchmarks/train_ldm.py --config configs/ct.yaml --steps 12 --volumes 4 --device cuda 2>&1 | grep -v -i "nvimagecodec\|warn\|^\[train\]"
