#!/usr/bin/env bash
# Run notata's benchmarks with baselines measured in the same run.
# Installs the published notata 0.3.0 into benchmarks/.notata03 (pip --target) to compare.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e . >/dev/null
[ -d benchmarks/.notata03/notata ] || .venv/bin/pip install -q --no-deps --target benchmarks/.notata03 notata==0.3.0
.venv/bin/python benchmarks/bench_logbook.py --notata03 benchmarks/.notata03 "$@"
.venv/bin/python benchmarks/bench_sweep.py
.venv/bin/python benchmarks/bench_attached.py --lines 20000 --repeats 5
# GNU parallel is the baseline of a pack's per-task overhead (Debian's package)
command -v parallel >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -q parallel >/dev/null; }
.venv/bin/python benchmarks/bench_pack.py --tasks 2000 --repeats 5 --parallel 2
.venv/bin/python benchmarks/bench_function.py --tasks 2000 --repeats 3
.venv/bin/python benchmarks/bench_scan.py --runs 100000 --repeats 3
.venv/bin/pip install -q -e '.[report]' >/dev/null
.venv/bin/python benchmarks/bench_report.py --runs 100000 --repeats 3
if command -v sbatch >/dev/null; then
  .venv/bin/python benchmarks/bench_slurm.py --tasks 500 --repeats 2
  .venv/bin/python benchmarks/bench_shepherd.py --tasks 100000 --fail 100 --repeats 3
  .venv/bin/python benchmarks/bench_pack_slurm.py --tasks 20000 --pack 500 --repeats 2
fi
