#!/usr/bin/env bash
# The main job: set up, run the example oscillator sweep locally, and show what it left.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
work=${DEMO_DIR:-$root/demo}
mkdir -p "$work"
cd "$work"
rm -rf outputs
"$root/.venv/bin/python" "$root/examples/oscillator_loop.py"
"$root/.venv/bin/python" - <<'PY'
from pathlib import Path
from notata import LogReader
for run in sorted(Path("outputs").glob("log_*")):
    r = LogReader(run)
    m = r.meta
    print(f"{r.run_id:22s} {m['status']:9s} attempt {m['attempt']}  E={r.load_json('final_metrics')['E']:.6f}")
PY
echo "runs are in $work/outputs (try: cat $work/outputs/log_omega1.0_dt0.01/metadata.json)"
