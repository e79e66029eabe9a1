"""Per-task overhead of a pack against GNU parallel, measured in the same run (medians).

N tasks of ``true`` run one after another in one process: ``notata exec MANIFEST --tasks
0-(N-1) -- true`` (each task a full run: lock, heartbeat, metadata, durable terminal
status) against ``parallel -j1 --joblog LOG true ::: 1..N`` (Debian's GNU parallel; the
benchmark script installs it). Both pay a fork and exec of ``true`` per task and one
interpreter start-up; the figure is the wall time per task, alternating the two, each
time in a fresh folder. A third figure is the floor of a task's files: plain Python
writing what a packed task leaves (its folder, lock, three metadata records by atomic
rename, params, log, stdout/stderr, index records, the same fsyncs before the last
record) and starting ``true`` the same way; notata minus that floor is notata's own
work per task.

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

#: The files a packed task leaves, written by plain Python as notata writes them (atomic
#: renames, the same fsyncs before the last record), with the command started the same
#: way: what the task's files and process cost before any of notata's own work.
FLOOR = r"""
import fcntl, json, os, subprocess, sys
n = int(sys.argv[1])
meta = {"status": "running", "pad": "x" * 900}
def atomic(path, data, durable=False):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.write(fd, data)
    if durable:
        os.fsync(fd)
    os.close(fd)
    os.replace(tmp, path)
def fsync(path, flags=os.O_RDONLY):
    fd = os.open(path, flags)
    os.fsync(fd)
    os.close(fd)
os.makedirs("outputs/.notata/index", exist_ok=True)
index = os.open("outputs/.notata/index/floor.bin", os.O_WRONLY | os.O_CREAT, 0o666)
for i in range(n):
    d = f"outputs/log_t{i}"
    os.mkdir(d)
    lock = os.open(d + "/.lock", os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(lock, b"host 123")
    data = json.dumps(meta, indent=2).encode()
    atomic(d + "/metadata.json", data)
    os.pwrite(index, b"x" * 48, i * 48)
    atomic(d + "/params.yaml", b"i: %d\n" % i)
    log = os.open(d + "/log.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    os.write(log, b"[2026-01-01T00:00:00] INFO Logbook initialized\n")
    out = open(d + "/stdout.txt", "ab")
    err = open(d + "/stderr.txt", "ab")
    out.write(b"=== header\n"); out.flush(); err.write(b"=== header\n"); err.flush()
    p = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "--", "true"],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                         start_new_session=True)
    atomic(d + "/metadata.json", data)
    os.pwrite(index, b"x" * 48, i * 48)
    p.wait()
    out.close(); err.close()
    os.write(log, b"[2026-01-01T00:00:00] INFO Marked complete\n")
    os.close(log)
    fsync(d + "/params.yaml"); fsync(d + "/log.txt"); fsync(d, os.O_RDONLY | os.O_DIRECTORY)
    atomic(d + "/metadata.json", data, durable=True)
    fsync(d, os.O_RDONLY | os.O_DIRECTORY)
    os.pwrite(index, b"x" * 48, i * 48)
    os.close(lock)
"""


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
    ours, theirs, floor, ours_p, theirs_p = [], [], [], [], []
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
            shutil.rmtree(d / "outputs")
            floor.append(timed([sys.executable, "-c", FLOOR, str(n)], d))
            if p:
                shutil.rmtree(d / "outputs")
                ours_p.append(timed([sys.executable, "-m", "notata", "exec", "sweep.yaml",
                                     "--", "true"], d, element))
                assert sum(1 for _ in (d / "outputs").glob("log_*")) == n
                theirs_p.append(timed([parallel, f"-j{p}", "--joblog", str(d / "joblog"),
                                       "true", ":::", *map(str, range(n))], d))
    a, b, c = statistics.median(ours), statistics.median(theirs), statistics.median(floor)
    print(f"{n} tasks of true, one after another, medians of {args.repeats}:")
    print(f"  notata exec --tasks (a run per task): {a:.2f} s, {a / n * 1e3:.2f} ms per task")
    print(f"  parallel -j1 --joblog:                {b:.2f} s, {b / n * 1e3:.2f} ms per task")
    print(f"  the run's files, by plain Python:     {c:.2f} s, {c / n * 1e3:.2f} ms per task")
    print(f"  ratio: {a / b:.2f}x GNU parallel; notata's own work (notata minus the files' "
          f"floor): {(a - c) / n * 1e3:.2f} ms per task, {(a - c) / b:.2f}x GNU parallel")
    if p:
        a, b = statistics.median(ours_p), statistics.median(theirs_p)
        print(f"{n} tasks of true, {p} at a time ({os.cpu_count()} CPUs), "
              f"medians of {args.repeats}:")
        print(f"  notata, --pack-parallel {p}:          {a:.2f} s, {n / a:.0f} tasks/s")
        print(f"  parallel -j{p} --joblog:               {b:.2f} s, {n / b:.0f} tasks/s")
        print(f"  throughput: {b / a:.2f}x GNU parallel's")


if __name__ == "__main__":
    main()
