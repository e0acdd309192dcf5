#!/usr/bin/env bash
# Create .venv and install weightweaving with what the suite and the tests need (CPU PyTorch 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[suite,test]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, weightweaving; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
  || { echo "setup failed: torch 2.13.0 or weightweaving did not install" >&2; exit 1; }
# Fashion-MNIST for the experiment suite comes from Debian's package.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "warning: could not install dataset-fashion-mnist; the suite will say what to install" >&2
  else
    echo "note: run 'sudo apt-get install -y dataset-fashion-mnist' for the experiment suite" >&2
  fi
fi
