"""Packs: several tasks of a sweep run one after another by one process (``notata submit
--pack N``: one array task per N tasks; ``notata exec MANIFEST --tasks 3,7,10-12`` by hand).

Every task of a pack is still its own run: :func:`notata.runner.exec_task` opens its
Logbook (lock, heartbeat, attempt history, index record) and runs the command, and the run
records where it ran (``task_from: pack``, ``pack: {position, size}``, the array task
it ran as). What the pack adds:

- **The time-limit warning** (SIGUSR1) stops the pack from starting another task; the
  task running goes on (it was warned) until it ends or SLURM's SIGTERM ends it as
  ``timeout``. Tasks never started are left untouched: no run directory, or the one
  their last attempt left.
- **SIGTERM or SIGHUP** records the running task as a lone task records it (``timeout``,
  ``cancelled``, ``preempted``...), stops its command, and ends the pack. Between tasks,
  it ends the pack at once.
- **What the queue holds.** While the array task is queued or running it holds every
  task of its pack it has not yet run: they read ``pending`` and no resubmit or retry
  takes them. One it has run to ``complete``, ``failed`` or ``oom`` (:data:`MOVED_ON`)
  it has let go: a resubmit may take it while the pack goes on.
- **A requeued array task** (preemption, a node lost) runs its pack again from the
  start, skipping what it has let go (a run whose last attempt it ran and that reads
  :data:`MOVED_ON`), and running again what a signal ended.

Isolation: each task's command is its own process group, as under ``notata exec``; a
command that crashes, leaks or is killed ends only its own run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from . import _fs, layout, scheduler, schema
from .manifest import Sweep, compact
from .runner import IN_USE, exec_task

#: The statuses with which a pack goes on to its next task and never comes back to this
#: one (a signal's statuses end the pack, and a requeued pack runs that task again).
MOVED_ON = frozenset({schema.COMPLETE, schema.FAILED, schema.OOM})


def exec_pack(sweep: Sweep, indices: Sequence[int], argv: Sequence[str], *,
              heartbeat: float | None = None, report: int | None = None) -> int:
    """Run ``argv`` as each task of ``indices`` in turn, each its own run (see the module
    docstring). Returns 0 when every task completed (or was complete), 1 when one did
    not, 130 on Ctrl-C, 128+N when signal N ended the pack. ``report``: a file
    descriptor that gets a line ``INDEX STATUS`` as each task ends (the local backend
    reads it)."""
    me = _job_key()
    failed: list[int] = []
    position = 0
    with _listening() as warned:
        try:
            for position, index in enumerate(indices):
                if warned:
                    print(f"notata: the time limit is near: tasks "
                          f"{compact(indices[position:])} of this pack are left unstarted",
                          file=sys.stderr, flush=True)
                    break
                if me is not None and _let_go(sweep, index, me):
                    continue
                rc = exec_task(sweep, index, argv, heartbeat=heartbeat,
                               pack=(position, len(indices)))
                if report is not None:
                    os.write(report, f"{index} {rc}\n".encode())
                if rc == 130:  # Ctrl-C, by hand: the task is recorded cancelled
                    return rc
                if rc not in (0, IN_USE):
                    failed.append(index)
        except SystemExit as stop:  # SIGTERM or SIGHUP: the running task is recorded
            left = indices[position + 1:]
            name = signal.Signals(int(stop.code or 0) - 128).name \
                if isinstance(stop.code, int) and stop.code > 128 else "a signal"
            if left:
                print(f"notata: {name} ended this pack: tasks {compact(left)} left "
                      "unstarted", file=sys.stderr, flush=True)
            raise
    return 1 if failed else 0


def _job_key() -> str | None:
    """The key of the array task this process runs in (``"123_4"``), if any."""
    found = scheduler.current(os.environ)
    return found[0].job_key(found[1]) if found is not None else None


def _let_go(sweep: Sweep, index: int, me: str) -> bool:
    """Whether this array task ran ``index`` already and let it go (it was requeued)."""
    try:
        meta = _fs.read_json_object(sweep.task(index).run_dir / layout.METADATA)
    except (OSError, ValueError):
        return False
    job = scheduler.job_of(meta)
    return (meta.get("status") in MOVED_ON and job is not None
            and job[0].job_key(job[1]) == me)


@contextlib.contextmanager
def _listening() -> Iterator[list[bool]]:
    """While the pack runs: SIGUSR1 sets the flag it yields (a list, true once warned);
    SIGTERM and SIGHUP end the pack (SystemExit 128+N). A run that is open hears them
    first (:mod:`notata._signals` calls these after recording)."""
    warned: list[bool] = []

    def warn(signum: int, frame: Any) -> None:
        warned[:] = [True]

    def end(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield warned
        return
    wanted = {signal.SIGUSR1: warn, signal.SIGTERM: end, signal.SIGHUP: end}
    before = {s: signal.signal(s, h) for s, h in wanted.items()
              if signal.getsignal(s) is not signal.SIG_IGN}  # nohup's SIGHUP stays ignored
    try:
        yield warned
    finally:
        for s, h in before.items():  # a warning repeated as the pack ends is taken too
            signal.signal(s, signal.SIG_IGN if s == signal.SIGUSR1 and warned else h)
