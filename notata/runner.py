"""Running a task's command under its Logbook (``notata exec``).

``exec_task`` opens the task's Logbook (lock, heartbeat, signals), runs the
command as a child in its own process group with ``{param}`` placeholders
replaced in its arguments (never through a shell), and records complete or
failed from the child's exit status. SIGTERM to the wrapper is recorded (see
:class:`~notata.Logbook`) and passed to the child's process group; SIGUSR1 is
passed on to the processes that handle it, so the payload can checkpoint (one that does
not handle it is not killed by it: see :func:`_pass_warning`); Ctrl-C stops the child and records
``cancelled``.

The local backend (:mod:`notata.local`) runs every task through this wrapper.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import _attach, _command, _signals, layout, resources, schema
from ._function import Function, Served
from .array import ENV_TASK, RUN_VARIABLES, open_task
from .errors import RunCompleteError, RunFileError, RunLockedError, RunLostError, UsageError
from .logbook import Logbook
from .manifest import Sweep

#: ``notata exec``'s exit status when another process holds the run (EX_TEMPFAIL): told
#: apart from a command that failed, so a local sweep beside another one counts it apart.
IN_USE = 75
_HEADER = "=== notata attempt"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def substitute(args: Sequence[str], values: Mapping[str, Any]) -> list[str]:
    """Replace ``{name}`` in each argument by ``values[name]``; other braces stay as they are."""
    def one(arg: str) -> str:
        return _PLACEHOLDER.sub(
            lambda m: as_argument(values[m.group(1)]) if m.group(1) in values else m.group(0), arg)
    return [one(a) for a in args]


def as_argument(value: Any) -> str:
    """A value as a command's ``{param}`` placeholder spells it: JSON for booleans, None,
    lists and dicts (``true``, ``null``), else ``str``. Run ids spell values their own
    way (:mod:`notata.manifest`)."""
    return json.dumps(value) if isinstance(value, (dict, list, bool)) or value is None \
        else str(value)


_TRACEBACK = "Traceback (most recent call last):"
_ERRORISH = re.compile(r"error|exception|fatal|abort|killed|segmentation fault|core dumped"
                       r"|out of memory|panic|denied|no such file", re.IGNORECASE)


def telling_line(path: os.PathLike[str] | str, limit: int = 65536) -> str:
    """The line of the command's stderr (this attempt's part) that best says why it failed.

    A Python traceback's last line (``TypeError: ...``); else the last line that looks
    like an error (``ERROR: CUDA out of memory`` before ``cleaning up...``); else the
    last line. At most 300 characters; "" when there is nothing.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for k in range(len(lines) - 1, -1, -1):  # only what this attempt wrote counts
        if lines[k].startswith(_HEADER):
            lines = lines[k + 1:]
            break
    chosen = ""
    tb = max((k for k, ln in enumerate(lines) if ln.startswith(_TRACEBACK)), default=None)
    if tb is not None:  # the exception line: the first unindented line after the frames
        chosen = next((ln for ln in lines[tb + 1:] if ln.strip() and not ln[0].isspace()), "")
    if not chosen:
        chosen = next((ln for ln in reversed(lines) if _ERRORISH.search(ln)), "")
    if not chosen:
        chosen = next((ln for ln in reversed(lines) if ln.strip()), "")
    return chosen.strip()[:300]


def exec_task(sweep: Sweep, index: int, argv: Sequence[str] | Function, *,
              heartbeat: float | None = None, from_array: bool = False) -> int:
    """Run ``argv`` as task ``index`` of ``sweep``; return the exit status for the wrapper.

    0 when the command succeeded or the task was already complete; :data:`IN_USE` (75)
    when another process holds the run (nothing is marked); the command's own status otherwise
    (128+N when it died of signal N, 127 when it could not be started). On SIGTERM or
    SIGHUP the status is recorded, the command is stopped (SIGTERM, then SIGKILL after
    :data:`STOP_GRACE`), and only then is the run lock released.
    """
    return run_task(sweep, index, argv, heartbeat=heartbeat, from_array=from_array).status


