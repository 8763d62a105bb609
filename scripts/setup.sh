#!/usr/bin/env bash
# Create .venv in the repository and install fmforge into it (editable, with the test extras).
# torch is pinned to 2.13.0 (see pyproject.toml); on a machine with a GPU, see README "Running on a GPU".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
.venv/bin/python -c "import fmforge, torch; print(f'fmforge {fmforge.__version__} ready (torch {torch.__version__}) in .venv')"
