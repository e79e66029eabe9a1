"""The liveness thread and the resource figures it reports.

While a run is open a daemon thread calls a beat function every ``interval``
seconds (default 30, or ``NOTATA_HEARTBEAT``). The beat rewrites the run's
metadata atomically with a counter, the time, and the process's resources, so
that a collector can tell a live run from a dead one by content alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time
from collections.abc import Callable
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


def has_children(pid: int) -> bool:
    """Whether process ``pid`` has a child, from ``/proc/PID/task/*/children`` (one small
    read per thread; listing the descendants reads every process of the machine). True
    when the kernel does not keep those lists."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                if f.read().strip():
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

    def sample(self) -> dict[str, Any]:
        """``rss_bytes``, ``peak_rss_bytes``, ``cpu_time_sec``, ``cpu_percent``, ``pids``."""
        procs = [self.process]
        if self.tree and has_children(self.process.pid):
            with contextlib.suppress(psutil.Error):
                procs += self.process.children(recursive=True)
        rss = 0
        cpu = 0.0
        for i, p in enumerate(procs):
            try:
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu += t.user + t.system
                    if i == 0:  # children already reaped by the root count too
                        cpu += t.children_user + t.children_system
            except psutil.Error:
                continue
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
    """A daemon thread calling ``beat()`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, interval: float, beat: Callable[[], None]) -> None:
        self.interval = interval
        self._beat = beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notata-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """Stop beating; with ``wait``, return once the thread has finished its last beat."""
        self._stop.set()
        if wait and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def is_current(self) -> bool:
        """Whether the caller is the heartbeat thread itself (which cannot wait for itself)."""
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self.interval):
            try:
                self._beat()
            except Exception as err:  # a full disk must not kill the run; say so once
                if not warned:
                    logger.warning("notata heartbeat failed: %s", err)
                    warned = True
