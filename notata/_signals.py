"""Signals for Logbooks: SIGTERM and SIGHUP end the open runs with a recorded status,
SIGUSR1 warns them.

One handler per signal for the whole process (:func:`_dispatch`), installed when the
first Logbook opens and put back when the last one closes: runs whose lives overlap in
any order never lose the handler that was there before them (a user's, submitit's),
which is called after notata's work, or the process exits with 128+N if it was the
default.

Python runs handlers in the main thread, between bytecodes, so one may land inside a
Logbook's own metadata write. :func:`critical` marks such sections: signals arriving
there queue up, in order, until the last section ends.

Signals that reach the process in the same instant are handled in the order CPython runs
pending handlers, by signal number (SIGHUP, then SIGUSR1, then SIGTERM); later ones in
the order they arrive.

Order on SIGTERM or SIGHUP, for each open run (the newest first): the terminal status is
written (fsynced) first, so that the SIGKILL a scheduler sends after its grace time
cannot lose it; then the run's ``on_terminate`` hooks run (``notata exec`` stops its
command there and waits for it). Then the previous handler, or SystemExit. The run lock
is released only when a run is finally closed (``__exit__``, or at interpreter exit),
after the user's ``finally`` blocks: until then no next attempt can start beside code
that is still writing. A second SIGTERM or SIGHUP while this goes on is ignored, so it
cannot cut the stop short and orphan a command.

A forked child inherits the handler and the parent's open runs, which are not its own:
it forgets them (``os.register_at_fork``) and records nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import runinfo, schema

logger = logging.getLogger("notata")

if TYPE_CHECKING:
    from .logbook import Logbook

#: The signals that end a run, and the warning.
ENDING = (signal.SIGTERM, signal.SIGHUP)
WARNING = signal.SIGUSR1
ALL = (*ENDING, WARNING)

_previous: dict[int, Any] = {}  # the handler before ours, per signal we handle
_listeners: dict[int, list[Logbook]] = {}  # the open runs each signal reaches
_pending: list[int] = []  # signals held back by a critical section, in order
_depth = 0  # critical sections open on the main thread
_stopping = False  # an ending signal is being handled: the process is on its way out


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def listen(log: Logbook, signums: tuple[int, ...] = ALL) -> None:
    """Let ``log`` hear ``signums`` (main thread only; a signal the user set to SIG_IGN,
    as ``nohup`` does for SIGHUP, stays ignored). A handler someone installed over ours
    while other runs were open is kept as the one to call after ours."""
    global _stopping
    if not _main_thread():
        return
    _stopping = False  # a run opening: the process carried on after any earlier stop
    for signum in signums:
        current = signal.getsignal(signum)
        if current is not _dispatch:
            if current is signal.SIG_IGN:
                continue
            _previous[signum] = current
            signal.signal(signum, _dispatch)
        _listeners.setdefault(signum, []).append(log)


def forget(log: Logbook) -> None:
    """``log`` hears nothing more; the previous handlers come back once no run listens."""
    for signum in list(_listeners):
        _listeners[signum] = [x for x in _listeners[signum] if x is not log]
        if _listeners[signum]:
            continue
        del _listeners[signum]
        if _main_thread():
            previous = _previous.pop(signum)
            if signal.getsignal(signum) is _dispatch:  # else someone replaced ours: keep theirs
                signal.signal(signum, previous)
        # elsewhere our dispatcher stays, with nobody to tell: it only calls the previous one


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """On the main thread, a section a signal must not cut: the signal waits for its end.

    Otherwise a SIGTERM landing inside a metadata write or a terminal status write could
    exit the process before the status is on disk, or deadlock on the metadata lock the
    interrupted code holds. Signals run only on the main thread, so other threads need
    no tracking.
    """
    global _depth
    if not _main_thread():
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        while _depth == 0 and _pending:
            _dispatch(_pending.pop(0), None)


def _dispatch(signum: int, frame: FrameType | None) -> None:
    """The process's handler of SIGTERM, SIGHUP and SIGUSR1 (see the module docstring)."""
    global _stopping
    if _depth:
        _pending.append(signum)  # finish the interrupted write first; keep the order
        return
    previous = _previous.get(signum, signal.SIG_DFL)
    runs = list(reversed(_listeners.get(signum, ())))
    if signum == WARNING:
        for log in runs:
            log._warned()
        if callable(previous):
            previous(signum, frame)
        return
    if _stopping:  # a second SIGTERM/SIGHUP: the first one's stop is under way
        if callable(previous):
            previous(signum, frame)
        return
    _stopping = True
    for log in runs:  # one run that cannot record (moved aside) must not stop the others
        try:
            log._terminated(signum)
        except Exception as err:
            logger.warning("notata: %s: %s", signal.Signals(signum).name, err)
    if callable(previous):
        try:
            previous(signum, frame)
        except BaseException:
            raise  # the previous handler ends the process: stay stopping
        _stopping = False  # it chose to carry on
    elif previous == signal.SIG_DFL:
        raise SystemExit(128 + signum)
    else:
        _stopping = False


