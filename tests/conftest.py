"""Shared fixtures: a run root with hostile characters, and helpers to run real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A base directory whose name has a space, quotes, ``;`` and ``$``."""
    d = tmp_path / "out put's;$x"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _no_scheduler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as if outside SLURM unless they set its variables themselves."""
    for var in list(os.environ):
        if var.startswith("SLURM_") or var.startswith("NOTATA_"):
            monkeypatch.delenv(var, raising=False)


def python(
    code: str, *args: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.Popen[str]:
    """Start ``python -c code args...`` (code is dedented) with notata importable."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full_env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def tree_digest(run: Path) -> dict[str, str]:
    """SHA-256 of every file under ``run``: to show that nothing in it changed."""
    import hashlib

    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def read_meta(run: Path) -> dict[str, Any]:
    return json.loads((run / "metadata.json").read_text())


def status_is(run: Path, status: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return read_meta(run).get("status") == status
        except (FileNotFoundError, ValueError):
            return False

    return check


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The real test cluster (scripts/slurm-local.sh start); skipped only without sbatch."""
    import shutil

    if shutil.which("sbatch") is None:
        pytest.skip("no sbatch here, and no root to start scripts/slurm-local.sh")
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    states = proc.stdout.split()
    if proc.returncode != 0 or not set(states) & {"idle", "mix", "alloc"}:
        pytest.fail(f"sbatch is here but the cluster is not up ({proc.stderr.strip() or states}); "
                    "run scripts/slurm-local.sh start")
    return states[0]


def sbatch(script: Path, *options: str) -> str:
    """Submit ``script`` with ``options``; return the job id."""
    out = subprocess.run(["sbatch", "--parsable", *options, str(script)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return out.strip().split(";")[0]


def job_gone(job_id: str) -> Callable[[], bool]:
    """True once squeue no longer lists the job (finished, cancelled or timed out)."""
    def check() -> bool:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                             text=True).stdout.strip()
        return out == ""
    return check
