"""Sweep costs, each against a baseline measured in the same run (medians).

1. Task lookup (index -> params, run id, run dir) at 10^3 and 10^7 tasks.
2. ``notata exec MANIFEST --task I -- true`` per task, against running ``true`` directly.
3. ``import notata`` against ``import numpy`` (fresh interpreters, ``-X importtime`` free).

Usage: python benchmarks/bench_sweep.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from notata.manifest import load


def lookup(path: Path, samples: int = 20_000) -> float:
    sweep = load(path)
    n = len(sweep)
    step = max(1, n // samples)
    t0 = time.perf_counter()
    k = 0
    for i in range(0, n, step):
        sweep.task(i)
        k += 1
    return (time.perf_counter() - t0) / k


def run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        small = d / "small.yaml"
        small.write_text("name: s\ngrid: {{a: [{}], b: [{}]}}\n".format(
            ", ".join(map(str, range(100))), ", ".join(map(str, range(10)))))
        big = d / "big.yaml"
        vals = ", ".join(map(str, range(100)))
        big.write_text(f"name: b\ngrid: {{a: [{vals}], b: [{vals}], c: [{vals}], "
                       "d: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}\n")
        for name, path in (("10^3", small), ("10^7", big)):
            t = statistics.median(lookup(path) for _ in range(args.repeats))
            print(f"task lookup, {name} tasks: {t * 1e6:.1f} us per task")

        exec_manifest = d / "exec.yaml"
        exec_manifest.write_text(f"name: e\ngrid: {{i: [{', '.join(map(str, range(200)))}]}}\n")
        notata = [sys.executable, "-m", "notata", "exec", str(exec_manifest), "--task"]
        plain, wrapped = [], []
        for r in range(args.repeats):
            plain.append(run(["true"]))
            wrapped.append(run([*notata, str(r), "--", "true"]))
        p, w = statistics.median(plain), statistics.median(wrapped)
        print(f"notata exec -- true: {w * 1e3:.1f} ms vs true: {p * 1e3:.2f} ms "
              f"(+{(w - p) * 1e3:.1f} ms per task)")

    imp_numpy, imp_notata = [], []
    for _ in range(args.repeats):
        imp_numpy.append(run([sys.executable, "-c", "import numpy"]))
        imp_notata.append(run([sys.executable, "-c", "import notata"]))
    bare = statistics.median(run([sys.executable, "-c", "pass"]) for _ in range(args.repeats))
    a, b = statistics.median(imp_numpy) - bare, statistics.median(imp_notata) - bare
    print(f"import numpy: {a * 1e3:.0f} ms, import notata: {b * 1e3:.0f} ms "
          f"(ratio {b / a:.2f}; notata imports numpy)")


if __name__ == "__main__":
    main()
