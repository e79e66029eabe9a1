"""The report at scale: ``notata report`` against ``notata status --full`` of the same sweep.

Makes N runs (as bench_scan.py does: realistic metadata.json files, every K-th run
failed, a 2-axis grid), each with a JSON artifact ``final_metrics`` ({"E": ...}), then
times, alternating and taking medians: ``notata status MANIFEST --full`` (the baseline:
one open per run), ``notata report MANIFEST`` and ``notata report MANIFEST --artifact
final_metrics`` (one more open per run), and gives the ratios and the HTML's size.

Usage: python benchmarks/bench_report.py [--runs 100000] [--repeats 3] [--fail 100]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import make_runs, time_all  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fail", type=int, default=100, help="every K-th run failed (0: none)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        root = Path(d)
        t0 = time.perf_counter()
        manifest = make_runs(root, args.runs, args.fail)
        for run in (root / "outputs").iterdir():
            if run.name.startswith("log_"):
                (run / "artifacts").mkdir()
                a, b = run.name[len("log_r"):].split("_")
                (run / "artifacts" / "final_metrics.json").write_text(
                    json.dumps({"E": int(a) * 0.01 + int(b) * 0.001}))
        print(f"made {args.runs} runs in {time.perf_counter() - t0:.0f} s")
        cli = [sys.executable, "-m", "notata"]
        which = subprocess.run([sys.executable, "-c", "import notata, matplotlib; print("
                                "notata.__version__, notata.__file__, 'matplotlib', "
                                "matplotlib.__version__)"], capture_output=True, text=True,
                               check=True)
        print(f"measured: notata status and notata report of {which.stdout.strip()}")
        html = root / "report.html"
        commands: dict[str, list[str] | str] = {
            "notata status MANIFEST --full": [*cli, "status", str(manifest), "--full"],
            "notata report MANIFEST": [*cli, "report", str(manifest), "-o", str(html)],
            "notata report MANIFEST --artifact final_metrics": [
                *cli, "report", str(manifest), "-o", str(html), "--artifact", "final_metrics"],
        }
        times, peak = time_all(commands, args.repeats)
        base = statistics.median(times["notata status MANIFEST --full"])
        print(f"{args.runs} runs, medians of {args.repeats}:")
        for name in commands:
            m = statistics.median(times[name])
            print(f"  {name:<48} {m:7.2f} s  ratio {m / base:5.2f}  peak {peak[name]:6.0f} MB")
        print(f"  report.html: {html.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
