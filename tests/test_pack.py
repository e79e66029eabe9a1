"""Packs: several tasks run one after another in one array task (or local process), each
still its own run. Real processes and signals; the real test cluster for SLURM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import (
    job_gone,
    notata_process,
    python,
    read_meta,
    status_is,
    submit,
    wait_for,
    write_sweep,
)

import notata
from notata import submission, submissions
from notata.array import pack_tasks
from notata.cli import main
from notata.sbatch import ArrayPlan, plan_arrays

PAYLOAD = """
import os, signal, sys, time
kind, folder = sys.argv[1], sys.argv[2]
if kind == "raise":
    raise RuntimeError("boom")
if kind == "exit":
    os._exit(3)
if kind == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if kind.startswith("status"):  # status130 exits 130, as a Ctrl-C'd program would
    sys.exit(int(kind[6:]))
if kind == "killparent":  # its wrapper: a worker of a side-by-side pack
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(5)
if kind == "killgrandparent":  # the pack's parent: the local backend's submit
    with open(f"/proc/{os.getppid()}/stat") as f:
        os.kill(int(f.read().rsplit(")", 1)[1].split()[1]), signal.SIGKILL)
if kind == "fail":  # fails until the test writes folder/fixed
    sys.exit(0 if os.path.exists(os.path.join(folder, "fixed")) else 4)
if kind == "wait":  # runs until the test writes folder/go
    while not os.path.exists(os.path.join(folder, "go")):
        time.sleep(0.05)
if kind == "trap":  # notes the warning, and waits a little for it
    n = os.environ["NOTATA_TASK"]
    signal.signal(signal.SIGUSR1, lambda *a: open(os.path.join(folder, "warned-" + n), "w"))
    for _ in range(100):
        if os.path.exists(os.path.join(folder, "warned-" + n)):
            break
        time.sleep(0.05)
if kind == "sleep":
    time.sleep(float(sys.argv[3]))
if kind == "burn":  # 0.4 s of CPU
    t = time.process_time()
    while time.process_time() - t < 0.4:
        pass
if kind == "forever":
    while True:
        time.sleep(1)
"""


def sweep_of(base: Path, kinds: list[str], name: str = "p", extra: str = "") -> Path:
    """A sweep whose task n runs the payload's ``kinds[n]`` (run ids ``n0``, ``n1``...)."""
    (base / "payload.py").write_text(PAYLOAD)
    return write_sweep(base, f"name: {name}\nrun_id: 'n{{n}}'\nzip:\n  n: "
                             f"{list(range(len(kinds)))}\n  kind: {json.dumps(kinds)}\n{extra}")


def command(base: Path, *more: str) -> list[str]:
    return [sys.executable, str(base / "payload.py"), "{kind}", str(base), *more]


def run(base: Path, n: int) -> Path:
    return base / "outputs" / f"log_n{n}"


def statuses(manifest: Path) -> dict[int, str]:
    return {r.task: r.status for r in notata.collect(manifest).read if r.task is not None} | {
        i: "complete" for i in notata.collect(manifest).indices("complete")}


# -- plans and the environment ---------------------------------------------------------------


def test_a_packed_plan_lists_its_tasks_and_splits_at_max_array_size_times_pack() -> None:
    [plan] = plan_arrays([0, 1, 2, 3, 4, 9, 10], 1001, pack=3)
    assert (plan.spec, plan.task_map, plan.pack) == ("0-2", "0-4,9-10", 3)
    plans = plan_arrays(list(range(2 * 5 * 3 + 1)), 5, pack=3)  # 5 array tasks of 3 each
    assert [len(p.indices) for p in plans] == [15, 15, 1]
    assert [p.spec for p in plans] == ["0-4", "0-4", "0"]
    assert plan_arrays(list(range(4)), 1001) == [ArrayPlan(0, (0, 1, 2, 3))]  # unpacked: as before
    # a task list is as long as it is written: 20,000 tasks in a row are "0-19999", one array
    assert [(p.spec, p.task_map) for p in plan_arrays(list(range(20000)), 1001, pack=500)] \
        == [("0-39", "0-19999")]
    scattered = plan_arrays(list(range(0, 60000, 2)), 10**6, pack=500)
    assert all(len(p.task_map) < 31000 for p in scattered) and len(scattered) == 6


def test_an_array_task_finds_its_pack_in_the_environment() -> None:
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "5", "NOTATA_PACK": "3",
           "NOTATA_TASK_MAP": "0-4,9-10"}
    assert pack_tasks(env) == [3, 4, 9]
    assert pack_tasks({**env, "SLURM_ARRAY_TASK_ID": "2"}) == [10]
    assert pack_tasks({k: v for k, v in env.items() if k != "NOTATA_PACK"}) is None
    with pytest.raises(notata.UsageError, match="outside"):
        pack_tasks({**env, "SLURM_ARRAY_TASK_ID": "3"})
    with pytest.raises(notata.UsageError, match="not a pack"):
        pack_tasks({**env, "NOTATA_TASK_MAP": "x"})
    from notata.array import task_index
    with pytest.raises(notata.UsageError, match="pack"):  # never one task of the pack
        task_index(env)