@dataclass(frozen=True)
class Ended:
    """How :func:`run_task` ended: the wrapper's exit status, and ``how`` the task ended,
    which the status alone cannot tell (a command may exit 75 or 130 itself): the run's
    recorded status, or :data:`SKIPPED` (already complete), :data:`BUSY` (another process
    holds the run) or :data:`INTERRUPTED` (Ctrl-C: recorded ``cancelled``)."""

    status: int
    how: str
    #: A Ctrl-C came while the task's end was recorded: what comes next (a pack's next
    #: task) does not start.
    stop: bool = False


SKIPPED, BUSY, INTERRUPTED = "skipped", "busy", "interrupted"


def run_task(sweep: Sweep, index: int, argv: Sequence[str] | Function, *,
             heartbeat: float | None = None, from_array: bool = False,
             pack: tuple[int, int] | None = None,
             warned: Callable[[], bool] | None = None,
             opened: Callable[[], None] | None = None) -> Ended:
    """:func:`exec_task`, saying how the task ended. ``pack``: the task's (position, size)
    in the pack that runs it (:mod:`notata.pack`), recorded in its metadata; ``warned()``
    true once the time-limit warning has come (to the pack, perhaps before this run could
    hear it): the run records it and the command is warned as soon as it is started;
    ``opened()`` is called the moment the run is open (before a signal held back while it
    opened is handled), so that a pack knows the task has begun. ``argv`` may be a
    :class:`~notata._function.Function`: the "command" is then a worker forked from this
    process that calls it (:mod:`notata._function`).

    SIGTERM, SIGHUP and SIGUSR1 wait while the run opens (:func:`notata._signals.deferred`):
    one that comes then is handled the moment the run is open, and recorded, rather than
    ending the process between the run's folder and its first record.
    """
    if isinstance(argv, Function):
        argv.ready(sweep)  # its fork server, forked while no run is open here
    elif not argv:
        raise UsageError("no command to run: give it after --")
    interrupted = _Deferred()
    try:
        # a Ctrl-C, SIGTERM or SIGHUP here must not leave a half-opened run behind
        with interrupted, _signals.deferred():
            log = open_task(sweep, index, heartbeat=heartbeat, track_children=True,
                            from_array=from_array, pack=pack, _wrapper=True)
            if opened is not None:
                opened()
    except RunCompleteError as err:
        if pack is None:
            print(f"notata: task {index}: {err.path} is already complete, so it is not run "
                  "again (move its folder away to run it afresh)", file=sys.stderr)
        return Ended(0, SKIPPED)
    except RunLockedError as err:
        print(f"notata: task {index}: {err}", file=sys.stderr)
        return Ended(IN_USE, BUSY)
    _command.spare_existing()
    _command.become_subreaper()
    with log:  # the lock is released on leaving this block: after the command has stopped
        try:
            if interrupted.caught:
                raise KeyboardInterrupt
            before = resources.children_peak()  # scontrol's, say: not the command's
            rc, peak, lost = _run_command(log, index, argv, warned)
        except KeyboardInterrupt:
            log.mark_cancelled("KeyboardInterrupt")
            return Ended(130, INTERRUPTED)
        held = _Deferred()  # a Ctrl-C now waits until the end is recorded
        with held:
            ended = _record(log, index, argv, rc, peak, lost, before)
        # the task ended as recorded; the Ctrl-C stops what comes after it (a pack)
        return Ended(ended.status, ended.how, stop=True) if held.caught else ended


