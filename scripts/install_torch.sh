#!/usr/bin/env bash
# Install PyTorch into the given Python's environment before the project:
# - a torch that is already installed is kept (users' CUDA builds survive);
# - with a working NVIDIA driver (nvidia-smi), the default PyPI build (CUDA);
# - otherwise the CPU build of torch 2.13.0: from a local wheel when pip finds
#   one (--find-links / this machine's disk), else from PyTorch's CPU index
#   (with PyPI for its dependencies).
set -euo pipefail
PY="${1:-python3}"
TORCH_CPU_VERSION="${TORCH_CPU_VERSION:-2.13.0}"

if "$PY" -c "import torch" 2>/dev/null; then
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)') already installed; keeping it"
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  echo "NVIDIA GPU found: installing the CUDA build of torch"
  "$PY" -m pip install "torch>=2.4"
  exit 0
fi
echo "no NVIDIA GPU: installing the CPU build of torch $TORCH_CPU_VERSION"
# A CPU wheel pip can find locally (--find-links, e.g. a machine's wheel cache)
# is taken first; its dependencies then come from the usual index.
if "$PY" -m pip install -q --no-index --no-deps "torch==$TORCH_CPU_VERSION" 2>/dev/null; then
  "$PY" -m pip install -q "torch==$TORCH_CPU_VERSION"
  exit 0
fi
"$PY" -m pip install "torch==$TORCH_CPU_VERSION" --index-url https://download.pytorch.org/whl/cpu \
  --extra-index-url https://pypi.org/simple
