#!/usr/bin/env bash
# Create .venv in the repository and install fmforge into it (editable, with the test extras).
# torch is pinned to 2.13.0 (see pyproject.toml); on a machine with a GPU, see README "Running on a GPU".
# The chat-page test drives Debian's chromium with Playwright; as root with apt, this installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian chromium for the chat-page browser test ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null; } \
      || echo "warning: could not install chromium; the chat-page browser test will be skipped" >&2
  else
    echo "note: chromium is not installed (needs root + apt); the chat-page browser test will be skipped" >&2
  fi
fi
.venv/bin/python -c "import fmforge, torch; print(f'fmforge {fmforge.__version__} ready (torch {torch.__version__}) in .venv')"
