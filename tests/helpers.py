"""Helpers shared by the test modules: real processes, polling, run records, sweep manifests,
and the SLURM test cluster. Fixtures stay in conftest.py (``from helpers import ...``)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: A venv other users can run (see conftest's ``group_users``).
SHARED_VENV = Path("/opt/notata-test/venv")
#: ``python -c CLI args...`` is ``notata args...``.
CLI = "import sys; from notata.cli import main; sys.exit(main(sys.argv[1:]))"


#: The processes :func:`python` started for the test running now (in the main thread):
#: conftest ends those still running when the test ends, with what they started, so a
#: test that fails while waiting on one leaves nothing behind.
STARTED: list[subprocess.Popen[str]] = []


def python(
    code: str, *args: str, env: dict[str, str] | None = None, **kw: Any
) -> subprocess.Popen[str]:
    """Start ``python -c code args...`` (code is dedented) with notata importable."""
    import threading

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full_env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )
    if threading.current_thread() is threading.main_thread():
        STARTED.append(proc)
    return proc


def end_started() -> None:
    """End what :func:`python` started for this test and is still running (and every
    process it started in turn), then forget them all."""
    import psutil

    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is not None:
            continue
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.Error:
            tree = []
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def notata_process(*args: str, **kw: Any) -> subprocess.Popen[str]:
    """Start ``notata args...`` in a process of its own (as :func:`python` starts one)."""
    return python(CLI, *args, **kw)


def submit(manifest: Path, *args: str) -> int:
    """``notata submit MANIFEST args...`` in this process; its exit status."""
    from notata.cli import main

    return main(["submit", str(manifest), *args])


def write_sweep(base: Path, text: str | None = None, file: str = "sweep.yaml", *,
                name: str = "sweep", tasks: int = 1, extra: str = "") -> Path:
    """Write a sweep manifest to ``base / file`` and return its path.

    ``text`` is written as it is. Without it, the manifest most tests use: sweep ``name``
    of ``tasks`` tasks, runs ``k0``, ``k1``, ... (``grid: {k: [0, 1, ...]}``), then the
    lines of ``extra`` (such as ``"params: {m: 10}\\n"``)."""
    if text is None:
        text = f"name: {name}\nrun_id: 'k{{k}}'\ngrid: {{k: {list(range(tasks))}}}\n{extra}"
    path = base / file
    path.write_text(text)
    return path


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "", *,
             every: float = 0.02) -> None:
    """Poll ``predicate`` every ``every`` seconds until true; fail the test after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
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


def shared_folder(group: str) -> Path:
    """A folder of the group, setgid, group-writable: where a group keeps a shared sweep
    (``sweep.yaml``, 4 tasks, group-writable too)."""
    import grp
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="notata-shared-", dir="/tmp"))
    os.chown(shared, -1, grp.getgrnam(group).gr_gid)
    shared.chmod(0o2775)
    write_sweep(shared, name="g", tasks=4).chmod(0o664)
    return shared


class Hook:
    """A loopback HTTP server that keeps every JSON body POSTed to it."""

    def __init__(self) -> None:
        import http.server
        import threading

        bodies: list[dict[str, Any]] = []
        self.bodies = bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
                size = int(self.headers["Content-Length"])
                bodies.append(json.loads(self.rfile.read(size)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
