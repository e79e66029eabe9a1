"""The processes of a task's command: starting it so that it dies with its wrapper,
passing the time-limit warning on, stopping it and everything it started, and knowing
when nothing of it is left. ``notata exec`` (:mod:`notata.runner`) is their only user."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import psutil

from .heartbeat import FOREIGN, SPARED, children, descendants, has_children, same_session


class Process(Protocol):
    """What the wrapper needs of its command's process: a :class:`subprocess.Popen`, or a
    function task's worker (:class:`notata._function.Served`)."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


#: Seconds the wrapper gives its command to exit after passing on SIGTERM or Ctrl-C.
STOP_GRACE = 20.0
#: Seconds of SIGKILLs after which a command that will not die (stuck in the kernel) is
#: given up on, and the run let go anyway (said on stderr).
KILL_GIVE_UP = 30.0


def stop(proc: Process, signum: int, grace: float = STOP_GRACE) -> int | None:
    """Stop the command and everything it started: ``signum`` to its process group and to
    every descendant (the wrapper is their subreaper, so a daemon that left the group is
    still one); wait up to ``grace`` for all of them to exit; then SIGKILL what is left,
    again and again (a process forked meanwhile, or one that keeps changing its pid),
    until nothing is left or :data:`KILL_GIVE_UP` seconds have passed (a process stuck in
    the kernel). The command's exit status (None if it could not be told)."""
    signal_all(proc, signum)
    deadline = time.monotonic() + grace
    while not gone(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    deadline = time.monotonic() + KILL_GIVE_UP
    while not gone(proc):
        signal_all(proc, signal.SIGKILL)
        if time.monotonic() > deadline:
            print(f"notata: processes {remaining(proc)} of the command would not die; "
                  "letting the run go", file=sys.stderr)
            break
        time.sleep(0.05)
    return proc.returncode


def gone(proc: Process) -> bool:
    """Whether nothing of the command is left: this process (the command's subreaper) has
    no child left and its group no member, by the kernel's own lists (one read each);
    else three listings in a row, 20 ms apart, find nothing (one listing of ``/proc`` can
    miss a process that is changing its pid)."""
    if not _children_left(proc) and not _group_alive(proc.pid):
        return True
    for _ in range(3):
        if remaining(proc):
            return False
        time.sleep(0.02)
    return True


def _children_left(proc: Process) -> bool:
    """Whether this process has a child left, after reaping those that have exited (the
    command included), from ``/proc/self/task/*/children``: every descendant left by the
    command is one, or a child's descendant, since this process is their subreaper.
    True when the kernel does not keep those lists (the slower listings decide)."""
    _reap(proc)
    return has_children(os.getpid(), besides=SPARED | FOREIGN | same_session(os.getpid()))


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member left."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # a member we may not signal is still a member
        return True
    return True


def _reap(proc: Process) -> None:
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


def remaining(proc: Process) -> list[int]:
    """The live processes of the command: its group and this process's descendants.
    Reaps those that have exited (the command itself included)."""
    _reap(proc)
    alive = set(group(proc.pid))
    for child in _descendants():
        with contextlib.suppress(psutil.Error):
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.add(child.pid)
    return sorted(alive)


def _descendants() -> list[psutil.Process]:
    """This process's descendants that belong to a run (:func:`heartbeat.descendants`)."""
    try:
        return descendants(psutil.Process(), wrapper=True)
    except psutil.Error:
        return []


def signal_all(proc: Process, signum: int) -> None:
    signal_group(proc, signum)
    for child in _descendants():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child.pid, signum)


def spare_existing() -> None:
    """The children this process has before a command starts are not the command's (a
    notebook's or a test runner's own, when a task runs in their process): they are
    :data:`~notata.heartbeat.FOREIGN`, subtree and all, never stopped as its leftovers.
    (An orphan that another process leaves while the command runs comes to this process,
    its subreaper, and is taken for the command's: run tasks in a process of their own,
    as ``notata exec`` does, where that matters.)"""
    gone = {p for p in FOREIGN if not psutil.pid_exists(p)}
    FOREIGN.difference_update(gone)  # forgotten once gone: their pids are reused
    FOREIGN.update(children(os.getpid()) - SPARED)


