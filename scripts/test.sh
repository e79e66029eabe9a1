#!/usr/bin/env bash
# Set up and run every check: ruff and mypy over notata/, then the test suite.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# report: the report's figures (matplotlib); pandas: notata.table's DataFrame is tested too
"$root/scripts/setup.sh" test report pandas
# The report test opens the report in a real headless browser: as root, install Debian's
# chromium when missing (without root, or where apt cannot, that one test is skipped).
if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >/dev/null 2>&1 || echo "test.sh: chromium could not be installed" >&2
fi
# The SLURM tests run against a real single-node cluster, and the node-loss tests against a
# three-node one beside it (each node in its own namespaces); as root, start both
# (idempotent).
if [ "$(id -u)" = 0 ]; then
    "$root/scripts/slurm-local.sh" start
    "$root/scripts/slurm-cluster.sh" start
fi
cd "$root"
.venv/bin/ruff check notata tests benchmarks
.venv/bin/mypy notata
.venv/bin/python -m pytest "$@"
