"""What a log line costs a command attached under ``notata exec`` (it opens its run with
``notata.task``), against the same line through a Logbook of its own, in the same run.

Since session 10 an attached process asks, at most once a second, whether the run's lock
is still the one its wrapper holds (a run taken over by another attempt refuses its
writes); this measures that the question stays off the per-line path.

Each figure is the median, over ``--repeats`` rounds, of the time per ``log.info`` over
``--lines`` lines; the two kinds alternate.

Usage: python benchmarks/bench_attached.py [--lines 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINES = """
import sys, time, notata
n, kind = int(sys.argv[2]), sys.argv[3]
log = notata.task(sys.argv[1]) if kind == "attached" else notata.Logbook("own", sys.argv[4])
with log:
    assert log.attached == (kind == "attached"), "not the kind of handle measured"
    t = time.perf_counter()
    for _ in range(n):
        log.info("a line")
    took = (time.perf_counter() - t) / n * 1e6
print(f"{notata.__version__} {notata.__file__} attached={log.attached}", file=sys.stderr)
print(took, file=sys.stderr)
"""


def _once(kind: str, lines: int) -> float:
    """Microseconds per line, in a fresh folder and process."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "s.yaml").write_text("name: b\nrun_id: 'r{k}'\ngrid: {k: [0]}\n")
        (work / "lines.py").write_text(LINES)
        cmd = [sys.executable, str(work / "lines.py"), str(work / "s.yaml"), str(lines), kind,
               str(work / "own")]
        if kind == "attached":  # its stderr goes to the run's stderr.txt
            cmd = [sys.executable, "-m", "notata", "exec", str(work / "s.yaml"), "--task", "0",
                   "--", *cmd]
        out = subprocess.run(cmd, cwd=work, check=True, capture_output=True, text=True,
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        said = (work / "outputs" / "log_r0" / "stderr.txt").read_text() \
            if kind == "attached" else out.stderr
        *_, who, figure = said.strip().splitlines()
        if not _SEEN.get(kind):  # what each side ran: the program and the notata it imported
            _SEEN[kind] = True
            print(f"  {kind}: {' '.join(cmd[:5])} ... -> notata {who}")
        return float(figure)


_SEEN: dict[str, bool] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import notata

    print(f"notata {notata.__version__} from {Path(notata.__file__).parent}")
    times: dict[str, list[float]] = {"attached": [], "own": []}
    for _ in range(args.repeats):
        for kind, seen in times.items():
            seen.append(_once(kind, args.lines))
    att, own = (statistics.median(times[k]) for k in ("attached", "own"))
    print(f"log.info, attached under notata exec: {att:.2f} us per line (median)")
    print(f"log.info, a Logbook of its own:       {own:.2f} us per line (median)")
    print(f"ratio attached / own: {att / own:.2f}x")


if __name__ == "__main__":
    main()
