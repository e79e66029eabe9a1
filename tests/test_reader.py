"""LogReader, Experiment and ExperimentReader, as notata 0.3 users know them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import python

from notata import Experiment, ExperimentReader, Logbook, LogReader


def test_log_reader_lists_and_loads(base: Path) -> None:
    with Logbook("run1", base, params={"dt": 0.1}) as log:
        log.array("energy", np.arange(4))
        log.arrays("state", x=np.zeros(2), v=np.ones(2))
        log.json("metrics", {"err": 1e-6})
        log.json("nested/config", {"a": 1})
    run = LogReader(log.path)
    assert run.run_id == "run1" and run.params == {"dt": 0.1}
    assert run.arrays == ["energy", "state:v", "state:x"]
    assert run.artifacts == ["metrics.json", "nested/config.json"]
    assert run.load_array("energy").tolist() == [0, 1, 2, 3]
    assert run.load_array("state:x").tolist() == [0.0, 0.0]
    assert run.load_json("metrics.json") == run.load_json("metrics") == {"err": 1e-6}
    text = str(run)
    assert "<LogReader 'run1'>" in text and "status=complete" in text and "state:v" in text
    with pytest.raises(FileNotFoundError):
        run.load_array("nope")
    with pytest.raises(KeyError):
        run.load_array("state:nope")
    with pytest.raises(FileNotFoundError):
        LogReader(base / "log_missing")
    with pytest.raises(ValueError, match="invalid"):
        run.load_array("../../etc/passwd")


def test_reader_never_unpickles_unless_asked(base: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(marker),))  # type: ignore[return-value]

    with Logbook("evil", base) as log:
        (log.datadir).mkdir()
        np.save(log.datadir / "obj.npy", np.array([Evil()], dtype=object), allow_pickle=True)
        log.save_pickle("p", Evil())
    run = LogReader(log.path)
    assert "obj" in run.arrays and "p.pkl" in run.artifacts
    with pytest.raises(ValueError, match="pickle"):
        run.load_array("obj")
    assert not marker.exists()
    run.load_pickle_unsafe("p")  # the explicit, unsafe call is the only way in
    assert marker.exists()


def test_experiment_index_and_reader(base: Path) -> None:
    exp = Experiment("falling_ball", base_dir=base)
    for dt in (0.01, 0.5):
        log = exp.add(dt=dt, skip_existing=True)
        assert log is not None
        try:
            with log:
                if dt > 0.1:
                    raise RuntimeError("hit the ground")
                log.json("metrics", {"final_height": 95.0})
        except RuntimeError:
            pass
    assert exp.add(dt=0.01, skip_existing=True) is None
    with (base / "falling_ball" / "index.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run_id"], r["status"], r["final_height"]) for r in rows] == [
        ("falling_ball_dt_0.01", "complete", "95.0"),
        ("falling_ball_dt_0.5", "failed", ""),
    ]
    reader = ExperimentReader(base / "falling_ball")
    assert len(reader) == 2
    assert reader[0].run_id == "falling_ball_dt_0.01"
    assert reader["falling_ball_dt_0.5"].meta["status"] == "failed"
    assert [r.params["dt"] for r in reader] == [0.01, 0.5]
    assert list(reader.params) == ["falling_ball_dt_0.01", "falling_ball_dt_0.5"]
    with pytest.raises(KeyError):
        reader["nope"]
    with pytest.raises(IndexError):
        reader[5]
    assert "Runs directory: runs with 2 runs" in str(reader)


def test_experiment_dataframe_needs_pandas(base: Path) -> None:
    exp = Experiment("e", base_dir=base)
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            exp.to_dataframe()
        return
    with exp.add(a=1) as log:
        log.json("metrics", {"m": 2})
    assert exp.select(a=1)["m"].tolist() == [2]


def test_parallel_workers_do_not_interleave_index_rows(base: Path) -> None:
    code = """
        import sys
        from notata import Experiment
        exp = Experiment("par", base_dir=sys.argv[1])
        for k in range(10):
            with exp.add(worker=int(sys.argv[2]), k=k) as log:
                log.json("metrics", {"value": k})
        """
    procs = [python(code, str(base), str(w)) for w in range(4)]
    assert [p.wait(60) for p in procs] == [0] * 4
    with (base / "par" / "index.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and all(r["status"] == "complete" for r in rows)


def test_experiment_reader_needs_a_runs_folder(base: Path) -> None:
    """As notata 0.3: a folder without runs/ is not an Experiment; an empty runs/ is."""
    with pytest.raises(FileNotFoundError, match="runs"):
        ExperimentReader(base)
    (base / "runs").mkdir()
    assert len(ExperimentReader(base)) == 0
