"""Signals end a run with a recorded status, tested by signalling real processes."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import python, read_meta, status_is, wait_for

from notata import Logbook

LOOP = """
    import sys, time
    from notata import Logbook
    with Logbook("run", sys.argv[1], heartbeat=0.1) as log:
        @log.on_warning
        def checkpoint(log):
            log.save_text("checkpoint", "saved at warning")
        try:
            print("open", flush=True)
            while True:
                time.sleep(0.01)
        finally:
            print("finally ran", flush=True)
    """


def test_sigterm_records_terminated_and_exits_143(base: Path) -> None:
    proc = python(LOOP, str(base))
    assert proc.stdout and proc.stdout.readline().strip() == "open"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert "finally ran" in out
    meta = read_meta(base / "log_run")
    assert meta["status"] == "terminated"
    assert "SIGTERM" in meta["failure_reason"]
    assert [s["signal"] for s in meta["signals"]] == ["SIGTERM"]
    assert meta["end_time"] and meta["runtime_sec"] > 0


def test_sigusr1_reaches_the_hook_and_then_sigterm_is_a_timeout(base: Path) -> None:
    proc = python(LOOP, str(base))
    assert proc.stdout and proc.stdout.readline().strip() == "open"
    run = base / "log_run"
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: (run / "artifacts" / "checkpoint.txt").exists(), what="checkpoint")
    assert read_meta(run)["status"] == "running"  # a warning does not end the run
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    meta = read_meta(run)
    assert meta["status"] == "timeout"
    assert [s["signal"] for s in meta["signals"]] == ["SIGUSR1", "SIGTERM"]
    assert "WARNING SIGUSR1 received" in (run / "log.txt").read_text()


def test_users_own_handler_is_chained(base: Path) -> None:
    code = """
        import signal, sys, time
        from notata import Logbook
        def mine(signum, frame):
            print("user handler", flush=True)
            sys.exit(7)
        signal.signal(signal.SIGTERM, mine)
        log = Logbook("run", sys.argv[1])
        print("open", flush=True)
        while True:
            time.sleep(0.01)
        """
    proc = python(code, str(base))
    assert proc.stdout and proc.stdout.readline().strip() == "open"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7 and "user handler" in out
    assert read_meta(base / "log_run")["status"] == "terminated"


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_a_signal_during_the_last_runs_close_reaches_the_users_handler(
        base: Path, signame: str) -> None:
    """The close's writes hold signals back, and the run stops listening meanwhile: the
    signal held back goes to the handler that was there before, not nowhere."""
    code = """
        import signal, sys
        from notata import Logbook, _fs
        got = []
        signal.signal(getattr(signal, sys.argv[2]), lambda s, f: got.append(s))
        real = _fs.fsync_paths
        def fsync_paths(paths):
            real(paths)
            signal.raise_signal(getattr(signal, sys.argv[2]))  # inside the close
        _fs.fsync_paths = fsync_paths
        with Logbook("run", sys.argv[1]) as log:
            log.save_json("x", {"a": 1})
        print("handled" if got else "lost", flush=True)
        """
    proc = python(code, str(base), signame)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == "handled", (out, err)
    assert read_meta(base / "log_run")["status"] == "complete"


def test_signals_held_back_reach_every_run_in_order(base: Path) -> None:
    """SIGUSR1 then SIGTERM held back by one run's write: both runs hear the warning
    before the SIGTERM (the warning's own writes do not deliver the next signal)."""
    code = """
        import os, signal, sys
        from notata import Logbook
        outer = Logbook("outer", sys.argv[1])
        inner = Logbook("inner", sys.argv[1])
        with inner.holding_signals():
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
        """
    proc = python(code, str(base))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    for name in ("outer", "inner"):
        meta = read_meta(base / f"log_{name}")
        assert meta["status"] == "timeout", (name, meta)
        assert [x["signal"] for x in meta["signals"]] == ["SIGUSR1", "SIGTERM"]


def test_a_child_forked_inside_a_held_section_still_holds_its_own(base: Path) -> None:
    code = """
        import os, signal, sys
        from notata import Logbook
        a = Logbook("a", sys.argv[1])
        with a.holding_signals():
            pid = os.fork()
        if pid == 0:
            b = Logbook("b", sys.argv[1])
            with b.holding_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                print("held", flush=True)  # reached only if the section held it
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        a.close()
        """
    proc = python(code, str(base))
    out, err = proc.communicate(timeout=30)
    assert "held" in out, (out, err)
    assert read_meta(base / "log_b")["status"] == "terminated"


def test_our_handler_put_back_by_hand_breaks_nothing(base: Path) -> None:
    code = """
        import signal, sys
        from notata import Logbook
        a = Logbook("a", sys.argv[1])
        old = signal.signal(signal.SIGTERM, lambda s, f: None)
        a.close()
        signal.signal(signal.SIGTERM, old)  # notata's dispatcher, with nobody to tell
        c = Logbook("c", sys.argv[1])
        Logbook("c", sys.argv[1], overwrite=True).close()
        print("fine", flush=True)
        """
    proc = python(code, str(base))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "fine" in out, err


def test_handlers_are_restored_after_the_run(base: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with Logbook("r", base):
        assert signal.getsignal(signal.SIGTERM) != before
    assert signal.getsignal(signal.SIGTERM) == before


def test_sigterm_during_a_storm_of_writes_never_leaves_running(base: Path) -> None:
    # SIGTERM lands at random points of metadata and artifact writes; the terminal
    # status must always reach the disk and the files must always parse.
    code = """
        import sys
        from notata import Logbook
        log = Logbook(sys.argv[2], sys.argv[1], heartbeat=0.01)
        print("open", flush=True)
        i = 0
        while True:
            i += 1
            log.meta(step=i)
            log.save_json("progress", {"i": i})
        """
    rng = random.Random(1)
    procs = []
    for n in range(12):
        procs.append((n, python(code, str(base), f"r{n}")))
    for _, proc in procs:
        assert proc.stdout and proc.stdout.readline().strip() == "open"
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGTERM)
    for n, proc in procs:
        proc.communicate(timeout=30)
        assert proc.returncode == 143
        meta = read_meta(base / f"log_r{n}")
        assert meta["status"] == "terminated", meta
        assert status_is(base / f"log_r{n}", "terminated")()


def test_run_opened_outside_the_main_thread_installs_no_handler(base: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    logs = []
    t = threading.Thread(target=lambda: logs.append(Logbook("t", base)))
    t.start()
    t.join()
    assert signal.getsignal(signal.SIGTERM) == before
    logs[0].mark_complete()


def test_after_sigterm_the_lock_is_kept_through_finally_blocks(base: Path) -> None:
    """The status is written in the handler; the lock is released only when the run is
    closed, after the user's finally blocks, which may still write into the run."""
    from notata import RunLockedError

    code = """
        import sys, time
        from notata import Logbook
        with Logbook("run", sys.argv[1], heartbeat=0.1) as log:
            try:
                print("open", flush=True)
                while True:
                    time.sleep(0.01)
            finally:
                print("in finally", flush=True)
                time.sleep(1.5)
                log.save_text("checkpoint", "written in finally")
        """
    proc = python(code, str(base))
    assert proc.stdout and proc.stdout.readline().strip() == "open"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "in finally"
    run = base / "log_run"
    assert read_meta(run)["status"] == "terminated"  # recorded in the handler
    try:
        Logbook("run", base, resume=True)
        raise AssertionError("a next attempt opened beside code that still writes")
    except RunLockedError:
        pass
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert (run / "artifacts" / "checkpoint.txt").read_text() == "written in finally"
    with Logbook("run", base, resume=True) as log:
        assert log.attempt == 2


def test_sighup_records_terminated_with_a_hangup(base: Path) -> None:
    proc = python(LOOP, str(base))
    assert proc.stdout and proc.stdout.readline().strip() == "open"
    proc.send_signal(signal.SIGHUP)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 129 and "finally ran" in out
    meta = read_meta(base / "log_run")
    assert meta["status"] == "terminated" and "hangup" in meta["failure_reason"]


def test_nohup_keeps_sighup_ignored(base: Path) -> None:
    code = """
        import signal, sys, time
        signal.signal(signal.SIGHUP, signal.SIG_IGN)   # what nohup does
        from notata import Logbook
        with Logbook("run", sys.argv[1]) as log:
            print("open", flush=True)
            time.sleep(1)
        """
    proc = python(code, str(base))
    assert proc.stdout and proc.stdout.readline().strip() == "open"
    proc.send_signal(signal.SIGHUP)
    proc.communicate(timeout=30)
    assert proc.returncode == 0 and read_meta(base / "log_run")["status"] == "complete"


SLOW_OPEN = """
    import sys, time
    from notata import Logbook
    print("opening", flush=True)
    with Logbook("run", sys.argv[1], heartbeat=60) as log:   # scontrol answers in 1.5 s
        print("open", flush=True)
        time.sleep(5)
    """


@pytest.mark.parametrize(("first", "then", "status"), [
    (signal.SIGTERM, signal.SIGUSR1, "terminated"),
    (signal.SIGUSR1, signal.SIGTERM, "timeout"),
])
def test_signals_that_arrive_while_the_run_opens_are_all_kept_in_order(
        base: Path, tmp_path: Path, first: int, then: int, status: str) -> None:
    """A slow open (a busy SLURM controller): a SIGTERM followed by the warning once lost
    the SIGTERM (the run completed), the warning followed by SIGTERM the warning."""
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "scontrol").write_text("#!/bin/sh\nsleep 1.5\nexit 1\n")
    (slow / "scontrol").chmod(0o755)
    import os

    proc = python(SLOW_OPEN, str(base), env={"PATH": f"{slow}:{os.environ['PATH']}",
                                             "SLURM_JOB_ID": "999999"})
    assert proc.stdout and proc.stdout.readline().strip() == "opening"
    wait_for(lambda: (base / "log_run" / "metadata.json").exists(), what="the first write")
    proc.send_signal(first)
    time.sleep(0.05)
    proc.send_signal(then)
    proc.communicate(timeout=30)
    assert proc.returncode == 143
    meta = read_meta(base / "log_run")
    assert meta["status"] == status
    assert [s["signal"] for s in meta["signals"]] == [signal.Signals(first).name,
                                                      signal.Signals(then).name][
        : 2 if first == signal.SIGUSR1 else 1]


def _run(code: str, base: Path) -> tuple[int, str, str]:
    proc = python(code, str(base))
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_a_caught_sigterm_does_not_deafen_the_process(base: Path) -> None:
    """A worker loop that catches SystemExit per run: the next run still hears SIGTERM."""
    rc, out, err = _run("""
        import os, signal, sys
        from notata import Logbook
        for name in ("first", "second"):
            try:
                with Logbook(name, sys.argv[1]):
                    os.kill(os.getpid(), signal.SIGTERM)
            except SystemExit as exit:
                print(name, exit.code, flush=True)
        """, base)
    assert out.split() == ["first", "143", "second", "143"], (out, err)
    assert read_meta(base / "log_second")["status"] == "terminated"


def test_a_sigterm_during_the_end_of_a_run_waits_for_its_callback(base: Path) -> None:
    """The signal, held while the status is written, used to exit before the callback: an
    Experiment's index.csv lost the row of a complete run."""
    rc, out, err = _run("""
        import os, signal, sys
        from notata import Experiment, _fs
        real = _fs.fsync_paths
        def fsync_and_get_killed(paths):
            os.kill(os.getpid(), signal.SIGTERM)   # lands in the middle of the end
            real(paths)
        _fs.fsync_paths = fsync_and_get_killed
        exp = Experiment("e", sys.argv[1])
        with exp.add(a=1) as log:
            log.json("metrics", {"loss": 1.0})
        """, base)
    assert rc == 143, err
    rows = (base / "e" / "index.csv").read_text().splitlines()
    assert len(rows) == 2 and ",complete," in rows[1]


def test_a_handler_installed_while_a_run_is_open_hides_nothing(base: Path) -> None:
    rc, out, err = _run("""
        import os, signal, sys
        from notata import Logbook
        a = Logbook("a", sys.argv[1])
        signal.signal(signal.SIGTERM, lambda s, f: print("library handler", flush=True))
        b = Logbook("b", sys.argv[1])
        os.kill(os.getpid(), signal.SIGTERM)
        print("carried on", flush=True)
        """, base)
    assert "library handler" in out and "carried on" in out, (out, err)
    assert read_meta(base / "log_b")["status"] == "terminated"
    assert read_meta(base / "log_a")["status"] == "terminated"


def test_one_run_moved_aside_does_not_keep_sigterm_from_the_others(base: Path) -> None:
    rc, out, err = _run("""
        import os, signal, sys, time
        from notata import Logbook
        base = sys.argv[1]
        a = Logbook("a", base)
        b = Logbook("b", base)
        os.rename(os.path.join(base, "log_b"), os.path.join(base, "aside"))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        """, base)
    assert rc == 143 and "Traceback" not in err, err
    assert read_meta(base / "log_a")["status"] == "terminated"


def test_one_run_moved_aside_does_not_keep_sigusr1_from_the_others(base: Path) -> None:
    rc, out, err = _run("""
        import os, signal, sys, time
        from notata import Logbook
        base = sys.argv[1]
        other = Logbook("other", base)
        other.on_warning(lambda log: print("checkpoint", flush=True))
        a = Logbook("a", base)
        os.rename(os.path.join(base, "log_a"), os.path.join(base, "aside"))
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.2)
        print("carried on", flush=True)
        other.close()
        """, base)
    assert rc == 0 and out.split() == ["checkpoint", "carried", "on"], (out, err)
    assert [s["signal"] for s in read_meta(base / "log_other")["signals"]] == ["SIGUSR1"]