@pytest.mark.parametrize("backend", ["local", "slurm"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_bad_pack_is_one_error_and_nothing_is_submitted(base: Path, value: str, backend: str,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    manifest = sweep_of(base, ["ok", "ok"])
    assert submit(manifest, "--backend", backend, "--pack", value, "--", "true") == 2
    assert f"pack {value}" in capsys.readouterr().err
    assert not (base / "outputs").exists()


# -- locally ---------------------------------------------------------------------------------


def test_a_local_packed_sweep_records_every_task_whatever_its_command_does(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A task that raises, one that calls os._exit(3), one SIGKILLed: each recorded, and
    the tasks after it in its pack still run; each task is its own run, with where it
    ran in its pack; resubmit takes exactly the failed ones."""
    kinds = ["ok", "raise", "exit", "kill", "ok", "fail", "ok"]
    manifest = sweep_of(base, kinds)
    assert submit(manifest, "--backend", "local", "--pack", "3", "-j", "2", "--",
                  *command(base)) == 1
    err = capsys.readouterr().err
    assert "4 done, 3 failed" in err or "3 done, 4 failed" in err, err
    seen = statuses(manifest)
    assert seen == {0: "complete", 1: "failed", 2: "failed", 3: "failed", 4: "complete",
                    5: "failed", 6: "complete"}
    assert "RuntimeError: boom" in read_meta(run(base, 1))["failure_reason"]
    assert "status 3" in read_meta(run(base, 2))["failure_reason"]
    assert "SIGKILL" in read_meta(run(base, 3))["failure_reason"]
    for n in range(7):
        meta = read_meta(run(base, n))
        assert (meta["task"], meta["task_from"], meta["pack"]) == (
            n, "pack", {"position": n % 3, "size": 3 if n < 6 else 1}), meta
    [record] = submissions.submitted(base / "outputs")
    assert record["options"]["pack"] == 3
    chosen, _ = notata.collect(manifest).to_resubmit()
    assert chosen == [1, 2, 3, 5]
    (base / "fixed").write_text("")
    done = submission.resubmit(manifest, ["failed"], command(base))  # the pack is reused
    assert done.tasks == [1, 2, 3, 5] and done.status == 1  # 1-3 fail again
    assert {n: read_meta(run(base, n))["pack"]["position"] for n in (1, 2, 3, 5)} == {
        1: 0, 2: 1, 3: 2, 5: 0}  # packs of 3 rebuilt from what was left
    assert read_meta(run(base, 5))["status"] == "complete"
    assert [read_meta(run(base, n))["attempt"] for n in (1, 5, 6)] == [2, 2, 1]


def exec_pack(manifest: Path, base: Path, tasks: str, **kw: Any) -> subprocess.Popen[str]:
    return notata_process("exec", str(manifest), "--tasks", tasks, "--", *command(base), **kw)


def test_a_command_exiting_130_or_75_is_a_failure_and_the_pack_goes_on(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The statuses Ctrl-C and a busy run give the wrapper are a command's own here."""
    manifest = sweep_of(base, ["ok", "status130", "ok", "status75", "ok"])
    assert submit(manifest, "--backend", "local", "--pack", "5", "--", *command(base)) == 1
    assert "3 done, 2 failed" in capsys.readouterr().err
    assert statuses(manifest) == {0: "complete", 1: "failed", 2: "complete", 3: "failed",
                                  4: "complete"}


def test_a_packed_task_counts_its_own_cpu_time_not_the_packs(base: Path) -> None:
    manifest = sweep_of(base, ["burn", "ok", "burn", "ok"])
    proc = exec_pack(manifest, base, "0-3")
    assert proc.wait(120) == 0, proc.communicate()
    cpu = [read_meta(run(base, n))["resources"]["used"]["cpu_time_sec"] for n in range(4)]
    assert cpu[0] >= 0.35 and cpu[2] >= 0.35 and cpu[2] < 0.8, cpu
    assert cpu[1] < 0.3 and cpu[3] < 0.3, cpu


def test_a_task_held_by_another_process_is_left_and_said(base: Path) -> None:
    manifest = sweep_of(base, ["ok", "wait", "ok"])
    holder = notata_process("exec", str(manifest), "--task", "1", "--", *command(base))
    try:
        wait_for(status_is(run(base, 1), "running"), 30, "the holder")
        proc = exec_pack(manifest, base, "0-2")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 75 and "in use" in err, err  # not complete, not failed
        assert statuses(manifest) == {0: "complete", 1: "running", 2: "complete"}
    finally:
        (base / "go").write_text("")
        holder.communicate(timeout=60)


def test_a_huge_pack_is_refused(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = sweep_of(base, ["ok"])
    for backend in ("local", "slurm"):
        assert submit(manifest, "--backend", backend, "--dry-run", "--pack",
                      "99999999999999999999", "--", "true") == 2
        assert "from 1 to 1,000,000" in capsys.readouterr().err


def test_tasks_a_changed_manifest_no_longer_has_are_said_and_the_rest_run(base: Path) -> None:
    """An array submitted before the manifest shrank: its pack runs the tasks that are
    still there."""
    manifest = sweep_of(base, ["ok"] * 4)
    env = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "999999",
           "SLURM_JOB_ID": "999999", "NOTATA_PACK": "6", "NOTATA_TASK_MAP": "0-5"}
    proc = notata_process("exec", str(manifest), "--", "true", env=env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "tasks 4-5 are outside the sweep's 4 tasks" in err, err
    assert statuses(manifest) == dict.fromkeys(range(4), "complete")


def test_a_task_that_kills_the_local_backend_does_not_end_its_pack(base: Path) -> None:
    manifest = sweep_of(base, ["ok", "killgrandparent", "ok", "ok"])
    proc = notata_process("submit", str(manifest), "--backend", "local", "--pack", "4", "--",
                          *command(base))
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: statuses(manifest) == dict.fromkeys(range(4), "complete"), 30,
             "the pack to finish without its reader")


def signal_while_opening(signum: int, manifest: Path, base: Path) -> subprocess.Popen[str]:
    """``notata exec --tasks 0-2`` that sends itself ``signum`` while task 1's run opens:
    after its folder is made, before its lock is taken (the second check of the folder)."""
    code = f"""
    import os, sys
    from notata import layout
    real, calls = layout.check_run_dir, []
    def hooked(path):
        out = real(path)
        if path.name == "log_n1":
            calls.append(path)
            if len(calls) == 2:
                os.kill(os.getpid(), {int(signum)})
        return out
    layout.check_run_dir = hooked
    from notata.cli import main
    sys.exit(main(sys.argv[1:]))
    """
    return python(code, "exec", str(manifest), "--tasks", "0-2", "--", *command(base))


def test_sigterm_while_a_run_opens_waits_for_it_to_be_open(base: Path) -> None:
    """A SIGTERM landing between a run's new folder and its first record is handled once
    the run is open, and recorded: never a run folder without metadata.json."""
    manifest = sweep_of(base, ["ok"] * 3)
    proc = signal_while_opening(signal.SIGTERM, manifest, base)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert read_meta(run(base, 1))["status"] == "terminated"
    assert "tasks 2 of this pack are left unstarted" in err and not run(base, 2).exists()


def test_a_local_run_stopped_by_sigterm_counts_what_each_task_did(base: Path) -> None:
    manifest = sweep_of(base, ["ok"] * 400)
    proc = notata_process("submit", str(manifest), "--backend", "local", "--pack", "400", "--",
                          *command(base))
    wait_for(lambda: len(list((base / "outputs").glob("log_*"))) > 20, 60, "some tasks")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    complete = sum(s == "complete" for s in statuses(manifest).values())
    ran = len(list((base / "outputs").glob("log_*")))
    summary = err.strip().splitlines()[-1]
    assert summary.startswith(f"{complete} done, 0 failed, {ran - complete} terminated"), (
        summary, ran)
    assert f"{400 - ran} not started" in summary, summary


def test_sigterm_records_the_running_task_and_leaves_the_rest_untouched(base: Path) -> None:
    manifest = sweep_of(base, ["ok", "wait", "ok", "ok"])
    proc = exec_pack(manifest, base, "0-3")
    wait_for(status_is(run(base, 1), "running"), 30, "task 1 to run")
    wait_for(lambda: "command_pid" in read_meta(run(base, 1)), 10, "its command")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, proc.communicate()
    assert read_meta(run(base, 0))["status"] == "complete"
    meta = read_meta(run(base, 1))
    assert meta["status"] == "terminated" and meta["pack"]["position"] == 1
    assert not run(base, 2).exists() and not run(base, 3).exists()
    assert statuses(manifest)[2] == "missing"


def test_the_time_limit_warning_lets_the_running_task_finish_and_starts_no_other(
        base: Path) -> None:
    manifest = sweep_of(base, ["ok", "wait", "ok", "ok"])
    proc = exec_pack(manifest, base, "0-3")
    wait_for(status_is(run(base, 1), "running"), 30, "task 1 to run")
    wait_for(lambda: "command_pid" in read_meta(run(base, 1)), 10, "its command")
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "signals" in read_meta(run(base, 1)), 10, "the warning recorded")
    (base / "go").write_text("")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "tasks 2-3 of this pack are left unstarted" in err
    assert read_meta(run(base, 1))["status"] == "complete"
    assert not run(base, 2).exists() and not run(base, 3).exists()


def test_a_warning_between_tasks_is_not_lost(base: Path) -> None:
    """SIGUSR1 while no run is open (the pack between two tasks) must neither kill the
    pack (SIGUSR1's default action) nor be forgotten."""
    manifest = sweep_of(base, ["ok"] * 400)
    proc = exec_pack(manifest, base, "0-399")
    wait_for(lambda: run(base, 3).exists(), 30, "a few tasks")
    for _ in range(20):  # some land between tasks
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.01)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "left unstarted" in err
    assert not run(base, 399).exists()


def test_tasks_a_pack_left_unstarted_are_read_per_array_task() -> None:
    records = [
        {"backend": "slurm", "manifest_hash": "h", "tasks": "0-5"},
        {"backend": "slurm", "manifest_hash": "h", "tasks": "3-5"},
        {"left": "3-5", "job": "7_0", "manifest_hash": "h"},
        {"left": "4-5", "job": "7_0", "manifest_hash": "h"},  # the same pack, requeued
        {"left": "5", "job": "8_0", "manifest_hash": "h"},
        {"left": "2-99999999999999", "job": "9_0", "manifest_hash": "other"},
        {"left": "4-99999999999999", "job": "9_1", "manifest_hash": "h"},  # bounded
        {"backend": "slurm", "manifest_hash": "other", "tasks": "0-5"},
    ]
    assert submissions.tries(records, "h") == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 2}
    assert submissions.left(records, "h", 6) == {3: {"7_0"}, 4: {"7_0", "9_1"},
                                                 5: {"7_0", "8_0", "9_1"}}
    from notata.pack import started_in
    meta = {"slurm": {"job_id": 3, "array_job_id": 7, "array_task_id": 0},
            "attempts": [{"slurm": {"job_id": 9, "array_job_id": 8, "array_task_id": 0}}, {}]}
    assert started_in(meta) == {"7_0", "8_0"}


def test_a_requeued_pack_skips_what_it_let_go_in_any_earlier_attempt(base: Path) -> None:
    """Its own failure stays let go even after another job's attempt; a task a signal
    ended in it runs again."""
    from notata.pack import _ran_here

    manifest = sweep_of(base, ["ok", "ok"])
    sweep = notata.load_sweep(manifest)
    mine = {"job_id": 12, "array_job_id": 11, "array_task_id": 0}
    other = {"job_id": 20, "array_job_id": 20, "array_task_id": 3}
    packed = {"position": 0, "size": 4}
    for n, attempts in ((0, [{"status": "failed", "slurm": mine, "pack": packed},
                             {"status": "failed", "slurm": other, "pack": packed}]),
                        (1, [{"status": "preempted", "slurm": mine, "pack": packed,
                              "signals": [{"signal": "SIGTERM"}]}])):
        run(base, n).mkdir(parents=True)
        (run(base, n) / "metadata.json").write_text(json.dumps(
            {**attempts[-1], "attempts": attempts[:-1], "task": n}))
    assert _ran_here(sweep, 0, "11_0") and not _ran_here(sweep, 1, "11_0")
    assert not _ran_here(sweep, 0, "11_1")


def test_without_the_kernels_child_lists_the_slow_listing_decides(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from notata import heartbeat

    real = open

    def no_lists(path: Any, *args: Any, **kw: Any) -> Any:
        if str(path).endswith("/children"):
            raise FileNotFoundError(path)
        return real(path, *args, **kw)

    monkeypatch.setattr("builtins.open", no_lists)
    assert heartbeat.has_children(os.getpid())


def test_a_pack_run_again_in_the_same_job_runs_its_failures_again(base: Path) -> None:
    """Only a requeued array task skips what it let go: the same command run twice in
    one job (an sbatch script, an salloc shell) runs a task that failed the first time."""
    manifest = sweep_of(base, ["ok", "fail"])
    env = {"SLURM_JOB_ID": "999999", "SLURM_JOB_NAME": "x"}  # a job, not an array task
    for expected in (1, 0):
        proc = exec_pack(manifest, base, "0-1", env=env)
        assert proc.wait(60) == expected, proc.communicate()
        (base / "fixed").write_text("")
    assert statuses(manifest) == {0: "complete", 1: "complete"}


def test_a_warning_while_a_run_closes_stops_the_pack(base: Path) -> None:
    """SIGUSR1 landing in the close of task 1's run (its last writes, when the run no
    longer listens) still reaches the pack: task 2 never starts."""
    manifest = sweep_of(base, ["ok"] * 3)
    code = """
    import os, signal, sys
    from notata import _fs
    real, calls = _fs.fsync_paths, []
    def fsync_paths(paths):
        real(paths)
        if any("log_n1" in str(p) for p in paths):
            os.kill(os.getpid(), signal.SIGUSR1)
    _fs.fsync_paths = fsync_paths
    from notata.cli import main
    sys.exit(main(sys.argv[1:]))
    """
    proc = python(code, "exec", str(manifest), "--tasks", "0-2", "--", *command(base))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert read_meta(run(base, 1))["status"] == "complete" and not run(base, 2).exists()
    assert "tasks 2 of this pack are left unstarted" in err


def test_a_run_that_cannot_be_opened_is_said_and_the_pack_goes_on(base: Path) -> None:
    manifest = sweep_of(base, ["ok"] * 4)
    run(base, 1).mkdir(parents=True)
    (run(base, 1) / "metadata.json").write_text("{bad")
    proc = exec_pack(manifest, base, "0-3")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "task 1:" in err and "metadata.json" in err, err
    assert [read_meta(run(base, n))["status"] for n in (0, 2, 3)] == ["complete"] * 3


def test_a_warning_while_a_run_opens_reaches_its_command(base: Path) -> None:
    """SIGUSR1 landing before the run could hear it: the run records it, its command is
    warned once it has started, and the pack starts no other task."""
    manifest = sweep_of(base, ["ok", "trap", "ok"])
    proc = signal_while_opening(signal.SIGUSR1, manifest, base)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    meta = read_meta(run(base, 1))
    assert meta["status"] == "complete" and "SIGUSR1" in [s["signal"] for s in meta["signals"]]
    assert (base / "warned-1").exists()  # the command's own handler ran
    assert not run(base, 2).exists() and "tasks 2 of this pack are left unstarted" in err


def test_a_pack_that_let_a_task_go_does_not_hold_it_after_another_job_ran_it(
        base: Path) -> None:
    """Pack 31_0 ran task 0 and let it go; job 40_0 ran it since (and it failed again):
    while 31_0 still runs, task 0 is free for a resubmit, and task 2 (not reached) is not."""
    from notata.queue import Queue

    manifest = sweep_of(base, ["ok", "ok", "ok"])
    sweep = notata.load_sweep(manifest)
    first = {"status": "failed", "pack": {"position": 0, "size": 3},
             "slurm": {"job_id": 32, "array_job_id": 31, "array_task_id": 0}}
    run(base, 0).mkdir(parents=True)
    (run(base, 0) / "metadata.json").write_text(json.dumps({
        "status": "failed", "attempt": 2, "task": 0, "manifest_hash": sweep.hash,
        "task_from": "pack", "pack": {"position": 0, "size": 1}, "attempts": [first],
        "slurm": {"job_id": 40, "array_job_id": 40, "array_task_id": 0}}))
    submissions.append(base / "outputs", {
        "backend": "slurm", "submission": "s", "manifest": str(manifest),
        "manifest_hash": sweep.hash, "tasks": "0-2", "job_ids": ["31"],
        "arrays": [{"job_id": "31", "spec": "0", "offset": 0, "map": "0-2", "pack": 3}]})
    queue = Queue({"31_0": "RUNNING"})
    report = notata.scan(sweep, queue=queue)
    by_task = {r.task: r for r in report.read}
    assert by_task[0].queued is None and by_task[2].queued == "RUNNING"
    assert report.to_resubmit()[0] == [0]


def test_pack_time_sizes_packs_from_task_time_then_from_complete_runs(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = sweep_of(base, ["ok"] * 40)
    sweep = notata.load_sweep(manifest)
    # nothing complete yet: --task-time is needed, and must fit
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--pack-time", "1m",
                  "--", "true") == 2
    assert "give --task-time" in capsys.readouterr().err
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--pack-time", "1m",
                  "--task-time", "2m", "--", "true") == 2
    assert "shorter than one task" in capsys.readouterr().err
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--pack", "3", "--pack-time",
                  "1m", "--", "true") == 2
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--pack-time", "1m",
                  "--task-time", "19s", "--", "true") == 0
    out, err = capsys.readouterr()  # 19 s and 0.1 s of notata's own: 3 fit in a minute
    assert "3 task(s) per array task" in err and "--time 00:06:06" in err
    assert "NOTATA_PACK=3" in out and "--array=0-13" in out and '--time="00:06:06"' in out
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--pack-time", "1m",
                  "--task-time", "19s", "--pack-parallel", "3", "--cpus-per-task", "3",
                  "--", "true") == 0
    assert "9 task(s) per array task" in capsys.readouterr().err  # 3 at a time
    # twenty complete runs of about 2 s: 30 s of work is 14 tasks (90th percentile)
    for i in range(20):
        with notata.task(sweep, i) as log:
            log._set(status="running")
        meta = read_meta(run(base, i))
        meta["runtime_sec"] = 2.0 if i < 18 else 1.0
        (run(base, i) / "metadata.json").write_text(json.dumps(meta))
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--pack-time", "30s",
                  "--task-time", "1s", "--time", "5", "--", "true") == 0
    out, err = capsys.readouterr()
    assert "14 task(s) per array task" in err and "20 complete runs" in err
    assert "--time" not in err.split("(")[0] and "NOTATA_PACK=14" in out


