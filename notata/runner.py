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
import ctypes
import errno
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from . import _attach, layout, resources, schema
from .array import ENV_TASK, RUN_VARIABLES, open_task
from .errors import RunCompleteError, RunLockedError, UsageError
from .heartbeat import has_children
from .logbook import Logbook
from .manifest import Sweep

#: Seconds the wrapper gives its command to exit after passing on SIGTERM or Ctrl-C.
STOP_GRACE = 20.0
#: ``notata exec``'s exit status when another process holds the run (EX_TEMPFAIL): told
#: apart from a command that failed, so a local sweep beside another one counts it apart.
IN_USE = 75
#: Seconds of SIGKILLs after which a command that will not die (stuck in the kernel) is
#: given up on, and the run let go anyway (said on stderr).
KILL_GIVE_UP = 30.0
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


def _stop(proc: subprocess.Popen[bytes], signum: int, grace: float = STOP_GRACE) -> int | None:
    """Stop the command and everything it started: ``signum`` to its process group and to
    every descendant (the wrapper is their subreaper, so a daemon that left the group is
    still one); wait up to ``grace`` for all of them to exit; then SIGKILL what is left,
    again and again (a process forked meanwhile, or one that keeps changing its pid),
    until nothing is left or :data:`KILL_GIVE_UP` seconds have passed (a process stuck in
    the kernel). The command's exit status (None if it could not be told)."""
    _signal_all(proc, signum)
    deadline = time.monotonic() + grace
    while not _gone(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = time.monotonic() + KILL_GIVE_UP
    while not _gone(proc):
        _signal_all(proc, signal.SIGKILL)
        if time.monotonic() > deadline:
            print(f"notata: processes {_remaining(proc)} of the command would not die; "
                  "letting the run go", file=sys.stderr)
            break
        time.sleep(0.05)
    return proc.returncode


def _gone(proc: subprocess.Popen[bytes]) -> bool:
    """Whether nothing of the command is left: this process (the command's subreaper) has
    no child left and its group no member, by the kernel's own lists (one read each);
    else three listings in a row, 20 ms apart, find nothing (one listing of ``/proc`` can
    miss a process that is changing its pid)."""
    if not _remaining_children(proc) and not _group_alive(proc.pid):
        return True
    for _ in range(3):
        if _remaining(proc):
            return False
        time.sleep(0.02)
    return True


def _remaining_children(proc: subprocess.Popen[bytes]) -> bool:
    """Whether this process has a child left, after reaping those that have exited (the
    command included), from ``/proc/self/task/*/children``: every descendant left by the
    command is one, or a child's descendant, since this process is their subreaper.
    True when the kernel does not keep those lists (the slower listings decide)."""
    _reap(proc)
    return has_children(os.getpid())


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # a member we may not signal is still a member
        return True
    return True


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Reap this process's children that have exited; the command's status is kept."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if not pid:
            break
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)


def _remaining(proc: subprocess.Popen[bytes]) -> list[int]:
    """The live processes of the command: its group and this process's descendants.
    Reaps those that have exited (the command itself included)."""
    _reap(proc)
    alive = set(_group(proc.pid))
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.add(child.pid)
    return sorted(alive)


def _signal_all(proc: subprocess.Popen[bytes], signum: int) -> None:
    _signal_group(proc, signum)
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                os.kill(child.pid, signum)