def _record(log: Logbook, index: int, argv: Sequence[str] | Function, rc: int | None,
            peak: int | None, lost: str | None, before: int) -> Ended:
    """Record how the task's command (or function) ended, from its exit status."""
    if rc is None:
        return Ended(127, schema.FAILED)
    if lost:  # the fork server died: how its worker ended is not known
        log._stage(exit_code=None)
        log.mark_failed(f"the fork server died during the task ({lost}): how the "
                        "function's worker ended is not known")
        _say_ended(index, log)
        return Ended(1, schema.FAILED)
    if peak is None:
        peak = resources.children_peak()  # the command's (not this wrapper's), when it
        peak = peak if peak > before else 0  # passed every earlier child's
    log._guard()  # what the command handed over is a newer attempt's once the run is lost
    handed = _attach.take_handed_over(log.path)
    marked, reason = handed.pop("status", None), handed.pop("failure_reason", None)
    if handed:  # on disk now: the file that held them is gone
        log._set(**_plain_fields(handed), exit_code=rc)
    else:
        log._stage(exit_code=rc)  # written with the status
    if rc == 0 and marked in (schema.FAILED, schema.TIMEOUT, schema.CANCELLED):
        log._finish(marked, f"the command marked the run {marked}"
                    + (f": {reason}" if reason else ""))
        return Ended(0, str(marked))
    if rc == 0:
        log.mark_complete()
        return Ended(0, schema.COMPLETE)
    granted = log.metadata.get("resources", {}).get("asked", {}).get("mem_bytes")
    if resources.killed_for_memory(rc, peak, granted):
        log._finish(schema.OOM, f"killed for memory: SIGKILL after a peak of "
                    f"{resources.size_text(peak)} of {resources.size_text(granted)} "
                    "granted")
        _say_ended(index, log)
        return Ended(128 - rc, schema.OOM)
    kind = "function" if isinstance(argv, Function) else "command"
    what = (f"{kind} exited with status {rc}" if rc > 0
            else f"{kind} killed by {signal.Signals(-rc).name}")
    detail = reason or telling_line(log.path / layout.STDERR)
    log.mark_failed(f"{what}: {detail}" if detail else what)
    _say_ended(index, log)
    return Ended(rc if rc > 0 else 128 - rc, schema.FAILED)



def _say_ended(index: int, log: Logbook) -> None:
    """One line on stderr for a task that did not complete: what, and where its output
    is (run by hand, everything else went to the run's files)."""
    reason = str(log.metadata.get("failure_reason") or "").splitlines()
    # On a terminal, first erase the line: a local sweep's progress line may be on it
    # (the line is said here, by the task's own process, and the progress line is redrawn
    # below it)
    erase = "\r\033[K" if sys.stderr.isatty() else ""
    print(f"{erase}notata: task {index} ({log.run_id}) {log.metadata.get('status')}"
          + (f": {reason[0]}" if reason else "")
          + f"; its output: {log.path / layout.STDOUT}, {log.path / layout.STDERR}",
          file=sys.stderr, flush=True)


def _plain_fields(handed: Mapping[str, Any]) -> dict[str, Any]:
    """What an attached command handed over, less notata's own fields."""
    return {k: v for k, v in handed.items() if k not in schema.RESERVED}


def _run_command(log: Logbook, index: int, argv: Sequence[str] | Function,
                 warned: Callable[[], bool] | None = None
                 ) -> tuple[int | None, int | None, str | None]:
    """Start the task's command under ``log`` (or have a worker call the function) and
    wait for it; its exit status as Popen gives it, or None (the run marked failed) when
    it cannot be started, and its peak RSS when known apart from this process's other
    children (a function's worker), and why a worker's end is not known, if it is not.
    On Ctrl-C, or anything else that ends the wait, the command is stopped before the
    exception goes on."""
    assert log.task is not None
    params = log.task.params
    values = {"run_dir": str(log.path), "run_id": log.run_id, "task": index,
              "attempt": log.attempt, **params}
    cmd = argv.argv if isinstance(argv, Function) else substitute(argv, values)
    log._stage(command=cmd)  # written with its pid, or with the failure to start it
    # nothing from an earlier attempt's command may leak into this one
    _attach.take_handed_over(log.path)
    env = {**clean_environment(os.environ), "NOTATA_RUN_DIR": str(log.path),
           "NOTATA_RUN_ID": log.run_id, ENV_TASK: str(index),
           "NOTATA_ATTEMPT": str(log.attempt), "NOTATA_PARAMS": json.dumps(params),
           **_attach.wrapper_environment(log.job_id, log._lock_identity())}
    header = f"{_HEADER} {log.attempt}: {shlex.join(cmd)}".replace("\n", "\\n") + "\n"
    with contextlib.ExitStack() as stack:
        streams = []
        for name in (layout.STDOUT, layout.STDERR):
            ended = _ends_its_line(log.path / name)
            f = stack.enter_context(_append(log.path / name))
            if not ended:  # an earlier attempt's last line: the header starts its own
                f.write(b"\n")
            f.write(header.encode())
            f.flush()
            streams.append(f)
        started = _Deferred()
        # Never leave a started command without a way to stop it: Ctrl-C, SIGTERM and
        # SIGHUP wait until the command is started and its stop hook is in place.
        with started, log.holding_signals():
            try:
                proc: _command.Process
                if isinstance(argv, Function):
                    proc = argv.start(index, env)
                else:
                    args, preexec = _command.start_args(cmd, env)
                    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                                            stdout=streams[0], stderr=streams[1],
                                            start_new_session=True, preexec_fn=preexec)
            except OSError as err:
                log._stage(command=cmd)
                log.mark_failed(f"cannot start {cmd[0]!r}: {err.strerror or err}")
                return None, None, None
            log.on_terminate(lambda _log, signum: _stopped(_log, proc))
            log._on_lost(lambda: _command.stop(proc, signal.SIGTERM))  # a new holder writes
            log.on_warning(lambda _log: _command.pass_warning(proc))
            log._set(command_pid=proc.pid)
            if warned is not None and warned():  # the warning came before the command
                if not any(s.get("signal") == "SIGUSR1"
                           for s in log.metadata.get("signals", [])):
                    os.kill(os.getpid(), signal.SIGUSR1)  # recorded once the block ends
                _command.pass_warning_late(proc)
        try:
            if started.caught:
                raise KeyboardInterrupt
            rc = proc.wait()
        except KeyboardInterrupt:
            _command.stop(proc, signal.SIGINT)
            raise
        except BaseException:  # submitit's requeue (SystemExit), say: nothing left running
            _command.stop(proc, signal.SIGTERM)
            raise
        if isinstance(proc, Served):  # a worker another process (its server) reaped
            log._count_worker(proc.cpu_sec, proc.peak_bytes or 0)
        if not _command.gone(proc):  # it ended, but left processes running: they end with it
            left = _command.remaining(proc)
            log.warning(f"the command left {len(left) or 'some'} process(es) running "
                        f"({', '.join(map(str, left[:5]))}); stopping them")
            _command.stop(proc, signal.SIGTERM)
        if isinstance(proc, Served):
            return rc, proc.peak_bytes, proc.lost
        return rc, None, None


