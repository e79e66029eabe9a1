"""Submit-to-finish wall time of a job array on the real cluster: notata against plain sbatch.

A 500-task array of ``notata exec -- true`` (through ``notata submit``) against a plain
``sbatch --array=0-499`` of ``true``, on the same cluster, alternating, medians of the
repeats; and the number of sbatch calls per submission. Needs the test cluster
(scripts/slurm-local.sh start) and an otherwise idle queue.

Usage: python benchmarks/bench_slurm.py [--tasks 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wait_gone(job_ids: list[str]) -> None:
    while subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], capture_output=True,
                         text=True).stdout.strip():
        time.sleep(0.5)


def plain(tmp: Path, n: int) -> float:
    script = tmp / "plain.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --array=0-{n - 1}\n#SBATCH --output=/dev/null\ntrue\n")
    t0 = time.perf_counter()
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    wait_gone([job])
    return time.perf_counter() - t0


def notata(tmp: Path, n: int) -> tuple[float, int]:
    stamp = time.time_ns()
    manifest = tmp / f"sweep{stamp}.yaml"
    manifest.write_text(f"name: bench\nbase_dir: out{stamp}\ngrid: {{i: {list(range(n))}}}\n")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "notata", "submit", str(manifest), "--backend", "slurm",
                    "--", "true"], check=True, capture_output=True)
    base = tmp / f"out{stamp}"
    record = json.loads((base / ".notata" / "submissions.jsonl").read_text().splitlines()[-1])
    wait_gone(record["job_ids"])
    elapsed = time.perf_counter() - t0
    done = sum(1 for d in base.glob("log_*")
               if json.loads((d / "metadata.json").read_text())["status"] == "complete")
    assert done == n, f"only {done} of {n} tasks complete"
    return elapsed, len(record["job_ids"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        tmp = Path(d)
        p, w, calls = [], [], set()
        for _ in range(args.repeats):
            p.append(plain(tmp, args.tasks))
            t, c = notata(tmp, args.tasks)
            w.append(t)
            calls.add(c)
    mp, mw = statistics.median(p), statistics.median(w)
    print(f"{args.tasks}-task array, submit to finish, median of {args.repeats}: "
          f"notata exec -- true {mw:.1f} s, plain sbatch of true {mp:.1f} s, ratio {mw / mp:.2f}; "
          f"sbatch calls per submission: {sorted(calls)}")


if __name__ == "__main__":
    main()
