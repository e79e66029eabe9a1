"""The collector end to end on the real test cluster: status and resubmit after real failures."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from helpers import (
    job_gone,
    read_meta,
    sbatch,
    status_is,
    submit,
    tree_digest,
    wait_for,
    write_sweep,
)

import notata
from notata import index, submissions
from notata.cli import main
from notata.collector import scan
from notata.manifest import load
from notata.slurm import collector_queue

# k1 fails on its first attempt; k2 hangs on its first attempt (to be SIGKILLed).
PAYLOAD = """
import os, sys, time
k, attempt = int(sys.argv[1]), int(os.environ["NOTATA_ATTEMPT"])
if attempt == 1 and k == 1:
    sys.exit("k1 diverged")
if attempt == 1 and k == 2:
    time.sleep(300)
"""



def test_status_and_resubmit_after_real_failures(slurm_cluster: str, base: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_sweep(base, name="e2e", tasks=6)
    payload = base / "payload.py"
    payload.write_text(PAYLOAD)
    out = base / "outputs"
    assert submit(manifest, "--backend", "slurm", "--throttle", "3", "--", sys.executable,
                  str(payload), "{k}") == 0
    [record] = submissions.submitted(out)
    job = record["job_ids"][0]
    wait_for(status_is(out / "log_k2", "running"), 120, "k2 to start")
    # while tasks are queued or running, none of them is resubmitted (k1 may have failed
    # already: it fails at once, and is then rightly chosen)
    live = scan(load(manifest), queue=collector_queue(out, "test"))
    chosen, _ = live.to_resubmit()
    assert set(chosen) <= {1}, [(r.run_id, r.status, r.queued) for r in live.runs]
    assert {r.run_id: r.status for r in live.runs}["k2"] == "running"
    # cancel k5 while it is still pending (the throttle holds it), then SIGKILL k2's
    # wrapper and payload outright, as the OOM killer or a dying node would
    subprocess.run(["scancel", f"{job}_5"], check=True)
    wrapper = psutil.Process(read_meta(out / "log_k2")["pid"])
    for p in [wrapper, *wrapper.children(recursive=True)]:
        p.kill()
    wait_for(job_gone(job), 300, "the array to end")
    capsys.readouterr()

    report = scan(load(manifest), queue=collector_queue(out, "test"))
    got = {r.run_id: (r.status, r.attempt) for r in report.runs}
    assert got == {"k0": ("complete", 1), "k1": ("failed", 1), "k2": ("stale", 1),
                   "k3": ("complete", 1), "k4": ("complete", 1), "k5": ("missing", 0)}
    # the queue no longer lists it, and on this single-node cluster its pid is gone too;
    # "job gone" alone is not concluded while its heartbeat is fresh (test_collect.py)
    assert report.runs[2].reason in ("its SLURM job is gone",
                                     f"its process (pid {wrapper.pid} on this host) is gone")
    assert "k1 diverged" in (report.runs[1].reason or "")
    complete_before = {k: tree_digest(out / f"log_k{k}") for k in (0, 3, 4)}

    # from Python, with a list option (repeated --sbatch-line)
    assert notata.resubmit(manifest, backend="slurm",
                           sbatch_line=["--comment=again", "--nice=1"]) == 0
    assert "resubmitting 3 task(s) with the slurm backend: 1-2,5" in capsys.readouterr().out
    second = submissions.submitted(out)[-1]
    assert second["tasks"] == "1-2,5" and second["command"] == record["command"]
    text = Path(second["arrays"][0]["script"]).read_text()
    assert "#SBATCH --nice=1" in text and ' again"' in text  # the comment follows the tag
    wait_for(lambda: all(job_gone(j)() for j in second["job_ids"]), 300, "the resubmission")
    metas = {k: read_meta(out / f"log_k{k}") for k in range(6)}
    assert {k: (m["status"], m["attempt"]) for k, m in metas.items()} == {
        0: ("complete", 1), 1: ("complete", 2), 2: ("complete", 2), 3: ("complete", 1),
        4: ("complete", 1), 5: ("complete", 1)}
    assert [a["status"] for a in metas[1]["attempts"]] == ["failed"]
    assert [a["status"] for a in metas[2]["attempts"]] == ["running"]  # killed: as it was left
    assert {k: tree_digest(out / f"log_k{k}") for k in (0, 3, 4)} == complete_before
    # nothing is left to do
    assert main(["resubmit", str(manifest), "--backend", "slurm"]) == 0
    assert "nothing to resubmit" in capsys.readouterr().out


def test_tasks_of_a_users_own_array_read_pending(slurm_cluster: str, base: Path) -> None:
    """An array submitted with plain sbatch (not notata submit) that calls notata.task():
    once one task has started, its queued siblings are pending, never missing, so resubmit
    leaves them alone."""
    manifest = write_sweep(base, name="own", tasks=3)
    go = base / "go"
    script = base / "own.sbatch"
    code = ("import os, sys, time, notata\n"
            "with notata.task(sys.argv[1]):\n"
            "    while not os.path.exists(sys.argv[2]): time.sleep(0.2)\n")
    script.write_text("#!/bin/sh\nexec " + shlex.join([sys.executable, "-c", code, str(manifest),
                                                       str(go)]) + "\n")
    job = subprocess.run(["sbatch", "--parsable", "--array=0-2%1", f"--chdir={base}",
                          f"--output={base}/slurm-%A_%a.out", str(script)],
                         capture_output=True, text=True, check=True).stdout.strip()
    out = base / "outputs"
    try:
        wait_for(status_is(out / "log_k0", "running"), 120, "task 0 to start")
        report = scan(load(manifest), queue=collector_queue(out, "test"))
        assert [(r.status, r.queued) for r in report.runs] == [
            ("running", "RUNNING"), ("pending", "PENDING"), ("pending", "PENDING")]
        assert report.to_resubmit() == ([], [])
    finally:
        go.write_text("")
        wait_for(job_gone(job), 120, "the array to end")
    assert [read_meta(out / f"log_k{k}")["status"] for k in range(3)] == ["complete"] * 3


def test_a_users_own_array_is_known_when_every_started_task_is_complete(
        slurm_cluster: str, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Tasks 0 and 1 of a plain sbatch array complete while 2 and 3 are held in the queue.
    The scan takes 0 and 1 from the sweep index (opening neither run), and still maps the
    array from their index records: 2 and 3 read pending and resubmit leaves them."""
    manifest = write_sweep(base, name="held", tasks=4)
    script = base / "own.sbatch"
    code = "import sys, notata\nwith notata.task(sys.argv[1]):\n    pass\n"
    script.write_text("#!/bin/sh\nexec " + shlex.join([sys.executable, "-c", code,
                                                       str(manifest)]) + "\n")
    job = sbatch(script, "--hold", "--array=0-3", f"--chdir={base}",
                 f"--output={base}/slurm-%A_%a.out")
    out = base / "outputs"
    try:
        subprocess.run(["scontrol", "release", f"{job}_0", f"{job}_1"], check=True)
        sweep = load(manifest)
        # the index says complete just after metadata.json does: wait for the index
        def both_indexed() -> bool:
            done = index.complete_tasks(out, sweep.hash, 4)
            return done is not None and len(done) == 2

        wait_for(both_indexed, 120, "tasks 0 and 1 to complete")
        report = scan(sweep, queue=collector_queue(out, "test"))
        assert report.indexed["task"].tolist() == [0, 1]  # not opened
        assert [(r.task, r.status, r.queued) for r in report.read] == [
            (2, "pending", "PENDING"), (3, "pending", "PENDING")]
        capsys.readouterr()
        assert main(["resubmit", str(manifest), "--backend", "slurm", "--", "true"]) == 0
        assert "nothing to resubmit" in capsys.readouterr().out
        # the table reads the queue as status does: pending, not missing
        assert main(["table", str(manifest), "--format", "json"]) == 0
        table = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(r["task"], r["status"]) for r in table] == [
            (0, "complete"), (1, "complete"), (2, "pending"), (3, "pending")]
    finally:
        subprocess.run(["scancel", job], check=True)
        wait_for(job_gone(job), 120, "the array to end")
    assert not (out / "log_k2").exists() and not (out / "log_k3").exists()


