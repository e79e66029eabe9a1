#!/usr/bin/env bash
# Run the published notata 0.3.0's own test suite against this checkout (the drop-in promise).
# Downloads the 0.3.0 sources from PyPI and makes a virtual environment with this checkout
# (and pandas, matplotlib, pytest, which 0.3's tests use), all in a temporary folder.
# Four of its 57 tests check behaviour this notata changes on purpose (README, "Coming from
# notata 0.3"): they are expected to fail, and this script fails if any other one does.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PY=${PYTHON:-python3}
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check "$root" pandas matplotlib pytest
"$work/venv/bin/python" -m pip download -q --no-deps --no-binary :all: notata==0.3.0 -d "$work"
tar -xzf "$work"/notata-0.3.0.tar.gz -C "$work"
cd "$work/notata-0.3.0"
rm -rf notata  # its tests must import this checkout's notata (installed above), not 0.3's
set +e
"$work/venv/bin/python" -m pytest -q -p no:cacheprovider tests \
  | tee "$work/out.txt"
set -e
expected="tests/test_experiment.py::test_handles_corrupt_metrics
tests/test_experiment.py::test_handles_missing_metrics
tests/test_logbook.py::test_current_status_and_elapsed
tests/test_logbook.py::test_init_creates_directory_and_metadata"
got=$(grep -oE '^FAILED [^ ]+' "$work/out.txt" | cut -d' ' -f2 | sort)
if [ "$got" != "$expected" ]; then
  echo "compat03: expected exactly these failures:"; echo "$expected"
  echo "got:"; echo "$got"; exit 1
fi
echo "compat03: notata 0.3.0's tests pass but for the four deliberate changes"
