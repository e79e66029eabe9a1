"""Scanning at scale: ``notata status`` over N runs against reading every metadata.json once.

Makes N run directories (each a realistic metadata.json written by a real Logbook, copied)
for a manifest of N tasks, then times, alternating and taking medians:

- the floor: ``find DIR -name metadata.json -print0 | xargs -0 cat > /dev/null``;
- ``notata status MANIFEST --json`` (every task classified, one open per run);
- ``notata status DIR --json`` (a bare folder).

It also counts the files a scan opens per run (strace, when installed) and reports the
peak memory of the status process.

Usage: python benchmarks/bench_scan.py [--runs 100000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_runs(root: Path, n: int) -> Path:
    from notata import Logbook

    manifest = root / "sweep.yaml"
    manifest.write_text(f"name: scale\nrun_id: 'r{{i}}'\ngrid: {{i: {list(range(n))}}}\n")
    from notata.manifest import load

    sweep = load(manifest)
    with Logbook("template", root / "tmpl", params={"i": 0}) as log:
        log.meta(task=0, sweep="scale", manifest=str(manifest), manifest_hash=sweep.hash)
    meta = json.loads((log.path / "metadata.json").read_text())
    out = root / "outputs"
    out.mkdir()
    for i in range(n):
        d = out / f"log_r{i}"
        d.mkdir()
        meta.update(run_id=f"r{i}", task=i)
        (d / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        (d / "params.yaml").write_text(f"i: {i}\n")
    return manifest


def timed(argv: list[str], shell: bool = False) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(argv if not shell else argv[0], shell=shell, stdout=subprocess.DEVNULL,
                          check=True)
    assert proc.returncode == 0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, usage.ru_maxrss


def opens_per_run(manifest: Path, n: int) -> float | None:
    if not shutil.which("strace"):
        return None
    log = manifest.parent / "strace.txt"
    subprocess.run(["strace", "-f", "-e", "trace=open,openat", "-o", str(log), sys.executable,
                    "-m", "notata", "status", str(manifest), "--json"], stdout=subprocess.DEVNULL,
                   check=True)
    opened = sum(1 for line in log.read_text().splitlines() if "/log_r" in line)
    return opened / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        root = Path(d)
        t0 = time.perf_counter()
        manifest = make_runs(root, args.runs)
        print(f"made {args.runs} runs in {time.perf_counter() - t0:.0f} s")
        out = root / "outputs"
        floor_cmd = [f"find {out} -name metadata.json -print0 | xargs -0 cat > /dev/null"]
        status_m = [sys.executable, "-m", "notata", "status", str(manifest), "--json"]
        status_d = [sys.executable, "-m", "notata", "status", str(out), "--json"]
        floor, by_manifest, by_dir = [], [], []
        for _ in range(args.repeats):
            floor.append(timed(floor_cmd, shell=True)[0])
            by_manifest.append(timed(status_m)[0])
            by_dir.append(timed(status_d)[0])
        f, m, b = (statistics.median(x) for x in (floor, by_manifest, by_dir))
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"{args.runs} runs, medians of {args.repeats}: find|xargs cat {f:.2f} s; "
              f"notata status MANIFEST {m:.2f} s (ratio {m / f:.2f}); "
              f"notata status DIR {b:.2f} s (ratio {b / f:.2f}); peak memory of the largest "
              f"child {peak_mb:.0f} MB")
        per_run = opens_per_run(manifest, args.runs)
        if per_run is not None:
            print(f"files opened per run by a scan: {per_run:.2f}")


if __name__ == "__main__":
    main()
