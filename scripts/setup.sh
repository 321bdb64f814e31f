#!/usr/bin/env bash
# Set up fxfuse in ./.venv: reuse an installed torch (a GPU machine's), else torch==2.13.0.
# Usage: bash scripts/setup.sh   (idempotent; prints the venv's python path last)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # --system-site-packages: a machine that already has torch (e.g. CUDA) keeps using it.
  "$PY" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # On the CI/dev machines this wheel (CPU build) lies on local disk; a bare 'torch' would pull CUDA.
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import torch, fxfuse; print(f'fxfuse {fxfuse.__version__} on torch {torch.__version__}')"