def element_env(tasks: str, pack: int, parallel: int) -> dict[str, str]:
    """The environment of array task 0 of a packed array (no real job behind it)."""
    return {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "999998",
            "SLURM_JOB_ID": "999999", "NOTATA_PACK": str(pack), "NOTATA_TASK_MAP": tasks,
            "NOTATA_PACK_PARALLEL": str(parallel)}


def most_at_once(base: Path, tasks: range) -> int:
    """The most runs of ``tasks`` whose attempts overlapped in time."""
    spans = [(read_meta(run(base, n))["start_unix"], read_meta(run(base, n))["end_unix"])
             for n in tasks]
    return max(sum(a <= t < b for a, b in spans) for t, _ in spans)


def test_a_pack_run_side_by_side_runs_that_many_at_a_time(base: Path) -> None:
    manifest = sweep_of(base, ["sleep"] * 7)
    proc = notata_process("exec", str(manifest), "--", *command(base, "0.4"),
                          env=element_env("0-6", 7, 3))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert statuses(manifest) == dict.fromkeys(range(7), "complete")
    assert sorted(read_meta(run(base, n))["pack"]["position"] for n in range(7)) == list(
        range(7))
    assert 2 <= most_at_once(base, range(7)) <= 3


def test_a_pack_side_by_side_stopped_by_sigterm_or_warned(base: Path) -> None:
    """SIGTERM: every running task recorded, the rest untouched and named; the warning:
    the running tasks finish, no other starts."""
    manifest = sweep_of(base, ["wait"] * 8)
    proc = notata_process("exec", str(manifest), "--", *command(base),
                          env=element_env("0-7", 8, 3))
    wait_for(lambda: all(status_is(run(base, n), "running")() for n in range(3)), 60,
             "three tasks running")
    wait_for(lambda: all("command_pid" in read_meta(run(base, n)) for n in range(3)), 10)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert [read_meta(run(base, n))["status"] for n in range(3)] == ["terminated"] * 3
    assert not any(run(base, n).exists() for n in range(3, 8))
    assert "SIGTERM ended this pack: tasks 3-7 of this pack are left unstarted" in err
    shutil.rmtree(base / "outputs")
    proc = notata_process("exec", str(manifest), "--", *command(base),
                          env=element_env("0-7", 8, 3))
    wait_for(lambda: all(status_is(run(base, n), "running")() for n in range(3)), 60,
             "three tasks running")
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: all("signals" in read_meta(run(base, n)) for n in range(3)), 10)
    (base / "go").write_text("")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert [read_meta(run(base, n))["status"] for n in range(3)] == ["complete"] * 3
    assert not any(run(base, n).exists() for n in range(3, 8))
    assert "the time limit is near: tasks 3-7 of this pack are left unstarted" in err


