#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite, one pytest-xdist worker per core (each test module
# stays on one worker, so its fixtures are built once; the workers run torch on one thread each; modules are handed
# out in tests/conftest.py's order, the slowest first). FMFORGE_TEST_WORKERS
# sets the count (0: no workers, everything in this process); pytest options pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "${FMFORGE_TEST_WORKERS:-auto}" --dist loadfile --no-loadscope-reorder "$@"