def _append(path: Path) -> IO[bytes]:
    """``path`` opened to append, never through a symlink: one planted as stdout.txt
    would send the command's output elsewhere, so the link (not what it names) is
    removed and the run gets a file of its own. Anything else that is not a regular
    file (a FIFO nobody reads would hang the task) is an error naming it."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC \
        | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            os.unlink(path)
            fd = os.open(path, flags | os.O_EXCL, 0o666)
        elif err.errno == errno.ENXIO:  # a FIFO without a reader
            fd = -1
        else:
            raise
    if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd >= 0:
            os.close(fd)
        raise RunFileError(str(path), "not a regular file, where notata writes the command's "
                           "output")
    os.set_blocking(fd, True)
    return open(fd, "ab")


def _ends_its_line(path: Path) -> bool:
    """Whether the file at ``path`` is empty, missing or ends with a newline (or is not a
    regular file: never waited on, as a FIFO would make a reader wait)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # missing, or a symlink
        return True
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return True
        return os.pread(fd, 1, st.st_size - 1) == b"\n"
    finally:
        os.close(fd)


def _stopped(log: Logbook, proc: _command.Process) -> None:
    """The wrapper's SIGTERM/SIGHUP hook: stop the command (Ctrl-C cannot cut that short),
    then keep what it handed over (the signal's status and reason stand)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rc = _command.stop(proc, signal.SIGTERM)
    try:
        log._guard()
    except RunLostError:  # what the command handed over is a newer attempt's now
        return
    handed = _attach.take_handed_over(log.path)
    log._set(**_plain_fields(handed), exit_code=rc)


def clean_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the variables ``notata exec`` sets for one run: a job or task
    started from inside a task must not inherit its run, index or wrapper."""
    return {k: v for k, v in environ.items() if k not in RUN_VARIABLES}


class _Deferred:
    """Hold SIGINT during a block that must not be cut; afterwards, ``caught`` says whether
    one came, and the next SIGINT interrupts once (later ones are ignored: a terminal's
    Ctrl-C and the local backend's forwarded one both arrive, and neither may cut the
    clean-up short). Outside the main thread it does nothing."""

    caught = False

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._hold)

    def __exit__(self, *exc: object) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN if self.caught else _interrupt_once)

    def _hold(self, signum: int, frame: object) -> None:
        self.caught = True


def _interrupt_once(signum: int, frame: object) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


