"""The local backend: a sweep on this machine, every task through ``notata exec``.

Each task runs as ``python -m notata exec MANIFEST --task I -- CMD...`` in a subprocess,
N at a time, so that the local and cluster paths are the same code. Packed (``pack`` >
1), each subprocess runs a pack of tasks one after another (``--tasks``) and reports
each task's end on a pipe as it happens.
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

from . import _fs, layout
from ._command import STOP_GRACE
from .manifest import Sweep, compact
from .runner import BUSY, IN_USE, INTERRUPTED, SKIPPED, clean_environment
from .schema import COMPLETE


@dataclass
class LocalResult:
    """What a local sweep did: task indices by outcome."""

    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)  # held by another process: not run here
    unstarted: list[int] = field(default_factory=list)  # in a pack that was stopped first
    stopped: list[int] = field(default_factory=list)  # ended by Ctrl-C or a signal to us
    interrupted: bool = False
    signal: int = 0  # the signal that stopped the run (0: Ctrl-C, or none)
    why: str = ""  # "cancelled" (Ctrl-C), "hangup", "terminated"

    def summary(self, elapsed: float) -> str:
        """One line: what the run did, in ``elapsed`` seconds."""
        sec = int(elapsed)
        stopped = f"{len(self.stopped)} {self.why or 'stopped'}, " if self.stopped else ""
        text = (f"{len(self.done)} done, {len(self.failed)} failed, {stopped}"
                f"{len(self.skipped)} already complete, in "
                f"{sec // 3600}:{sec // 60 % 60:02d}:{sec % 60:02d}")
        if self.busy:
            text += f", {len(self.busy)} run by another process ({compact(self.busy)})"
        if self.unstarted:
            text += f", {len(self.unstarted)} not started ({compact(self.unstarted)})"
        if self.failed:
            text += f"; failed tasks: {compact(self.failed)}"
        if self.interrupted:
            text += f" ({self.why or 'interrupted'})"
        return text



def run_local(sweep: Sweep, todo: Sequence[int], argv: Sequence[str], *, jobs: int,
              pack: int = 1, skipped: Iterable[int] = (), progress: Any = None
              ) -> LocalResult:
    """Run ``notata exec`` for each task of ``todo``, ``jobs`` at a time (``pack`` tasks
    one after another per process).

    The caller leaves out complete tasks (``skipped``, reported in the result).
    ``progress(result, running, total)`` is called as tasks start and end.
    Ctrl-C, SIGTERM or SIGHUP (an ssh connection that drops) stops launching, passes the
    signal to the running wrappers, which stop their commands and record ``cancelled``
    or ``terminated``, waits for them, and returns with ``interrupted`` set. A sweep
    that must outlive a logout belongs in tmux, nohup, or the SLURM backend.
    """
    result = LocalResult(skipped=list(skipped))
    total = len(todo)
    running: list[_Process] = []
    base = [sys.executable, "-m", "notata", "exec", str(sweep.path)]
    queue = [list(todo[k:k + pack]) for k in range(0, len(todo), max(pack, 1))][::-1]
    env = clean_environment(os.environ)

    def report() -> None:
        if progress is not None:
            progress(result, len(running), total)

    def stop(signum: int, frame: object) -> None:
        raise _Stopped(signum)

    def take(proc: _Process, ended: bool) -> None:
        for i, kind in proc.outcomes(ended):
            getattr(result, kind).append(i)

    previous = _install({signal.SIGTERM: stop, signal.SIGHUP: stop})
    try:
        while queue or running:
            while queue and len(running) < jobs:
                running.append(_Process(sweep, queue.pop(), base, argv, env, pack > 1))
                report()
            time.sleep(0.05)
            for proc in list(running):
                ended = proc.popen.poll() is not None
                before = len(result.done) + len(result.failed) + len(result.busy)
                take(proc, ended)
                if ended:
                    running.remove(proc)
                    proc.close()
                if ended or len(result.done) + len(result.failed) + len(result.busy) > before:
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
        for proc in running:
            proc.popen.send_signal(signum)
        for proc in running:
            try:
                proc.popen.wait(STOP_GRACE + 10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
            for i, kind in proc.outcomes(True, interrupted=True):
                getattr(result, kind).append(i)
        report()
    finally:
        _install(previous)
        for proc in running:
            proc.close()
    return result


class _Process:
    """One ``notata exec`` subprocess: one task (its exit status says how it ended), or a
    pack (each task's end comes as a line ``INDEX HOW`` on a pipe; what it did not report
    before it ended is read from the runs)."""

    def __init__(self, sweep: Sweep, tasks: list[int], base: list[str], argv: Sequence[str],
                 env: dict[str, str], packed: bool) -> None:
        self.sweep = sweep
        self.tasks = tasks
        self.reported: set[int] = set()
        self._buffer = b""
        self._read: int | None = None
        self.started = time.time()
        if not packed:
            self.popen = subprocess.Popen([*base, "--task", str(tasks[0]), "--", *argv],
                                          stdin=subprocess.DEVNULL, env=env)
            return
        self._read, write = os.pipe()
        try:
            self.popen = subprocess.Popen(
                [*base, "--tasks", compact(tasks), "--report-fd", str(write), "--", *argv],
                stdin=subprocess.DEVNULL, env=env, pass_fds=(write,))
        finally:
            os.close(write)
        os.set_blocking(self._read, False)

    def outcomes(self, ended: bool, interrupted: bool = False) -> list[tuple[int, str]]:
        """(task, ``done``/``failed``/``busy``/``stopped``/``unstarted``) of the tasks that
        ended since the last call; once the process has ended (``ended``), of all the rest
        too. ``interrupted``: the sweep was stopped (Ctrl-C, a signal), so a task the
        stop ended is ``stopped``, not ``failed``."""
        if self._read is None:
            if not ended or self.reported:
                return []
            self.reported.add(self.tasks[0])
            rc = self.popen.returncode
            stopped = interrupted and self._status(self.tasks[0]) in _STOPPED
            return [(self.tasks[0], "done" if rc == 0 else "busy" if rc == IN_USE
                     else "stopped" if stopped else "failed")]
        out = []
        for index, how in self._lines():
            self.reported.add(index)
            out.append((index, "done" if how in (COMPLETE, SKIPPED) else
                        "busy" if how == BUSY else
                        "stopped" if how in _STOPPED or how == INTERRUPTED else "failed"))
        if ended:
            out += [(i, self._settled(i)) for i in self.tasks if i not in self.reported]
            self.reported.update(self.tasks)
        return out

    def _lines(self) -> list[tuple[int, str]]:
        while self._read is not None:
            try:
                chunk = os.read(self._read, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        out = []
        for line in lines:
            index, _, how = line.decode(errors="replace").partition(" ")
            if index.isdigit():
                out.append((int(index), how.strip()))
        return out

    def _status(self, index: int) -> object:
        try:
            return _fs.read_json_object(self.sweep.task(index).run_dir / layout.METADATA).get(
                "status")
        except (OSError, ValueError):
            return None

    def _settled(self, index: int) -> str:
        """How a task the pack did not report ended, from its run: not started (no run,
        or one older than the pack), complete, or not (stopped, or the pack died)."""
        try:
            meta = _fs.read_json_object(self.sweep.task(index).run_dir / layout.METADATA)
        except (OSError, ValueError):
            return "unstarted"
        start = meta.get("start_unix")
        if not isinstance(start, (int, float)) or start < self.started - 1:
            return "unstarted"
        status = meta.get("status")
        return "done" if status == COMPLETE else "stopped" if status in _STOPPED else "failed"

    def close(self) -> None:
        if self._read is not None:
            os.close(self._read)
            self._read = None


#: How a task that the sweep's stop ended reads (Ctrl-C: cancelled; SIGTERM/SIGHUP).
_STOPPED = frozenset({"cancelled", "terminated"})


class _Stopped(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _install(handlers: Mapping[int, Any]) -> dict[int, Any]:
    """Install signal handlers (main thread only); return the ones they replace."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
