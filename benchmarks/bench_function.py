"""Per-task overhead of a pack of Python function tasks, measured in the same run (medians).

N tasks of a function that returns at once (``fn(params, log) -> None``), one after
another in one process:

- ``notata exec MANIFEST --tasks 0-(N-1) --python bench_fn:fn``: each task a full run
  (lock, heartbeat, metadata, durable terminal status) and a worker forked per task;
- the same function called N times in a plain Python loop, in one interpreter (no run,
  no isolation: the floor of calling it at all);
- a plain loop that forks a child per call and waits for it (what the isolation alone
  costs, with nothing recorded);
- for scale, what the same task costs as a command: ``notata exec --tasks ... -- python
  -c "from bench_fn import fn; fn({}, None)"``, an interpreter per task (on a tenth of
  the tasks).

Each figure is the wall time of a fresh process doing all N (start-up included), in a
fresh folder, the three alternating.

Usage: python benchmarks/bench_function.py [--tasks 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FN = "def fn(params, log):\n    return None\n"

LOOP = """
import sys
sys.path.insert(0, ".")
from bench_fn import fn
for i in range({n}):
    fn({{"i": i}}, None)
"""

FORKS = """
import os, sys
sys.path.insert(0, ".")
from bench_fn import fn
for i in range({n}):
    pid = os.fork()
    if pid == 0:
        fn({{"i": i}}, None)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def timed(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    import notata
    print(f"notata {notata.__version__} from {Path(notata.__file__).parent}")
    n = args.tasks
    ours, loop, forks, commands = [], [], [], []
    m = max(1, n // 10)
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            (d / "bench_fn.py").write_text(FN)
            (d / "sweep.yaml").write_text(
                f"name: fn\nrun_id: 't{{i}}'\n"
                f"grid: {{i: [{', '.join(map(str, range(n + m)))}]}}\n")
            ours.append(timed([sys.executable, "-m", "notata", "exec", "sweep.yaml", "--tasks",
                               f"0-{n - 1}", "--python", "bench_fn:fn"], d))
            done = sum(1 for p in (d / "outputs").glob("log_*/metadata.json")
                       if '"status": "complete"' in p.read_text())
            assert done == n, f"{done} of {n} complete"

            loop.append(timed([sys.executable, "-c", LOOP.format(n=n)], d))
            forks.append(timed([sys.executable, "-c", FORKS.format(n=n)], d))
            commands.append(timed([sys.executable, "-m", "notata", "exec", "sweep.yaml",
                                   "--tasks", f"{n}-{n + m - 1}", "--", sys.executable, "-c",
                                   "from bench_fn import fn; fn({}, None)"], d))
    a, b, c, e = (statistics.median(x) for x in (ours, loop, forks, commands))
    print(f"{n} tasks of a function that returns at once, medians of {args.repeats}:")
    print(f"  notata exec --python (a run and a worker per task): {a:.2f} s, "
          f"{a / n * 1e3:.3f} ms per task")
    print(f"  a plain loop in one interpreter:                    {b:.2f} s, "
          f"{b / n * 1e3:.3f} ms per task")
    print(f"  a plain loop forking a child per call:              {c:.2f} s, "
          f"{c / n * 1e3:.3f} ms per task")
    print(f"  the same task as a command (an interpreter each):   {e:.2f} s for {m}, "
          f"{e / m * 1e3:.3f} ms per task")
    print(f"  notata minus the plain loop: {(a - b) / n * 1e3:.3f} ms per task; "
          f"{a / b:.1f}x the plain loop, {a / c:.2f}x the forking loop")


if __name__ == "__main__":
    main()
