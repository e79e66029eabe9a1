"""Packs: several tasks of a sweep run one after another by one process (``notata submit
--pack N``: one array task per N tasks; ``notata exec MANIFEST --tasks 3,7,10-12`` by hand).

Every task of a pack is still its own run: :func:`notata.runner.run_task` opens its
Logbook (lock, heartbeat, attempt history, index record) and runs the command, and the run
records where it ran (``task_from: pack``, ``pack: {position, size}``, the array task
it ran as). What the pack adds:

- **A task that fails** (an exit status, an exception, ``os._exit``, a SIGKILL of its
  command) is recorded, and the pack goes on: each command is its own process group.
- **The time-limit warning** (SIGUSR1) stops the pack from starting another task; the
  task running goes on (it was warned) until it ends or SLURM's SIGTERM ends it as
  ``timeout``. Tasks never started are left untouched: no run directory, or the one
  their last attempt left.
- **SIGTERM or SIGHUP** records the running task as a lone task records it (``timeout``,
  ``cancelled``, ``preempted``...), stops its command, and ends the pack. Between tasks,
  it ends the pack at once; while a task's run opens, it waits until the run is open.
- **What the queue holds.** While the array task is queued or running it holds every
  task of its pack it has not yet run: they read ``pending`` and no resubmit or retry
  takes them. A task it has ended without a signal (complete, failed, oom, or marked by
  its command) it has let go (:func:`let_go`): a resubmit may take it while the pack
  goes on.
- **A requeued array task** (preemption, a node lost) runs its pack again from the
  start, skipping what it has let go in an earlier life, and running again what a
  signal ended.
- **Tasks left unstarted** by a warning or a signal are recorded in the sweep's
  submissions record, so that the retry shepherd does not count that submission as one
  of their attempts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from . import _fs, index, layout, scheduler, schema, submissions
from .errors import NotataError, UsageError
from .manifest import Sweep, compact
from .runner import BUSY, IN_USE, INTERRUPTED, SKIPPED, Ended, run_task

#: The largest pack: its tasks are listed in one job script and sliced by position.
MAX_PACK = 1_000_000
_ENDING_NAMES = frozenset({"SIGTERM", "SIGHUP"})


def check_size(value: Any) -> int:
    """A pack size as given (``--pack``, ``pack=``, a recorded submission's): a whole
    number from 1 to :data:`MAX_PACK`, else :class:`~notata.errors.UsageError`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PACK:
        raise UsageError(f"pack {value!r}: give a number of tasks per array task, from 1 "
                         f"to {MAX_PACK:,}")
    return value


def let_go(attempt: Mapping[str, Any]) -> bool:
    """Whether a pack that ran this attempt (a run's metadata, or an entry of its
    ``attempts``) is done with the task for good: it ended without a signal ending it."""
    signals = attempt.get("signals") or []
    return attempt.get("status") in schema.TERMINAL_STATUSES and not any(
        isinstance(s, Mapping) and s.get("signal") in _ENDING_NAMES for s in signals)


#: How many complete runs a ``--pack-time`` estimate reads, spread over the sweep.
SAMPLE = 200


def size_for(sweep: Sweep, pack_time: float, task_time: float | None) -> tuple[int, str]:
    """The pack size that fills ``pack_time`` seconds, and how it was found: from the
    runtimes of the sweep's complete runs (their 90th percentile, from up to
    :data:`SAMPLE` of them), else from ``task_time``. A
    :class:`~notata.errors.UsageError` when neither is there, or one task takes longer
    than ``pack_time``."""
    done = index.complete_tasks(sweep.base_dir, sweep.hash, len(sweep))
    runtimes: list[float] = []
    if done is not None and len(done):
        step = max(1, len(done) // SAMPLE)
        for i in done["task"][::step][:SAMPLE].tolist():
            with contextlib.suppress(OSError, ValueError):
                sec = _fs.read_json_object(sweep.task(int(i)).run_dir / layout.METADATA).get(
                    "runtime_sec")
                if isinstance(sec, (int, float)) and sec >= 0:
                    runtimes.append(float(sec))
    if runtimes:
        runtimes.sort()
        each = runtimes[min(len(runtimes) - 1, int(0.9 * len(runtimes)))]
        how = f"the 90th percentile of {len(runtimes)} complete runs' runtimes, {each:.3g} s"
    elif task_time is not None:
        each, how = task_time, f"--task-time {task_time:g} s"
    else:
        raise UsageError("--pack-time: no run of this sweep is complete yet, so its tasks' "
                         "runtime is not known: give --task-time too (e.g. --task-time 20s)")
    if each > pack_time:
        raise UsageError(f"--pack-time {pack_time:g} s is shorter than one task ({how})")
    return check_size(max(1, min(MAX_PACK, int(pack_time // max(each, 1e-3))))), how


def let_go_by(meta: Mapping[str, Any], key: Callable[[Mapping[str, Any]], str | None]
              ) -> set[str]:
    """The job keys (``key(attempt)``) of the packs that ran an attempt of this run and let
    it go (:func:`let_go`): none of them holds the task any more."""
    out = set()
    for attempt in [*(meta.get("attempts") or []), meta]:
        if isinstance(attempt, Mapping) and "pack" in attempt and let_go(attempt):
            k = key(attempt)
            if k is not None:
                out.add(k)
    return out


def exec_pack(sweep: Sweep, indices: Sequence[int], argv: Sequence[str], *,
              heartbeat: float | None = None, report: int | None = None,
              element: bool = False) -> int:
    """Run ``argv`` as each task of ``indices`` in turn, each its own run (see the module
    docstring). Returns 0 when every task completed (or was complete), 1 when one did
    not, :data:`~notata.runner.IN_USE` when one was held by another process and none
    failed, 130 on Ctrl-C; SIGTERM or SIGHUP end it with SystemExit(128+N). ``report``:
    a file descriptor that gets a line ``INDEX HOW`` as each task ends (``HOW``: the
    run's status, or ``skipped``, ``busy``, ``interrupted``, ``error``; the local
    backend reads it). ``element``: the tasks are an array task's pack (``NOTATA_PACK``),
    which, requeued, skips what it let go, and records what it leaves unstarted.
    """
    me = _job_key() if element else None
    failed: list[int] = []
    busy: list[int] = []
    said: list[bool] = []
    nxt = 0  # the position of the first task not yet begun

    def leave(why: str) -> None:
        if not said:
            said.append(True)
            _left(sweep, indices[nxt:], me, why)

    with _listening() as warned:
        try:
            for position, index in enumerate(indices):
                if warned:
                    leave("the time limit is near")
                    break
                if me is not None and _ran_here(sweep, index, me):
                    nxt = position + 1
                    continue
                nxt = position + 1  # from here on, the task counts as begun
                try:
                    ended = run_task(sweep, index, argv, heartbeat=heartbeat,
                                     pack=(position, len(indices)),
                                     warned=lambda: bool(warned))
                except (NotataError, OSError) as err:  # this run cannot be opened
                    print(f"notata: task {index}: {err}", file=sys.stderr, flush=True)
                    ended = Ended(1, _ERROR)
                if report is not None:
                    with contextlib.suppress(OSError):  # the reader is gone: go on
                        os.write(report, f"{index} {ended.how}\n".encode())
                if ended.how == INTERRUPTED:
                    leave("Ctrl-C")
                    return 130
                if ended.how == BUSY:
                    busy.append(index)
                elif ended.how not in (schema.COMPLETE, SKIPPED):
                    failed.append(index)
        except SystemExit as stop:  # SIGTERM or SIGHUP: the running task is recorded
            code = stop.code if isinstance(stop.code, int) else 0
            leave(f"{signal.Signals(code - 128).name if code > 128 else 'a signal'} "
                  "ended this pack")
            raise
    return 1 if failed else IN_USE if busy else 0


_ERROR = "error"


def _left(sweep: Sweep, tasks: Sequence[int], me: str | None, why: str) -> None:
    """Say which tasks the pack leaves unstarted; in an array task, record them (a retry
    does not count this submission as one of their attempts)."""
    if not tasks:
        return
    print(f"notata: {why}: tasks {compact(tasks)} of this pack are left unstarted",
          file=sys.stderr, flush=True)
    if me is not None:
        with contextlib.suppress(OSError):
            submissions.append(sweep.base_dir, {
                "left": compact(tasks), "job": me, "manifest": str(sweep.path),
                "manifest_hash": sweep.hash})


def _job_key() -> str | None:
    """The key of the array task this process runs in (``"123_4"``), if any."""
    found = scheduler.current(os.environ)
    return found[0].job_key(found[1]) if found is not None else None


def _key(attempt: Mapping[str, Any]) -> str | None:
    job = scheduler.job_of(attempt)
    return job[0].job_key(job[1]) if job is not None else None


def _ran_here(sweep: Sweep, index: int, me: str) -> bool:
    """Whether this array task (requeued since) already ran ``index`` and let it go."""
    try:
        meta = _fs.read_json_object(sweep.task(index).run_dir / layout.METADATA)
    except (OSError, ValueError):
        return False
    return me in let_go_by(meta, _key)


def started_in(meta: Mapping[str, Any]) -> set[str]:
    """The job keys every attempt of this run ran in."""
    return {k for attempt in [*(meta.get("attempts") or []), meta]
            if isinstance(attempt, Mapping) and (k := _key(attempt)) is not None}


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
