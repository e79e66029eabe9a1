"""The tutorial (../shared/seed/) runs unchanged: its code blocks, verbatim, in a fresh folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import ROOT

SEED_DIR = ROOT.parent / "shared" / "seed"


def python_blocks(text: str) -> list[str]:
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|[ \t]*\n)+)", text)
    return [textwrap.dedent(b) for b in blocks]


def run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


@pytest.mark.skipif(not SEED_DIR.is_dir(), reason=f"no tutorial at {SEED_DIR}")
def test_the_tutorials_code_runs_unchanged(tmp_path: Path) -> None:
    [seed] = sorted(SEED_DIR.glob("*.txt"))
    loop, metrics, resume = python_blocks(seed.read_text(encoding="utf-8"))
    first = run(loop, tmp_path)
    assert first.returncode == 0, first.stderr
    runs = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert runs == ["log_omega1.0_dt0.001", "log_omega1.0_dt0.01", "log_omega2.0_dt0.001",
                    "log_omega2.0_dt0.01", "log_omega3.0_dt0.001", "log_omega3.0_dt0.01"]
    state = json.loads((tmp_path / "outputs" / runs[0] / "artifacts" / "final_state.json")
                       .read_text())
    assert set(state) == {"x", "v"}
    # "Resuming only failed runs": nothing to re-run after a clean sweep
    after = run(resume, tmp_path)
    assert after.returncode == 0 and after.stdout == ""
    from notata import Logbook

    with pytest.raises(RuntimeError), Logbook("omega2.0_dt0.01", tmp_path / "outputs",
                                              overwrite=True):
        raise RuntimeError("blew up")
    after = run(resume, tmp_path)
    assert after.stdout == "Will re-run: log_omega2.0_dt0.01\n"
    # the metrics block belongs inside the loop body: examples/oscillator_loop.py is that
    assert "log.save_json(\"final_metrics\"" in metrics
    example = subprocess.run([sys.executable, str(ROOT / "examples" / "oscillator_loop.py")],
                             cwd=tmp_path / "outputs", capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert example.returncode == 0, example.stderr
    e = json.loads((tmp_path / "outputs" / "outputs" / "log_omega2.0_dt0.001" / "artifacts" /
                    "final_metrics.json").read_text())["E"]
    assert abs(e - 2.0) < 1e-3  # 0.5 * omega^2 * x0^2 is conserved
