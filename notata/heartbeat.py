"""The liveness thread and the resource figures it reports.

While a run is open the process's heartbeat thread (one for all its runs) calls the
run's beat function every ``interval`` seconds (default 30, or ``NOTATA_HEARTBEAT``).
The beat rewrites the run's metadata atomically with a counter, the time, and the
process's resources, so that a collector can tell a live run from a dead one by content
alone.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import psutil

from .errors import UsageError

logger = logging.getLogger("notata")

DEFAULT_INTERVAL = 30.0
#: Bounds of the interval: faster rewrites metadata.json in a loop; slower (or infinite)
#: makes a dead run on another host never stale.
MIN_INTERVAL, MAX_INTERVAL = 0.001, 86400.0
ENV_INTERVAL = "NOTATA_HEARTBEAT"


def interval_from(value: float | None) -> float:
    """The heartbeat interval: ``value``, else ``NOTATA_HEARTBEAT``, else 30 s."""
    if value is None:
        raw = os.environ.get(ENV_INTERVAL)
        if not raw:
            return DEFAULT_INTERVAL
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"{ENV_INTERVAL}={raw!r} is not a number of seconds") from None
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:  # NaN fails both
        raise UsageError(f"heartbeat interval must be positive seconds, between "
                         f"{MIN_INTERVAL} and {MAX_INTERVAL:.0f} (a day), got {value!r}")
    return float(value)


#: Children of this process that belong to no run (a function pack's fork server,
#: :mod:`notata._function`): their own children (a task's worker) do. Never signalled
#: as a command's, not counted as left by one, and not in a run's resource figures.
SPARED: set[int] = set()
#: Children of this process that belong to no run, with everything they start (what a
#: function's module started at import): as :data:`SPARED`, subtree and all.
FOREIGN: set[int] = set()


def descendants(root: psutil.Process, wrapper: bool = False) -> list[psutil.Process]:
    """``root``'s descendants that belong to a run: less :data:`SPARED` processes (not
    their children), :data:`FOREIGN` ones with theirs, and, for a ``wrapper`` of a command
    (``notata exec``), ``root``'s children in its own session with theirs
    (:func:`same_session`; a plain Logbook's children are its run's, whatever their
    session)."""
    out: list[psutil.Process] = []
    todo = [root]
    ours = same_session(root.pid) if wrapper else set()
    while todo:
        with contextlib.suppress(psutil.Error):
            for child in todo.pop().children():
                if child.pid in FOREIGN or child.pid in ours:
                    continue
                if child.pid not in SPARED:
                    out.append(child)
                todo.append(child)
    return out


def same_session(pid: int) -> set[int]:
    """Process ``pid``'s children in its own session, but :data:`SPARED`: never a run's.
    A command starts in a session of its own, and everything it starts stays in that
    session or makes one (a daemon): so a child in the wrapper's session is something
    else's, such as a process another thread of a notebook or test runner started while a
    task ran in it."""
    try:
        mine = os.getsid(pid)
    except OSError:
        return set()
    out = set()
    for child in children(pid) - SPARED:
        with contextlib.suppress(OSError):
            if os.getsid(child) == mine:
                out.add(child)
    return out


def children(pid: int) -> set[int]:
    """Process ``pid``'s children, from ``/proc/PID/task/*/children`` (empty where the
    kernel keeps no such lists)."""
    out: set[int] = set()
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children",
                                                     "rb") as f:
                out.update(int(c) for c in f.read().split())
    return out


def has_children(pid: int, besides: Collection[int] = ()) -> bool:
    """Whether process ``pid`` has a child (other than those ``besides``), from
    ``/proc/PID/task/*/children`` (one small read per thread; listing the descendants
    reads every process of the machine). True when the kernel does not keep those lists."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                if any(int(c) not in besides for c in f.read().split()):
                    return True
        except FileNotFoundError:
            if os.path.isdir(f"/proc/{pid}/task/{tid}"):
                return True  # the thread is there, its list is not: the kernel keeps none
            continue  # a thread that has just ended
        except OSError:
            return True
    return False


class Resources:
    """Memory and CPU of a process, optionally with all its descendants (psutil)."""

    def __init__(self, pid: int | None = None, tree: bool = False) -> None:
        self.process = psutil.Process(pid)
        self.tree = tree
        self._peak = 0
        #: The largest resident set (of the tree) a sample saw: this sampler's own figure.
        self.sampled_peak = 0
        self._last: tuple[float, float] | None = None
        #: CPU seconds of processes that ran for the run but were reaped by another process
        #: (a function task's worker, reaped by its fork server): added to the figure.
        self.elsewhere = 0.0
        # The CPU time spent before the run opened (a pack's earlier tasks, the commands
        # it reaped, the interpreter's start) is not the run's.
        self._before = 0.0
        self._before = self._cpu([self.process])

    def _cpu(self, procs: list[psutil.Process]) -> float:
        """CPU seconds of ``procs`` since this sampler began, with the children the root
        has reaped since then and :attr:`elsewhere`."""
        cpu = 0.0
        for i, p in enumerate(procs):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                cpu += t.user + t.system
                if i == 0:  # children already reaped by the root count too
                    cpu += t.children_user + t.children_system
        return max(0.0, cpu - self._before) + self.elsewhere

    def sample(self) -> dict[str, Any]:
        """``rss_bytes``, ``peak_rss_bytes``, ``cpu_time_sec``, ``cpu_percent``, ``pids``."""
        procs = [self.process]
        if self.tree and (has_children(self.process.pid, besides=SPARED | FOREIGN)
                          or any(has_children(s) for s in SPARED)):
            procs += descendants(self.process)
        rss = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                rss += p.memory_info().rss
        cpu = self._cpu(procs)
        self._peak = max(self._peak, rss)
        self.sampled_peak = max(self.sampled_peak, rss)
        if self.process.pid == os.getpid() and not self.tree:
            self._peak = max(self._peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        now = time.monotonic()
        percent = 0.0
        if self._last is not None and now > self._last[0]:
            percent = 100.0 * (cpu - self._last[1]) / (now - self._last[0])
        self._last = (now, cpu)
        return {
            "rss_bytes": rss,
            "peak_rss_bytes": self._peak,
            "cpu_time_sec": round(cpu, 3),
            "cpu_percent": round(max(percent, 0.0), 1),
            "pids": len(procs),
        }


class Heartbeat:
    """Calls ``beat()`` every ``interval`` seconds until :meth:`stop`, from the process's
    one heartbeat thread (:class:`_Beater`): a pack runs thousands of runs one after
    another, and a thread started and joined per run cost more than the run's writes."""

    def __init__(self, interval: float, beat: Callable[[], None]) -> None:
        self.interval = interval
        self._beat = beat
        self.stopped = False
        self._warned = False

    def start(self) -> None:
        _beater().add(self)

    def stop(self, wait: bool = True) -> None:
        """Stop beating; with ``wait``, return once a beat of this run under way is done."""
        _beater().remove(self, wait)

    def is_current(self) -> bool:
        """Whether the caller is this run's beat (which cannot wait for itself)."""
        return _beater().running(self)

    def beat_once(self) -> None:
        try:
            self._beat()
        except Exception as err:  # a full disk must not kill the run; say so once
            if not self._warned:
                logger.warning("notata heartbeat failed: %s", err)
                self._warned = True


class _Beater:
    """The process's heartbeat thread: beats each open run when it is due (a heap by due
    time). A beat that blocks (a hung filesystem) delays the other runs' beats too; runs
    open at once in one process are few. Started on the first run, a daemon."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Heartbeat]] = []
        self._current: Heartbeat | None = None
        self._thread: threading.Thread | None = None
        self._count = 0

    def add(self, hb: Heartbeat) -> None:
        with self._cond:
            self._count += 1
            heapq.heappush(self._due, (time.monotonic() + hb.interval, self._count, hb))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="notata-heartbeat",
                                                daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def remove(self, hb: Heartbeat, wait: bool) -> None:
        with self._cond:
            hb.stopped = True
            self._due = [d for d in self._due if d[2] is not hb]
            heapq.heapify(self._due)
            while wait and self._current is hb and threading.current_thread() is not self._thread:
                self._cond.wait()

    def quiesce(self) -> bool:
        """End the thread if no run is open here, and wait for it to be gone; whether the
        process is left without it (a process that forks needs no thread of its own)."""
        with self._cond:
            if self._due or self._current is not None:
                return False
            thread, self._thread = self._thread, None  # it sees it is not the one, and ends
            self._cond.notify_all()
        if thread is not None:
            thread.join()
        return True

    def running(self, hb: Heartbeat) -> bool:
        return threading.current_thread() is self._thread and self._current is hb

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._thread is not threading.current_thread():
                        return
                    now = time.monotonic()
                    if self._due and self._due[0][0] <= now:
                        _, _, hb = heapq.heappop(self._due)
                        self._current = hb
                        break
                    self._cond.wait(self._due[0][0] - now if self._due else None)
            try:
                hb.beat_once()
            finally:
                with self._cond:
                    self._current = None
                    if not hb.stopped:
                        self._count += 1
                        heapq.heappush(self._due, (time.monotonic() + hb.interval,
                                                   self._count, hb))
                    self._cond.notify_all()


_BEATER: _Beater | None = None
_BEATER_LOCK = threading.Lock()


def _forget_in_child() -> None:
    """A forked child has no heartbeat thread, and a lock another thread held at the fork
    would stay held in it: start from nothing."""
    global _BEATER, _BEATER_LOCK
    _BEATER, _BEATER_LOCK = None, threading.Lock()
    SPARED.clear()  # the parent's fork server is not the child's
    FOREIGN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def quiesce() -> bool:
    """End this process's heartbeat thread when no run is open in it (the next run starts
    another); whether it is gone. :mod:`notata._function` forks only without it."""
    with _BEATER_LOCK:
        beater = _BEATER if _BEATER is not None and _BEATER.pid == os.getpid() else None
    return beater.quiesce() if beater is not None else True


def _beater() -> _Beater:
    """The process's beater (a forked child gets its own: the parent's thread is not
    there)."""
    global _BEATER
    with _BEATER_LOCK:
        if _BEATER is None or _BEATER.pid != os.getpid():
            _BEATER = _Beater()
        return _BEATER
