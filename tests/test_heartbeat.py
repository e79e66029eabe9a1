"""The heartbeat: beats while open, reports resources, stops at close, never tears a file."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from helpers import read_meta, wait_for

from notata import Logbook
from notata.heartbeat import Resources


def test_beats_advance_with_resources_and_stop_at_close(base: Path) -> None:
    with Logbook("hb", base, heartbeat=0.05) as log:
        t = time.process_time()
        while time.process_time() - t < 0.05:  # CPU time the run itself spends
            pass
        wait_for(lambda: read_meta(log.path)["heartbeat"]["beat"] >= 3, what="3 beats")
        hb = read_meta(log.path)["heartbeat"]
        assert hb["interval_sec"] == 0.05
        assert hb["rss_bytes"] > 1_000_000 and hb["peak_rss_bytes"] >= hb["rss_bytes"]
        assert hb["cpu_time_sec"] > 0 and hb["cpu_percent"] >= 0 and hb["pids"] == 1
        assert abs(hb["unix"] - time.time()) < 5
    closed = (log.path / "metadata.json").read_bytes()
    time.sleep(0.3)
    assert (log.path / "metadata.json").read_bytes() == closed
    assert read_meta(log.path)["status"] == "complete"


def test_one_thread_beats_every_open_run_each_at_its_interval(base: Path) -> None:
    """Runs open at once share the process's heartbeat thread; closing one leaves the
    others beating; a forked child that opens a run gets a thread of its own."""
    import os
    import threading

    def beat(log: Logbook) -> int:
        return int(read_meta(log.path)["heartbeat"]["beat"])

    def threads() -> int:
        return sum(t.name == "notata-heartbeat" for t in threading.enumerate())

    with Logbook("a", base, heartbeat=0.05) as a, Logbook("b", base, heartbeat=0.2) as b:
        with Logbook("c", base, heartbeat=0.05) as c:
            wait_for(lambda: beat(a) >= 8 and beat(c) >= 8 and beat(b) >= 1, what="beats")
            assert threads() == 1
            assert beat(b) < beat(a)  # each at its own interval
        closed = (c.path / "metadata.json").read_bytes()
        before = beat(a)
        wait_for(lambda: beat(a) >= before + 3, what="a still beating")
        assert (c.path / "metadata.json").read_bytes() == closed
        pid = os.fork()
        if pid == 0:  # the child's run must beat, though the parent's thread is not there
            code = 1
            try:
                with Logbook("child", base, heartbeat=0.05) as d:
                    deadline = time.monotonic() + 10
                    while beat(d) < 3 and time.monotonic() < deadline:
                        time.sleep(0.02)
                    code = 0 if beat(d) >= 3 else 2
            finally:
                os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
    assert read_meta(base / "log_child")["status"] == "complete"


def test_the_thread_ends_when_no_run_is_open_and_asked_to(base: Path) -> None:
    """A process that forks a function task's worker first ends its heartbeat thread
    (notata._function): only when no run is open; the next run starts it again."""
    import threading

    from notata import heartbeat

    def threads() -> int:
        return sum(t.name == "notata-heartbeat" for t in threading.enumerate())

    with Logbook("a", base, heartbeat=0.05) as a:
        assert threads() == 1
        assert heartbeat.quiesce() is False and threads() == 1  # a run is open
    assert heartbeat.quiesce() is True and threads() == 0
    with Logbook("b", base, heartbeat=0.05) as b:
        wait_for(lambda: read_meta(b.path)["heartbeat"]["beat"] >= 2, what="b beating")
    assert read_meta(a.path)["status"] == "complete"


def test_interval_from_environment(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTATA_HEARTBEAT", "2.5")
    with Logbook("env", base) as log:
        assert read_meta(log.path)["heartbeat"]["interval_sec"] == 2.5


@pytest.mark.parametrize("value", ["soon", "0", "-1"])
def test_bad_interval_is_refused_before_anything_is_made(
    base: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("NOTATA_HEARTBEAT", value)
    with pytest.raises(ValueError, match="heartbeat|NOTATA_HEARTBEAT"):
        Logbook("bad", base)
    assert not (base / "log_bad").exists()


def test_tree_resources_count_children() -> None:
    import subprocess

    child = subprocess.Popen(
        ["python3", "-c", "x = bytearray(50_000_000); import time; time.sleep(5)"]
    )
    try:
        tree = Resources(tree=True)
        wait_for(lambda: tree.sample()["rss_bytes"] > 50_000_000, what="child memory")
        assert tree.sample()["pids"] >= 2
    finally:
        child.kill()
        child.wait()


def test_heartbeat_keeps_beating_during_busy_numpy_work(base: Path) -> None:
    # Liveness must show even while the main thread computes (timing is in benchmarks/).
    with Logbook("busy", base, heartbeat=0.02) as log:
        acc = np.zeros(100_000)
        deadline = time.monotonic() + 20
        while read_meta(log.path)["heartbeat"]["beat"] < 5:
            acc += np.sin(acc + 1.0)
            assert time.monotonic() < deadline, "no heartbeat during computation"
    assert np.isfinite(acc).all()


def test_the_heartbeat_never_writes_a_terminal_status_or_an_index_record(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guarantee 17's order (outputs fsynced, then metadata.json complete, durably, then
    the index record) must hold against the heartbeat thread too. The window between its
    check of the run's state and its write is widened here: a beat that wrote after the
    run was marked complete wrote "complete" (not durable) and the index record before
    the outputs were fsynced."""
    import threading

    from notata import _fs, _run, index

    events: list[tuple[str, str, str, object, bool]] = []

    def who() -> str:
        return threading.current_thread().name

    real_write_meta = _run.OwnedRun.write
    real_atomic = _fs.atomic_write_json
    real_fsync = _fs.fsync_paths
    real_record = index.record

    def slow_write_meta(self: _run.OwnedRun, durable: bool = False) -> None:
        if who() == "notata-heartbeat":
            time.sleep(0.02)
        real_write_meta(self, durable)

    def atomic(path: Path, obj: object, *, durable: bool = False,
               still: object = None) -> bool:
        if path.name == "metadata.json" and isinstance(obj, dict):
            events.append(("meta", who(), path.parent.name, obj.get("status"), durable))
        return real_atomic(path, obj, durable=durable, still=still)

    def fsync(paths: object) -> None:
        events.append(("fsync", who(), "", None, True))
        real_fsync(paths)  # type: ignore[arg-type]

    def record(base_dir: Path, meta: dict) -> None:  # type: ignore[type-arg]
        events.append(("index", who(), f"log_{meta['run_id']}", meta.get("status"), False))
        real_record(base_dir, meta)

    monkeypatch.setattr(_run.OwnedRun, "write", slow_write_meta)
    monkeypatch.setattr(_fs, "atomic_write_json", atomic)
    monkeypatch.setattr(_fs, "fsync_paths", fsync)
    monkeypatch.setattr(index, "record", record)
    for i in range(25):
        log = Logbook(f"r{i}", base, heartbeat=0.002)
        log._set(task=i, manifest_hash="abc123")  # a sweep task: it writes index records
        log.save_text("out", "x")
        time.sleep(0.005 * (i % 5))
        log.mark_complete()
    time.sleep(0.1)  # any late beat would show now
    beats = [e for e in events if e[1] == "notata-heartbeat"]
    assert beats, "the heartbeat never wrote: the test widened no window"
    assert all(kind == "meta" and status in ("running", "initialized")
               for kind, _, _, status, _ in beats), beats
    for i in range(25):
        mine = [e for e in events if e[2] in (f"log_r{i}", "")]
        done = next(k for k, e in enumerate(mine) if e[0] == "index" and e[3] == "complete")
        durable = next(k for k, e in enumerate(mine) if e[0] == "meta" and e[3] == "complete")
        assert mine[durable][4] and durable < done
        assert any(e[0] == "fsync" for e in mine[:durable])
        assert not any(e[0] == "meta" and e[3] == "complete" and not e[4] for e in mine)
