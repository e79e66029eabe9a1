"""Python function tasks (notata._function): one import per pack, a forked worker per task,
each task its own run; a worker that raises, exits, segfaults or is SIGKILLed ends alone."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from helpers import notata_process, read_meta, submit, wait_for, write_sweep

import notata
from notata import submissions

# submitit's jobs unpickle the functions below in another process, where tests/ is not
# importable.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SIM = """
import ctypes, os, signal, time
from pathlib import Path

IMPORTED = os.getpid()   # the pack's process: imported once
STATE = {"touched": False}

def run(params, log):
    k = params["k"]
    print("task", k, "imported in", IMPORTED, "runs in", os.getpid())
    assert not STATE["touched"], "a task saw what an earlier task changed"
    STATE["touched"] = True
    what = params["what"]
    if what == "raise":
        raise ValueError(f"k={k} diverges")
    if what == "exit":
        os._exit(3)
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what == "segv":
        ctypes.string_at(0)
    if what == "wait":
        while not Path("go").exists():
            time.sleep(0.05)
    if what == "big":
        block = bytearray(200 << 20)
        block[::4096] = b"x" * len(block[::4096])
    if what == "killserver":  # the fork server dies under the task
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(5)
    if what == "burn":
        t = time.process_time()
        while time.process_time() - t < 0.4:
            pass
    if what == "leave":
        import subprocess
        child = subprocess.Popen(["sleep", "300"], start_new_session=True)
        Path("left.pid").write_text(str(child.pid))
    if what == "warned":
        got = []
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
        Path(f"ready{k}").write_text("")
        while not got:
            time.sleep(0.05)
    log.info(f"k={k}")
    return {"k": k, "imported": IMPORTED, "pid": os.getpid()}
"""


def sweep(base: Path, whats: list[str], name: str = "fn") -> Path:
    (base / "sim.py").write_text(textwrap.dedent(SIM))
    grid = ", ".join(json.dumps(w) for w in whats)
    return write_sweep(base, f"name: {name}\nrun_id: 'k{{k}}'\n"
                             f"runs:\n" + "".join(f"  - {{k: {k}, what: {w}}}\n"
                                                  for k, w in enumerate(json.loads(f"[{grid}]"))))


def run(base: Path, k: int) -> Path:
    return base / "outputs" / f"log_k{k}"


def worker_of(path: Path) -> int | None:
    """The pid of the worker running the task at ``path``, once its run records it."""
    try:
        return read_meta(path).get("command_pid")
    except (OSError, ValueError):
        return None


def dead(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie that init has not reaped yet has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def exec_pack(manifest: Path, base: Path, tasks: str, target: str = "sim:run"
              ) -> subprocess.Popen[str]:
    return notata_process("exec", str(manifest), "--tasks", tasks, "--python", target, cwd=base)


def test_each_task_is_its_own_run_and_a_dying_worker_ends_alone(base: Path) -> None:
    manifest = sweep(base, ["ok", "raise", "exit", "kill", "segv", "ok"])
    proc = exec_pack(manifest, base, "0-5")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    metas = {k: read_meta(run(base, k)) for k in range(6)}
    assert {k: m["status"] for k, m in metas.items()} == {
        0: "complete", 1: "failed", 2: "failed", 3: "failed", 4: "failed", 5: "complete"}
    assert metas[1]["failure_reason"] == "function exited with status 1: ValueError: k=1 diverges"
    assert metas[2]["failure_reason"] == "function exited with status 3"
    assert metas[3]["failure_reason"] == "function killed by SIGKILL"
    assert metas[4]["failure_reason"].startswith("function killed by SIGSEGV")
    # one pack process held every run; each task ran in a worker of its own, forked from it
    assert len({m["pid"] for m in metas.values()}) == 1
    assert len({m["command_pid"] for m in metas.values()}) == 6
    results = {k: json.loads((run(base, k) / "artifacts" / "result.json").read_text())
               for k in (0, 5)}
    assert results[0]["imported"] == results[5]["imported"] == metas[0]["pid"]
    assert results[0]["pid"] == metas[0]["command_pid"]
    assert metas[0]["command"] == ["--python", "sim:run"] and metas[5]["exit_code"] == 0
    assert metas[5]["pack"] == {"position": 5, "size": 6}
    # its output in the run's files, its traceback in stderr.txt, params said once
    assert f"task 0 imported in {metas[0]['pid']}" in (run(base, 0) / "stdout.txt").read_text()
    assert "Traceback" in (run(base, 1) / "stderr.txt").read_text()
    log = (run(base, 0) / "log.txt").read_text()
    assert log.count("Saved params") == 1 and "k=0" in log
    assert "task 1 (k1) failed" in err


def test_a_task_counts_its_own_cpu_and_memory_not_the_packs(base: Path) -> None:
    """cpu_time_sec is the task's (its worker's, though the fork server reaped it), not
    the pack's so far; the fork server's memory is nobody's."""
    manifest = sweep(base, ["burn", "ok", "ok", "burn"])
    proc = exec_pack(manifest, base, "0-3")
    assert proc.wait(120) == 0, proc.communicate()
    used = {k: read_meta(run(base, k))["resources"]["used"] for k in range(4)}
    assert used[0]["cpu_time_sec"] >= 0.35 and used[3]["cpu_time_sec"] >= 0.35, used
    assert used[1]["cpu_time_sec"] < 0.3 and used[2]["cpu_time_sec"] < 0.3, used