def test_a_side_by_side_pack_warned_as_its_workers_start_leaves_everything(
        base: Path) -> None:
    """A worker still importing is not sent the warning (it would die of it): it finds
    the pipe emptied, and the pack exits 0 with every task left and recorded."""
    manifest = sweep_of(base, ["ok"] * 12)
    proc = notata_process("exec", str(manifest), "--", *command(base),
                          env=element_env("0-11", 12, 3))
    wait_for(lambda: len(psutil.Process(proc.pid).children()) == 3, 20, "the workers")
    proc.send_signal(signal.SIGUSR1)  # ...and its workers are still importing
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    ran = [n for n in range(12) if run(base, n).exists()]
    assert "the time limit is near" in err and ran == list(range(len(ran)))
    left = [r["left"] for r in submissions.read(base / "outputs") if "left" in r]
    from notata.manifest import compact
    assert left == [compact(range(len(ran), 12))]


def test_side_by_side_workers_that_die_are_not_a_warning(base: Path) -> None:
    """Workers that die (here each kills its own at its first task) leave their tasks to
    count as attempts: said, exit 1, no left line."""
    manifest = sweep_of(base, ["killparent"] * 6)
    proc = notata_process("exec", str(manifest), "--", *command(base),
                          env=element_env("0-5", 6, 2))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "the pack's workers ended before tasks 2-5" in err, err
    assert not any("left" in r for r in submissions.read(base / "outputs"))


