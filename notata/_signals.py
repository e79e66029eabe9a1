"""Signals for a Logbook: SIGTERM ends the run with a recorded status, SIGUSR1 warns.

Python runs signal handlers in the main thread, between bytecodes, so a handler may
land inside the Logbook's own metadata write. :meth:`SignalsMixin._critical` marks
such sections: a signal arriving there waits until the section ends.
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


class SignalsMixin:
    """Signal handling of :class:`~notata.Logbook`, which provides the state used here."""

    _warning_hooks: list[Callable[[Logbook], Any]]
    _terminate_hooks: list[Callable[[Logbook, int], Any]]
    _previous_handlers: dict[int, Any]
    _critical_depth: int
    _pending_signal: int | None
    _closed: bool
    attached: bool
    _meta: dict[str, Any]
    _meta_lock: threading.Lock
    _scheduler: SchedulerProvider | None

    def warning(self, msg: str) -> None:
        raise NotImplementedError

    def _set(self, **fields: Any) -> None:
        raise NotImplementedError

    def _finish(self, status: str, reason: str | None) -> None:
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
        """Call ``hook(log, signum)`` after a SIGTERM's status is on disk, before the exit."""
        self._terminate_hooks.append(hook)
        return hook

    def _install_signals(self, *signums: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        for signum in signums or (signal.SIGTERM, signal.SIGUSR1):
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue  # the user chose to ignore it; so do we
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
        """SIGUSR1: record it and call the warning hooks. SIGTERM: record why, flush, exit.

        The cause of a SIGTERM is told apart as: ``timeout`` when SIGUSR1 (the
        time-limit warning) came first or the scheduler says the time is up;
        ``cancelled`` / ``preempted`` as the scheduler reports the job; else
        ``terminated``. After recording, the handler that was installed before
        is called; if that was the default, the process exits with 128+signum.
        """
        if self._critical_depth:
            self._pending_signal = signum  # finish the interrupted write first
            return
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        now = time.time()
        name = signal.Signals(signum).name
        if self.attached:  # the wrapper records signals; only the hooks run here
            if not self._closed:
                for hook in list(self._warning_hooks):
                    hook(self)  # type: ignore[arg-type]
        elif not self._closed:
            signals = [*self._meta.get("signals", []),
                       {"signal": name, "unix": round(now, 3), "time": runinfo.now_iso(now)}]
            if signum == signal.SIGUSR1:
                self.warning("SIGUSR1 received: the time limit is near")
                self._set(signals=signals)
                for hook in list(self._warning_hooks):
                    hook(self)  # type: ignore[arg-type]
            else:
                status = self._termination_status(now)
                self._meta["signals"] = signals
                self._finish(status, f"{name} received ({status})")
                for terminate_hook in list(self._terminate_hooks):
                    terminate_hook(self, signum)  # type: ignore[arg-type]
        if signum == signal.SIGUSR1:
            if callable(previous):
                previous(signum, frame)
            return
        self._restore_signals()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(128 + signum)

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


