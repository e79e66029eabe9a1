"""The submitit bridge: DebugExecutor and LocalExecutor here, AutoExecutor on the test cluster."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import submitit
from helpers import read_meta, write_sweep

from notata import submissions
from notata.submitit import submit_sweep

# Jobs unpickle the functions below in another process, where tests/ is not importable.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def manifest(base: Path, n: int = 4) -> Path:
    return write_sweep(base, name="sub", tasks=n, extra="params: {m: 10}\n")


def square(params: dict[str, Any], log: Any) -> dict[str, int]:
    log.info(f"attempt {log.attempt}")
    if params["k"] == 3:
        raise ValueError("k=3 diverges")
    return {"value": params["k"] ** 2 + params["m"]}


def test_debug_executor_runs_the_sweep_in_process(base: Path) -> None:
    executor = submitit.DebugExecutor(folder=str(base / "submitit"))
    jobs = submit_sweep(square, manifest(base), executor, tasks=[0, 1, 2])
    assert [j.result() for j in jobs] == [{"value": 10}, {"value": 11}, {"value": 14}]
    out = base / "outputs"
    assert read_meta(out / "log_k2")["status"] == "complete"
    assert (out / "log_k2" / "artifacts" / "result.json").read_text().strip().endswith("}")
    [record] = submissions.submitted(out)
    assert record["backend"] == "submitit:DebugExecutor" and record["tasks"] == "0-2"
    # complete tasks are not submitted again
    assert submit_sweep(square, manifest(base), executor, tasks=[0, 1, 2]) == []


def test_local_executor_records_failures(base: Path) -> None:
    executor = submitit.LocalExecutor(folder=str(base / "submitit"))
    executor.update_parameters(timeout_min=5)
    jobs = submit_sweep(square, manifest(base), executor)
    assert jobs[0].result() == {"value": 10}
    with pytest.raises(Exception, match="k=3 diverges"):
        jobs[3].result()
    meta = read_meta(base / "outputs" / "log_k3")
    assert meta["status"] == "failed" and meta["failure_reason"] == "k=3 diverges"


def test_index_outside_the_sweep_submits_nothing(base: Path) -> None:
    executor = submitit.DebugExecutor(folder=str(base / "submitit"))
    with pytest.raises(IndexError):
        submit_sweep(square, manifest(base), executor, tasks=[0, 9])
    assert submissions.submitted(base / "outputs") == []


def test_auto_executor_on_the_cluster_with_a_requeue_after_timeout(slurm_cluster: str,
                                                                    base: Path) -> None:
    def simulate(params: dict[str, Any], log: Any) -> dict[str, int]:
        import time

        if params["k"] == 0 and log.attempt == 1:
            log.save_text("checkpoint", "state of attempt 1")
            while True:  # runs into the time limit; submitit's signal requeues it
                time.sleep(0.5)
        return {"k": params["k"], "attempt": log.attempt}

    executor = submitit.AutoExecutor(folder=str(base / "submitit"), cluster="slurm")
    # the signal must come after the task started: SLURM may send it up to 60 s early
    executor.update_parameters(timeout_min=2, slurm_signal_delay_s=30)
    jobs = submit_sweep(simulate, manifest(base, 3), executor)
    assert [j.result() for j in jobs[1:]] == [{"k": 1, "attempt": 1}, {"k": 2, "attempt": 1}]
    assert jobs[0].result() == {"k": 0, "attempt": 2}  # after the requeue
    meta = read_meta(base / "outputs" / "log_k0")
    assert meta["status"] == "complete" and meta["attempt"] == 2
    assert [a["status"] for a in meta["attempts"]] == ["timeout"]
    assert meta["slurm"]["restart_count"] == 1
    checkpoint = base / "outputs" / "log_k0" / "artifacts" / "checkpoint.txt"
    assert checkpoint.read_text() == "state of attempt 1"
    [record] = submissions.submitted(base / "outputs")
    assert record["backend"] == "submitit:SlurmExecutor" and len(record["job_ids"]) == 3
