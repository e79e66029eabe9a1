#!/usr/bin/env bash
# Set up and run every check: ruff and mypy over notata/, then the test suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh" test pandas  # pandas: notata.table's DataFrame is tested too
# The SLURM tests run against a real single-node cluster; as root, start it (idempotent).
if [ "$(id -u)" = 0 ]; then "$root/scripts/slurm-local.sh" start; fi
cd "$root"
.venv/bin/ruff check notata tests benchmarks
.venv/bin/mypy notata
.venv/bin/python -m pytest "$@"
