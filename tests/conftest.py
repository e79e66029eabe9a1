"""Shared fixtures: a run root with hostile characters, the SLURM test cluster, and a
group of users. Plain helpers live in helpers.py (``from helpers import ...``)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, SHARED_VENV


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A base directory whose name has a space, quotes, ``;`` and ``$``."""
    d = tmp_path / "out put's;$x"
    d.mkdir()
    return d


@pytest.fixture(autouse=True)
def _no_scheduler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests run as if outside SLURM unless they set its variables themselves; what a
    test started through helpers.python (or notata_process) and left running, because it
    failed while waiting on it, is ended with it."""
    from helpers import end_started

    for var in list(os.environ):
        if var.startswith("SLURM_") or var.startswith("NOTATA_"):
            monkeypatch.delenv(var, raising=False)
    yield
    end_started()


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


@pytest.fixture(scope="session")
def group_users() -> tuple[str, list[str], str]:
    """Two users of one group (``notata-a``, ``notata-b`` in ``notata-share``) and a Python
    they can run with this checkout's notata installed (Debian's python3, in
    /opt/notata-test/venv: the test venv's interpreter lives where other users cannot go).
    Made once, as root; skipped with the reason elsewhere."""
    import shutil

    if os.geteuid() != 0:
        pytest.skip("making a second and third user needs root")
    for cmd in (["groupadd", "-f", "notata-share"],
                *(["useradd", "-M", "-N", "-g", "notata-share", "-s", "/bin/sh", u]
                  for u in ("notata-a", "notata-b")
                  if subprocess.run(["id", u], capture_output=True).returncode != 0)):
        subprocess.run(cmd, check=True, capture_output=True)
    system_python = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3 that other users can run")
    if not (SHARED_VENV / "bin" / "python").exists():
        subprocess.run([system_python, "-m", "venv", str(SHARED_VENV)], check=True,
                       capture_output=True)
    subprocess.run([str(SHARED_VENV / "bin" / "pip"), "install", "-q",
                    "--disable-pip-version-check", str(ROOT)], check=True, timeout=900)
    SHARED_VENV.parent.chmod(0o755)
    return str(SHARED_VENV / "bin" / "python"), ["notata-a", "notata-b"], "notata-share"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Scenarios that take minutes on the cluster (the retry shepherd's dozen-task sweep, a
    pack that reaches its time limit) are submitted as soon as the session knows it will
    run them, and run while the other modules' tests do: each module that has one
    defines ``start_early()``, and ``START_EARLY_FOR``, the tests that need it (default:
    any of the module's)."""
    started = set()
    for item in session.items:
        module = getattr(item, "module", None)
        if module is None or not hasattr(module, "start_early") or module in started:
            continue
        wanted = getattr(module, "START_EARLY_FOR", None)
        if wanted is None or getattr(item, "originalname", item.name) in wanted:
            started.add(module)
            module.start_early()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How long each node-loss scenario took (tests/test_nodes.py), for the README."""
    import sys

    took = getattr(sys.modules.get("test_nodes"), "_SEEN", {}).get("took")
    if took:
        terminalreporter.write_line("node scenarios: " + ", ".join(took))
