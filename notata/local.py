"""The local backend: a sweep on this machine, every task through ``notata exec``.

Each task runs as ``python -m notata exec MANIFEST --task I -- CMD...`` in a subprocess,
N at a time, so that the local and cluster paths are the same code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .manifest import Sweep, compact
from .runner import IN_USE, STOP_GRACE, clean_environment


@dataclass
class LocalResult:
    """What a local sweep did: task indices by outcome."""

    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)  # held by another process: not run here
    interrupted: bool = False
    signal: int = 0  # the signal that stopped the run (0: Ctrl-C, or none)
    why: str = ""  # "cancelled" (Ctrl-C), "hangup", "terminated"

    def summary(self, elapsed: float) -> str:
        """One line: what the run did, in ``elapsed`` seconds."""
        sec = int(elapsed)
        text = (f"{len(self.done)} done, {len(self.failed)} failed, "
                f"{len(self.skipped)} already complete, in "
                f"{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}")
        if self.busy:
            text += f", {len(self.busy)} run by another process ({compact(self.busy)})"
        if self.failed:
            text += f"; failed tasks: {compact(self.failed)}"
        if self.interrupted:
            text += f" ({self.why or 'interrupted'})"
        return text



def run_local(sweep: Sweep, todo: Sequence[int], argv: Sequence[str], *, jobs: int,
              skipped: Iterable[int] = (), progress: Any = None) -> LocalResult:
    """Run ``notata exec`` for each task of ``todo``, ``jobs`` at a time.

    The caller leaves out complete tasks (``skipped``, reported in the result).
    ``progress(result, running, total)`` is called as tasks start and end.
    Ctrl-C, SIGTERM or SIGHUP (an ssh connection that drops) stops launching, passes the
    signal to the running wrappers, which stop their commands and record ``cancelled``
    or ``terminated``, waits for them, and returns with ``interrupted`` set. A sweep
    that must outlive a logout belongs in tmux, nohup, or the SLURM backend.
    """
    result = LocalResult(skipped=list(skipped))
    total = len(todo)
    running: dict[int, subprocess.Popen[bytes]] = {}
    base = [sys.executable, "-m", "notata", "exec", str(sweep.path)]
    queue = list(reversed(todo))
    env = clean_environment(os.environ)

    def report() -> None:
        if progress is not None:
            progress(result, len(running), total)

    def stop(signum: int, frame: object) -> None:
        raise _Stopped(signum)

    previous = _install({signal.SIGTERM: stop, signal.SIGHUP: stop})
    try:
        while queue or running:
            while queue and len(running) < jobs:
                i = queue.pop()
                running[i] = subprocess.Popen([*base, "--task", str(i), "--", *argv],
                                              stdin=subprocess.DEVNULL, env=env)
                report()
            time.sleep(0.05)
            for i, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[i]
                    outcome = {0: result.done, IN_USE: result.busy}.get(proc.returncode,
                                                                        result.failed)
                    outcome.append(i)
                    report()
    except (KeyboardInterrupt, _Stopped) as err:
        # Each wrapper stops its command and records why (a terminal's Ctrl-C or hangup
        # reaches them already; a second one is ignored). Wait for them all, so that
        # nothing is left "running".
        signum = err.signum if isinstance(err, _Stopped) else signal.SIGINT
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        result.interrupted = True
        result.signal = 0 if signum == signal.SIGINT else signum
        result.why = ("cancelled" if signum == signal.SIGINT
                      else "hangup" if signum == signal.SIGHUP else "terminated")
        for proc in running.values():
            proc.send_signal(signum)
        for i, proc in running.items():
            try:
                proc.wait(STOP_GRACE + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            result.failed.append(i)
        report()
    finally:
        _install(previous)
    return result


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _install(handlers: Mapping[int, Any]) -> dict[int, Any]:
    """Install signal handlers (main thread only); return the ones they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
