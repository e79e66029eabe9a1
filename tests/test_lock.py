"""One live writer per run, tested with real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from helpers import python, status_is, wait_for

from notata import Logbook, LogReader, RunLockedError
from notata import lock as lockmod

HOLD = """
    import sys, time
    from notata import Logbook
    log = Logbook(sys.argv[2], sys.argv[1], resume=True, heartbeat=0.2)
    print("open", flush=True)
    time.sleep(60)
    """


def test_second_opener_gets_a_clear_error_naming_the_holder(base: Path) -> None:
    holder = python(HOLD, str(base), "run")
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "open"
        before = (base / "log_run" / "metadata.json").read_text()
        with pytest.raises(RunLockedError) as info:
            Logbook("run", base, resume=True)
        message = str(info.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert info.value.holder["pid"] == holder.pid
        assert isinstance(info.value, BlockingIOError)
        # the failed opener changed nothing the holder wrote
        assert json.loads((base / "log_run" / "metadata.json").read_text())["pid"] == holder.pid
        assert json.loads(before)["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_does_not_block_the_next_attempt(base: Path) -> None:
    holder = python(HOLD, str(base), "run")
    assert holder.stdout and holder.stdout.readline().strip() == "open"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert LogReader(base / "log_run").meta["status"] == "running"  # it had no chance to write
    with Logbook("run", base, resume=True) as log:
        assert log.attempt == 2
    meta = LogReader(log.path).meta
    assert meta["attempts"][0]["status"] == "running" and meta["attempts"][0]["pid"] == holder.pid


def test_two_processes_racing_for_one_run_exactly_one_wins(base: Path) -> None:
    code = """
        import sys, time
        from notata import Logbook, RunLockedError
        time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
        try:
            log = Logbook(sys.argv[2], sys.argv[1], resume=True)
        except RunLockedError as err:
            print("locked:", err, flush=True)
            sys.exit(3)
        print("won", flush=True)
        time.sleep(4)  # longer than the losers' retry (lock.RETRY_SEC) plus start-up skew
        log.mark_complete()
        """
    start = str(time.time() + 2.0)
    procs = [python(code, str(base), "race", start) for _ in range(4)]
    results = [(p.wait(30), p.communicate()[0]) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 3, 3, 3], results
    meta = LogReader(base / "log_race").meta
    assert meta["status"] == "complete" and meta["attempt"] == 1


def test_live_holder_on_this_host_is_never_broken(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = python(HOLD, str(base), "run")
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "open"
        # even with an ancient heartbeat, a holder on this host is alive if its lock is held
        monkeypatch.setattr(lockmod, "MIN_STALE_LOCK_SEC", 0.0)
        with pytest.raises(RunLockedError):
            Logbook("run", base, resume=True, heartbeat=1000)
    finally:
        holder.kill()
        holder.wait()


# A holder on another host, as its Logbook left the run: it holds the run lock (here, the
# flock of a process of this host stands for the one taken on that node), its metadata.json
# names that host, and its lock file carries that host's stamp ("host pid unixtime"). Its
# last heartbeat is AGE seconds old, at INTERVAL seconds between beats; it beats no more.
# Arguments: RUN_DIR HOST AGE INTERVAL.
REMOTE_HOLDER = """
    import json, os, sys, time
    from pathlib import Path
    from notata.lock import RunLock
    run, host = Path(sys.argv[1]), sys.argv[2]
    age, interval = float(sys.argv[3]), float(sys.argv[4])
    run.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run, lambda: json.loads((run / "metadata.json").read_text()))
    assert lock.try_acquire(stamp=False), "the run lock is free"
    beat = time.time() - age
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(beat))
    meta = {"schema": 1, "run_id": run.name.removeprefix("log_"), "status": "running",
            "start_time": when, "start_unix": round(beat, 3), "attempt": 1, "attempts": [],
            "host": host, "pid": os.getpid(), "user": "someone", "cwd": os.getcwd(),
            "argv": sys.argv, "heartbeat": {"unix": round(beat, 3), "time": when, "beat": 1,
                                           "interval_sec": interval}}
    (run / "metadata.json").write_text(json.dumps(meta))
    # what the holder on that node stamped into the lock file when it took it
    (run / ".lock").write_text(f"{host} {os.getpid()} {beat:.3f}")
    print("open", flush=True)
    time.sleep(60)
    """


def test_stale_holder_on_another_host_is_broken_after_the_threshold(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process holds the flock but stopped beating an hour ago; it runs on a lost node.
    holder = python(REMOTE_HOLDER, str(base / "log_run"), "lost-node-17", "3600", "5")
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "open"
        monkeypatch.setattr(lockmod, "CONFIRM_SEC", 0.1)
        with Logbook("run", base, resume=True) as log:
            assert log.attempt == 2
        assert LogReader(log.path).meta["attempts"][0]["host"] == "lost-node-17"
        assert list(log.path.glob(".lock.broken-*"))
    finally:
        holder.kill()
        holder.wait()


def test_a_broken_holders_open_files_are_not_the_new_attempts(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder taken for dead may only be cut off (a frozen node): what it writes
    through the files it holds open, once its lock was broken, lands in none of the new
    attempt's files; what it wrote before is kept."""
    holder = python(REMOTE_HOLDER.replace('    print("open", flush=True)', """\
    files = [open(run / name, "a") for name in ("stdout.txt", "stderr.txt", "log.txt")]
    for f in files:
        f.write("before the break\\n"); f.flush()
    print("open", flush=True)
    while not (run / "go").exists():
        time.sleep(0.05)
    for f in files:
        f.write("after the break\\n"); f.flush()
    print("wrote", flush=True)"""), str(base / "log_run"), "lost-node-17", "3600", "5")
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "open"
        monkeypatch.setattr(lockmod, "CONFIRM_SEC", 0.1)
        with Logbook("run", base, resume=True) as log:
            assert log.attempt == 2
            (log.path / "go").touch()
            assert holder.stdout.readline().strip() == "wrote"
            log.info("the new attempt's line")
        for name in ("stdout.txt", "stderr.txt", "log.txt"):
            text = (log.path / name).read_text()
            assert "before the break" in text and "after the break" not in text, (name, text)
    finally:
        holder.kill()
        holder.wait()


