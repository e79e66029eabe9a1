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
- **Python functions** (``--python MODULE:FUNCTION``): the pack's process imports the
  module once and forks a worker per task (:mod:`notata._function`).
- **Side by side** (``--pack-parallel P``): the array task's process starts P workers
  that take the pack's tasks one at a time from a pipe (:func:`_side_by_side`); each
  worker is a pack as above; the warning and SIGTERM are passed to every worker, and
  what is still in the pipe when they stop is what was left unstarted.
- **Tasks left unstarted** by a warning or a signal are recorded in the sweep's
  submissions record, so that the retry shepherd does not count that submission as one
  of their attempts.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from . import _fs, _function, index, layout, scheduler, schema, submissions
from ._command import catches, start_args
from ._function import Function
from .errors import NotataError, RunLostError, UsageError
from .manifest import Sweep, compact
from .runner import BUSY, IN_USE, INTERRUPTED, SKIPPED, run_task

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


#: Seconds a packed task costs beyond its run's own runtime (opening and closing the run,
#: starting the command): a few ms here, more on a busy shared filesystem.
OVERHEAD = 0.1


def size_for(sweep: Sweep, pack_time: float, task_time: float | None,
             parallel: int = 1) -> tuple[int, str]:
    """The pack size that fills ``pack_time`` seconds with ``parallel`` tasks at a time,
    and how it was found: each task takes the 90th percentile of the sweep's complete
    runs' runtimes (up to :data:`SAMPLE` of them), else ``task_time``, plus
    :data:`OVERHEAD`. A :class:`~notata.errors.UsageError` when neither is there, or one
    task takes longer than ``pack_time``."""
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
    fits = int(pack_time // (each + OVERHEAD)) * max(1, parallel)
    return check_size(max(1, min(MAX_PACK, fits))), how


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


def exec_pack(sweep: Sweep, indices: Sequence[int], argv: Sequence[str] | Function, *,
              heartbeat: float | None = None, report: int | None = None,
              element: bool = False, parallel: int = 1, ending: bool = True) -> int:
    """Run ``argv`` as each task of ``indices`` in turn, each its own run (see the module
    docstring). Returns 0 when every task completed (or was complete), 1 when one did
    not, :data:`~notata.runner.IN_USE` when one was held by another process and none
    failed, 130 on Ctrl-C; SIGTERM or SIGHUP end it with SystemExit(128+N). ``report``:
    a file descriptor that gets a line ``INDEX HOW`` as each task ends (``HOW``: the
    run's status, or ``skipped``, ``busy``, ``interrupted``, ``error``; the local
    backend reads it). ``element``: the tasks are an array task's pack (``NOTATA_PACK``),
    which, requeued, skips what it let go, and records what it leaves unstarted.
    ``parallel`` > 1: that many tasks at a time (:func:`_side_by_side`). ``ending``: this
    process ends with the pack (``notata exec``), so SIGUSR1 stays ignored after it.
    """
    if parallel > 1 and len(indices) > 1:  # each worker imports a function itself
        return _side_by_side(sweep, indices, argv, heartbeat, element, parallel)
    argv = _function.of(argv) or argv  # a function's module: imported once, here
    me = _job_key() if element else None
    again = me is not None and _requeued()  # one read per task only in a second life
    outcome = _Outcome()
    said: list[bool] = []
    nxt = 0  # the position of the first task not yet begun

    def leave(why: str) -> None:
        if not said:
            said.append(True)
            _left(sweep, indices[nxt:], me, why)

    with _listening(ending) as warned:
        try:
            for position, index in enumerate(indices):
                if warned:
                    leave("the time limit is near")
                    break
                if again and _ran_here(sweep, index, me):
                    nxt = position + 1
                    continue

                def begun(position: int = position) -> None:
                    nonlocal nxt
                    nxt = position + 1  # its run is open: no longer left unstarted
                how, stop = _one(sweep, index, (position, len(indices)), argv, heartbeat,
                                 warned, report, begun)
                nxt = position + 1  # skipped (complete, held, not openable): not left
                if how == INTERRUPTED:
                    leave("Ctrl-C")
                    return 130
                outcome.add(index, how)
                if stop:
                    leave("Ctrl-C")
                    return 130
        except SystemExit as stop:  # SIGTERM or SIGHUP: the running task is recorded
            leave(f"{_name(stop)} ended this pack")
            raise
    return outcome.status()


def exec_queue(sweep: Sweep, fd: int, size: int, argv: Sequence[str] | Function, *,
               heartbeat: float | None = None, element: bool = False) -> int:
    """One worker of :func:`_side_by_side`: run tasks read from ``fd`` (records of
    :data:`_RECORD` bytes, ``INDEX POSITION``) until it is empty or the warning comes;
    the array task's own process says what was left."""
    me = _job_key() if element else None
    again = me is not None and _requeued()
    outcome = _Outcome()
    held: list[int] = []  # the task read from the pipe and not yet begun
    argv = _function.of(argv) or argv  # a function's module: imported once, here
    with _listening() as warned:
        try:
            while not warned:
                raw = os.read(fd, _RECORD)
                if len(raw) < _RECORD:
                    break
                index, position = map(int, raw.split())
                held[:] = [index]
                if again and _ran_here(sweep, index, me):
                    held.clear()
                    continue
                how, stop = _one(sweep, index, (position, size), argv, heartbeat, warned,
                                 None, held.clear)
                held.clear()
                if how == INTERRUPTED or stop:
                    return 130
                outcome.add(index, how)
        except SystemExit as stop:  # a task taken from the pipe but never begun is left
            _left(sweep, held, me, f"{_name(stop)} ended this pack", say=False)
            raise
    return outcome.status()


_ERROR = "error"
#: A task of a side-by-side pack as its workers read it: index and position, fixed width.
_RECORD = 24


def _side_by_side(sweep: Sweep, indices: Sequence[int], argv: Sequence[str] | Function,
                  heartbeat: float | None, element: bool, parallel: int) -> int:
    """``parallel`` workers (``notata exec --queue-fd``) take the pack's tasks one at a time
    from a pipe, in order, each task its own run. The warning and SIGTERM/SIGHUP are
    passed to every worker (each records its running task as a lone pack would); the
    pipe is then emptied, and what was still in it is what the pack left unstarted."""
    me = _job_key() if element else None
    read, write = os.pipe()
    records = [f"{i} {k}".ljust(_RECORD - 1).encode() + b"\n" for k, i in enumerate(indices)]
    fed: list[int] = []  # records written so far
    stop = threading.Event()
    feeding = threading.RLock()  # a record is written, or the pipe emptied, never both
    # this process's own reading end, that never blocks (the workers' blocks: on Linux,
    # opening /proc/self/fd/N of a pipe makes a description of its own)
    mine = os.open(f"/proc/self/fd/{read}", os.O_RDONLY | os.O_NONBLOCK)

    def feed() -> None:  # the only user of ``write``: it closes it, when done or stopped
        try:
            for record in records:
                while not stop.is_set() and not select.select([], [write], [], 0.2)[1]:
                    pass  # the pipe is full: the workers are busy
                with feeding:
                    if stop.is_set():
                        break
                    os.write(write, record)  # under PIPE_BUF: whole, and at once
                    fed.append(1)
        except OSError:
            pass  # every worker is gone
        finally:
            os.close(write)

    base = [sys.executable, "-m", "notata", "exec", str(sweep.path), "--queue-fd", str(read),
            "--pack-size", str(len(indices))]
    if heartbeat is not None:
        base += ["--heartbeat", str(heartbeat)]
    workers: list[subprocess.Popen[bytes]] = []
    stopping: list[int] = []
    warned: list[bool] = []
    left: list[int] = []  # tasks taken back from the pipe

    def drain() -> None:  # stop feeding, and take back what no worker has taken
        with feeding:
            stop.set()
            with contextlib.suppress(OSError):  # BlockingIOError: empty
                while len(raw := os.read(mine, _RECORD)) == _RECORD:
                    left.append(int(raw.split()[0]))

    def forward(signum: int, frame: Any) -> None:
        stop.set()  # no more tasks: what is still in the pipe is left
        if signum == signal.SIGUSR1:
            warned[:] = [True]
            drain()  # a worker still starting finds the pipe empty
            for w in workers:  # and is not sent the warning, which would kill it
                if catches(w.pid, signal.SIGUSR1):
                    with contextlib.suppress(OSError):
                        w.send_signal(signum)
            return
        stopping.append(signum)
        for w in workers:
            with contextlib.suppress(OSError):
                w.send_signal(signum)

    wanted = (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    before = {s: signal.signal(s, forward) for s in wanted
              if signal.getsignal(s) is not signal.SIG_IGN}
    feeder = threading.Thread(target=feed, name="notata-pack-feed", daemon=True)
    try:
        for _ in range(parallel):  # each dies with this process, as a command does
            command = argv.argv if isinstance(argv, Function) else list(argv)
            args, preexec = start_args([*base, "--", *command], os.environ)
            workers.append(subprocess.Popen(args, pass_fds=(read,), stdin=subprocess.DEVNULL,
                                            preexec_fn=preexec))
        feeder.start()
        codes = []
        for w in workers:
            while True:
                try:
                    codes.append(w.wait())
                    break
                except InterruptedError:
                    continue
        stop.set()
        feeder.join()
        drain()
        left += [int(r.split()[0]) for r in records[len(fed):]]
        if stopping or warned:
            why = (f"{_name(SystemExit(128 + stopping[0]))} ended this pack" if stopping
                   else "the time limit is near")
            _left(sweep, sorted(left), me, why)
        elif left:  # the workers died: those tasks were given their chance (an attempt)
            print(f"notata: the pack's workers ended before tasks {compact(sorted(left))}",
                  file=sys.stderr, flush=True)
    finally:
        _put_back(before)
        os.close(read)
        os.close(mine)
    if stopping:
        raise SystemExit(128 + stopping[0])
    if any(c == 130 for c in codes):
        return 130
    if left and not warned:
        return 1
    return 1 if any(c not in (0, IN_USE) for c in codes) else IN_USE if IN_USE in codes else 0


class _Outcome:
    """What the tasks of a pack did: the exit status they add up to."""

    def __init__(self) -> None:
        self.failed: list[int] = []
        self.busy: list[int] = []

    def add(self, index: int, how: str) -> None:
        if how == BUSY:
            self.busy.append(index)
        elif how not in (schema.COMPLETE, SKIPPED):
            self.failed.append(index)

    def status(self) -> int:
        return 1 if self.failed else IN_USE if self.busy else 0


def _one(sweep: Sweep, index: int, where: tuple[int, int], argv: Sequence[str] | Function,
         heartbeat: float | None, warned: list[bool], report: int | None,
         begun: Callable[[], None] | None = None) -> tuple[str, bool]:
    """Run one task of the pack; how it ended (:class:`~notata.runner.Ended`'s ``how``),
    and whether a Ctrl-C came as its end was recorded (the pack stops after it)."""
    stop = False
    try:
        ended = run_task(sweep, index, argv, heartbeat=heartbeat, pack=where,
                         warned=lambda: bool(warned), opened=begun)
        how, stop = ended.how, ended.stop
    except (NotataError, OSError) as err:  # this run cannot be opened, or was moved away
        if isinstance(err, RunLostError) and err.taken_over:  # another attempt broke its
            raise  # lock (the pack's node was cut off, SLURM requeued it): the rest is its
        print(f"notata: task {index}: {err}", file=sys.stderr, flush=True)
        how = _ERROR
    if report is not None:
        with contextlib.suppress(OSError):  # the reader is gone: go on
            os.write(report, f"{index} {how}\n".encode())
    return how, stop


def _name(stop: SystemExit) -> str:
    code = stop.code if isinstance(stop.code, int) else 0
    return signal.Signals(code - 128).name if code > 128 else "a signal"




def _left(sweep: Sweep, tasks: Sequence[int], me: str | None, why: str,
          say: bool = True) -> None:
    """Say which tasks the pack leaves unstarted; in an array task, record them (a retry
    does not count this submission as one of their attempts)."""
    if not tasks:
        return
    if say:
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


def _requeued() -> bool:
    """Whether this array task has run before: only then can it have let a task go."""
    found = scheduler.current(os.environ)
    return found is not None and found[0].requeued(found[1])


def _key(attempt: Mapping[str, Any]) -> str | None:
    job = scheduler.job_of(attempt)
    return job[0].job_key(job[1]) if job is not None else None


def _ran_here(sweep: Sweep, index: int, me: str | None) -> bool:
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


def _put_back(before: Mapping[Any, Any], ending: bool = True) -> None:
    """The handlers a pack replaced, back; in a process that ends with the pack
    (``ending``), SIGUSR1 stays taken (ignored): a warning that lands as the pack ends must
    not kill a process whose tasks are all done. A process that goes on (a submitit job
    run in the caller's process) gets its own handler back."""
    for signum, handler in before.items():
        signal.signal(signum, signal.SIG_IGN if signum == signal.SIGUSR1 and ending
                      else handler)


@contextlib.contextmanager
def _listening(ending: bool = True) -> Iterator[list[bool]]:
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
        _put_back(before, ending)
