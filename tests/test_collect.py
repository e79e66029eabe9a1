"""The collector: classification of every kind of run, staleness, and resubmitting exactly those."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    ROOT,
    notata_process,
    python,
    read_meta,
    status_is,
    submit,
    tree_digest,
    wait_for,
    write_sweep,
)

import notata
from notata import Logbook
from notata.cli import main
from notata.collector import Watcher, scan
from notata.manifest import load
from notata.submission import duration as parse_duration

SWEEP = "name: c\nrun_id: 'k{k}'\ngrid: {k: [0, 1, 2, 3, 4, 5]}\n"
# fails on the first attempt for k in 1 and 4
PAYLOAD = (
    "import os, sys; k = int(sys.argv[1]); "
    "sys.exit(2 if k in (1, 4) and os.environ['NOTATA_ATTEMPT'] == '1' else 0)"
)



@pytest.fixture
def manifest(base: Path) -> Path:
    return write_sweep(base, SWEEP)


def kill_mid_run(manifest: Path, index: int) -> None:
    """A task whose wrapper and payload die by SIGKILL: nothing written at the end."""
    proc = notata_process("exec", str(manifest), "--task", str(index), "--", "sleep", "30",
                          start_new_session=True)
    run = load(manifest).task(index).run_dir
    wait_for(status_is(run, "running"), what="the task to start")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_every_kind_of_run_is_classified(manifest: Path, base: Path) -> None:
    out = base / "outputs"
    assert submit(manifest, "--backend", "local", "--tasks", "0-1", "--", sys.executable, "-c",
                  PAYLOAD, "{k}") == 1
    kill_mid_run(manifest, 2)
    holder = python(
        """
        import sys, time, notata
        log = notata.task(sys.argv[1], 3, heartbeat=0.2)
        print("open", flush=True)
        time.sleep(60)
        """,
        str(manifest),
    )
    assert holder.stdout and holder.stdout.readline().strip() == "open"
    try:
        (out / "log_stray").mkdir()
        (out / "log_stray" / "notes.txt").write_text("not a run")  # never opened by notata
        with Logbook("other", out):
            pass
        other = read_meta(out / "log_other")
        (out / "log_k4").mkdir()
        (out / "log_k4" / "metadata.json").write_text(
            json.dumps({**other, "run_id": "k4", "manifest_hash": "0" * 16})
        )
        report = scan(load(manifest))
        got = {(r.task, r.run_id): r.status for r in report.runs}
        assert got == {
            (0, "k0"): "complete",
            (1, "k1"): "failed",
            (2, "k2"): "stale",
            (3, "k3"): "running",
            (4, "k4"): "mismatch",
            (5, "k5"): "missing",
            (None, "other"): "complete",
            (None, "stray"): "corrupt",
        }
        reasons = {r.run_id: r.reason for r in report.runs}
        assert "is gone" in reasons["k2"] and "no metadata.json" in reasons["stray"]
        assert reasons["k1"].startswith("command exited with status 2")
        chosen, left = report.to_resubmit(["failed", "stale", "missing", "running", "mismatch"])
        assert chosen == [1, 2, 5]
        assert [(r.run_id, why) for r, why in left] == [
            ("k3", "a live process holds its lock"),
            ("k4", "another version of the manifest wrote it"),
        ]
    finally:
        holder.kill()
        holder.wait()


def test_heartbeat_staleness_and_clock_skew(base: Path) -> None:
    """A run that another host recorded (its last writer gone: nobody holds its lock)."""
    with Logbook("r", base, heartbeat=60) as log:
        pass
    meta = read_meta(log.path)
    meta.update(status="running", host="node-elsewhere")  # only the heartbeat can tell
    meta["heartbeat"] = dict(meta["heartbeat"], unix=time.time() - 1000)
    (log.path / "metadata.json").write_text(json.dumps(meta))
    [r] = scan(base).runs
    assert r.status == "stale" and "no heartbeat for" in r.reason
    assert scan(base, stale_after=5000).runs[0].status == "running"
    # a clock running ahead: fresh for a single scan, stale once the beat stops moving
    meta["heartbeat"] = dict(meta["heartbeat"], unix=time.time() + 3600)
    (log.path / "metadata.json").write_text(json.dumps(meta))
    assert scan(base).runs[0].status == "running"
    watcher = Watcher(stale_after=0.3)
    assert watcher.scan(base).runs[0].status == "running"
    time.sleep(0.5)
    r = watcher.scan(base).runs[0]
    assert r.status == "stale" and "collector's clock" in r.reason


def test_a_run_whose_lock_a_live_process_holds_is_never_stale(base: Path) -> None:
    """Whatever its heartbeat says (a suspended job, a short --stale-after), a run whose
    lock a live process holds is running, and nobody is told to stop its command."""
    with Logbook("held", base, heartbeat=60):
        [r] = scan(base, stale_after=0).runs
        assert r.status == "running" and "holds its lock" in (r.reason or "")
        watcher = Watcher(stale_after=0.1)
        watcher.scan(base)
        time.sleep(0.3)
        assert watcher.scan(base).runs[0].status == "running"
        assert scan(base, stale_after=0).to_resubmit(["stale"]) == ([], [])


def test_parse_duration() -> None:
    assert [parse_duration(t) for t in ("90s", "10m", "2h", "1d", "45")] == [
        90,
        600,
        7200,
        86400,
        45,
    ]
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_resubmit_locally_runs_exactly_what_needs_it(
    manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = base / "outputs"
    cmd = ["--", sys.executable, "-c", PAYLOAD, "{k}"]
    assert submit(manifest, "--backend", "local", "--tasks", "0-1,3-4", *cmd) == 1
    kill_mid_run(manifest, 2)  # k5 is never submitted: missing
    before = {k: tree_digest(out / f"log_k{k}") for k in (0, 3)}
    capsys.readouterr()
    assert main(["resubmit", str(manifest), "--backend", "local", "--dry-run"]) == 0
    assert "would resubmit 4 task(s) with the local backend: 1-2,4-5" in capsys.readouterr().out
    with pytest.raises(TypeError, match="unknown option 'walltime'"):
        notata.resubmit(manifest, walltime="1:00:00")
    with pytest.raises(ValueError, match="unknown status 'complete'"):
        notata.resubmit(manifest, "complete")
    with pytest.raises(ValueError, match="throttle 'many': give a whole number"):
        notata.resubmit(manifest, throttle="many")
    with pytest.raises(ValueError, match="is one string; give a list"):
        notata.resubmit(manifest, command="python sim.py")
    with pytest.raises(ValueError, match="stale_after: invalid duration 'soon'"):
        notata.resubmit(manifest, stale_after="soon")
    assert "resubmit" not in capsys.readouterr().out  # neither ran
    assert notata.resubmit(manifest, backend="local", max_attempts=1) == 0  # the Python API
    text = capsys.readouterr()
    # 1, 2 and 4 already had one attempt
    assert "resubmitting 1 task(s) with the local backend: 5" in text.out
    assert "leaving task 1 (k1, failed): already at 1 attempt(s)" in text.err
    assert main(["resubmit", str(manifest), "--backend", "local"]) == 0  # the recorded command
    attempts = {k: read_meta(out / f"log_k{k}")["attempt"] for k in range(6)}
    assert attempts == {0: 1, 1: 2, 2: 2, 3: 1, 4: 2, 5: 1}
    assert all(read_meta(out / f"log_k{k}")["status"] == "complete" for k in range(6))
    assert read_meta(out / "log_k2")["attempts"][0]["status"] == "running"  # killed, kept
    assert {k: tree_digest(out / f"log_k{k}") for k in (0, 3)} == before
    assert main(["resubmit", str(manifest), "--backend", "local"]) == 0
    assert "nothing to resubmit" in capsys.readouterr().out
    not_complete = [
        r
        for r in json.loads(
            subprocess.run(
                [sys.executable, "-m", "notata", "status", str(manifest), "--json"],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            ).stdout
        )["runs"]
        if r["status"] != "complete"
    ]
    assert not_complete == []


def test_table_rows_params_and_artifact_fields(
    manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import notata

    code = (
        "import json, os, sys; d = os.environ['NOTATA_RUN_DIR'] + '/artifacts'; os.makedirs(d);"
        " json.dump({'E': int(sys.argv[1]) * 0.5, 'nested': {'n': 1}, 'list': [1]},"
        " open(d + '/final_metrics.json', 'w'))"
    )
    assert submit(manifest, "--backend", "local", "--tasks", "0-2", "--", sys.executable, "-c",
                  code, "{k}") == 0
    capsys.readouterr()
    assert main(["table", str(manifest), "--artifact", "final_metrics", "--status",
                 "complete"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "run_id,task,status,attempt,runtime_sec,exit_code,job,failure_reason,k,"
        "final_metrics.E,final_metrics.nested.n"
    )
    assert [ln.split(",")[:4] + ln.split(",")[5:] for ln in lines[1:]] == [
        ["k0", "0", "complete", "1", "0", "", "", "0", "0.0", "1"],
        ["k1", "1", "complete", "1", "0", "", "", "1", "0.5", "1"],
        ["k2", "2", "complete", "1", "0", "", "", "2", "1.0", "1"],
    ]
    # a misspelt status or artifact is an error naming the choices, not empty columns
    assert main(["table", str(manifest), "--status", "faild"]) == 2
    err = capsys.readouterr().err
    assert "not a status; the statuses are initialized, running, complete" in err
    assert main(["table", str(manifest), "--artifact", "final_metric"]) == 2
    assert "the JSON artifacts they have: final_metrics" in capsys.readouterr().err
    assert main(["table", str(base / "outputs"), "--format", "json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [(r["run_id"], r["task"], r["k"]) for r in rows] == [  # tasks from metadata
        ("k0", 0, 0),
        ("k1", 1, 1),
        ("k2", 2, 2),
    ]
    try:
        import pandas  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pandas"):
            notata.table(str(manifest))
    else:  # the command line's names (one artifact, one status), and the older ones
        df = notata.table(manifest, artifact="final_metrics", status="complete")
        assert df["final_metrics.E"].tolist() == [0.0, 0.5, 1.0]
        assert df["task"].tolist() == [0, 1, 2] and df["k"].tolist() == [0, 1, 2]
        old = notata.table(str(manifest), artifacts=["final_metrics"],
                           statuses=["complete", "missing"])
        assert old["task"].tolist() == list(range(6)) and "final_metrics.E" in old.columns
        with pytest.raises(notata.UsageError, match="faild"):
            notata.table(manifest, status="faild")
        with pytest.raises(TypeError):
            notata.table(manifest, artifact="final_metrics", artifacts=["final_metrics"])


def test_table_is_aligned_text_on_a_terminal_and_csv_in_a_pipe(
        manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pty

    code = ("import json, os, sys; d = os.environ['NOTATA_RUN_DIR'] + '/artifacts'; "
            "os.makedirs(d); json.dump({'E': int(sys.argv[1]) / 3}, open(d + '/m.json', 'w'))")
    assert submit(manifest, "--backend", "local", "--tasks", "0-1", "--", sys.executable, "-c",
                  code, "{k}") == 0
    capsys.readouterr()
    argv = [sys.executable, "-m", "notata", "table", str(manifest), "--artifact", "m"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    piped = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert piped.returncode == 0 and piped.stdout.startswith("run_id,task,status,")
    master, slave = pty.openpty()
    on_screen = subprocess.Popen(argv, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    seen = b""
    with contextlib.suppress(OSError):  # EIO once the terminal's other end is closed
        while chunk := os.read(master, 65536):
            seen += chunk
    os.close(master)
    assert on_screen.wait(60) == 0
    lines = seen.decode().replace("\r", "").splitlines()
    assert main(["table", str(manifest), "--artifact", "m", "--format", "text"]) == 0
    assert capsys.readouterr().out.splitlines() == lines
    header = lines[0].split()
    assert header[:4] == ["run_id", "task", "status", "attempt"] and header[-1] == "m.E"
    assert "job" not in header and "failure_reason" not in header  # no run has one
    assert lines[1].split()[:4] == ["k0", "0", "complete", "1"] and lines[1].endswith(" 0")
    assert lines[2].endswith(" 0.333333") and lines[3].split()[:3] == ["k2", "2", "missing"]
    assert lines[3].endswith(" -")
    # the columns line up: each header name ends where its right-aligned numbers end
    end = lines[0].index("task") + len("task")
    assert [ln[end - 1] for ln in lines[1:]] == ["0", "1", "2", "3", "4", "5"]


def test_watch_returns_once_every_task_is_terminal(manifest: Path, base: Path) -> None:
    assert submit(manifest, "--backend", "local", "--", "true") == 0
    proc = subprocess.run([sys.executable, "-m", "notata", "status", str(manifest), "--watch",
                           "0.1", "--json"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0
    assert json.loads(proc.stdout.splitlines()[-1])["counts"]["complete"] == 6


def test_hostile_run_folders_are_reported_never_followed(base: Path, tmp_path: Path) -> None:
    out = base / "outputs"
    with Logbook("good", out):
        pass
    cases = {"empty": None, "truncated": b'{"status": "compl', "binary": b"\xff\xfe\x00{",
             "nan": b'{"status": NaN, "attempt": 1}', "array": b"[1, 2]", "blank": b""}
    for name, data in cases.items():
        (out / f"log_{name}").mkdir()
        if data is not None:
            (out / f"log_{name}" / "metadata.json").write_bytes(data)
    (out / "log_young").mkdir()  # a start between its mkdir and its lock
    old = time.time() - 600
    os.utime(out / "log_empty", (old, old))  # a start that died there, long ago
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "metadata.json").write_text('{"status": "failed"}')
    (out / "log_link").symlink_to(outside)
    (out / ".nfs000000001234").write_text("stray")
    report = scan(out)
    got = {r.run_id: r.status for r in report.runs}
    assert got == {"good": "complete", "link": "corrupt", "young": "running",
                   **dict.fromkeys(cases, "corrupt"), "empty": "stale"}
    reasons = {r.run_id: r.reason for r in report.runs}
    assert "symlink" in reasons["link"] and "not UTF-8" in reasons["binary"]
    assert "empty file" in reasons["blank"] and "unknown status" in reasons["nan"]
    assert report.to_resubmit(["corrupt"]) == ([], [])  # no task: never resubmitted blindly


def test_two_collectors_at_once_resubmit_each_task_once(manifest: Path, base: Path) -> None:
    cmd = ["--", sys.executable, "-c", PAYLOAD, "{k}"]
    assert submit(manifest, "--backend", "local", *cmd) == 1  # k1, k4 fail
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "notata", "resubmit", str(manifest),
                               "--backend", "local"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o.splitlines()[0] for o in outs) == [
        "nothing to resubmit among: failed, timeout, preempted, stale, missing, oom",
        "resubmitting 2 task(s) with the local backend: 1,4"]
    attempts = {k: read_meta(base / "outputs" / f"log_k{k}")["attempt"] for k in range(6)}
    assert attempts == {0: 1, 1: 2, 2: 1, 3: 1, 4: 2, 5: 1}


def test_choosing_runs_to_resubmit_writes_nothing(manifest: Path, base: Path) -> None:
    """The lock probe of to_resubmit() creates no .lock where none was (a scan writes nothing)."""
    with pytest.raises(RuntimeError), notata.task(manifest, 1):
        raise RuntimeError("diverged")
    run = base / "outputs" / "log_k1"
    (run / ".lock").unlink(missing_ok=True)
    before = tree_digest(run)
    chosen, left = scan(load(manifest)).to_resubmit()
    assert 1 in chosen and not left
    assert tree_digest(run) == before and not (run / ".lock").exists()


def test_a_task_killed_during_start_up_is_a_start_that_died(
        manifest: Path, base: Path, tmp_path: Path) -> None:
    """The lock is taken, then SLURM is asked for the time limit (seconds on a busy
    controller): a SIGKILL there once left a folder with only .lock, read corrupt and
    never resubmitted. The first write now comes before anything slow."""
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "scontrol").write_text("#!/bin/sh\nsleep 30\n")  # a controller that hangs
    (slow / "scontrol").chmod(0o755)
    env = {"PATH": f"{slow}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = python("import sys, notata; notata.task(sys.argv[1], 2)", str(manifest), env=env)
    run = base / "outputs" / "log_k2"
    wait_for(lambda: (run / "metadata.json").exists(), what="the first write")
    time.sleep(0.3)
    proc.kill()
    proc.wait()
    assert read_meta(run)["status"] == "initialized"
    # and a folder a start left with nothing but its (free) lock
    bare = base / "outputs" / "log_k3"
    bare.mkdir()
    (bare / ".lock").touch()
    assert {r.task: r.status for r in scan(load(manifest)).runs}[3] == "running"  # starting
    old = time.time() - 600
    for made in (bare / ".lock", bare):
        os.utime(made, (old, old))  # ten minutes later, still nothing
    report = scan(load(manifest))
    by_task = {r.task: r for r in report.runs}
    assert by_task[2].status == "stale" and "pid" in (by_task[2].reason or "")
    assert by_task[3].status == "stale" and "start died" in (by_task[3].reason or "")
    chosen, _ = report.to_resubmit()
    assert {2, 3} <= set(chosen)
    with notata.task(manifest, 3) as log:
        assert log.attempt == 1


def test_a_local_sweep_stops_cleanly_on_a_hangup(manifest: Path, base: Path) -> None:
    """An ssh connection that drops during `notata submit --backend local`: the tasks stop
    and say so; nothing runs on unsupervised."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "notata", "submit", str(manifest),
                             "--backend", "local", "-j", "2", "--", "sleep", "62.5"],
                            env=env, stderr=subprocess.PIPE, text=True)
    out = base / "outputs"
    wait_for(lambda: sum(status_is(d, "running")() for d in out.glob("log_*")) == 2,
             what="two running tasks")
    proc.send_signal(signal.SIGHUP)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 129, err
    metas = [read_meta(d) for d in out.glob("log_*")]
    assert sorted(m["status"] for m in metas) == ["terminated", "terminated"]
    assert all("hangup" in m["failure_reason"] for m in metas)
    assert "(hangup)" in err
    assert subprocess.run(["pgrep", "-f", "^sleep 62.5$"], capture_output=True).stdout == b""