def test_killing_a_side_by_side_array_task_kills_its_workers(base: Path) -> None:
    manifest = sweep_of(base, ["wait"] * 6)
    proc = notata_process("exec", str(manifest), "--", *command(base),
                          env=element_env("0-5", 6, 2))
    wait_for(lambda: all(status_is(run(base, n), "running")() for n in range(2)), 60,
             "two tasks running")
    workers = psutil.Process(proc.pid).children()
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                             for w in workers), 20, "the workers to die with it")
    (base / "go").write_text("")
    time.sleep(0.5)
    assert not any(run(base, n).exists() for n in range(2, 6))  # nobody ran the rest


@pytest.mark.parametrize("args, says", [
    (["--pack", "4", "--pack-parallel", "4", "--cpus-per-task", "2"], "more than the array"),
    (["--pack-parallel", "2", "--cpus-per-task", "2"], "goes with --pack"),
    (["--pack", "4", "--pack-parallel", "0"], "at least 1"),
    (["--backend", "local", "--pack", "4", "--pack-parallel", "2"], "-j runs packs"),
])
def test_a_pack_parallel_the_array_task_cannot_hold_is_refused(
        base: Path, args: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = sweep_of(base, ["ok"] * 8)
    backend = [] if "--backend" in args else ["--backend", "slurm"]
    assert submit(manifest, *backend, "--dry-run", *args, "--", "true") == 2
    assert says in capsys.readouterr().err


# -- on the test cluster ---------------------------------------------------------------------


def _job(manifest: Path, k: int = -1) -> str:
    records = submissions.submitted(manifest.parent / "outputs")
    return str(records[k]["job_ids"][0])


def test_a_failure_inside_a_running_pack_is_resubmitted_alone(slurm_cluster: str,
                                                              base: Path) -> None:
    """While the pack still runs task 2, task 1 (failed) may be resubmitted and task 3
    (not started) may not: it reads pending, not missing."""
    manifest = sweep_of(base, ["ok", "fail", "wait", "ok"])
    assert submit(manifest, "--backend", "slurm", "--pack", "4", "--", *command(base)) == 0
    job = _job(manifest)
    wait_for(status_is(run(base, 2), "running"), 120, "task 2 to run")
    seen = statuses(manifest)
    assert (seen[0], seen[1], seen[3]) == ("complete", "failed", "pending"), seen
    (base / "fixed").write_text("")
    done = submission.resubmit(manifest)  # the default selectors: missing among them
    assert done.tasks == [1]
    wait_for(status_is(run(base, 1), "complete"), 120, "task 1's second attempt")
    (base / "go").write_text("")
    wait_for(job_gone(job), 120, "the pack to end")
    assert set(statuses(manifest).values()) == {"complete"}
    meta = read_meta(run(base, 3))
    assert meta["slurm"]["array_job_id"] == int(job) and meta["slurm"]["array_task_id"] == 0
    assert meta["pack"] == {"position": 3, "size": 4}
    assert read_meta(run(base, 1))["attempts"][0]["pack"] == {"position": 1, "size": 4}


def test_a_packed_sweep_side_by_side_on_the_cluster(slurm_cluster: str, base: Path) -> None:
    manifest = sweep_of(base, ["sleep"] * 8 + ["fail"])
    assert submit(manifest, "--backend", "slurm", "--pack", "9", "--pack-parallel", "2",
                  "--cpus-per-task", "2", "--", *command(base, "0.5")) == 0
    job = _job(manifest)
    wait_for(job_gone(job), 180, "the pack to end")
    assert statuses(manifest) == {**dict.fromkeys(range(8), "complete"), 8: "failed"}
    assert most_at_once(base, range(8)) == 2
    assert {read_meta(run(base, n))["slurm"]["array_task_id"] for n in range(9)} == {0}
    assert notata.collect(manifest).to_resubmit()[0] == [8]


def test_a_pack_cancelled_midway(slurm_cluster: str, base: Path) -> None:
    """Its finished tasks stay complete, its running task reads cancelled, its unstarted
    ones have no run and read missing once it has gone; resubmit takes exactly the
    unstarted ones, and the cancelled one too when asked."""
    manifest = sweep_of(base, ["ok", "forever", "ok", "ok"])
    assert submit(manifest, "--backend", "slurm", "--pack", "4", "--", *command(base)) == 0
    job = _job(manifest)
    wait_for(status_is(run(base, 1), "running"), 120, "task 1 to run")
    subprocess.run(["scancel", job], check=True)
    wait_for(status_is(run(base, 1), "cancelled"), 60, "cancelled")
    wait_for(job_gone(job), 120, "the pack to end")
    assert statuses(manifest) == {0: "complete", 1: "cancelled", 2: "missing", 3: "missing"}
    assert notata.collect(manifest).to_resubmit()[0] == [2, 3]
    assert notata.collect(manifest).to_resubmit(["cancelled", "missing"])[0] == [1, 2, 3]


def test_a_packed_sweep_over_max_array_size_times_pack_splits(slurm_cluster: str,
                                                               base: Path) -> None:
    """2,003 tasks, 2 per array task: one array of 1,001 array tasks and one more; held,
    every task reads pending (never missing) until the arrays are cancelled."""
    manifest = write_sweep(base, name="big", tasks=2003)
    assert submit(manifest, "--backend", "slurm", "--pack", "2", "--sbatch-line=--hold",
                  "--", "true") == 0
    records = submissions.submitted(base / "outputs")
    arrays = [a for r in records for a in r["arrays"]]
    try:
        assert [(a["spec"], a["map"], a["pack"]) for a in arrays] == [
            ("0-1000", "0-2001", 2), ("0", "2002", 2)]
        counts = notata.collect(manifest).counts
        assert {k: n for k, n in counts.items() if n} == {"pending": 2003}
    finally:
        subprocess.run(["scancel", *(str(a["job_id"]) for a in arrays)], check=True)


# -- the time limit, started early (two minutes on the cluster) -------------------------------

_LIMIT: dict[str, Any] = {}
START_EARLY_FOR = {"test_a_pack_at_its_time_limit"}


def start_early() -> None:
    """Submit the time-limit sweep now, if the cluster is up (conftest calls this): two
    packs of six; in the first every task sleeps 20 s (the warning lands in one of them,
    which finishes; no other starts), in the second task 6 runs past the limit."""
    if _LIMIT or not shutil.which("sbatch") or subprocess.run(
            ["sinfo", "-h"], capture_output=True, timeout=30).returncode != 0:
        return
    base = Path(tempfile.mkdtemp(prefix="notata-pack-limit-"))
    manifest = sweep_of(base, ["sleep"] * 6 + ["forever"] * 6, name="limit")
    from notata.cli import main as cli
    rc = cli(["submit", str(manifest), "--backend", "slurm", "--pack", "6", "--time", "2",
              "--warn-before", "30", "--", *command(base, "20")])
    _LIMIT.update(base=base, manifest=manifest, rc=rc, job=_job(manifest) if rc == 0 else None)


def test_a_pack_at_its_time_limit(slurm_cluster: str) -> None:
    start_early()
    base, manifest = _LIMIT["base"], _LIMIT["manifest"]
    try:
        assert _LIMIT["rc"] == 0
        wait_for(job_gone(_LIMIT["job"]), 400, "the time limit")
        seen = statuses(manifest)
        ran = [n for n in range(6) if run(base, n).exists()]
        assert ran == list(range(len(ran))) and 1 <= len(ran) < 6, seen
        assert all(seen[n] == "complete" for n in ran)  # the warned one finished too
        assert all(seen[n] == "missing" for n in range(len(ran), 6))
        assert seen[6] == "timeout" and [s["signal"] for s in read_meta(run(base, 6))[
            "signals"]] == ["SIGUSR1", "SIGTERM"]
        assert all(seen[n] == "missing" for n in range(7, 12)), seen
        out = base / "outputs" / ".notata"
        first = (out / f"slurm-{_LIMIT['job']}_0.out").read_text()
        assert f"the time limit is near: tasks {len(ran)}" in first and "left unstarted" in first
        second = (out / f"slurm-{_LIMIT['job']}_1.out").read_text()
        assert "SIGTERM ended this pack: tasks 7-11 of this pack are left unstarted" in second
        records = submissions.read(base / "outputs")  # left unstarted: not an attempt
        from notata.manifest import compact
        assert {r["left"] for r in records if "left" in r} == {
            compact(range(len(ran), 6)), "7-11"}
        unbegun = submissions.left(records, notata.load_sweep(manifest).hash, 12)
        job = _LIMIT["job"]
        assert unbegun == {**{n: {f"{job}_0"} for n in range(len(ran), 6)},
                           **{n: {f"{job}_1"} for n in range(7, 12)}}
        assert main(["resubmit", str(manifest), "--dry-run"]) == 0
    finally:
        shutil.rmtree(base, ignore_errors=True)



LOCK_TAKER = """
import fcntl, sys, time
fd = open(sys.argv[1], "w")
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_a_pack_whose_running_task_is_taken_over_stops(base: Path) -> None:
    """Another attempt breaks the lock of the task a pack runs (SLURM requeued the pack
    from a node cut off, which came back): the old pack starts none of its other tasks,
    which are the new attempt's to run, and says why."""
    manifest = sweep_of(base, ["wait", "ok", "ok"])
    proc = notata_process("exec", str(manifest), "--tasks", "0-2", "--heartbeat", "0.2", "--",
                          *command(base))
    taker = None
    try:
        wait_for(status_is(run(base, 0), "running"), 30, "the first task to run")
        os.replace(run(base, 0) / ".lock", run(base, 0) / ".lock.broken-20261205T000000")
        taker = python(LOCK_TAKER, str(run(base, 0) / ".lock"))
        assert taker.stdout is not None and taker.stdout.readline().strip() == "held"
        out, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "lock broken" in err, err
        assert not run(base, 1).exists() and not run(base, 2).exists()
    finally:
        (base / "go").write_text("")
        if proc.poll() is None:
            proc.kill()
        if taker is not None:
            taker.kill()
            taker.wait()


def test_a_pack_whose_task_folder_is_moved_by_hand_goes_on(base: Path) -> None:
    """A run folder moved away while its task runs is that task's failure (it cannot write
    there any more), not another attempt taking the pack over: the other tasks run."""
    manifest = sweep_of(base, ["wait", "ok", "ok"])
    proc = notata_process("exec", str(manifest), "--tasks", "0-2", "--heartbeat", "0.2", "--",
                          *command(base))
    try:
        wait_for(status_is(run(base, 0), "running"), 30, "the first task to run")
        os.rename(run(base, 0), base / "outputs" / "aside_n0")
        (base / "go").write_text("")
        out, err = proc.communicate(timeout=60)
        assert "n0" in err, err
        assert read_meta(run(base, 1))["status"] == read_meta(run(base, 2))["status"] \
            == "complete"
    finally:
        (base / "go").write_text("")
        if proc.poll() is None:
            proc.kill()
