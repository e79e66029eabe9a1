"""Signals for a Logbook: SIGTERM and SIGHUP end a run with a recorded status, SIGUSR1 warns.

Python runs signal handlers in the main thread, between bytecodes, so a handler may
land inside the Logbook's own metadata write. :meth:`SignalsMixin._critical` marks
such sections: a signal arriving there waits until the section ends.

Order on SIGTERM or SIGHUP: the terminal status is written (fsynced) first, so that
the SIGKILL a scheduler sends after its grace time cannot lose it; then the
``on_terminate`` hooks run (``notata exec`` stops its command there and waits for
it); then the previous handler is called, or SystemExit(128+N) raised. The run lock is
released only when the run is finally closed (``__exit__``, or at interpreter exit),
after the user's ``finally`` blocks: until then no next attempt can start beside
code that is still writing. A second SIGTERM or SIGHUP while this goes on is ignored,
so it cannot cut the stop short and orphan the command.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import runinfo, schema

if TYPE_CHECKING:
    from .logbook import Logbook
    from .runinfo import SchedulerProvider

#: The signals that end a run, and the warning.
ENDING = (signal.SIGTERM, signal.SIGHUP)
WARNING = signal.SIGUSR1


class SignalsMixin:
    """Signal handling of :class:`~notata.Logbook`, which provides the state used here."""

    _warning_hooks: list[Callable[[Logbook], Any]]
    _terminate_hooks: list[Callable[[Logbook, int], Any]]
    _previous_handlers: dict[int, Any]
    _critical_depth: int
    _pending_signal: int | None
    _stopping: bool
    _closed: bool
    attached: bool
    _meta: dict[str, Any]
    _meta_lock: threading.Lock
    _scheduler: SchedulerProvider | None

    def warning(self, msg: str) -> None:
        raise NotImplementedError

    def _set(self, **fields: Any) -> None:
        raise NotImplementedError

    def _end(self, status: str, reason: str | None) -> bool:
        raise NotImplementedError

    @contextlib.contextmanager
    def _critical(self) -> Iterator[None]:
        """On the main thread, a section a signal must not cut: the signal waits for its end.

        Otherwise a SIGTERM landing inside a metadata write or a terminal status
        write could exit the process before the status is on disk, or deadlock on
        the metadata lock the interrupted code holds. Signals run only on the main
        thread, so other threads need no tracking.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._critical_depth += 1
        try:
            yield
        finally:
            self._critical_depth -= 1
            if self._critical_depth == 0 and self._pending_signal is not None:
                signum, self._pending_signal = self._pending_signal, None
                self._on_signal(signum, None)

    def _take_pending_signal(self) -> int | None:
        """The signal a critical section held back, now forgotten (an open that failed)."""
        signum, self._pending_signal = self._pending_signal, None
        return signum

    def holding_signals(self) -> contextlib.AbstractContextManager[None]:
        """A block that SIGTERM, SIGHUP and SIGUSR1 wait for (main thread): e.g. starting a
        command and registering the hook that stops it."""
        return self._critical()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the metadata lock inside a critical section."""
        with self._critical(), self._meta_lock:
            yield

    def on_warning(self, hook: Callable[[Logbook], Any]) -> Callable[[Logbook], Any]:
        """Call ``hook(log)`` on SIGUSR1 (``sbatch --signal=B:USR1@secs``): checkpoint now."""
        self._warning_hooks.append(hook)
        return hook

    def on_terminate(self, hook: Callable[[Logbook, int], Any]) -> Callable[[Logbook, int], Any]:
        """Call ``hook(log, signum)`` after a SIGTERM's or SIGHUP's status is on disk, before
        the exit, with the run lock still held."""
        self._terminate_hooks.append(hook)
        return hook

    def _install_signals(self, *signums: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in signums or (*ENDING, WARNING):
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue  # the user chose to ignore it (nohup, say); so do we
            self._previous_handlers[signum] = previous
            signal.signal(signum, self._on_signal)

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1: record it and call the warning hooks. SIGTERM, SIGHUP: record why, stop.

        The cause of a SIGTERM is told apart as: ``timeout`` when SIGUSR1 (the
        time-limit warning) came first or the scheduler says the time is up;
        ``cancelled`` / ``preempted`` as the scheduler reports the job; else
        ``terminated``. SIGHUP (a closed terminal or ssh connection) is
        ``terminated``, reason "hangup". After recording and the ``on_terminate``
        hooks, the handler that was installed before is called; if that was the
        default, the process exits with 128+signum.
        """
        if self._critical_depth:
            self._pending_signal = signum  # finish the interrupted write first
            return
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        if signum == WARNING:
            if not self._closed:
                self._warn()
            if callable(previous):
                previous(signum, frame)
            return
        if self._stopping:  # a second SIGTERM/SIGHUP: the first one's stop is under way
            if callable(previous):
                previous(signum, frame)
            return
        self._stopping = True
        if not self.attached and not self._closed:  # the wrapper records an attached run
            now = time.time()
            name = signal.Signals(signum).name
            self._meta["signals"] = [*self._meta.get("signals", []), _signal_record(name, now)]
            if signum == signal.SIGHUP:
                status, why = schema.TERMINATED, "hangup: the terminal or connection closed"
            else:
                status = self._termination_status(now)
                why = status
            self._end(status, f"{name} received ({why})")
            for hook in list(self._terminate_hooks):
                hook(self, signum)  # type: ignore[arg-type]
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    def _warn(self) -> None:
        if not self.attached:  # the wrapper records signals; only the hooks run here
            now = time.time()
            self.warning("SIGUSR1 received: the time limit is near")
            self._set(signals=[*self._meta.get("signals", []), _signal_record("SIGUSR1", now)])
        for hook in list(self._warning_hooks):
            hook(self)  # type: ignore[arg-type]

    def _termination_status(self, now: float) -> str:
        if any(s["signal"] == "SIGUSR1" for s in self._meta.get("signals", [])):
            return schema.TIMEOUT
        if self._scheduler is not None:
            ctx = self._meta.get(self._scheduler.name, {})
            try:
                status = self._scheduler.termination_status(ctx, now)
            except Exception:  # the scheduler cannot be asked: say what we know
                status = None
            if status in schema.SIGNAL_STATUSES:
                return status
        return schema.TERMINATED


def _signal_record(name: str, now: float) -> dict[str, Any]:
    return {"signal": name, "unix": round(now, 3), "time": runinfo.now_iso(now)}