def test_resubmit_keeps_the_backend_options_and_narrows_to_tasks(
        manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep run locally is resubmitted locally, with its recorded options, even where
    sbatch exists; --tasks narrows the choice and names what it leaves."""
    from notata import submissions

    cmd = ["--", sys.executable, "-c", PAYLOAD, "{k}"]
    assert submit(manifest, "--backend", "local", "-j", "1", *cmd) == 1
    capsys.readouterr()
    assert main(["resubmit", str(manifest), "--tasks", "0,4"]) == 0
    said = capsys.readouterr()
    assert "resubmitting 1 task(s) with the local backend: 4" in said.out
    assert "from the last submission" in said.out and "jobs=1" in said.out
    assert "task 0 is complete, which is not among" in said.err
    attempts = {k: read_meta(base / "outputs" / f"log_k{k}")["attempt"] for k in range(6)}
    assert attempts == {0: 1, 1: 1, 2: 1, 3: 1, 4: 2, 5: 1}  # task 1 was not asked for
    records = [r for r in submissions.submitted(base / "outputs") if r.get("backend")]
    assert [r["options"] for r in records] == [{"jobs": 1}, {"jobs": 1}]
    assert len({r["submission"] for r in records}) == 2
    ends = [r for r in submissions.read(base / "outputs") if r.get("ended")]
    assert [r["submission"] for r in ends] == [r["submission"] for r in records]


def test_job_gone_is_never_concluded_over_a_fresh_heartbeat(tmp_path: Path) -> None:
    """A queue that does not list a job (another user's, a partial answer) is wrong about a
    run that is still beating; one that has missed its beats is gone."""
    from notata.queue import Queue
    from notata.runstate import read_run

    def run(age: float) -> dict[str, object]:
        now = time.time()
        return {"status": "running", "run_id": "r", "attempt": 1, "host": "node7",
                "pid": 1234, "user": "someone", "slurm": {"job_id": 99},
                "heartbeat": {"unix": now - age, "beat": 3, "interval_sec": 30}}

    queue = Queue({})  # asked, and it lists nothing
    for age, status, reason in [(5, "running", None), (59, "running", None),
                                (61, "stale", "its SLURM job is gone")]:
        d = tmp_path / f"log_r{age}"
        d.mkdir()
        (d / "metadata.json").write_text(json.dumps(run(age)))
        r = read_run(d, queue=queue)
        assert (r.status, r.reason) == (status, reason), age


def test_only_the_queue_of_the_runs_own_scheduler_judges_its_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SLURM's queue says nothing of a job another scheduler ran (a second provider, the
    seam's promise), nor of an empty scheduler record: neither reads "job gone"."""
    from notata import scheduler
    from notata.queue import Queue
    from notata.runstate import read_run

    class Pbs:  # the least a second scheduler implements for a scan
        name, title = "pbs", "PBS"

        def job_key(self, ctx: dict[str, object]) -> str:
            return str(ctx["job_id"])

        def array_of(self, ctx: dict[str, object]) -> None:
            return None

        def is_alive(self, state: str) -> bool:
            return state == "R"

    monkeypatch.setattr(scheduler, "_PROVIDERS", [*scheduler._PROVIDERS, Pbs()])
    queue = Queue({})  # SLURM's queue, asked, lists nothing
    now = time.time()
    for name, job in [("pbs", {"pbs": {"job_id": "77.server"}}), ("empty", {"slurm": {}}),
                      ("slurm", {"slurm": {"job_id": 99}})]:
        d = tmp_path / f"log_{name}"
        d.mkdir()
        (d / "metadata.json").write_text(json.dumps({
            "status": "running", "run_id": name, "attempt": 1, "host": "node7", "pid": 1234,
            "user": "someone", **job,
            "heartbeat": {"unix": now - 100, "beat": 3, "interval_sec": 30}}))
    assert read_run(tmp_path / "log_pbs", queue=queue).status == "running"
    assert read_run(tmp_path / "log_empty", queue=queue).status == "running"
    slurm = read_run(tmp_path / "log_slurm", queue=queue)
    assert (slurm.status, slurm.reason) == ("stale", "its SLURM job is gone")


def test_the_submission_record_survives_a_torn_line_and_odd_lines(
        manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A line a full disk cut short once swallowed the next record; a well-formed line of
    the wrong shape (a hand edit, another tool) crashed status and resubmit."""
    from notata import submissions

    out = base / "outputs"
    first = submissions.append(out, {"backend": "slurm", "submission": "a",
                                     "manifest_hash": "x", "tasks": "0-1", "job_ids": ["7"]})
    path = submissions.path(out)
    path.write_bytes(path.read_bytes()[:-20])  # the last write cut short
    second = submissions.append(out, {"backend": "slurm", "submission": "b",
                                      "manifest_hash": "x", "tasks": "2-3", "job_ids": ["8"]})
    assert [r["submission"] for r in submissions.read(out)] == ["b"]
    assert first["submission"] == "a" and second["submission"] == "b"
    with path.open("a") as f:
        for odd in ({"arrays": [{"job_id": "1", "offset": None}]}, {"arrays": "0-1"},
                    {"tasks": [0, 1]}, {"tasks": "x-y"}, {"options": [1]},
                    {"command": "echo hi"}, {"command": [1, 2]}):
            f.write(json.dumps({"backend": "local", "manifest_hash": "y", **odd}) + "\n")
    assert [r["submission"] for r in submissions.read(out)] == ["b"]
    assert main(["status", str(manifest)]) == 0
    assert main(["resubmit", str(manifest), "--backend", "local", "--dry-run", "--",
                 "true"]) == 0
    # status reads the record from several places (queue, code versions, resources):
    # the skipped lines are said once
    said = notata_process("status", str(manifest), "--resources").communicate(timeout=60)[1]
    assert said.count("line(s) skipped") == 1, said


def test_a_dead_process_on_this_host_is_stale_whatever_its_job_says(tmp_path: Path) -> None:
    """Two tasks in one job, one SIGKILLed (the OOM killer): its job still runs, for the
    other task, but its own pid is gone here. And a process that happens to have the dead
    command's pid (recycled) is not taken for a survivor."""
    import socket

    from notata.queue import Queue
    from notata.runstate import read_run

    d = tmp_path / "log_r"
    d.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    meta = {"status": "running", "run_id": "r", "attempt": 1, "host": socket.gethostname(),
            "pid": int(dead), "command_pid": os.getpid(), "user": "someone",
            "slurm": {"job_id": 99}, "heartbeat": {"unix": time.time(), "beat": 1,
                                                   "interval_sec": 30}}
    (d / "metadata.json").write_text(json.dumps(meta))
    r = read_run(d, queue=Queue({"99": "RUNNING"}))
    assert r.status == "stale" and "is gone" in (r.reason or "") and not r.orphan


def test_bad_values_are_one_line_and_write_nothing(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "name: h\ngrid: {" + ", ".join(f"k{i}: [{', '.join(map(str, range(10)))}]"
                                        for i in range(13)) + "}\n": "notata takes at most",
        "name: t\nrun_id: 'r{x[5]}'\nruns: [{x: [1, 2, 3, 4, 5, 6]}, {x: [1]}]\n":
            "run_id template",
        "name: d\ngrid: {a: [1]}\ngrid: {b: [2]}\n": "appears twice",
        "name: s\ngrid: {a: [1]}\nslurm: {warn_before: soon}\n": "warn_before 'soon'",
        "name: s\ngrid: {a: [1]}\nslurm: {throttle: -1}\n": "throttle -1",
        "name: s\ngrid: {a: [1]}\nslurm: {partition: no}\n": "quote it",
        "name: s\ngrid: {a: [1]}\nslurm: {extra: ['#SBATCH --array=0-99']}\n":
            "notata sets the job array",
    }
    for i, (text, message) in enumerate(cases.items()):
        m = write_sweep(base, text, f"m{i}.yaml")
        for argv in (["status", str(m)],
                     ["submit", str(m), "--backend", "slurm", "--dry-run", "--", "true"]):
            rc = main(argv)
            err = capsys.readouterr().err
            if message in err:
                assert rc == 2 and len(err.strip().splitlines()) == 1, (argv, err)
                break
        else:
            raise AssertionError(f"{text!r}: no one-line error saying {message!r}")
    m = write_sweep(base, "name: ok\ngrid: {a: [1, 2]}\n", "ok.yaml")
    for argv, message in [(["exec", str(m), "--task", "0", "--heartbeat", "inf", "--", "true"],
                           "heartbeat"),
                          (["status", str(m), "--watch", "-1"], "--watch")]:
        assert main(argv) == 2 and message in capsys.readouterr().err
    assert not (base / "outputs").exists()


def test_resubmit_from_python_refuses_bad_values_before_anything_runs(
        manifest: Path, base: Path) -> None:
    cmd = ["--", sys.executable, "-c", PAYLOAD, "{k}"]
    assert submit(manifest, "--backend", "local", *cmd) == 1
    before = tree_digest(base / "outputs")
    for kwargs in ({"max_attempts": "3"}, {"max_attempts": 0}, {"stale_after": -5},
                   {"stale_after": float("nan")}, {"tasks": [99]}, {"command": ["true", 1]}):
        with pytest.raises(ValueError):
            notata.resubmit(manifest, backend="local", **kwargs)  # type: ignore[arg-type]
    assert tree_digest(base / "outputs") == before
    hashes = list((base / "outputs" / ".notata" / "index").glob("*.unique"))
    [h.unlink() for h in hashes]
    assert notata.resubmit(manifest, backend="local", dry_run=True) == 0
    assert not list((base / "outputs" / ".notata" / "index").glob("*.unique"))


def test_submit_leaves_out_what_is_still_running(
        manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second submit (or one beside a resubmit) never runs a task twice."""
    holder = python("import sys, time, notata\nlog = notata.task(sys.argv[1], 2)\n"
                    "print('open', flush=True)\ntime.sleep(30)\n", str(manifest))
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "open"
        assert submit(manifest, "--backend", "local", "--", "true") == 0
        err = capsys.readouterr().err
        assert "1 task(s) still queued or running, left out: 2" in err
        assert read_meta(base / "outputs" / "log_k2")["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_an_ended_local_run_of_an_earlier_manifest_version_is_not_running(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A driver (a notebook) that submits, edits the manifest, and submits again: the first
    submission, long ended, once kept the new version's tasks "queued" for ever."""
    m = write_sweep(base, "name: v\nrun_id: 'x{x}'\ngrid: {x: [1, 2]}\n", "v.yaml")
    assert submit(m, "--backend", "local", "--", "true") == 0
    m.write_text("name: v\nrun_id: 'x{x}'\ngrid: {x: [3, 4, 5]}\n")
    capsys.readouterr()
    assert submit(m, "--backend", "local", "--", "true") == 0
    assert "left out" not in capsys.readouterr().err
    assert {r.status for r in notata.collect(m).runs} == {"complete"}


def test_submit_and_resubmit_return_what_they_did(manifest: Path) -> None:
    """The Python API's record of a submission: what ran, what was left out and why, the
    id its lines carry in submissions.jsonl, and the exit status the command returns."""
    from notata import submissions
    from notata.submission import Options, resubmit
    from notata.submission import submit as submit_tasks

    cmd = [sys.executable, "-c", PAYLOAD, "{k}"]
    first = submit_tasks(manifest, cmd, Options(backend="local", jobs=2))
    assert (first.status, first.backend, first.tasks) == (1, "local", [0, 1, 2, 3, 4, 5])
    assert first.skipped == first.busy == first.job_ids == [] and not first.dry_run
    base = notata.load_sweep(manifest).base_dir
    assert first.id in {r.get("submission") for r in submissions.read(base)}
    again = resubmit(manifest, ["failed"], options=Options(dry_run=True))
    assert (again.status, again.tasks, again.dry_run, again.backend) == (0, [1, 4], True, "local")
    done = resubmit(manifest, ["failed"])
    assert (done.status, done.tasks) == (0, [1, 4])
    rest = submit_tasks(manifest, cmd, Options(backend="local", tasks=[0, 5]))
    assert (rest.status, rest.tasks, rest.skipped) == (0, [], [0, 5])
    assert resubmit(manifest).tasks == []  # nothing to resubmit


def test_a_run_slurm_says_was_killed_for_memory_reads_oom(tmp_path: Path) -> None:
    """When the wrapper died with its command (or the kill came below the 90 % rule),
    slurmstepd's line in the array task's output file says why (recorded SLURM text:
    cgroup-confined jobs only, which the test cluster does not have)."""
    from notata.runstate import read_run

    lines = {4: "slurmstepd: error: Detected 1 oom_kill event in StepId=204.batch. Some of "
                "the step tasks have been OOM Killed.\n",  # the task's own job id
             5: "slurmstepd: error: Detected 2 oom-kill event(s) in step 123_5.batch cgroup.\n",
             6: "slurmstepd: error: *** JOB 206 ON n1 CANCELLED AT 2026-12-04T10:00:00 ***\n"
                "slurmstepd: error: Detected 1 oom_kill event in StepId=999.batch.\n"  # another
                "my program says: slurmstepd: error: Detected 1 oom_kill event in StepId=206.0\n"}
    (tmp_path / ".notata").mkdir()
    old = time.time() - 3600
    for task, line in lines.items():
        (tmp_path / ".notata" / f"slurm-123_{task}.out").write_text("started\n" + line)
        for status in ("running", "failed"):
            d = tmp_path / f"log_{status}{task}"
            d.mkdir()
            (d / "metadata.json").write_text(json.dumps({
                "status": status, "run_id": d.name[4:], "attempt": 1, "host": "node7",
                "pid": 4242, "failure_reason": "command killed by SIGKILL",
                "slurm": {"job_id": 200 + task, "array_job_id": 123, "array_task_id": task},
                "heartbeat": {"unix": old, "beat": 9, "interval_sec": 30}}))
    for task in (4, 5):
        for status in ("running", "failed"):
            r = read_run(tmp_path / f"log_{status}{task}")
            assert r.status == "oom", (task, status, r.reason)
            assert r.reason == f"killed for memory ({lines[task].strip()})"
    assert read_run(tmp_path / "log_running6").status == "stale"
    assert read_run(tmp_path / "log_failed6").status == "failed"
    os.replace(tmp_path / ".notata" / "slurm-123_6.out", tmp_path / "gone")
    os.mkfifo(tmp_path / ".notata" / "slurm-123_6.out")  # never read, never waited on
    assert read_run(tmp_path / "log_running6").status == "stale"


def test_status_shows_what_each_unfinished_attempt_had(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from notata.cli import main

    d = tmp_path / "log_r"
    d.mkdir()
    (d / "metadata.json").write_text(json.dumps({
        "status": "timeout", "run_id": "r", "attempt": 2, "failure_reason": "time limit",
        "resources": {"asked": {"time_limit": "00:02:00", "mem_bytes": 400 * 2**20}}}))
    assert main(["status", str(tmp_path)]) == 0
    assert "r  timeout (attempt 2) [time 00:02:00, mem 400.0M]: time limit" in \
        capsys.readouterr().out


def test_a_live_local_submission_holds_its_tasks_pending_until_it_dies(
        manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Tasks a local submission has not started yet read pending, with its pid and host,
    while its process lives (resubmit leaves them); once it is killed (a zombie not yet
    reaped counts as dead), they read missing and resubmit takes them."""
    import socket

    import psutil

    flag = base / "go"
    proc = notata_process("submit", str(manifest), "--backend", "local", "-j", "1", "--",
                          "sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.1; done', str(flag),
                          start_new_session=True)
    try:
        wait_for(status_is(base / "outputs" / "log_k0", "running"), what="task 0 to start")
        held = f"queued by the local submission, pid {proc.pid} on {socket.gethostname()}"
        runs = notata.collect(manifest).runs
        assert [(r.task, r.status, r.reason) for r in runs[1:]] == [
            (i, "pending", held) for i in range(1, 6)]
        assert main(["status", str(manifest)]) == 0
        assert f"tasks 1-5      pending (5, never started): {held}" in capsys.readouterr().out
        assert main(["resubmit", str(manifest), "--dry-run"]) == 0
        assert "nothing to resubmit" in capsys.readouterr().out
        os.killpg(proc.pid, signal.SIGKILL)
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE,
                 what="the submitter to die")
        runs = notata.collect(manifest).runs
        assert [(r.task, r.status, r.reason) for r in runs[1:]] == [
            (i, "missing", None) for i in range(1, 6)]
        assert main(["resubmit", str(manifest), "--dry-run"]) == 0
        assert "would resubmit 5 task(s) with the local backend: 1-5" in \
            capsys.readouterr().out
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_watch_goes_on_while_a_local_resubmission_holds_failed_tasks(
        manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Failed tasks that a live local resubmission will run again are not the end of the
    sweep: status --watch goes on (it once stopped whenever no task was running at the
    moment of a scan) and ends once they have run."""
    flag = base / "go"
    cmd = ["--", "sh", "-c", 'test "$NOTATA_ATTEMPT" != 1 && while [ ! -e "$0" ]; do '
           'sleep 0.1; done', str(flag)]
    assert submit(manifest, "--backend", "local", *cmd) == 1  # attempt 1 fails
    again = notata_process("resubmit", str(manifest), "--backend", "local", "-j", "1",
                           start_new_session=True)
    watch = None
    try:
        first = base / "outputs" / "log_k0"
        wait_for(lambda: status_is(first, "running")() and read_meta(first)["attempt"] == 2,
                 what="task 0's second attempt")
        os.kill(again.pid, signal.SIGSTOP)  # alive, and starting nothing more
        flag.touch()
        wait_for(status_is(first, "complete"), what="task 0 to complete")
        report = notata.collect(manifest)
        assert report.counts["complete"] == 1 and report.counts["failed"] == 5
        assert not report.terminal
        assert main(["status", str(manifest)]) == 0
        assert (f"tasks 1-5  failed (5, attempt 1) [queued by the local submission, pid "
                f"{again.pid} on ") in capsys.readouterr().out
        watch = notata_process("status", str(manifest), "--watch", "0.1", "--json")
        assert watch.stdout is not None
        for _ in range(3):  # scan after scan: the watch goes on
            counts = json.loads(watch.stdout.readline())["counts"]
            assert (counts["running"], counts["complete"], counts["failed"]) == (0, 1, 5)
        os.kill(again.pid, signal.SIGCONT)
        out, err = watch.communicate(timeout=120)
        assert watch.returncode == 0, err
        assert json.loads(out.splitlines()[-1])["counts"]["complete"] == 6
        assert again.wait(120) == 0
    finally:
        flag.touch()  # nothing of a failed test waits for ever
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
        again.communicate()
        if watch is not None and watch.poll() is None:
            watch.kill()
            watch.communicate()


def test_a_run_held_from_a_down_node_is_resubmitted(manifest: Path, base: Path) -> None:
    """A task whose process is frozen on a node SLURM says is down (a partition) still
    holds its run's lock: stale, the lock said, and resubmit takes it (its next attempt
    breaks that lock by the rule for another host's holder). While the node is only
    busy, the held lock keeps it running and resubmit leaves it."""
    import signal

    from notata.queue import Queue

    holder = python("""
        import sys, time, notata
        log = notata.task(sys.argv[1], 0, heartbeat=0.2)
        print("open", flush=True)
        time.sleep(60)
        """, str(manifest))
    try:
        assert holder.stdout and holder.stdout.readline().strip() == "open"
        holder.send_signal(signal.SIGSTOP)  # frozen with its node, the lock still held
        run = load(manifest).task(0).run_dir
        meta = read_meta(run)
        meta.update(host="n2", slurm={"job_id": 99, "nodelist": "n2"})
        meta["heartbeat"] = dict(meta["heartbeat"], unix=time.time() - 30)
        (run / "metadata.json").write_text(json.dumps(meta))
        (run / ".lock").write_text(f"n2 {holder.pid} {time.time() - 60:.3f}")  # its stamp
        down = scan(load(manifest), queue=Queue({}, nodes={"n2": "down*"}))
        [r] = [r for r in down.runs if r.task == 0]
        assert r.status == "stale" and "its lock is still held from there" in (r.reason or "")
        assert 0 in down.to_resubmit(["stale"])[0]
        busy = scan(load(manifest), queue=Queue({}, nodes={"n2": "allocated"}))
        [r] = [r for r in busy.runs if r.task == 0]
        assert r.status == "running" and 0 not in busy.to_resubmit(["stale", "running"])[0]
        # a new attempt here has just taken the lock (its stamp, or none yet), before its
        # first record
        for stamp in (f"{socket.gethostname()} {os.getpid()} {time.time():.3f}", ""):
            (run / ".lock").write_text(stamp)
            taken = scan(load(manifest), queue=Queue({}, nodes={"n2": "down*"}))
            [r] = [r for r in taken.runs if r.task == 0]
            assert r.status == "running" and 0 not in taken.to_resubmit(["stale"])[0], stamp
    finally:
        holder.send_signal(signal.SIGCONT)
        holder.kill()
        holder.wait()
