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
from typing import Any, Protocol

from . import runinfo

logger = logging.getLogger("notata")

#: The signals that end a run, and the warning.
ENDING = (signal.SIGTERM, signal.SIGHUP)
WARNING = signal.SIGUSR1
ALL = (*ENDING, WARNING)

_previous: dict[int, Any] = {}  # the handler before ours, per signal we handle
_listeners: dict[int, list[RunSignals]] = {}  # the open runs each signal reaches
_pending: list[int] = []  # signals held back by a critical section, in order
_depth = 0  # critical sections open on the main thread
_unhook_later: set[int] = set()  # signals nobody listens to, whose handler goes back at the end
_draining = False  # the outermost critical section's end is delivering held signals
_stopping = False  # an ending signal is being handled: the process is on its way out


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def listen(log: RunSignals, signums: tuple[int, ...] = ALL) -> None:
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


def forget(log: RunSignals) -> None:
    """``log`` hears nothing more; the previous handlers come back once no run listens."""
    for signum in list(_listeners):
        _listeners[signum] = [x for x in _listeners[signum] if x is not log]
        if _listeners[signum]:
            continue
        del _listeners[signum]
        if _main_thread() and _depth:  # a signal held back meanwhile goes to the previous
            _unhook_later.add(signum)  # handler: ours stays until the section's end
        elif _main_thread():
            _unhook(signum)
        # elsewhere our dispatcher stays, with nobody to tell: it only calls the previous one


def _unhook(signum: int) -> None:
    """Put back the handler that was there before ours (unless someone replaced ours)."""
    if signum not in _previous:  # ours was put back by hand over ours: nothing to undo
        return
    previous = _previous.pop(signum)
    if signal.getsignal(signum) is _dispatch:  # else someone replaced ours: keep theirs
        signal.signal(signum, previous)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """On the main thread, a section a signal must not cut: the signal waits for its end.

    Otherwise a SIGTERM landing inside a metadata write or a terminal status write could
    exit the process before the status is on disk, or deadlock on the metadata lock the
    interrupted code holds. Signals run only on the main thread, so other threads need
    no tracking.
    """
    global _depth, _draining
    if not _main_thread():
        yield
        return
    pid = os.getpid()
    _depth += 1
    try:
        yield
    finally:
        if os.getpid() == pid:  # a child forked in the section starts afresh
            _depth -= 1
        if _depth == 0 and not _draining:  # the outermost end delivers, in order: a
            _draining = True  # signal's own writes (critical too) must not deliver the next
            try:
                while _pending:
                    _dispatch(_pending.pop(0), None)
            finally:
                _draining = False
                while _unhook_later:
                    signum = _unhook_later.pop()
                    if not _listeners.get(signum):
                        _unhook(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """On the main thread: SIGTERM, SIGHUP and SIGUSR1 arriving in the block wait for its
    end, then reach the runs open by then (a run opened in the block hears them), or the
    handler there was before. ``notata exec`` opens a run in such a block: a SIGTERM
    there is recorded once the run is open, rather than ending the process between the
    run's folder and its first record. (Blocking the signals would not do: a library's
    native threads, OpenBLAS's say, take the signal for the process.)"""
    if not _main_thread():
        yield
        return
    installed = []
    for signum in ALL:
        current = signal.getsignal(signum)
        if current is not _dispatch and current is not signal.SIG_IGN:
            _previous[signum] = current
            signal.signal(signum, _dispatch)
            installed.append(signum)
    try:
        with critical():
            yield
    finally:
        for signum in installed:  # ours again, unless a run now listens
            if not _listeners.get(signum) and signum in _previous \
                    and signal.getsignal(signum) is _dispatch:
                signal.signal(signum, _previous.pop(signum))


def _dispatch(signum: int, frame: FrameType | None) -> None:
    """The process's handler of SIGTERM, SIGHUP and SIGUSR1 (see the module docstring)."""
    global _stopping
    if _depth:
        _pending.append(signum)  # finish the interrupted write first; keep the order
        return
    previous = _previous.get(signum, signal.SIG_DFL)
    runs = list(reversed(_listeners.get(signum, ())))
    if signum == WARNING:
        for log in runs:  # one run that cannot record (moved aside) must not stop the others
            try:
                log.warned()
            except Exception as err:
                logger.warning("notata: %s: %s", signal.Signals(signum).name, err)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL and not runs and not _stopping:  # held back for
            signal.signal(signum, signal.SIG_DFL)  # nobody: as Python would have done
            signal.raise_signal(signum)  # (not while a SIGTERM's exit is under way)
        return
    if _stopping:  # a second SIGTERM/SIGHUP: the first one's stop is under way
        if callable(previous):
            previous(signum, frame)
        return
    _stopping = True
    for log in runs:  # one run that cannot record (moved aside) must not stop the others
        try:
            log.terminated(signum)
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
    global _depth, _stopping, _draining
    _draining = False
    _listeners.clear()
    _pending.clear()
    _unhook_later.clear()
    _depth, _stopping = 0, False
    if _main_thread():
        for signum, previous in _previous.items():
            with contextlib.suppress(ValueError, TypeError):
                if signal.getsignal(signum) is _dispatch:
                    signal.signal(signum, previous)
    _previous.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)


class Recorder(Protocol):
    """What a run records when a signal reaches it (the owned and attached runs of
    :mod:`notata._run` and :mod:`notata._attach`)."""

    def warned(self) -> bool:
        """Record SIGUSR1; whether the run's warning hooks are to be called."""

    def ended(self, signum: int) -> bool:
        """Record SIGTERM or SIGHUP; whether the run's terminate hooks are to be called."""


class RunSignals:
    """One run's part in the dispatcher: it records the signal through its run, then calls
    the user's hooks with ``owner`` (the Logbook)."""

    def __init__(self, owner: Any, record: Recorder, on_warning: Any = None) -> None:
        self.owner = owner
        self.record = record
        self.warning_hooks: list[Any] = [on_warning] if on_warning else []
        self.terminate_hooks: list[Any] = []

    def warned(self) -> None:
        if self.record.warned():
            for hook in list(self.warning_hooks):
                hook(self.owner)

    def terminated(self, signum: int) -> None:
        if self.record.ended(signum):
            for hook in list(self.terminate_hooks):
                hook(self.owner, signum)


def record(name: str) -> dict[str, Any]:
    """The entry a signal gets in a run's ``signals`` metadata."""
    now = time.time()
    return {"signal": name, "unix": round(now, 3), "time": runinfo.now_iso(now)}
