"""A packed sweep on the real cluster against a hand-made packed array of the same work.

N tasks of ``true`` through ``notata submit --pack P`` (N/P array tasks, each task its
own run) against a plain ``sbatch --array=0-(N/P-1)`` whose every array task runs a shell
loop of P ``true``s: submit-to-finish wall time (alternating, medians of the repeats),
sbatch calls, and the array tasks the scheduler started. Needs the test cluster
(scripts/slurm-local.sh start) and an otherwise idle queue.

Usage: python benchmarks/bench_pack_slurm.py [--tasks 20000] [--pack 500] [--repeats 2]
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


def plain(tmp: Path, n: int, pack: int) -> float:
    script = tmp / "plain.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --array=0-{-(-n // pack) - 1}\n"
                      f"#SBATCH --output=/dev/null\nfor i in $(seq {pack}); do true; done\n")
    t0 = time.perf_counter()
    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    wait_gone([job])
    return time.perf_counter() - t0


def packed(tmp: Path, n: int, pack: int) -> tuple[float, int, int]:
    stamp = time.time_ns()
    manifest = tmp / f"sweep{stamp}.yaml"
    manifest.write_text(f"name: bench\nbase_dir: out{stamp}\nrun_id: 't{{i}}'\n"
                        f"grid: {{i: {list(range(n))}}}\n")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "notata", "submit", str(manifest), "--backend",
                    "slurm", "--pack", str(pack), "--", "true"], check=True, capture_output=True)
    base = tmp / f"out{stamp}"
    records = [json.loads(line) for line in
               (base / ".notata" / "submissions.jsonl").read_text().splitlines()]
    arrays = [a for r in records if r.get("backend") for a in r.get("arrays", [])]
    wait_gone([str(a["job_id"]) for a in arrays])
    elapsed = time.perf_counter() - t0
    done = sum(1 for d in base.glob("log_*")
               if json.loads((d / "metadata.json").read_text())["status"] == "complete")
    assert done == n, f"only {done} of {n} tasks complete"
    from notata.taskspec import expand
    elements = sum(len(list(expand(a["spec"]))) for a in arrays)
    return elapsed, len(arrays), elements


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--pack", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import notata
    print(f"notata {notata.__version__} from {Path(notata.__file__).parent}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        tmp = Path(d)
        p, w, calls, started = [], [], set(), set()
        for _ in range(args.repeats):
            p.append(plain(tmp, args.tasks, args.pack))
            t, c, e = packed(tmp, args.tasks, args.pack)
            w.append(t)
            calls.add(c)
            started.add(e)
    mp, mw = statistics.median(p), statistics.median(w)
    print(f"{args.tasks} tasks of true, {args.pack} per array task, submit to finish, median "
          f"of {args.repeats}: notata submit --pack {mw:.1f} s (a run per task), a plain array "
          f"of shell loops {mp:.1f} s, ratio {mw / mp:.2f}; sbatch calls: {sorted(calls)}; "
          f"array tasks started: {sorted(started)}")


if __name__ == "__main__":
    main()
