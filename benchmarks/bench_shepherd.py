"""The retry shepherd's own cost per round at scale, on the real cluster.

Makes a sweep of N tasks (``bench_scan.make_runs``: the index plus the failed runs'
files), 1 in K failed (spread over the grid, as failures are), and a retry chain whose
first round is recorded. Then times, alternating, medians of the repeats:

- ``notata status MANIFEST``: the scan alone (the baseline);
- ``notata shepherd MANIFEST``: one whole round (scan under the sweep's lock, SLURM's
  fate of the last round, the resubmission of every failed task, its successor).

The SLURM commands go through a folder of wrappers put first on PATH that count each
call and submit every job held (``sbatch --hold``), so nothing runs; the held jobs are
cancelled after each round, and the sweep's records are put back as they were. Prints
wall and CPU seconds and peak memory per round, and the sbatch, squeue and scontrol
calls each round made. Needs the test cluster (scripts/slurm-local.sh start).

Usage: python benchmarks/bench_shepherd.py [--tasks 100000] [--fail 100] [--repeats 3]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import make_runs  # noqa: E402

COUNTED = ("sbatch", "squeue", "scontrol", "scancel")


def shims(folder: Path, calls: Path) -> dict[str, str]:
    """Wrappers that log each SLURM call to ``calls`` and run the real command (sbatch
    with --hold); the environment that puts them first."""
    folder.mkdir()
    for name in COUNTED:
        real = shutil.which(name)
        if real is None:
            raise SystemExit(f"no {name} here: start the test cluster first")
        extra = " --hold" if name == "sbatch" else ""
        (folder / name).write_text(f'#!/bin/sh\necho {name} >> "{calls}"\n'
                                   f'exec {real}{extra} "$@"\n')
        (folder / name).chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}"}


def run(argv: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system, children included) and peak MB."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} exited {proc.returncode}: {proc.stderr.read().decode()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100_000)
    ap.add_argument("--fail", type=int, default=100, help="every K-th task failed")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from notata import chain, submissions
    from notata.manifest import load

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        root = Path(d)
        manifest = make_runs(root, args.tasks, args.fail, index_only=True)
        text = manifest.read_text() + "retry: {attempts: 100}\n"
        manifest.write_text(text)
        sweep = load(manifest)
        # the index was recorded under the manifest without retry:, which is not hashed
        chain_id = chain.new_chain(sweep)
        submissions.append(sweep.base_dir, submissions.entry(
            sweep, "slurm", submissions.new_id(), range(args.tasks), command=["true"],
            options={"time": "1", "mem": "100M"}, chain=chain_id, round=1, job_ids=[],
            arrays=[]))
        chain.write(sweep.base_dir, chain.State(
            chain_id, sweep.name, str(manifest), sweep.hash, ["true"],
            {"time": "1", "mem": "100M"}, f"0-{args.tasks - 1}"))
        folder = sweep.base_dir / ".notata"
        saved = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        calls = root / "calls.txt"
        env = shims(root / "bin", calls)
        root_dir = Path(__file__).resolve().parent.parent
        env["PYTHONPATH"] = str(root_dir)
        which = subprocess.run([sys.executable, "-c", "import notata; print(notata.__version__,"
                                " notata.__file__)"], env=env, cwd=root, capture_output=True,
                               text=True, check=True).stdout.split()
        print(f"measured: notata {which[0]} from {which[1]}; sbatch etc. through {root / 'bin'}")
        if not Path(which[1]).resolve().is_relative_to(root_dir):
            raise SystemExit(f"measured the wrong notata: {which[1]}, not this checkout's")
        commands = {"notata status MANIFEST (the scan)": [sys.executable, "-m", "notata",
                                                          "status", str(manifest)],
                    "notata shepherd MANIFEST (a round)": [sys.executable, "-m", "notata",
                                                           "shepherd", str(manifest)]}
        times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in commands}
        counts: dict[str, list[int]] = {k: [] for k in commands}
        for _ in range(args.repeats):
            for name, argv in commands.items():
                calls.write_text("")
                times[name].append(run(argv, env))
                made = calls.read_text().split()
                counts[name] = [made.count(c) for c in COUNTED]
                state = chain.read(sweep.base_dir, sweep.name)
                held = [str(j) for r in submissions.submitted(sweep.base_dir)
                        for j in r.get("job_ids") or []]
                held += [state.job_id] if state is not None and state.job_id else []
                if held:
                    subprocess.run(["scancel", *held], check=True)
                for p in folder.iterdir():  # the records as they were before the round
                    if p.is_file() and p.name not in saved:
                        p.unlink()
                for name_, data in saved.items():
                    (folder / name_).write_bytes(data)
        base = statistics.median(t[0] for t in next(iter(times.values())))
        print(f"{args.tasks} tasks, {args.tasks // args.fail} failed, medians of "
              f"{args.repeats}:")
        for name, rows in times.items():
            wall = statistics.median(r[0] for r in rows)
            cpu = statistics.median(r[1] for r in rows)
            peak = max(r[2] for r in rows)
            said = ", ".join(f"{c} {n}" for c, n in zip(COUNTED, counts[name], strict=True))
            print(f"  {name:<36} wall {wall:6.2f} s  ratio {wall / base:5.2f}  cpu "
                  f"{cpu:6.2f} s  peak {peak:5.0f} MB  calls: {said}")


if __name__ == "__main__":
    main()
