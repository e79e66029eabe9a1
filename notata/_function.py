"""Python function tasks: a sweep whose tasks are calls of ``fn(params, log)``.

``notata exec MANIFEST --tasks 0-199 --python MODULE:FUNCTION`` (what ``notata submit
--pack 200 --python MODULE:FUNCTION`` runs in each array task), and
:func:`notata.submitit.submit_sweep` with ``pack=``. The command recorded for such a
sweep is ``["--python", "MODULE:FUNCTION"]`` (:data:`FLAG`): the submission record,
``resubmit`` and the retry shepherd carry it as they carry a command.

**One interpreter, one process per task.** The process that runs the pack imports the
function's module once, then forks a *fork server*, which forks a worker per task: the
fork starts from everything already imported (copy-on-write), so a task costs a fork, not
an interpreter. The pack's process holds the task's run exactly as ``notata exec`` holds
a command's (lock, heartbeat, status, signals, what the worker leaves running stopped
before the lock is let go: it is the subreaper); the worker calls ``fn`` in the run's
Logbook, attached (:mod:`notata._attach`), with its stdout and stderr in the run's
``stdout.txt`` and ``stderr.txt``, and saves what ``fn`` returns as
``artifacts/result.json`` (or ``.pkl``); the server tells the pack how it ended (exit
status, peak RSS for the OOM rule). **Isolation:** an exception, ``sys.exit``,
``os._exit``, a segfault, a memory leak or a SIGKILL ends that worker only; the pack's
process records it (``failed``, or ``oom`` for a kill for memory) and goes on with the
next task. Nothing a task changes in memory reaches the next task: each worker starts
from the state after the import (so a cache filled by one task is not seen by the next:
set up what is shared at import time).

**Forking safely, and cheaply.** A fork copies only the thread that forks: a lock
another thread held at that instant stays held in the child forever (a ``print`` can
hang on it). So the server is forked when notata has no thread running in the pack's
process (before its first run opens; the heartbeat thread ends between runs:
:func:`notata.heartbeat.quiesce`), and never starts one: it only waits for requests and
for its worker. Forking from it, not from the pack's process, also spares the pack's
process the copy-on-write faults a live child would cost every page it writes while it
records the run. Signals are blocked across each fork; the server ignores those that end
a pack (the pack's process handles them, and the server dies with it:
``PR_SET_PDEATHSIG``); a worker starts with default handlers, in a session of its own,
and dies with the server. Threads the user's module starts at import are its own to
make fork-safe.

**Finding the function.** ``MODULE:FUNCTION`` is imported as ``python -m`` would, with
the current folder first on ``sys.path`` (a job runs in the folder it was submitted
from); ``path/to/file.py:FUNCTION`` loads that file. ``FUNCTION`` may be dotted
(``Class.method``). ``notata submit`` imports it once before submitting, so that a typo
is an error then, not in every task; a pack that cannot import it records each of its
tasks ``failed`` with the reason.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import json
import os
import pickle
import select
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from . import heartbeat, layout
from ._command import die_with_parent
from .array import open_task
from .errors import UsageError
from .manifest import Sweep

#: The first word of a function task's command: ``["--python", "MODULE:FUNCTION"]``.
FLAG = "--python"
RESULT = "result"
#: Signals the worker starts with default handlers for (the pack's are not its own;
#: SIGPIPE stays ignored, as Python starts every program).
_RESET = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT,
          signal.SIGALRM, signal.SIGCHLD)
_BLOCKED = {signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT}
#: A worker's exit status when notata itself failed in it (not the function).
_INTERNAL = 70
#: Seconds the fork server has to say it forked a worker before it is given up on.
ANSWER_WITHIN = 30.0


class Function:
    """A function to call as each task: ``fn(params, log)``. ``name``: how the command
    spells it (``MODULE:FUNCTION``); ``error``: why it could not be loaded (each task is
    then recorded failed with it); ``ignore``: signals the worker ignores (submitit's
    warning signal, which is the pack's to handle)."""

    def __init__(self, fn: Callable[..., Any] | None, name: str, error: str | None = None,
                 ignore: tuple[int, ...] = ()) -> None:
        self.fn = fn
        self.name = name
        self.error = error
        self.ignore = ignore
        self._server: _Server | None = None

    @property
    def argv(self) -> list[str]:
        """The command that names this function (:data:`FLAG` and the name)."""
        return [FLAG, self.name]

    def ready(self, sweep: Sweep) -> None:
        """Have a fork server for ``sweep``'s tasks: forked now if there is none (or it
        died), which only a process with no run open may do (its heartbeat thread ends
        first)."""
        if self._server is not None and self._server.usable(sweep):
            return
        if self._server is not None:
            self._server.close()
        self._server = _Server(self, sweep)

    def start(self, index: int, env: Mapping[str, str]) -> Served:
        """Have the fork server fork the worker of task ``index`` (its run is open) with
        ``env`` as its environment; the worker to wait for."""
        assert self._server is not None, "ready() first"
        return self._server.start(index, env)

    def close(self) -> None:
        """End the fork server (it also ends with this process)."""
        if self._server is not None:
            self._server.close()
            self._server = None


class _Server:
    """The pack process's side of its fork server: a child forked while no thread runs
    here, that forks a worker per task and says how each ended (exit status, peak RSS),
    over two pipes. Its workers are not this process's children, but what they leave
    behind is (this process is the subreaper)."""

    def __init__(self, function: Function, sweep: Sweep) -> None:
        # No thread of ours runs when no run is open here. When one is (submitit's
        # DebugExecutor runs the pack in the caller's process), the heartbeat thread holds
        # only its own locks, which a forked child never takes (heartbeat gives it new
        # ones): the fork is still safe.
        heartbeat.quiesce()
        # Processes the module started at import (a multiprocessing Manager, a helper) are
        # no task's: never stopped as a task's leftovers, nor counted in its figures.
        with contextlib.suppress(psutil.Error):
            heartbeat.FOREIGN.update(p.pid for p in psutil.Process().children())
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            with contextlib.suppress(Exception):
                stream.flush()
        tie = die_with_parent(os.getpid())
        gc.freeze()  # the workers' collections leave what was made before alone
        requests, self._requests = os.pipe()
        self._replies, replies = os.pipe()

        def serve(mask: Any) -> int:
            os.close(self._requests)
            os.close(self._replies)
            return _serve(requests, replies, function, sweep, mask, tie)

        try:
            pid = _fork(serve)
        except BaseException:
            for fd in (requests, self._requests, self._replies, replies):
                os.close(fd)
            raise
        os.close(requests)
        os.close(replies)
        self.pid = pid
        self.sweep = sweep
        self._buffer = b""
        self._workers: dict[int, Served] = {}
        self._started: list[int] = []
        self._ended: dict[int, list[bytes]] = {}  # heard before the worker was handed out
        self._dead = False
        heartbeat.SPARED.add(pid)

    def usable(self, sweep: Sweep) -> bool:
        """Whether this server can take ``sweep``'s next task: alive (it may have died
        while idle) and forked for that sweep."""
        if not self._dead:
            try:
                self._dead = os.waitpid(self.pid, os.WNOHANG)[0] != 0
            except ChildProcessError:  # reaped already, as the pack reaps leftovers
                self._dead = True
        return not self._dead and sweep is self.sweep

    def start(self, index: int, env: Mapping[str, str]) -> Served:
        request = json.dumps({"index": index, "env": dict(env)}).encode() + b"\n"
        try:
            while request:
                request = request[os.write(self._requests, request):]
        except BrokenPipeError:
            self._dead = True
        deadline = time.monotonic() + ANSWER_WITHIN
        while not self._started and not self._dead and time.monotonic() < deadline:
            self.collect(block=True)
        if not self._started:
            if not self._dead:  # stopped, or stuck: it is of no use any more
                with contextlib.suppress(OSError):
                    os.kill(self.pid, signal.SIGKILL)
                self._dead = True
                raise OSError(f"the fork server (pid {self.pid}) did not answer within "
                              f"{ANSWER_WITHIN:.0f} s")
            raise OSError(f"the fork server (pid {self.pid}) has died")
        return self._hand_out()

    def _hand_out(self) -> Served:
        """The worker the server said it started, with its end if that was heard too."""
        worker = Served(self._started.pop(), self)
        self._workers[worker.pid] = worker
        # a worker that returns at once may have ended in the same read as it started
        if worker.pid in self._ended:
            self._heard([b"ended", str(worker.pid).encode(), *self._ended.pop(worker.pid)])
        return worker

    def collect(self, block: bool) -> None:
        """Read what the server said (waiting up to a second for a word when ``block``)."""
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                self._heard(line.split())
                continue
            if self._dead:
                return
            if not select.select([self._replies], [], [], 1.0 if block else 0)[0]:
                return
            chunk = os.read(self._replies, 4096)
            if not chunk:  # the server is gone: its workers' ends are not known
                self._dead = True
                for worker in self._workers.values():
                    worker.lost = f"pid {self.pid}"
                    worker.returncode = 255
                self._workers.clear()
                return
            self._buffer += chunk
            block = False

    def _heard(self, words: list[bytes]) -> None:
        if words[:1] == [b"started"]:
            self._started.append(int(words[1]))
        elif words[:1] == [b"ended"]:
            worker = self._workers.pop(int(words[1]), None)
            if worker is None:
                self._ended[int(words[1])] = words[2:]
            else:
                worker.peak_bytes = int(words[3]) * 1024  # ru_maxrss: KiB on Linux
                worker.cpu_sec = float(words[4])
                worker.returncode = int(words[2])

    def close(self) -> None:
        if self._requests >= 0:
            os.close(self._requests)
            os.close(self._replies)
            self._requests = self._replies = -1
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        heartbeat.SPARED.discard(self.pid)
        self._dead = True


def _dead(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie its parent has not reaped has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


class Served:
    """A worker of the fork server, waited for as Popen waits: its exit status (and peak
    RSS and CPU time) come from the server, which is its parent."""

    def __init__(self, pid: int, server: _Server) -> None:
        self.pid = pid
        self._server = server
        self._code: int | None = None
        #: Its peak RSS and CPU seconds, as its parent (the server) reaped it.
        self.peak_bytes: int | None = None
        self.cpu_sec = 0.0
        #: Set when the server died before saying how the worker ended (its pid).
        self.lost: str | None = None

    @property
    def returncode(self) -> int | None:
        if self._code is None:
            self._server.collect(block=False)
        return self._code

    @returncode.setter
    def returncode(self, value: int | None) -> None:
        self._code = value

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        dead_since: float | None = None
        while self._code is None:
            self._server.collect(block=True)
            if self._code is None and _dead(self.pid):  # and the server says nothing
                dead_since = dead_since or time.monotonic()
                if time.monotonic() - dead_since > ANSWER_WITHIN:  # stopped, or stuck
                    with contextlib.suppress(OSError):
                        os.kill(self._server.pid, signal.SIGKILL)  # its end: unknown
        return self._code


    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def _fork(life: Callable[[Any], int]) -> int:
    """Fork with the signals that end a pack blocked; the child lives ``life(mask)`` (it
    puts the signal mask back itself, once its handlers are its own) and exits with what
    it returns (:data:`_INTERNAL` if notata fails in it); the parent gets the pid."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid == 0:  # never returns
        code = _INTERNAL
        try:
            code = life(mask)
        except KeyboardInterrupt:  # Ctrl-C before the task began: as Python would exit
            code = 130
        except BaseException:
            with contextlib.suppress(Exception):
                traceback.print_exc()
        finally:
            os._exit(code)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return pid


def _serve(requests: int, replies: int, function: Function, sweep: Sweep, mask: Any,
           tie: Callable[[], None] | None) -> int:
    """The fork server's life: deaf to the signals that end a pack (the pack's process
    handles them, and the server dies with it), it forks a worker per request and says
    when it started and how it ended."""
    for signum in _BLOCKED:
        signal.signal(signum, signal.SIG_IGN)
    os.setsid()
    if tie is not None:  # the server dies with the pack's process
        tie()
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    buffer = b""
    while True:
        line, sep, buffer = buffer.partition(b"\n")
        if not sep:
            chunk = os.read(requests, 1 << 16)
            if not chunk:
                return 0  # the pack is done
            buffer = line + chunk
            continue
        task = json.loads(line)

        def work(mask: Any, task: Any = task) -> int:
            os.close(requests)
            os.close(replies)
            return _worker(function, sweep, int(task["index"]), task["env"], mask)

        pid = _fork(work)
        os.write(replies, f"started {pid}\n".encode())
        while True:
            try:
                _, status, usage = os.wait4(pid, 0)
                break
            except InterruptedError:
                continue
        os.write(replies, f"ended {pid} {os.waitstatus_to_exitcode(status)} "
                          f"{usage.ru_maxrss} {usage.ru_utime + usage.ru_stime}\n".encode())


def _worker(function: Function, sweep: Sweep, index: int, env: Mapping[str, str],
            mask: Any) -> int:
    """A worker's life: default signal handlers, a session of its own, dying with the
    server; the task's environment and output files; then the call. Its exit status."""
    die_with_server = die_with_parent(os.getppid())
    for signum in _RESET:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for ignored in function.ignore:
        signal.signal(ignored, signal.SIG_IGN)
    os.setsid()
    if die_with_server is not None:
        die_with_server()
    os.environ.clear()
    os.environ.update(env)
    run_dir = Path(env["NOTATA_RUN_DIR"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, layout.STDOUT), (2, layout.STDERR)):
        out = os.open(run_dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(out, fd)
        os.close(out)
    # signals only now: whatever they make it say goes to the run's files, not the pack's
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        return _call(function, sweep, index)
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()


def _call(function: Function, sweep: Sweep, index: int) -> int:
    """Call the function in the task's (attached) Logbook; the exit status a Python
    program would end with (1 for an exception, its traceback on stderr)."""
    try:
        log = open_task(sweep, index)
        with log:
            if function.fn is None:
                raise UsageError(f"cannot load {function.name}: {function.error}")
            assert log.task is not None
            value = function.fn(dict(log.task.params), log)
            save_result(log, value)
    except SystemExit as end:
        if end.code is None or isinstance(end.code, int):
            return end.code or 0
        print(end.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException as err:  # the traceback from the user's code on (not notata's)
        tb = err.__traceback__
        while tb is not None and tb.tb_frame.f_code is _call.__code__:
            tb = tb.tb_next
        traceback.print_exception(type(err), err, tb)
        return 1
    return 0


def load(name: str) -> Function:
    """The function ``MODULE:FUNCTION`` (or ``path/file.py:FUNCTION``) names; one that
    cannot be loaded gives a :class:`Function` that records its error in every task."""
    try:
        return Function(resolve(name), name)
    except UsageError as err:
        return Function(None, name, str(err).removeprefix(f"--python {name}: "))


def resolve(name: str) -> Callable[..., Any]:
    """Import what ``name`` (``MODULE:FUNCTION`` or ``path/file.py:FUNCTION``) names; a
    :class:`~notata.errors.UsageError` saying why when it cannot."""
    module_name, sep, attr = name.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--python {name}: give MODULE:FUNCTION, e.g. --python "
                         "simulate:run (or path/to/file.py:run)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise UsageError(f"--python {name}: no file {module_name}")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules.setdefault(path.stem, module)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as python -m: the current folder first
            module = importlib.import_module(module_name)
    except (UsageError, KeyboardInterrupt):
        raise
    except BaseException as err:  # an import that fails, or that exits
        raise UsageError(f"--python {name}: cannot import {module_name}: "
                         f"{type(err).__name__}: {err}") from err
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(f"--python {name}: {module_name} has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"--python {name}: {attr} is not a function "
                         f"({type(target).__name__})")
    return target  # type: ignore[no-any-return]


def of(argv: Any) -> Function | None:
    """The :class:`Function` a command names (``["--python", NAME]``), loaded; None for
    a command of its own."""
    if isinstance(argv, Function):
        return argv
    argv = list(argv)
    if not argv or argv[0] != FLAG:
        return None
    if len(argv) != 2:
        raise UsageError(f"{FLAG} takes one MODULE:FUNCTION and nothing after it, not "
                         f"{argv[1:]!r}")
    return load(argv[1])


def save_result(log: Any, value: Any) -> None:
    """``artifacts/result.json`` when the value is JSON, else ``artifacts/result.pkl``."""
    if value is None:
        return
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        log.save_pickle(RESULT, value)
    else:
        log.save_json(RESULT, value)


def load_result(run_dir: Path) -> Any:
    """The saved result of a complete task. A pickle written by this task is trusted."""
    folder = run_dir / layout.ARTIFACTS
    if (folder / f"{RESULT}.json").exists():
        return json.loads((folder / f"{RESULT}.json").read_text(encoding="utf-8"))
    if (folder / f"{RESULT}.pkl").exists():
        with open(folder / f"{RESULT}.pkl", "rb") as f:
            return pickle.load(f)
    return None
