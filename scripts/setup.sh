#!/usr/bin/env bash
# Make .venv (if missing) and install notata into it from this checkout, with extras "$@".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if [ $# -gt 0 ]; then extras="[$(IFS=,; echo "$*")]"; else extras=""; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