def _become_subreaper() -> None:
    """Orphans of the command are re-parented to this wrapper (not to init), so that it can
    stop them before it lets the run go. Linux 3.4+; elsewhere the group must do."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


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


def exec_task(sweep: Sweep, index: int, argv: Sequence[str], *,
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


SKIPPED, BUSY, INTERRUPTED = "skipped", "busy", "interrupted"


def run_task(sweep: Sweep, index: int, argv: Sequence[str], *,
             heartbeat: float | None = None, from_array: bool = False,
             pack: tuple[int, int] | None = None) -> Ended:
    """:func:`exec_task`, saying how the task ended. ``pack``: the task's (position, size)
    in the pack that runs it (:mod:`notata.pack`), recorded in its metadata.

    SIGTERM and SIGHUP wait while the run opens (blocked, so that the kernel keeps them):
    one that comes then is handled the moment the run is open, and recorded, rather than
    ending the process between the run's folder and its first record.
    """
    if not argv:
        raise UsageError("no command to run: give it after --")
    interrupted = _Deferred()
    main = threading.current_thread() is threading.main_thread()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _ENDING) if main else None
    try:
        with interrupted:  # a Ctrl-C here must not leave a half-opened run behind
            log = open_task(sweep, index, heartbeat=heartbeat, track_children=True,
                            from_array=from_array, pack=pack)
    except RunCompleteError as err:
        if pack is None:
            print(f"notata: task {index}: {err.path} is already complete, so it is not run "
                  "again (move its folder away to run it afresh)", file=sys.stderr)
        return Ended(0, SKIPPED)
    except RunLockedError as err:
        print(f"notata: task {index}: {err}", file=sys.stderr)
        return Ended(IN_USE, BUSY)
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    _become_subreaper()
    with log:  # the lock is released on leaving this block: after the command has stopped
        try:
            if interrupted.caught:
                raise KeyboardInterrupt
            before = resources.children_peak()  # scontrol's, say: not the command's
            rc = _run_command(log, index, argv)
        except KeyboardInterrupt:
            log.mark_cancelled("KeyboardInterrupt")
            return Ended(130, INTERRUPTED)
        if rc is None:
            return Ended(127, schema.FAILED)
        handed = _attach.take_handed_over(log.path)
        marked, reason = handed.pop("status", None), handed.pop("failure_reason", None)
        log._stage(**_plain_fields(handed), exit_code=rc)  # written with the status
        if rc == 0 and marked in (schema.FAILED, schema.TIMEOUT, schema.CANCELLED):
            log._finish(marked, f"the command marked the run {marked}"
                        + (f": {reason}" if reason else ""))
            return Ended(0, str(marked))
        if rc == 0:
            log.mark_complete()
            return Ended(0, schema.COMPLETE)
        peak = resources.children_peak()  # the command's (not this wrapper's), when it
        peak = peak if peak > before else 0  # passed every earlier child's
        granted = log.metadata.get("resources", {}).get("asked", {}).get("mem_bytes")
        if resources.killed_for_memory(rc, peak, granted):
            log._finish(schema.OOM, f"killed for memory: SIGKILL after a peak of "
                        f"{resources.size_text(peak)} of {resources.size_text(granted)} "
                        "granted")
            _say_ended(index, log)
            return Ended(128 - rc, schema.OOM)
        what = (f"command exited with status {rc}" if rc > 0
                else f"command killed by {signal.Signals(-rc).name}")
        detail = reason or telling_line(log.path / layout.STDERR)
        log.mark_failed(f"{what}: {detail}" if detail else what)
        _say_ended(index, log)
        return Ended(rc if rc > 0 else 128 - rc, schema.FAILED)


#: The signals that end a run (see :mod:`notata._signals`).
_ENDING = frozenset({signal.SIGTERM, signal.SIGHUP})


def _say_ended(index: int, log: Logbook) -> None:
    """One line on stderr for a task that did not complete: what, and where its output
    is (run by hand, everything else went to the run's files)."""
    reason = str(log.metadata.get("failure_reason") or "").splitlines()
    print(f"notata: task {index} ({log.run_id}) {log.metadata.get('status')}"
          + (f": {reason[0]}" if reason else "")
          + f"; its output: {log.path / layout.STDOUT}, {log.path / layout.STDERR}",
          file=sys.stderr, flush=True)


def _plain_fields(handed: Mapping[str, Any]) -> dict[str, Any]:
    """What an attached command handed over, less notata's own fields."""
    return {k: v for k, v in handed.items() if k not in schema.RESERVED}


def _run_command(log: Logbook, index: int, argv: Sequence[str]) -> int | None:
    """Start the task's command under ``log`` and wait for it; its exit status as Popen
    gives it, or None (the run marked failed) when it cannot be started. On Ctrl-C the
    command is stopped before KeyboardInterrupt goes on."""
    assert log.task is not None
    params = log.task.params
    values = {"run_dir": str(log.path), "run_id": log.run_id, "task": index,
              "attempt": log.attempt, **params}
    cmd = substitute(argv, values)
    log._stage(command=cmd)  # written with its pid, or with the failure to start it
    # nothing from an earlier attempt's command may leak into this one
    _attach.take_handed_over(log.path)
    env = {**clean_environment(os.environ), "NOTATA_RUN_DIR": str(log.path),
           "NOTATA_RUN_ID": log.run_id, ENV_TASK: str(index),
           "NOTATA_ATTEMPT": str(log.attempt), "NOTATA_PARAMS": json.dumps(params),
           **_attach.wrapper_environment(log.job_id)}
    header = f"{_HEADER} {log.attempt}: {shlex.join(cmd)}".replace("\n", "\\n") + "\n"
    with contextlib.ExitStack() as stack:
        streams = []
        for name in (layout.STDOUT, layout.STDERR):
            f = stack.enter_context(open(log.path / name, "ab"))
            f.write(header.encode())
            f.flush()
            streams.append(f)
        started = _Deferred()
        # Never leave a started command without a way to stop it: Ctrl-C, SIGTERM and
        # SIGHUP wait until the command is started and its stop hook is in place.
        with started, log.holding_signals():
            try:
                argv, preexec = _dying_with_this_process(cmd, env)
                proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL,
                                        stdout=streams[0], stderr=streams[1],
                                        start_new_session=True, preexec_fn=preexec)
            except OSError as err:
                log._stage(command=cmd)
                log.mark_failed(f"cannot start {cmd[0]!r}: {err.strerror or err}")
                return None
            log.on_terminate(lambda _log, signum: _stopped(_log, proc))
            log.on_warning(lambda _log: _pass_warning(proc))
            log._set(command_pid=proc.pid)
        try:
            if started.caught:
                raise KeyboardInterrupt
            rc = proc.wait()
        except KeyboardInterrupt:
            _stop(proc, signal.SIGINT)
            raise
        if not _gone(proc):  # it ended, but left processes running in the run: they end with it
            left = _remaining(proc)
            log.warning(f"the command left {len(left) or 'some'} process(es) running "
                        f"({', '.join(map(str, left[:5]))}); stopping them")
            _stop(proc, signal.SIGTERM)
        return rc


