"""Scanning at scale: ``notata status`` over N runs against reading every metadata.json once.

Makes N run directories (each a realistic metadata.json written by a real Logbook, copied,
and its record in the sweep index, written by the function the Logbook calls) for a
manifest of N tasks (a 2-axis grid), then times, alternating and taking medians:

- the floor: ``find DIR -name metadata.json -print0 | xargs -0 cat > /dev/null``;
- ``notata status MANIFEST`` (every task classified; the index spares opening complete runs);
- ``notata status MANIFEST --full`` (one open per run, the index ignored);
- ``notata status DIR`` (a bare folder: one open per run).

``--fail K`` leaves every K-th run failed (not complete), so the index path still opens
those. It also counts the files each scan opens per run (strace, when installed) and the
peak memory of each status process.

Usage: python benchmarks/bench_scan.py [--runs 100000] [--repeats 5] [--fail 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_runs(root: Path, n: int, fail_every: int, index_only: bool = False) -> Path:
    from notata import Logbook, index
    from notata.manifest import load

    b = min(n, 1000)
    if n % b:
        raise SystemExit("--runs must be a multiple of 1000")
    manifest = root / "sweep.yaml"
    manifest.write_text(f"name: scale\nrun_id: 'r{{a}}_{{b}}'\n"
                        f"grid: {{a: {list(range(n // b))}, b: {list(range(b))}}}\n")
    sweep = load(manifest)
    with Logbook("template", root / "tmpl", params={"a": 0, "b": 0}) as log:
        # the fields notata.task records (its own: meta() refuses them)
        log._set(task=0, sweep="scale", manifest=str(manifest), manifest_hash=sweep.hash)
    meta = json.loads((log.path / "metadata.json").read_text())
    out = root / "outputs"
    out.mkdir()
    for i in range(n):
        failed = fail_every and i % fail_every == fail_every - 1
        meta.update(run_id=sweep.run_id(i), task=i, status="failed" if failed else "complete")
        index.record(out, meta)
        if index_only and not failed:
            continue  # the index path never opens a complete run: no files needed for it
        p = sweep.params(i)
        d = out / f"log_{sweep.run_id(i)}"
        d.mkdir()
        (d / "metadata.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        (d / "params.yaml").write_text(f"a: {p['a']}\nb: {p['b']}\n")
    return manifest


def timed(argv: list[str] | str) -> tuple[float, float]:
    """Seconds and peak memory (MB) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *(
        ["sh", "-c", argv] if isinstance(argv, str) else argv)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=True)
    return time.perf_counter() - t0, int(proc.stderr.split()[-1]) / 1024


def time_all(commands: dict[str, list[str] | str], repeats: int
             ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Each command's times (alternating, ``repeats`` rounds) and peak memory (MB)."""
    times: dict[str, list[float]] = {k: [] for k in commands}
    peak: dict[str, float] = dict.fromkeys(commands, 0.0)
    for _ in range(repeats):
        for name, argv in commands.items():
            sec, mb = timed(argv)
            times[name].append(sec)
            peak[name] = max(peak[name], mb)
    return times, peak


def opens_per_run(argv: list[str], n: int, root: Path) -> float | None:
    if not shutil.which("strace"):
        return None
    log = root / "strace.txt"
    subprocess.run(["strace", "-f", "-e", "trace=open,openat", "-o", str(log), *argv],
                   stdout=subprocess.DEVNULL, check=True)
    opened = sum(1 for line in log.read_text().splitlines() if "/log_r" in line)
    return opened / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fail", type=int, default=100, help="every K-th run failed (0: none)")
    ap.add_argument("--index-only", action="store_true",
                    help="make only the index and the non-complete runs' files; time only "
                         "notata status MANIFEST (quick at 10^6: no floor to compare with)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        root = Path(d)
        t0 = time.perf_counter()
        manifest = make_runs(root, args.runs, args.fail, args.index_only)
        print(f"made {args.runs} runs in {time.perf_counter() - t0:.0f} s")
        out = root / "outputs"
        status = [sys.executable, "-m", "notata", "status"]
        which = subprocess.run([sys.executable, "-c", "import notata; print(notata.__version__, "
                                "notata.__file__)"], capture_output=True, text=True, check=True)
        print(f"measured: notata status of notata {which.stdout.strip()}")
        commands = {
            "find|xargs cat (floor)": f"find {out} -name metadata.json -print0 | "
                                      "xargs -0 cat > /dev/null",
            "notata status MANIFEST": [*status, str(manifest)],
            "notata status MANIFEST --full": [*status, str(manifest), "--full"],
            "notata status DIR": [*status, str(out)],
        }
        if args.index_only:  # the baseline is then the start-up every notata command pays
            commands = {"python -c 'import notata'": [sys.executable, "-c", "import notata"],
                        "notata status MANIFEST": commands["notata status MANIFEST"]}
        times, peak = time_all(commands, args.repeats)
        floor = statistics.median(next(iter(times.values())))  # the first command: baseline
        print(f"{args.runs} runs ({args.fail and args.runs // args.fail} failed), "
              f"medians of {args.repeats}:")
        for name, argv in commands.items():
            m = statistics.median(times[name])
            line = f"  {name:<32} {m:7.2f} s  ratio {m / floor:5.2f}  peak {peak[name]:6.0f} MB"
            if isinstance(argv, list) and args.runs <= 100_000:  # strace is slow
                per_run = opens_per_run(argv, args.runs, root)
                if per_run is not None:
                    line += f"  files opened per run {per_run:.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
