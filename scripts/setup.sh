#!/usr/bin/env bash
# Install zsdb3kd and what it needs into the current Python environment.
#  - torch: kept if already importable (a GPU user keeps their build). Otherwise
#    ${ZSDB3KD_TORCH:-torch==2.13.0} is installed; on this project's CPU machines that
#    pin resolves to a local CPU wheel. Elsewhere, for a CPU-only build, set e.g.
#    PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index before running this script.
#  - the package itself (editable) with its extras: ONNX teachers, plots, the label server, tests.
#  - Fashion-MNIST (Debian package dataset-fashion-mnist) when missing and apt is usable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: using installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing ${ZSDB3KD_TORCH:-torch==2.13.0}"
  "$PY" -m pip install -q "${ZSDB3KD_TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[onnx,plot,serve,test]"

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing Debian package dataset-fashion-mnist"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist
  else
    echo "setup: Fashion-MNIST not found in /usr/share/datasets/fashion-mnist; pass --data-root / [data] root" >&2
  fi
fi
echo "setup: done ($("$PY" -m zsdb3kd --version))"
