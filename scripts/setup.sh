#!/usr/bin/env bash
# Set up hhrlhf in ./.venv with every extra (hhrlhf[all]). With --dev, also the test and docs
# tools (hhrlhf[dev]) and Chromium for the browser tests.
# Installs PyTorch's CPU build first where there is no GPU: a plain `torch` requirement would
# otherwise pull a CUDA build of several GB. The range is the one pyproject.toml's pm extra asks.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.1,<2.15"
  else
    "${pip[@]}" "torch==2.13.0" || "${pip[@]}" "torch>=2.1,<2.15" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if [ "$dev" = 1 ]; then
  "${pip[@]}" -e ".[dev]"
  if ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the browser tests" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq chromium >/dev/null \
      || echo "setup: could not install chromium; browser tests will fail" >&2
  fi
else
  "${pip[@]}" -e ".[all]"
fi
echo "setup: ready (.venv/bin/hhrlhf)" >&2
