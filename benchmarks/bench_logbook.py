"""Logbook overhead, measured against baselines in the same run (ratios of medians).

1. Per-run overhead: open + params + one 1,000-element array + one JSON artifact
   + close, against plain ``np.save`` + ``json.dump`` of the same files, against the
   fsync floor (the same files and a log and metadata file written and fsynced, with
   their folders: the 9 fsyncs notata's durability costs, and nothing else), and against
   the published notata 0.3.0 when ``--notata03 DIR`` names a folder it is installed in
   (``benchmarks/run.sh`` does that).
2. Heartbeat cost: a tight numpy loop with a 0.1 s heartbeat against the same loop
   with no beat during it.

Usage: python benchmarks/bench_logbook.py [--runs 200] [--repeats 7] [--notata03 DIR]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

PARAMS = {"omega": 2.0, "dt": 1e-3, "steps": 1000}
ARRAY = np.linspace(0, 1, 1000)
RESULT = {"E": 0.5, "x": 1.0}

WORKLOAD_03 = """
import sys, time, numpy as np
import notata
from notata import Logbook
base, runs = sys.argv[1], int(sys.argv[2])
print(notata.__version__, notata.__file__, file=sys.stderr)  # the baseline it really ran
arr = np.linspace(0, 1, 1000)
t0 = time.perf_counter()
for i in range(runs):
    with Logbook(f"r{i}", base_dir=base, params={"omega": 2.0, "dt": 1e-3, "steps": 1000}) as log:
        log.array("x", arr)
        log.json("final_state", {"E": 0.5, "x": 1.0})
print((time.perf_counter() - t0) / runs)
"""


def plain(base: Path, runs: int) -> float:
    t0 = time.perf_counter()
    for i in range(runs):
        d = base / f"log_r{i}"
        (d / "data").mkdir(parents=True)
        (d / "artifacts").mkdir()
        with open(d / "params.json", "w") as f:
            json.dump(PARAMS, f)
        np.save(d / "data" / "x.npy", ARRAY)
        with open(d / "artifacts" / "final_state.json", "w") as f:
            json.dump(RESULT, f)
    return (time.perf_counter() - t0) / runs


def fsync_floor(base: Path, runs: int) -> float:
    """The same files as :func:`plain`, plus a log and a metadata file, each fsynced, and
    their folders: what notata must sync per run (9 fsyncs), with nothing else."""
    def synced(path: Path, write: Callable[[Any], object], mode: str = "w") -> None:
        with open(path, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())

    def sync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    for i in range(runs):
        d = base / f"log_r{i}"
        (d / "data").mkdir(parents=True)
        (d / "artifacts").mkdir()
        synced(d / "params.yaml", lambda f: json.dump(PARAMS, f))
        synced(d / "data" / "x.npy", lambda f: np.save(f, ARRAY), "wb")
        synced(d / "artifacts" / "final_state.json", lambda f: json.dump(RESULT, f))
        synced(d / "log.txt", lambda f: f.write("opened\nclosed\n"))
        synced(d / "metadata.json", lambda f: json.dump({"status": "complete", **PARAMS}, f))
        for folder in (d / "data", d / "artifacts", d, d):
            sync_dir(folder)
    return (time.perf_counter() - t0) / runs


def ours(base: Path, runs: int) -> float:
    from notata import Logbook

    t0 = time.perf_counter()
    for i in range(runs):
        with Logbook(f"r{i}", base_dir=base, params=PARAMS) as log:
            log.save_numpy("x", ARRAY)
            log.save_json("final_state", RESULT)
    return (time.perf_counter() - t0) / runs


def notata03(base: Path, runs: int, site: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(site).resolve())}
    # cwd: python -c puts the current folder first on sys.path, and from this checkout that
    # is our notata, which once stood in for the baseline unnoticed
    proc = subprocess.run([sys.executable, "-c", WORKLOAD_03, str(base), str(runs)], env=env,
                          check=True, capture_output=True, text=True, cwd=base)
    version, where = proc.stderr.split()[-2:]
    if version != "0.3.0" or not Path(where).resolve().is_relative_to(Path(site).resolve()):
        raise SystemExit(f"the baseline imported notata {version} from {where}, not 0.3.0 "
                         f"from {site}")
    return float(proc.stdout)


def imported() -> str:
    """Which notata this process measures: its version and where it was imported from."""
    import notata

    return f"notata {notata.__version__} from {Path(notata.__file__).parent}"


def loop(seconds_of_work: int = 3_000) -> float:
    a = np.random.default_rng(0).random(20_000)
    t0 = time.perf_counter()
    for _ in range(seconds_of_work):
        a = np.sin(a) + 0.5 * a
    return time.perf_counter() - t0


def heartbeat_cost(repeats: int) -> tuple[float, float]:
    from notata import Logbook

    with tempfile.TemporaryDirectory() as tmp:
        with_hb, without = [], []
        for i in range(repeats):  # interleaved, so drift of the machine hits both alike
            with Logbook(f"hb{i}", tmp, heartbeat=0.1):
                with_hb.append(loop())
            with Logbook(f"nohb{i}", tmp, heartbeat=86400):
                without.append(loop())
    return statistics.median(with_hb), statistics.median(without)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--notata03", help="a folder where notata 0.3.0 is installed (pip --target)")
    args = ap.parse_args()

    times: dict[str, list[float]] = {"plain": [], "fsync floor": [], "notata": [],
                                     "notata 0.3.0": []}
    for _ in range(args.repeats):
        for name in times:
            if name == "notata 0.3.0" and not args.notata03:
                continue
            with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
                if name == "plain":
                    times[name].append(plain(Path(tmp), args.runs))
                elif name == "fsync floor":
                    times[name].append(fsync_floor(Path(tmp), args.runs))
                elif name == "notata":
                    times[name].append(ours(Path(tmp), args.runs))
                else:
                    times[name].append(notata03(Path(tmp), args.runs, args.notata03))
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"measured: {imported()}" + (f"; baseline: notata 0.3.0 from {args.notata03} "
                                       "(checked in each run)" if args.notata03 else ""))
    print(f"per-run overhead, median of {args.repeats} x {args.runs} runs:")
    for name, t in med.items():
        print(f"  {name:14s} {t * 1e3:8.3f} ms/run   ratio to plain {t / med['plain']:5.2f}")
    if "notata 0.3.0" in med:
        print(f"  notata / notata 0.3.0 = {med['notata'] / med['notata 0.3.0']:.2f}")
        above = med["notata"] - med["fsync floor"]
        print(f"  (notata - fsync floor) / notata 0.3.0 = {above / med['notata 0.3.0']:.2f} "
              f"({above * 1e3:.3f} ms above the floor)")
    hb, no = heartbeat_cost(args.repeats)
    print(f"heartbeat 0.1 s on a numpy loop: {hb:.3f} s vs {no:.3f} s without, "
          f"cost {100 * (hb / no - 1):+.2f}%")


if __name__ == "__main__":
    main()
