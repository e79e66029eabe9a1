"""A Logbook inside real SLURM jobs: what it records, and its status when SLURM ends the job.

Runs against the test cluster of scripts/slurm-local.sh (KillWait=5). A time limit
can only be set in whole minutes, so the timeout case takes about 90 s; the
requeue case waits out SLURM's ~120 s requeue delay. All jobs are submitted
together and checked as they finish.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, job_gone, read_meta, sbatch, status_is, wait_for

PAYLOAD = """
import sys, time
from notata import Logbook
log = Logbook(sys.argv[2], sys.argv[1], resume=True, heartbeat=1)
print("attempt", log.attempt, flush=True)
if log.attempt >= 2 or sys.argv[3] == "quick":
    log.save_text("done", "finished in attempt %d" % log.attempt)
    log.mark_complete()
    sys.exit(0)
while True:
    time.sleep(0.1)
"""


def job_script(tmp_path: Path, base: Path, run_id: str, mode: str) -> Path:
    payload = tmp_path / "payload.py"
    payload.write_text(PAYLOAD)
    script = tmp_path / f"job_{run_id}.sh"
    argv = [sys.executable, str(payload), str(base), run_id, mode]
    script.write_text("#!/bin/bash\n"
                      f"export PYTHONPATH={shlex.quote(str(ROOT))}\n"
                      f"exec {shlex.join(argv)}\n")
    return script


def test_slurm_ends_jobs_and_each_run_records_why(slurm_cluster: str, base: Path,
                                                   tmp_path: Path) -> None:
    out = str(tmp_path / "slurm-%j.out")
    quick = sbatch(job_script(tmp_path, base, "quick", "quick"), "--array=3", "-o", out)
    cancel = sbatch(job_script(tmp_path, base, "cancel", "loop"), "-o", out)
    limit = sbatch(job_script(tmp_path, base, "limit", "loop"), "-t", "1", "-o", out)
    requeue = sbatch(job_script(tmp_path, base, "requeue", "loop"), "--requeue", "-o", out)

    wait_for(status_is(base / "log_quick", "complete"), 120, "the quick array task")
    meta = read_meta(base / "log_quick")
    assert meta["slurm"]["array_job_id"] == int(quick) and meta["slurm"]["array_task_id"] == 3
    assert meta["slurm"]["partition"] and meta["slurm"]["time_limit"]

    for run in ("cancel", "requeue"):
        wait_for(status_is(base / f"log_{run}", "running"), 120, f"{run} to start")
    subprocess.run(["scancel", cancel], check=True)
    subprocess.run(["scontrol", "requeue", requeue], check=True)
    wait_for(job_gone(cancel), 60, "the cancelled job to end")
    meta = read_meta(base / "log_cancel")
    assert meta["status"] == "cancelled", meta
    assert "SIGTERM" in meta["failure_reason"]

    wait_for(status_is(base / "log_requeue", "complete"), 300, "the requeued job's 2nd attempt")
    meta = read_meta(base / "log_requeue")
    assert meta["attempt"] == 2 and meta["slurm"]["restart_count"] == 1
    assert [a["status"] for a in meta["attempts"]] == ["preempted"]
    assert meta["slurm"]["job_id"] == int(requeue)  # a requeue keeps the job id

    wait_for(job_gone(limit), 300, "the time-limited job to end")
    meta = read_meta(base / "log_limit")
    assert meta["status"] == "timeout", meta
    assert meta["slurm"]["time_limit"] == "00:01:00"
    assert meta["runtime_sec"] >= 50  # it ran until the one-minute limit
