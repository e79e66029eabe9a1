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


SHARED_VENV = Path("/opt/notata-test/venv")


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


def as_user(user: str, python_exe: str, code: str, *args: str, umask: int = 0o002,
            **kw: Any) -> subprocess.Popen[str]:
    """Run ``python -c code args`` as ``user`` (primary group, umask 002), from /tmp."""
    import pwd

    pw = pwd.getpwnam(user)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": "/tmp", "USER": user,
           "LOGNAME": user, "NOTATA_HEARTBEAT": "0.5"}
    return subprocess.Popen([python_exe, "-c", textwrap.dedent(code), *args], env=env,
                            cwd="/tmp", user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                            umask=umask, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)
