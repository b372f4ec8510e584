#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs medgen into it.
# Why a script: the install must live in the project's files, and torch needs care:
#  - a CPU machine gets the 2.13.0 CPU wheel explicitly (an unpinned torch pulls a multi-GB CUDA build);
#  - a machine whose python3 already has torch >= 2.11 (a GPU box) keeps it: the venv then sees the
#    system site-packages and pip's range torch>=2.11,<2.14 is already satisfied.
# Usage: scripts/install.sh [extras]   e.g. scripts/install.sh test
# Env:   PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c 'import sys, torch; v = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]); sys.exit(0 if v >= (2, 11) else 1)' 2>/dev/null; then
    echo "medgen install: keeping the system torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  "${PIP[@]}" install "$TORCH_SPEC"
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
# -e keeps the checkout as the code that runs, so edits need no reinstall.
"${PIP[@]}" install -e "$spec" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c 'import medgen, torch, monai, pydicom, nibabel; print(f"medgen install: ok (torch {torch.__version__}, monai {monai.__version__})")'