def test_a_colleagues_queued_and_running_tasks_read_so(
        slurm_cluster: str, group_users: tuple[str, list[str], str]) -> None:
    """squeue --me does not list a colleague's jobs: their RUNNING task once read "stale:
    its SLURM job is gone" and was chosen for resubmit, their queued ones "missing". The
    queue is now asked for every user who submitted to the sweep or ran one of its runs."""
    import shutil

    from helpers import as_user, shared_folder

    py, (a, _), group = group_users
    shared = shared_folder(group)
    manifest = shared / "sweep.yaml"
    out = shared / "outputs"
    try:
        submitting = as_user(a, py, "import sys\nfrom notata.cli import main\n"
                             "sys.exit(main(sys.argv[1:]))", "submit", str(manifest),
                             "--backend", "slurm", "--throttle", "1", "--", "sleep", "120")
        said, err = submitting.communicate(timeout=120)
        assert submitting.returncode == 0, (said, err)
        wait_for(status_is(out / "log_k0", "running"), 120, "the colleague's task 0 to start")
        assert read_meta(out / "log_k0")["user"] == a
        report = notata.collect(manifest)  # by root: another user than the submitter
        got = {r.task: (r.status, r.queued) for r in report.runs}
        assert got[0] == ("running", "RUNNING")
        assert {got[k][0] for k in (1, 2, 3)} == {"pending"}, got
        assert report.to_resubmit() == ([], [])
    finally:
        for r in submissions.submitted(out):
            for j in r.get("job_ids", []):
                subprocess.run(["scancel", str(j)], check=False)
        shutil.rmtree(shared, ignore_errors=True)