def _stopped(log: Logbook, proc: subprocess.Popen[bytes]) -> None:
    """The wrapper's SIGTERM/SIGHUP hook: stop the command (Ctrl-C cannot cut that short),
    then keep what it handed over (the signal's status and reason stand)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rc = _stop(proc, signal.SIGTERM)
    handed = _attach.take_handed_over(log.path)
    log._set(**_plain_fields(handed), exit_code=rc)


def _dying_with_this_process(cmd: list[str], env: Mapping[str, str]
                             ) -> tuple[list[str], Callable[[], None] | None]:
    """How to start ``cmd`` so that the kernel SIGKILLs it when this wrapper dies (a
    SIGKILLed wrapper runs no code: without this its command would run on unsupervised
    beside the next attempt): through util-linux's ``setpriv --pdeathsig KILL``, which
    sets it and execs the command (a spawn without Python code in the child is about
    3 ms faster per task, which a pack of short tasks feels); else a ``preexec_fn``.
    A command that cannot be started raises OSError, as Popen would."""
    setpriv = _setpriv()
    if setpriv is None:
        return cmd, _die_with_parent(os.getpid())
    found = shutil.which(cmd[0], path=env.get("PATH", os.defpath))
    if found is None:  # say it as Popen would have, not as setpriv's exit status 127
        exists = os.sep in cmd[0] and os.path.exists(cmd[0])
        raise OSError(errno.EACCES if exists else errno.ENOENT,
                      os.strerror(errno.EACCES if exists else errno.ENOENT))
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd], None


@functools.cache
def _setpriv() -> str | None:
    """util-linux's setpriv, if it knows ``--pdeathsig`` (2.33 and later)."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        text = subprocess.run([path, "--help"], capture_output=True, text=True,
                              timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return path if "--pdeathsig" in text else None


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the command when its wrapper dies (a
    SIGKILLed wrapper runs no code: without this its command would run on unsupervised
    beside the next attempt). Linux only; the child calls a function resolved here,
    before the fork."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    set_pdeathsig, kill = 1, int(signal.SIGKILL)  # PR_SET_PDEATHSIG

    def child() -> None:
        prctl(set_pdeathsig, kill, 0, 0, 0)
        if os.getppid() != parent:  # the wrapper died before the line above
            os.kill(os.getpid(), kill)

    return child


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


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def _pass_warning(proc: subprocess.Popen[bytes]) -> list[int]:
    """Pass SIGUSR1 to the processes of the command's group that handle it; the pids.

    SIGUSR1's default action kills: a program that never asked for the warning would die
    minutes before its time limit and read ``failed``. So only a process whose
    ``/proc/PID/status`` shows SIGUSR1 caught (``SigCgt``) gets it. Elsewhere than Linux,
    the whole group gets it.
    """
    bit = 1 << (signal.SIGUSR1 - 1)
    sent = []
    for pid in _group(proc.pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                caught = next(int(line.split()[1], 16) for line in f
                              if line.startswith("SigCgt:"))
        except FileNotFoundError:
            if not os.path.isdir("/proc/self"):
                _signal_group(proc, signal.SIGUSR1)
                return [proc.pid]
            continue
        except (OSError, StopIteration, ValueError):
            continue
        if caught & bit:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGUSR1)
                sent.append(pid)
    return sent


def _group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid:
                out.append(p.pid)
    return out