def _forget_all_in_child() -> None:
    """After fork: the parent's runs and handlers are not the child's."""
    global _depth, _stopping
    _listeners.clear()
    _pending.clear()
    _depth, _stopping = 0, False
    if _main_thread():
        for signum, previous in _previous.items():
            with contextlib.suppress(ValueError, TypeError):
                if signal.getsignal(signum) is _dispatch:
                    signal.signal(signum, previous)
    _previous.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)


class SignalsMixin:
    """What one :class:`~notata.Logbook` does when a signal reaches it."""

    _warning_hooks: list[Any]
    _terminate_hooks: list[Any]
    _closed: bool
    attached: bool
    _meta: dict[str, Any]
    _meta_lock: threading.Lock
    _scheduler: Any

    def warning(self, msg: str) -> None:
        raise NotImplementedError

    def _set(self, **fields: Any) -> None:
        raise NotImplementedError

    def _end(self, status: str, reason: str | None) -> bool:
        raise NotImplementedError

    def on_warning(self, hook: Any) -> Any:
        """Call ``hook(log)`` on SIGUSR1 (``sbatch --signal=B:USR1@secs``): checkpoint now."""
        self._warning_hooks.append(hook)
        return hook

    def on_terminate(self, hook: Any) -> Any:
        """Call ``hook(log, signum)`` after a SIGTERM's or SIGHUP's status is on disk, before
        the exit, with the run lock still held (also in a command attached under
        ``notata exec``, whose wrapper records the status)."""
        self._terminate_hooks.append(hook)
        return hook

    def holding_signals(self) -> contextlib.AbstractContextManager[None]:
        """A block that SIGTERM, SIGHUP and SIGUSR1 wait for (main thread): e.g. starting a
        command and registering the hook that stops it."""
        return critical()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the metadata lock inside a critical section."""
        with critical(), self._meta_lock:
            yield

    def _warned(self) -> None:
        """SIGUSR1: record it (the wrapper does, for an attached run) and call the hooks."""
        if self._closed:
            return
        if not self.attached:
            self.warning("SIGUSR1 received: the time limit is near")
            self._set(signals=[*self._meta.get("signals", []), _record("SIGUSR1")])
        for hook in list(self._warning_hooks):
            hook(self)

    def _terminated(self, signum: int) -> None:
        """SIGTERM or SIGHUP: record why (not for an attached run), then the hooks.

        The cause of a SIGTERM is told apart as: ``timeout`` when SIGUSR1 (the time-limit
        warning) came first or the scheduler says the time is up; ``cancelled`` /
        ``preempted`` as the scheduler reports the job; else ``terminated``. SIGHUP (a
        closed terminal or ssh connection) is ``terminated``, reason "hangup".
        """
        if self._closed and not self.attached:
            return
        if not self.attached:
            name = signal.Signals(signum).name
            self._meta["signals"] = [*self._meta.get("signals", []), _record(name)]
            if signum == signal.SIGHUP:
                status, why = schema.TERMINATED, "hangup: the terminal or connection closed"
            else:
                status = why = self._termination_status(time.time())
            self._end(status, f"{name} received ({why})")
        for hook in list(self._terminate_hooks):
            hook(self, signum)

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
                return str(status)
        return schema.TERMINATED


def _record(name: str) -> dict[str, Any]:
    now = time.time()
    return {"signal": name, "unix": round(now, 3), "time": runinfo.now_iso(now)}