def test_a_colleagues_own_array_reads_pending(
        slurm_cluster: str, group_users: tuple[str, list[str], str]) -> None:
    """A colleague's own `sbatch --array` (no submission of hers recorded): once some of
    its tasks have completed, its held tasks read pending for another user too, and are
    never resubmitted beside hers (her jobs are not in `squeue -u` of anyone asked)."""
    import shutil

    from helpers import as_user, shared_folder

    py, (_, b), group = group_users
    shared = shared_folder(group)
    manifest = shared / "sweep.yaml"
    script = shared / "own.sbatch"
    script.write_text(f"#!/bin/sh\nexec {py} -m notata exec {manifest} -- true\n")
    script.chmod(0o775)
    job = None
    try:
        sub = as_user(b, py, "import subprocess, sys\nprint(subprocess.run(['sbatch', "
                      "'--parsable', '--hold', '--array=0-3', '--output=' + sys.argv[2], "
                      "sys.argv[1]], capture_output=True, text=True, check=True).stdout)",
                      str(script), f"{shared}/slurm-%A_%a.out")
        out, err = sub.communicate(timeout=60)
        assert sub.returncode == 0, err
        job = out.strip().split(";")[0]
        subprocess.run(["scontrol", "release", f"{job}_0", f"{job}_1"], check=True)
        for k in (0, 1):
            wait_for(status_is(shared / "outputs" / f"log_k{k}", "complete"), 120, f"task {k}")
        report = notata.collect(manifest)  # by root
        got = {r.task: r.status for r in report.runs}
        assert got == {0: "complete", 1: "complete", 2: "pending", 3: "pending"}, got
        assert report.to_resubmit() == ([], [])
    finally:
        if job:
            subprocess.run(["scancel", job], check=False)
        shutil.rmtree(shared, ignore_errors=True)
