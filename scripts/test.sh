#!/usr/bin/env bash
# Set up and run every check: ruff and mypy over notata/, then the test suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh" test
cd "$root"
.venv/bin/ruff check notata tests benchmarks
.venv/bin/mypy notata
.venv/bin/python -m pytest "$@"
