#!/usr/bin/env bash
# The main job: set up, run the example oscillator sweep on this machine, and show its status.
#   1. the sweep through notata.task (a Python script), with the local backend
#   2. the same manifest through notata exec with a shell one-liner as the payload
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh" report
export PATH="$root/.venv/bin:$PATH"
work=${DEMO_DIR:-$root/demo}
rm -rf "$work"
mkdir -p "$work"
cp "$root"/examples/oscillator/* "$work/"
cd "$work"

echo "== the sweep"
notata sweep sweep.yaml
echo "== run every task locally, two at a time"
notata submit sweep.yaml --backend local -j 2 -- python simulate.py sweep.yaml
echo "== status"
notata status sweep.yaml
echo "== the tutorial's jq one-liner still works (here in Python, jq may be absent)"
python - <<'PY'
import json, pathlib
for p in sorted(pathlib.Path("outputs").glob("log_*/artifacts/final_metrics.json")):
    print(p.parent.parent.name, json.loads(p.read_text())["E"])
PY
echo "== run it again: complete tasks are skipped"
notata submit sweep.yaml --backend local -- python simulate.py sweep.yaml
echo "== the same manifest with a non-Python payload (notata exec, no shell unless you ask)"
sed 's/^base_dir: outputs/base_dir: outputs-sh/' sweep.yaml > sweep-sh.yaml
notata submit sweep-sh.yaml --backend local -j 2 -- sh -c 'echo "omega={omega} dt={dt}"; test -n "$NOTATA_PARAMS"'
notata status sweep-sh.yaml
echo "== the report: one HTML file (status map, energy over omega and dt, resources, code)"
notata report sweep.yaml --artifact final_metrics -o report.html
echo "runs are in $work/outputs and $work/outputs-sh; open $work/report.html in a browser"
