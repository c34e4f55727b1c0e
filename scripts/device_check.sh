#!/usr/bin/env bash
# The device check on a machine with one NVIDIA GPU (never run by CI): a venv with the GPU's own
# jax (0.11 or later, CUDA 12 wheels; not the pinned CPU jax) and CUDA PyTorch, jaxarith
# installed into it, then scripts/device_check.py (attention backends against each other and
# against transformers; the 1B bf16 training step's tokens/s and MFU next to PyTorch).
# Usage: scripts/device_check.sh [device_check.py options, e.g. --batch 4 --steps 20]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-device}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "jax[cuda12]>=0.11" torch -e '.[test-newest]'
fi
"$VENV/bin/python" -c "import jax; print('jax', jax.__version__, jax.devices())"
exec "$VENV/bin/python" scripts/device_check.py "$@"