def test_a_tasks_peak_memory_is_its_workers(base: Path) -> None:
    manifest = sweep(base, ["big", "ok"])
    proc = exec_pack(manifest, base, "0-1")
    assert proc.wait(120) == 0, proc.communicate()
    peaks = [read_meta(run(base, k))["resources"]["used"]["peak_rss_bytes"] for k in (0, 1)]
    assert peaks[0] >= 200 << 20 > peaks[1], peaks


def test_a_fork_server_that_dies_under_a_task_is_said_and_the_next_task_runs(
        base: Path) -> None:
    manifest = sweep(base, ["killserver", "ok"])
    proc = exec_pack(manifest, base, "0-1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    meta = read_meta(run(base, 0))
    assert meta["status"] == "failed" and meta["failure_reason"].startswith(
        "the fork server died during the task"), meta["failure_reason"]
    assert read_meta(run(base, 1))["status"] == "complete"  # on a new server


def test_what_the_module_starts_at_import_is_no_tasks(base: Path) -> None:
    """A helper started at import (a multiprocessing Manager, a server) is shared by the
    tasks: never stopped as a task's leftover, nor counted in a task's processes."""
    manifest = sweep(base, ["ok", "ok", "ok"])
    (base / "sim.py").write_text("import subprocess\n"
                                 "HELPER = subprocess.Popen(['sleep', '300'], "
                                 "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                                 "open('helper.pid', 'w').write(str(HELPER.pid))\n"
                                 + textwrap.dedent(SIM))
    proc = exec_pack(manifest, base, "0-2")
    try:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        for k in range(3):
            assert "left" not in (run(base, k) / "log.txt").read_text()
            assert read_meta(run(base, k))["status"] == "complete"
    finally:
        helper = int((base / "helper.pid").read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(helper, signal.SIGKILL)


def test_ctrl_c_while_the_module_imports_runs_nothing(base: Path) -> None:
    manifest = sweep(base, ["ok", "ok"])
    (base / "sim.py").write_text("import time, pathlib\npathlib.Path('importing').touch()\n"
                                 "time.sleep(30)\n" + textwrap.dedent(SIM))
    proc = exec_pack(manifest, base, "0-1")
    wait_for(lambda: (base / "importing").exists(), 60, "the import")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not run(base, 0).exists() and "Traceback" not in err


def test_the_heartbeat_counts_the_pack_and_the_worker_not_the_fork_server(base: Path) -> None:
    manifest = sweep(base, ["wait"])
    proc = notata_process("exec", str(manifest), "--tasks", "0", "--python", "sim:run",
                          "--heartbeat", "0.1", cwd=base)
    try:
        wait_for(lambda: worker_of(run(base, 0)) is not None
                 and read_meta(run(base, 0))["heartbeat"]["beat"] >= 2, 60, "beats")
        beat = read_meta(run(base, 0))["heartbeat"]
        pack = psutil.Process(proc.pid)
        assert len(pack.children(recursive=True)) == 2  # the server and its worker
        assert beat["pids"] == 2, beat  # the pack's process and the worker
    finally:
        (base / "go").write_text("")
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_a_worker_that_ends_as_it_starts_is_not_waited_for_forever(base: Path) -> None:
    """The server's "started" and "ended" can come in one read (a function that returns at
    once): the end was once dropped, and the pack waited for it forever (seen once in
    1,250 tasks). The replies in that order, then a pack of many such tasks."""
    from notata._function import _Server

    server = object.__new__(_Server)
    server._workers, server._started, server._ended, server._dead = {}, [], {}, False
    server._heard([b"started", b"41"])
    server._heard([b"ended", b"41", b"3", b"2048", b"0.25"])
    worker = server._hand_out()
    assert (worker.pid, worker.returncode, worker.peak_bytes, worker.cpu_sec) == (
        41, 3, 2048 * 1024, 0.25)
    manifest = write_sweep(base, name="quick", tasks=400)
    (base / "quick.py").write_text("def fn(params, log):\n    return None\n")
    proc = notata_process("exec", str(manifest), "--tasks", "0-399", "--python", "quick:fn",
                          cwd=base)
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert notata.collect(manifest).counts["complete"] == 400


def test_a_function_that_cannot_be_loaded_fails_each_task_with_the_reason(base: Path) -> None:
    manifest = sweep(base, ["ok", "ok"])
    proc = exec_pack(manifest, base, "0-1", "sim:nosuch")
    proc.communicate(timeout=60)
    assert proc.returncode == 1
    for k in (0, 1):
        meta = read_meta(run(base, k))
        assert meta["status"] == "failed"
        assert "cannot load sim:nosuch: sim has no 'nosuch'" in meta["failure_reason"]


@pytest.mark.parametrize("target", ["nosuchmodule:run", "sim:nosuch", "sim", "sim:STATE"])
def test_submit_refuses_a_function_it_cannot_find(base: Path, target: str,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    manifest = sweep(base, ["ok"])
    monkeypatch.chdir(base)
    assert submit(manifest, "--backend", "local", "--python", target) == 2
    assert "--python" in capsys.readouterr().err
    assert submissions.submitted(base / "outputs") == []
    assert not run(base, 0).exists()


def test_a_command_and_a_function_at_once_is_refused(base: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifest = sweep(base, ["ok"])
    assert submit(manifest, "--backend", "local", "--python", "sim:run", "--", "true") == 2
    assert "not both" in capsys.readouterr().err


def test_a_file_path_names_the_module_too(base: Path) -> None:
    manifest = sweep(base, ["ok"])
    proc = exec_pack(manifest, base, "0", str(base / "sim.py") + ":run")
    assert proc.wait(60) == 0, proc.communicate()
    assert read_meta(run(base, 0))["status"] == "complete"


def test_the_local_backend_packs_function_tasks_and_resubmits_the_failures(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = sweep(base, ["ok", "raise", "ok", "exit", "ok"])
    monkeypatch.chdir(base)
    assert submit(manifest, "--backend", "local", "--pack", "2", "-j", "2",
                  "--python", "sim:run") == 1
    report = notata.collect(manifest)
    assert report.counts["complete"] == 3 and report.counts["failed"] == 2
    [record] = submissions.submitted(base / "outputs")
    assert record["command"] == ["--python", "sim:run"]
    (base / "sim.py").write_text(textwrap.dedent(SIM).replace('"raise"', '"-"')
                                 .replace('"exit"', '"-"'))
    assert notata.resubmit(manifest, backend="local") == 0
    assert submissions.submitted(base / "outputs")[-1]["tasks"] == "1,3"
    assert notata.collect(manifest).counts["complete"] == 5
    assert read_meta(run(base, 1))["attempt"] == 2


def test_sigterm_stops_the_running_worker_and_leaves_the_rest(base: Path) -> None:
    manifest = sweep(base, ["ok", "wait", "ok", "ok"])
    proc = exec_pack(manifest, base, "0-3")
    wait_for(lambda: worker_of(run(base, 1)) is not None, 60, "task 1's worker")
    worker = int(worker_of(run(base, 1)) or 0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert dead(worker)
    assert read_meta(run(base, 0))["status"] == "complete"
    assert read_meta(run(base, 1))["status"] == "terminated"
    assert not run(base, 2).exists() and not run(base, 3).exists()
    assert "tasks 2-3 of this pack are left unstarted" in err


def test_the_warning_reaches_a_worker_that_handles_it_and_starts_no_other(base: Path) -> None:
    manifest = sweep(base, ["ok", "warned", "ok"])
    proc = exec_pack(manifest, base, "0-2")
    wait_for(lambda: (base / "ready1").exists(), 60, "task 1 to listen for SIGUSR1")
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    meta = read_meta(run(base, 1))
    assert meta["status"] == "complete" and meta["signals"][0]["signal"] == "SIGUSR1"
    assert not run(base, 2).exists()


def test_what_a_task_leaves_running_is_stopped_before_its_run_is_let_go(base: Path) -> None:
    manifest = sweep(base, ["leave", "ok"])
    proc = exec_pack(manifest, base, "0-1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert dead(int((base / "left.pid").read_text()))
    assert "left 1 process(es) running" in (run(base, 0) / "log.txt").read_text()
    assert read_meta(run(base, 1))["status"] == "complete"


def test_function_tasks_side_by_side(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--pack-parallel: each worker process has a fork server of its own."""
    manifest = sweep(base, ["ok", "raise", "ok", "ok", "ok", "ok"])
    (base / "sim.py").write_text("import os\nwith open('imported', 'a') as f:\n"
                                 "    f.write(f'{os.getpid()}\\n')\n" + textwrap.dedent(SIM))
    proc = notata_process("exec", str(manifest), "--python", "sim:run", cwd=base,
                          env={"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "999998",
                               "SLURM_JOB_ID": "999999", "NOTATA_PACK": "6",
                               "NOTATA_TASK_MAP": "0-5", "NOTATA_PACK_PARALLEL": "2"})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    metas = {k: read_meta(run(base, k)) for k in range(6)}
    assert [m["status"] for m in metas.values()].count("complete") == 5
    assert len({m["pid"] for m in metas.values()}) == 2  # two pack processes
    assert len((base / "imported").read_text().split()) == 2  # one import each, no more


def test_killing_the_pack_kills_its_worker(base: Path) -> None:
    manifest = sweep(base, ["wait"])
    proc = exec_pack(manifest, base, "0")
    wait_for(lambda: worker_of(run(base, 0)) is not None, 60, "the worker")
    worker = int(worker_of(run(base, 0)) or 0)
    proc.kill()
    proc.wait(30)
    wait_for(lambda: dead(worker), 10, "the worker to die")


def test_submitit_packs_return_results_and_name_the_failures(base: Path) -> None:
    import submitit

    from notata.errors import TasksFailedError
    from notata.submitit import submit_sweep

    manifest = sweep(base, ["ok", "ok", "raise", "ok", "exit"])
    executor = submitit.LocalExecutor(folder=str(base / "submitit"))
    executor.update_parameters(timeout_min=5)
    sys.path.insert(0, str(base))
    try:
        import sim  # type: ignore[import-not-found]
        cloudpickle.register_pickle_by_value(sim)  # the job has no sim.py on its path
        jobs = submit_sweep(sim.run, manifest, executor, pack=2)
    finally:
        sys.path.remove(str(base))
        sys.modules.pop("sim", None)
    assert len(jobs) == 3
    assert [r["k"] for r in jobs[0].result()] == [0, 1]
    with pytest.raises(Exception, match="task 2: failed: function exited with status 1: "
                                        "ValueError: k=2 diverges"):
        jobs[1].result()
    with pytest.raises(Exception, match="task 4: failed: function exited with status 3"):
        jobs[2].result()
    assert read_meta(run(base, 3))["status"] == "complete"
    [record] = submissions.submitted(base / "outputs")
    assert record["job_tasks"] == ["0-1", "2-3", "4"] and record["pack"] == 2
    assert TasksFailedError({2: "x"}).failures == {2: "x"}


def test_a_submitit_pack_in_this_process_beside_an_open_run(base: Path) -> None:
    """DebugExecutor runs the pack in the caller's process, where a Logbook may be open
    (its heartbeat thread running): the fork server is forked all the same."""
    import submitit

    from notata import Logbook
    from notata.submitit import submit_sweep

    manifest = write_sweep(base, name="dbg", tasks=2)
    with Logbook("mine", base / "elsewhere", heartbeat=0.05):
        executor = submitit.DebugExecutor(folder=str(base / "submitit"))
        before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
        jobs = submit_sweep(quick, manifest, executor, pack=2)
        assert jobs[0].result() == [{"k": 0}, {"k": 1}]
        # this process goes on: its handlers are its own again (SIGUSR1 was left ignored,
        # and every process it started after inherited that)
        assert {s: signal.getsignal(s) for s in before} == before


# -- on the cluster ---------------------------------------------------------------------------


def job_gone(job: str) -> Callable[[], bool]:
    def gone() -> bool:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        return out.returncode == 0 and not out.stdout.strip() or "Invalid job id" in out.stderr
    return gone


def test_a_function_pack_on_the_cluster_fails_alone_and_is_resubmitted(
        slurm_cluster: str, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = sweep(base, ["ok", "raise", "ok", "segv", "ok", "ok"])
    monkeypatch.chdir(base)  # a job runs where it was submitted from: sim.py is found there
    assert submit(manifest, "--backend", "slurm", "--pack", "3", "--python", "sim:run") == 0
    [record] = submissions.submitted(base / "outputs")
    job = str(record["job_ids"][0])
    wait_for(job_gone(job), 180, "the packs to end")
    metas = {k: read_meta(run(base, k)) for k in range(6)}
    assert {k: m["status"] for k, m in metas.items()} == {
        0: "complete", 1: "failed", 2: "complete", 3: "failed", 4: "complete", 5: "complete"}
    assert metas[3]["failure_reason"].startswith("function killed by SIGSEGV")
    assert [metas[k]["slurm"]["array_task_id"] for k in range(6)] == [0, 0, 0, 1, 1, 1]
    assert len({metas[k]["pid"] for k in range(3)}) == 1  # one process per array task
    (base / "sim.py").write_text(textwrap.dedent(SIM).replace('"raise"', '"-"')
                                 .replace('"segv"', '"-"'))
    assert notata.resubmit(manifest) == 0
    again = submissions.submitted(base / "outputs")[-1]
    assert again["tasks"] == "1,3" and again["command"] == ["--python", "sim:run"]
    wait_for(job_gone(str(again["job_ids"][0])), 180, "the resubmitted tasks to end")
    assert notata.collect(manifest).counts["complete"] == 6
    assert read_meta(run(base, 3))["attempt"] == 2


def quick(params: dict[str, Any], log: Any) -> dict[str, int]:
    return {"k": params["k"]}


def slow_then_done(params: dict[str, Any], log: Any) -> dict[str, int]:
    if params["k"] == 1 and log.attempt == 1:
        log.save_text("checkpoint", "state of attempt 1")
        while True:  # runs into submitit's warning, which requeues the pack
            time.sleep(0.5)
    return {"k": params["k"], "attempt": log.attempt}


START_EARLY_FOR = {"test_a_submitit_pack_at_its_time_limit_is_requeued_and_resumed"}
_LIMIT: dict[str, Any] = {}


def start_early() -> None:
    """Submit the submitit pack that reaches its time limit now, if the cluster is up
    (conftest calls this): it takes a minute and a half, while other modules run."""
    if _LIMIT or not shutil.which("sbatch") or subprocess.run(
            ["sinfo", "-h"], capture_output=True, timeout=30).returncode != 0:
        return
    import submitit

    from notata.submitit import submit_sweep

    base = Path(tempfile.mkdtemp(prefix="notata-subpack-"))
    manifest = write_sweep(base, name="subpack", tasks=3)
    executor = submitit.AutoExecutor(folder=str(base / "submitit"), cluster="slurm")
    executor.update_parameters(timeout_min=2, slurm_signal_delay_s=30)
    _LIMIT.update(base=base, jobs=submit_sweep(slow_then_done, manifest, executor, pack=3))


def test_a_submitit_pack_at_its_time_limit_is_requeued_and_resumed(slurm_cluster: str) -> None:
    """submitit's warning: the running task is recorded timeout, the unstarted one left,
    the job requeued; its second life skips the complete task, resumes the timed-out one
    as attempt 2 (its outputs kept) and runs the one left."""
    start_early()
    [job] = _LIMIT["jobs"]
    assert job.result() == [{"k": 0, "attempt": 1}, {"k": 1, "attempt": 2},
                            {"k": 2, "attempt": 1}]
    out = _LIMIT["base"] / "outputs"
    meta = read_meta(out / "log_k1")
    assert meta["status"] == "complete" and meta["slurm"]["restart_count"] == 1
    assert [a["status"] for a in meta["attempts"]] == ["timeout"]
    assert (out / "log_k1" / "artifacts" / "checkpoint.txt").read_text() == "state of attempt 1"
    assert read_meta(out / "log_k0")["attempt"] == 1  # complete: not run again
    records = submissions.read(out)
    assert [r["left"] for r in records if "left" in r] == ["2"]
    shutil.rmtree(_LIMIT["base"], ignore_errors=True)
