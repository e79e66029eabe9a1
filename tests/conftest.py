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


def read_meta(run: Path) -> dict[str, Any]:
    return json.loads((run / "metadata.json").read_text())


def status_is(run: Path, status: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return read_meta(run).get("status") == status
        except (FileNotFoundError, ValueError):
            return False

    return check