def become_subreaper() -> None:
    """Orphans of the command are re-parented to this wrapper (not to init), so that it can
    stop them before it lets the run go. Linux 3.4+; elsewhere the group must do."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def start_args(cmd: list[str], env: Mapping[str, str]
                             ) -> tuple[list[str], Callable[[], None] | None]:
    """How to start ``cmd`` so that the kernel SIGKILLs it when this wrapper dies (a
    SIGKILLed wrapper runs no code: without this its command would run on unsupervised
    beside the next attempt): through util-linux's ``setpriv --pdeathsig KILL``, which
    sets it and execs the command (a spawn without Python code in the child is about
    3 ms faster per task, which a pack of short tasks feels), for a program the kernel
    surely runs (an ELF file of this machine, a script whose interpreter is there); else
    (no setpriv, a file setpriv's ``execvp`` would hand to ``/bin/sh``) a ``preexec_fn``,
    and the kernel's own answer. A command that cannot be found raises OSError, as Popen
    would. (Unlike the ``preexec_fn``, setpriv cannot check that the wrapper is still
    alive once the signal is set: a wrapper SIGKILLed in that instant leaves its command
    running, and the collector's orphan rule names it.)"""
    setpriv = _setpriv()
    if setpriv is None:
        return cmd, die_with_parent(os.getpid())
    found = shutil.which(cmd[0], path=env.get("PATH", os.defpath))
    if found is None:  # say it as Popen would have, not as setpriv's exit status 127
        exists = os.sep in cmd[0] and os.path.exists(cmd[0])
        raise OSError(errno.EACCES if exists else errno.ENOENT,
                      os.strerror(errno.EACCES if exists else errno.ENOENT))
    if not _surely_runs(found):
        return cmd, die_with_parent(os.getpid())
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd], None


def _surely_runs(path: str, depth: int = 0) -> bool:
    """Whether the kernel runs ``path`` as it is: an executable ELF file for this machine
    whose program headers are all there, or a ``#!`` script whose interpreter surely runs
    (read as the kernel reads it: up to a space, a tab or the line's end). Anything else
    (another format, a text file without ``#!``) is left to the faithful way."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
            size = os.fstat(f.fileno()).st_size
    except OSError:  # execute-only, say
        return False
    own = _own_elf()
    if head.startswith(b"\x7fELF"):
        if len(head) < 64 or len(own) < 20 or head[4:6] != own[4:6] or head[18:20] != own[18:20]:
            return False
        order = "<" if head[5] == 1 else ">"
        if head[4] == 2:  # 64-bit
            e_type, = struct.unpack_from(order + "H", head, 16)
            phoff, = struct.unpack_from(order + "Q", head, 32)
            phentsize, phnum = struct.unpack_from(order + "HH", head, 54)
        else:
            e_type, = struct.unpack_from(order + "H", head, 16)
            phoff, = struct.unpack_from(order + "I", head, 28)
            phentsize, phnum = struct.unpack_from(order + "HH", head, 42)
        return e_type in (2, 3) and phnum > 0 and phoff + phentsize * phnum <= size
    if head.startswith(b"#!") and depth < 4:
        line = head[2:].split(b"\n", 1)[0].lstrip(b" \t")
        interpreter = os.fsdecode(re.split(rb"[ \t]", line, maxsplit=1)[0])
        return bool(interpreter) and os.path.isfile(interpreter) \
            and os.access(interpreter, os.X_OK) and _surely_runs(interpreter, depth + 1)
    return False


@functools.cache
def _own_elf() -> bytes:
    """The start of this interpreter's own ELF header (class, byte order, machine)."""
    try:
        with open("/proc/self/exe", "rb") as f:
            return f.read(64)
    except OSError:
        return b""


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


def die_with_parent(parent: int) -> Callable[[], None] | None:
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


def signal_group(proc: Process, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` handles ``signum`` (``SigCgt`` in ``/proc/PID/status``)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(caught & (1 << (signum - 1)))


def pass_warning(proc: Process) -> list[int]:
    """Pass SIGUSR1 to the processes of the command's group that handle it; the pids.

    SIGUSR1's default action kills: a program that never asked for the warning would die
    minutes before its time limit and read ``failed``. So only a process whose
    ``/proc/PID/status`` shows SIGUSR1 caught (``SigCgt``) gets it. Elsewhere than Linux,
    the whole group gets it.
    """
    bit = 1 << (signal.SIGUSR1 - 1)
    sent = []
    for pid in group(proc.pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                caught = next(int(line.split()[1], 16) for line in f
                              if line.startswith("SigCgt:"))
        except FileNotFoundError:
            if not os.path.isdir("/proc/self"):
                signal_group(proc, signal.SIGUSR1)
                return [proc.pid]
            continue
        except (OSError, StopIteration, ValueError):
            continue
        if caught & bit:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGUSR1)
                sent.append(pid)
    return sent


#: Seconds a command that started after the warning has to take SIGUSR1 in hand.
LATE_WARNING = 30.0


def pass_warning_late(proc: Process, within: float = LATE_WARNING) -> None:
    """The warning came before the command started: pass it on once a process of the
    command handles SIGUSR1 (a Python program installs its handler after its imports),
    from a daemon thread that looks every 0.1 s for ``within`` seconds."""
    def wait_and_pass() -> None:
        deadline = time.monotonic() + within
        while proc.poll() is None and time.monotonic() < deadline:
            if pass_warning(proc):
                return
            time.sleep(0.1)

    threading.Thread(target=wait_and_pass, name="notata-late-warning", daemon=True).start()


def group(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)  # a zombie is dead (its parent may be stopped)
    return out