def test_fresh_holder_on_another_host_is_not_broken(base: Path) -> None:
    # It has just beaten, and beats every 1000 s.
    holder = python(REMOTE_HOLDER, str(base / "log_run"), "busy-node-3", "0", "1000")
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "open"
        with pytest.raises(RunLockedError, match="busy-node-3"):
            Logbook("run", base, resume=True)
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_not_inherited_by_children(base: Path) -> None:
    # A child started by the run keeps running after the run's process is killed;
    # the next attempt must still get the lock.
    code = """
        import subprocess, sys, time
        from notata import Logbook
        log = Logbook("run", sys.argv[1])
        child = subprocess.Popen(["sleep", "30"])
        print(child.pid, flush=True)
        time.sleep(60)
        """
    holder = python(code, str(base))
    assert holder.stdout
    child_pid = int(holder.stdout.readline())
    try:
        holder.kill()
        holder.wait()
        wait_for(lambda: True)
        with Logbook("run", base, resume=True) as log:
            assert log.attempt == 2
    finally:
        os.kill(child_pid, signal.SIGKILL)
    assert status_is(log.path, "complete")()


def test_locked_error_names_the_slurm_job() -> None:
    err = RunLockedError("/runs/log_x", {"host": "n1", "pid": 42,
                                         "slurm": {"array_job_id": 77, "array_task_id": 5}})
    assert str(err) == ("/runs/log_x is in use by another process (host n1, pid 42, "
                        "SLURM job 77_5); it must finish first")
    import pickle

    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_a_lock_held_for_an_instant_is_waited_for_not_refused(base: Path) -> None:
    """A collector's probe (runstate.held) holds a run's lock for an instant; a task
    opening the run in that instant retries instead of failing with RunLockedError."""
    (base / "log_run").mkdir()
    code = """
        import sys, time, filelock
        lock = filelock.FileLock(sys.argv[1] + "/log_run/.lock")
        lock.acquire()
        print("held", flush=True)
        time.sleep(0.3)
        lock.release()
        """
    prober = python(code, str(base))
    try:
        assert prober.stdout and prober.stdout.readline().strip() == "held"
        with Logbook("run", base, resume=True) as log:
            assert log.attempt == 1
    finally:
        prober.wait(10)


def test_a_new_holder_is_never_taken_for_the_dead_one_it_replaced(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's record still names a node that died 20 minutes ago; a new holder has just
    taken the lock and not yet written its record (a slow start, a suspended job). The
    breaker once read the stale record twice, broke the lock, and two processes ran."""
    run = base / "log_run"
    run.mkdir()
    dead = {"run_id": "run", "status": "running", "host": "lost-node-17", "pid": 4242,
            "attempt": 1, "heartbeat": {"unix": time.time() - 1200, "interval_sec": 30}}
    (run / "metadata.json").write_text(json.dumps(dead))
    (run / ".lock").write_text(f"lost-node-17 4242 {time.time() - 1300}")
    holder = python("""
        import sys, time
        from pathlib import Path
        from notata.lock import RunLock
        lock = RunLock(Path(sys.argv[1]), dict)
        lock.acquire()                 # taken, stamped; its metadata not written yet
        print("held", flush=True)
        time.sleep(60)
        """, str(run))
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(lockmod, "CONFIRM_SEC", 0.2)
        with pytest.raises(RunLockedError):
            Logbook("run", base, resume=True)
        assert not list(run.glob(".lock.broken-*"))
        assert json.loads((run / "metadata.json").read_text()) == dead
    finally:
        holder.kill()
        holder.wait()


def test_a_broken_holders_streams_are_copied_only_when_they_are_regular_files(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy made when a lock is broken follows no symlink (a planted one naming a
    secret, or /dev/zero), leaves a FIFO or a folder alone, and a copy that fails leaves
    the old file aside (not where the new attempt writes) and no temporary file."""
    from notata import _fs

    run = base / "log_r"
    run.mkdir()
    secret = base / "secret"
    secret.write_text("s3cret")
    (run / "log.txt").symlink_to(secret)
    (run / "stderr.txt").symlink_to("/dev/zero")
    os.mkfifo(run / "stdout.txt")
    for name in ("log.txt", "stderr.txt", "stdout.txt"):
        _fs.detach(run / name)
    assert not (run / "log.txt").exists() and not (run / "stderr.txt").exists()
    assert (run / "stdout.txt").is_fifo() and secret.read_text() == "s3cret"
    assert sorted(p.name for p in run.iterdir()) == ["stdout.txt"]
    (run / "stdout.txt").unlink()
    (run / "stdout.txt").write_text("kept\n")

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(_fs.shutil, "copyfileobj", full)
    with pytest.raises(OSError):
        _fs.detach(run / "stdout.txt")
    # the old file stays aside (its writer may still write to it): never the new one's
    [aside] = run.iterdir()
    assert aside.name.startswith(".stdout.txt.detached-") and aside.read_text() == "kept\n"
