"""The heartbeat: beats while open, reports resources, stops at close, never tears a file."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from conftest import read_meta, wait_for

from notata import Logbook
from notata.heartbeat import Resources


def test_beats_advance_with_resources_and_stop_at_close(base: Path) -> None:
    with Logbook("hb", base, heartbeat=0.05) as log:
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
