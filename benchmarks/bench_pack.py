"""Per-task overhead of a pack against GNU parallel, measured in the same run (medians).

N tasks of ``true`` run one after another in one process: ``notata exec MANIFEST --tasks
0-(N-1) -- true`` (each task a full run: lock, heartbeat, metadata, durable terminal
status) against ``parallel -j1 --joblog LOG true ::: 1..N`` (Debian's GNU parallel; the
benchmark script installs it). Both pay a fork and exec of ``true`` per task and one
interpreter start-up; the figure is the wall time per task, alternating the two, each
time in a fresh folder.

With ``--parallel P``, also P at a time: a packed array task's ``--pack-parallel P``
(the environment of array task 0 of a packed array: ``NOTATA_PACK``, ``NOTATA_TASK_MAP``,
``NOTATA_PACK_PARALLEL``; no scheduler behind it) against ``parallel -jP``.

Usage: python benchmarks/bench_pack.py [--tasks 2000] [--repeats 5] [--parallel 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=cwd, stdout=subprocess.DEVNULL,
                   env=None if env is None else {**os.environ, **env})
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=0, metavar="P",
                    help="also P at a time: --pack-parallel P against parallel -jP")
    args = ap.parse_args()
    parallel = shutil.which("parallel")
    if parallel is None:
        raise SystemExit("GNU parallel is not installed (apt-get install parallel)")
    version = subprocess.run([parallel, "--version"], capture_output=True, text=True,
                             check=True).stdout.splitlines()[0]
    import notata
    print(f"notata {notata.__version__} from {Path(notata.__file__).parent}; {version}")
    n = args.tasks
    ours, theirs, ours_p, theirs_p = [], [], [], []
    p = args.parallel
    element = {"SLURM_ARRAY_TASK_ID": "0", "NOTATA_PACK": str(n),
               "NOTATA_TASK_MAP": f"0-{n - 1}", "NOTATA_PACK_PARALLEL": str(p)}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "sweep.yaml").write_text(f"name: pack\nrun_id: 't{{i}}'\n"
                                          f"grid: {{i: [{', '.join(map(str, range(n)))}]}}\n")
            ours.append(timed([sys.executable, "-m", "notata", "exec", "sweep.yaml", "--tasks",
                               f"0-{n - 1}", "--", "true"], d))
            assert sum(1 for _ in (d / "outputs").glob("log_*")) == n
            theirs.append(timed([parallel, "-j1", "--joblog", str(d / "joblog"), "true", ":::",
                                 *map(str, range(n))], d))
            if p:
                shutil.rmtree(d / "outputs")
                ours_p.append(timed([sys.executable, "-m", "notata", "exec", "sweep.yaml",
                                     "--", "true"], d, element))
                assert sum(1 for _ in (d / "outputs").glob("log_*")) == n
                theirs_p.append(timed([parallel, f"-j{p}", "--joblog", str(d / "joblog"),
                                       "true", ":::", *map(str, range(n))], d))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{n} tasks of true, one after another, medians of {args.repeats}:")
    print(f"  notata exec --tasks (a run per task): {a:.2f} s, {a / n * 1e3:.2f} ms per task")
    print(f"  parallel -j1 --joblog:                {b:.2f} s, {b / n * 1e3:.2f} ms per task")
    print(f"  ratio: {a / b:.2f}x GNU parallel")
    if p:
        a, b = statistics.median(ours_p), statistics.median(theirs_p)
        print(f"{n} tasks of true, {p} at a time ({os.cpu_count()} CPUs), "
              f"medians of {args.repeats}:")
        print(f"  notata, --pack-parallel {p}:          {a:.2f} s, {n / a:.0f} tasks/s")
        print(f"  parallel -j{p} --joblog:               {b:.2f} s, {n / b:.0f} tasks/s")
        print(f"  throughput: {b / a:.2f}x GNU parallel's")


if __name__ == "__main__":
    main()
