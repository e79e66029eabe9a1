"""``notata exec``: environment, placeholders, exit statuses, signals, attaching, locking."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, notata_process, python, read_meta, status_is, wait_for, write_sweep

from notata import _attach
from notata.cli import main

MANIFEST = """
name: demo
run_id: "w{word}"
zip:
  word: [plain, "two words", "$(id) `id`; echo 'q' \\"dq\\" #x", "ünï"]
params:
  n: 3
"""


@pytest.fixture
def manifest(base: Path) -> Path:
    return write_sweep(base, MANIFEST)


def run_dir(base: Path, word: str) -> Path:
    return base / "outputs" / f"log_w{word}"


def test_environment_and_placeholders_reach_the_command_verbatim(
    manifest: Path, base: Path
) -> None:
    out = base / "seen.json"
    payload = (
        "import json, os, sys; json.dump({'argv': sys.argv[1:], 'env': {k: v for k, v in "
        "os.environ.items() if k.startswith('NOTATA_')}}, open(sys.argv[1], 'w'))"
    )
    for task in range(4):
        rc = main(["exec", str(manifest), "--task", str(task), "--", sys.executable, "-c", payload,
                   f"{out}{task}", "{word}", "n={n}", "{print $1}", "{nope}",
                   "{run_id}:{task}:{attempt}"])
        assert rc == 0
    seen = json.loads(Path(f"{out}2").read_text())
    hostile = "$(id) `id`; echo 'q' \"dq\" #x"
    assert seen["argv"][1:] == [hostile, "n=3", "{print $1}", "{nope}", f"w{hostile}:2:1"]
    env = seen["env"]
    assert env["NOTATA_RUN_DIR"] == str(run_dir(base, hostile))
    assert env["NOTATA_RUN_ID"] == f"w{hostile}" and env["NOTATA_TASK"] == "2"
    assert env["NOTATA_ATTEMPT"] == "1"
    assert json.loads(env["NOTATA_PARAMS"]) == {"n": 3, "word": hostile}
    assert json.loads(Path(f"{out}3").read_text())["argv"][1] == "ünï"
    meta = read_meta(run_dir(base, hostile))
    assert meta["status"] == "complete" and meta["task"] == 2 and meta["sweep"] == "demo"
    assert meta["exit_code"] == 0 and meta["manifest_hash"]


def test_exit_status_decides_the_run(manifest: Path, base: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = "import sys; print('out line'); print('boom: bad input', file=sys.stderr); sys.exit(3)"
    assert main(["exec", str(manifest), "--task", "0", "--", sys.executable, "-c", code]) == 3
    d = run_dir(base, "plain")
    said = capsys.readouterr().err.strip().splitlines()  # by hand: one line says it all
    assert said == [f"notata: task 0 ({d.name[4:]}) failed: command exited with status 3: "
                    f"boom: bad input; its output: {d / 'stdout.txt'}, {d / 'stderr.txt'}"]
    meta = read_meta(d)
    assert meta["status"] == "failed" and meta["exit_code"] == 3
    assert meta["failure_reason"] == "command exited with status 3: boom: bad input"
    assert "out line" in (d / "stdout.txt").read_text()
    assert "=== notata attempt 1" in (d / "stderr.txt").read_text()
    # the next exec is attempt 2 of the same run, outputs and history kept
    assert main(["exec", str(manifest), "--task", "0", "--", "true"]) == 0
    meta = read_meta(d)
    assert meta["status"] == "complete" and meta["attempt"] == 2
    assert meta["attempts"][0]["status"] == "failed"
    assert "out line" in (d / "stdout.txt").read_text()
    capsys.readouterr()
    assert main(["exec", str(manifest), "--task", "0", "--", "true"]) == 0
    said = capsys.readouterr().err
    assert "already complete" in said and "overwrite=True" not in said  # a CLI's words
    # a complete task is not run again
    assert main(["exec", str(manifest), "--task", "0", "--", "false"]) == 0
    assert read_meta(d)["attempt"] == 2


def test_command_killed_by_a_signal_and_missing_command(manifest: Path, base: Path) -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert main(["exec", str(manifest), "--task", "1", "--", sys.executable, "-c", code]) == 137
    meta = read_meta(run_dir(base, "two words"))
    assert meta["status"] == "failed" and "killed by SIGKILL" in meta["failure_reason"]
    assert main(["exec", str(manifest), "--task", "3", "--", "/no/such/program"]) == 127
    assert "cannot start" in read_meta(run_dir(base, "ünï"))["failure_reason"]


@pytest.mark.parametrize("kind, says", [
    ("no #! line", "cannot start"), ("a missing interpreter", "cannot start"),
    ("another machine's ELF", "cannot start"), ("a good script", None),
    ("an interpreter without #!", "cannot start"), ("a #! line ending in CRLF", "cannot start"),
    ("a truncated ELF", "cannot start"), ("a relocatable ELF", "cannot start")])
def test_a_command_the_kernel_would_not_run_cannot_start(
        manifest: Path, base: Path, kind: str, says: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the kernel refuses is refused (127, "cannot start"), whatever the fast way of
    starting commands would do with it (setpriv's execvp hands such a file to /bin/sh)."""
    program = base / "program"
    interpreter = Path(tempfile.mkdtemp()) / "interp"  # a path without spaces
    interpreter.write_bytes(b"echo ran > ran.txt\n")
    interpreter.chmod(0o755)
    true = Path(shutil.which("true") or "/bin/true").read_bytes()
    body = {"no #! line": b"echo ran > ran.txt\n",
            "an interpreter without #!": b"#!" + bytes(interpreter) + b"\necho x\n",
            "a #! line ending in CRLF": b"#!/bin/sh\r\necho ran > ran.txt\n",
            "a truncated ELF": true[:64],
            "a relocatable ELF": true[:16] + b"\x01" + true[17:],
            "a missing interpreter": b"#!/no/such/sh\necho ran\n",
            "another machine's ELF": b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\0\x99\x99"
                                     + b"\0" * 44,
            "a good script": b"#!/bin/sh\nexit 0\n"}[kind]
    program.write_bytes(body)
    program.chmod(0o755)
    monkeypatch.chdir(base)  # where the command runs, and where "ran.txt" would appear
    rc = main(["exec", str(manifest), "--task", "0", "--", str(program)])
    meta = read_meta(run_dir(base, "plain"))
    if says is None:
        assert rc == 0 and meta["status"] == "complete"
    else:
        assert rc == 127 and says in meta["failure_reason"], meta
        assert not (base / "ran.txt").exists()


def test_bad_task_and_missing_command_are_usage_errors(
    manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["exec", str(manifest), "--task", "9", "--", "true"]) == 2
    assert "task 9 is outside" in capsys.readouterr().err
    assert main(["exec", str(manifest), "--task", "0"]) == 2
    assert "no command given" in capsys.readouterr().err
    assert not (base / "outputs").exists()


WRAPPED = """
import signal, sys, time
from pathlib import Path
marks = Path(sys.argv[1])
def on(signum, frame):
    with marks.open("a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    if signum == signal.SIGTERM:
        sys.exit(0)
signal.signal(signal.SIGTERM, on)
signal.signal(signal.SIGUSR1, on)
print("child up", flush=True)
while True:
    time.sleep(0.05)
"""


def start_wrapper(manifest: Path, base: Path, task: int = 0) -> tuple[object, Path]:
    marks = base / f"marks{task}.txt"
    proc = notata_process("exec", str(manifest), "--task", str(task), "--heartbeat", "0.1", "--",
                          sys.executable, "-c", WRAPPED, str(marks))
    return proc, marks


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_sigterm_and_sigusr1_are_passed_to_the_command(manifest: Path, base: Path) -> None:
    proc, marks = start_wrapper(manifest, base)
    d = run_dir(base, "plain")
    wait_for(lambda: "child up" in _lines(d / "stdout.txt"), what="the command to start")
    proc.send_signal(signal.SIGUSR1)  # type: ignore[attr-defined]
    wait_for(lambda: marks.exists() and "SIGUSR1" in marks.read_text(), what="SIGUSR1 passed on")
    proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    assert proc.wait(30) == 143  # type: ignore[attr-defined]
    assert marks.read_text().split() == ["SIGUSR1", "SIGTERM"]
    meta = read_meta(d)
    assert meta["status"] == "timeout"  # SIGTERM after the time-limit warning
    assert [s["signal"] for s in meta["signals"]] == ["SIGUSR1", "SIGTERM"]


def test_heartbeat_reports_the_whole_process_tree(manifest: Path, base: Path) -> None:
    code = "import time; x = bytearray(80_000_000); print('up', flush=True); time.sleep(30)"
    proc = notata_process("exec", str(manifest), "--task", "1", "--heartbeat", "0.1", "--",
                          sys.executable, "-c", code)
    d = run_dir(base, "two words")
    try:
        wait_for(
            lambda: (d / "metadata.json").exists()
            and read_meta(d)["heartbeat"].get("rss_bytes", 0) > 80_000_000,
            what="the child's memory in the heartbeat",
        )
        assert read_meta(d)["heartbeat"]["pids"] >= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert read_meta(d)["status"] == "terminated"


def test_second_wrapper_for_a_running_task_marks_nothing(
    manifest: Path, base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, _ = start_wrapper(manifest, base)
    d = run_dir(base, "plain")
    try:
        wait_for(status_is(d, "running"), what="the first wrapper")
        before = read_meta(d)
        assert main(["exec", str(manifest), "--task", "0", "--", "true"]) == 75  # IN_USE
        assert "in use by another process" in capsys.readouterr().err
        after = read_meta(d)
        assert (after["pid"], after["attempt"], after["status"]) == (
            before["pid"],
            before["attempt"],
            "running",
        )
    finally:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        proc.wait(30)  # type: ignore[attr-defined]


def test_python_command_attaches_to_the_wrappers_run(manifest: Path, base: Path) -> None:
    payload = base / "payload.py"
    payload.write_text(f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import notata
with notata.task(sys.argv[1]) as log:
    assert log.attached and log.task.params["word"] == "plain"
    log.save_json("result", {{"n": log.task.params["n"]}})
    log.meta(score=0.5)
    log.info("from the command")
    raise RuntimeError("diverged at step 7")
""")
    rc = main(["exec", str(manifest), "--task", "0", "--heartbeat", "0.1", "--", sys.executable,
               str(payload), str(manifest)])
    assert rc == 1
    d = run_dir(base, "plain")
    meta = read_meta(d)
    assert meta["status"] == "failed" and meta["attempt"] == 1 and meta["score"] == 0.5
    reason = "command exited with status 1: RuntimeError: diverged at step 7"
    assert meta["failure_reason"] == reason
    assert json.loads((d / "artifacts" / "result.json").read_text()) == {"n": 3}
    assert "from the command" in (d / "log.txt").read_text()
    assert not (d / ".attached.json").exists()


def test_notata_task_outside_exec_uses_the_array_index(
    manifest: Path, base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import notata

    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("NOTATA_TASK_OFFSET", "2")
    with notata.task(manifest, heartbeat=60) as log:
        assert not log.attached and log.task is not None and log.task.index == 3
    assert read_meta(run_dir(base, "ünï"))["task"] == 3
    with pytest.raises(SystemExit) as info:
        notata.task(manifest)  # complete: exits 0 instead of running again
    assert info.value.code == 0
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with pytest.raises(notata.NotataError, match="no task index"):
        notata.task(manifest)
    assert os.environ.get("NOTATA_TASK") is None


def test_warning_spares_a_command_that_does_not_handle_it(manifest: Path, base: Path) -> None:
    """SIGUSR1's default action kills; a command that never asked for the time-limit warning
    must not die of it minutes before its limit (and read failed)."""
    proc = notata_process("exec", str(manifest), "--task", "0", "--", "sh", "-c",
                          "echo up; sleep 1; echo survived")
    d = run_dir(base, "plain")
    wait_for(lambda: "up" in _lines(d / "stdout.txt"), what="the command to start")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(30) == 0
    assert "survived" in _lines(d / "stdout.txt")
    meta = read_meta(d)
    assert meta["status"] == "complete"
    assert [s["signal"] for s in meta["signals"]] == ["SIGUSR1"]


def test_attached_python_command_gets_the_warning_in_its_hooks(manifest: Path,
                                                              base: Path) -> None:
    payload = base / "payload.py"
    payload.write_text(f"""
import pathlib, sys, time
sys.path.insert(0, {str(ROOT)!r})
import notata
with notata.task(sys.argv[1]) as log:
    log.on_warning(lambda log: log.save_text("checkpoint", "saved"))
    print("up", flush=True)
    while not (log.path / "artifacts" / "checkpoint.txt").exists():
        time.sleep(0.05)
""")
    proc = notata_process("exec", str(manifest), "--task", "0", "--", sys.executable,
                          str(payload), str(manifest))
    d = run_dir(base, "plain")
    wait_for(lambda: "up" in _lines(d / "stdout.txt"), what="the command to start")
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(30) == 0
    meta = read_meta(d)
    assert meta["status"] == "complete"
    assert [s["signal"] for s in meta["signals"]] == ["SIGUSR1"]
    assert (d / "artifacts" / "checkpoint.txt").read_text() == "saved"


def test_a_hand_over_is_taken_once_and_leaves_no_file(tmp_path: Path) -> None:
    _attach.hand_over(tmp_path, {"a": 1})
    _attach.hand_over(tmp_path, {"b": 2})  # merged with what is there
    assert _attach.take_handed_over(tmp_path) == {"a": 1, "b": 2}
    assert list(tmp_path.iterdir()) == []  # neither the file nor its taken copy is left
    assert _attach.take_handed_over(tmp_path) == {}


TRAPS_TERM = """
import os, signal, sys, time
from pathlib import Path
run = Path(os.environ["NOTATA_RUN_DIR"])
def on_term(signum, frame):
    (run / "term.txt").write_text(str(os.getpid()))
    time.sleep(float(sys.argv[1]))          # a checkpoint that takes a while
    (run / "ckpt.txt").write_text("written after SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("child up", os.getpid(), flush=True)
while True:
    time.sleep(0.05)
"""


def _exec(manifest: Path, *cmd: str, task: int = 0) -> object:
    return notata_process("exec", str(manifest), "--task", str(task), "--heartbeat", "0.2", "--",
                          *cmd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _child_pid(d: Path) -> int:
    def up() -> list[str]:
        return [ln for ln in _lines(d / "stdout.txt") if ln.startswith("child up")]
    wait_for(lambda: bool(up()), what="the command to start")
    return int(up()[-1].split()[-1])


@pytest.mark.parametrize("second", [False, True], ids=["one-sigterm", "two-sigterms"])
def test_the_run_lock_is_held_until_the_command_has_stopped(manifest: Path, base: Path,
                                                            second: bool) -> None:
    """SIGTERM to the wrapper: the status is recorded, the command is stopped, and only
    then is the lock released; nothing the command writes lands in the next attempt. A
    second SIGTERM while the command stops neither kills the wrapper nor orphans it."""
    from notata import Logbook, RunLockedError

    proc = _exec(manifest, sys.executable, "-c", TRAPS_TERM, "2")
    d = run_dir(base, "plain")
    child = _child_pid(d)
    proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    wait_for(lambda: (d / "term.txt").exists(), what="the command to get SIGTERM")
    if second:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    wait_for(status_is(d, "terminated"), what="the status, written first")
    assert _pid_alive(child) and not (d / "ckpt.txt").exists()
    with pytest.raises(RunLockedError):  # the command still runs: no next attempt yet
        Logbook("wplain", base / "outputs", resume=True)
    assert proc.wait(30) == 143  # type: ignore[attr-defined]
    assert (d / "ckpt.txt").read_text() == "written after SIGTERM"
    assert not _pid_alive(child)
    meta = read_meta(d)
    assert meta["status"] == "terminated" and meta["exit_code"] == 0
    with Logbook("wplain", base / "outputs", resume=True) as log:
        assert log.attempt == 2


def test_sighup_stops_the_command_and_records_a_hangup(manifest: Path, base: Path) -> None:
    """An ssh connection that drops sends SIGHUP: the command must not run on unsupervised."""
    proc = _exec(manifest, sys.executable, "-c", TRAPS_TERM, "0")
    d = run_dir(base, "plain")
    child = _child_pid(d)
    proc.send_signal(signal.SIGHUP)  # type: ignore[attr-defined]
    assert proc.wait(30) == 129  # type: ignore[attr-defined]
    assert not _pid_alive(child)
    meta = read_meta(d)
    assert meta["status"] == "terminated" and "hangup" in meta["failure_reason"]
    assert [s["signal"] for s in meta["signals"]] == ["SIGHUP"]


def test_a_sigkilled_wrapper_takes_its_command_along(manifest: Path, base: Path) -> None:
    """No code runs in a SIGKILLed wrapper; the kernel kills its command (PR_SET_PDEATHSIG),
    and a process of the command that survives anyway is named, and never run beside."""
    from notata.collector import scan
    from notata.manifest import load

    def sigkill_wrapper(task: int, word: str, *cmd: str) -> int:
        """Run ``cmd`` as ``task`` (run ``w<word>``) and SIGKILL its wrapper once the command
        is up; the pid the command said ("child up <pid>")."""
        proc = _exec(manifest, *cmd, task=task)
        pid = _child_pid(run_dir(base, word))
        proc.kill()  # type: ignore[attr-defined]
        proc.wait()  # type: ignore[attr-defined]
        return pid

    def record(task: int) -> Any:
        [r] = [r for r in scan(load(manifest)).read if r.task == task]
        return r

    child = sigkill_wrapper(0, "plain", sys.executable, "-c", TRAPS_TERM, "0")
    wait_for(lambda: not _pid_alive(child), 5, "the command to die with its wrapper")
    r = record(0)
    assert r.status == "stale" and not r.orphan

    # a grandchild in the command's process group outlives the shell that pdeathsig kills
    grandchild = sigkill_wrapper(1, "two words", "sh", "-c", "sleep 60 & echo child up $!; wait")
    try:
        r = record(1)
        assert r.status == "stale" and r.orphan and f"pid {grandchild}" in (r.reason or "")
        chosen, left = scan(load(manifest)).to_resubmit()
        assert 1 not in chosen and [x.task for x, _ in left] == [1]
    finally:
        os.kill(grandchild, signal.SIGKILL)

    # one that cleared its environment (env -i, Popen(env=...)) is found by its group
    quiet = sigkill_wrapper(2, "$(id) `id`; echo 'q' \"dq\" #x",
                            "sh", "-c", "env -i sleep 60 & echo child up $!; wait")
    try:
        r = record(2)
        assert r.status == "stale" and r.orphan and f"pid {quiet}" in (r.reason or "")
    finally:
        os.kill(quiet, signal.SIGKILL)


@pytest.mark.parametrize(("code", "reason"), [
    ("import sys; print('cleaning up...', file=sys.stderr); sys.exit(3)",
     "command exited with status 3: cleaning up..."),
    ("import sys; print('ERROR: CUDA out of memory', file=sys.stderr); "
     "print('cleaning up...', file=sys.stderr); sys.exit(1)",
     "command exited with status 1: ERROR: CUDA out of memory"),
    ("import atexit, sys\natexit.register(lambda: print('saved partial results', "
     "file=sys.stderr))\ndef f():\n    raise KeyError('omega')\nf()",
     "command exited with status 1: KeyError: 'omega'"),
    ("import sys; sys.exit(4)", "command exited with status 4"),
])
def test_the_failure_reason_is_the_most_telling_line(manifest: Path, base: Path, code: str,
                                                      reason: str) -> None:
    assert main(["exec", str(manifest), "--task", "0", "--", sys.executable, "-c", code]) != 0
    assert read_meta(run_dir(base, "plain"))["failure_reason"] == reason


def test_sys_exit_inside_an_attached_task_is_its_exit_status(manifest: Path, base: Path) -> None:
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import notata\n"
            f"with notata.task(sys.argv[1]) as log:\n    sys.exit(3)")
    assert main(["exec", str(manifest), "--task", "0", "--", sys.executable, "-c", code,
                 str(manifest)]) == 3
    assert read_meta(run_dir(base, "plain"))["failure_reason"] == "command exited with status 3"


def test_an_attached_logbook_cannot_be_pickled_or_copied(manifest: Path) -> None:
    """A copy in another process would write through a descriptor number that is not its
    log.txt there, and hand over a status after the run ended."""
    code = (f"import copy, pickle, sys; sys.path.insert(0, {str(ROOT)!r}); import notata\n"
            "with notata.task(sys.argv[1]) as log:\n"
            "    assert log.attached\n"
            "    for copy_it in (pickle.dumps, copy.deepcopy, copy.copy):\n"
            "        try:\n            copy_it(log)\n        except TypeError:\n"
            "            continue\n        sys.exit(5)\n")
    assert main(["exec", str(manifest), "--task", "0", "--", sys.executable, "-c", code,
                 str(manifest)]) == 0


def test_an_inherited_notata_task_never_overrides_the_array_index() -> None:
    """sbatch exports the submitter's environment: a sweep submitted from inside a task
    carries that task's NOTATA_TASK into every array task of the next sweep."""
    from notata.array import index_from_env

    env = {"NOTATA_TASK": "0", "SLURM_ARRAY_TASK_ID": "1", "NOTATA_TASK_OFFSET": "1",
           "NOTATA_WRAPPER_PID": str(os.getppid()), "NOTATA_WRAPPER_HOST": "elsewhere"}
    assert index_from_env(env) == 2
    assert index_from_env({"NOTATA_TASK": "5"}) == 5  # no array: set by hand
    here = {**env, "NOTATA_WRAPPER_HOST": __import__("socket").gethostname()}
    assert index_from_env(here) == 0  # our parent is the wrapper that set it


def test_the_command_inherits_no_run_variables_of_an_outer_task(manifest: Path, base: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 ) -> None:
    monkeypatch.setenv("NOTATA_RUN_ID", "outer")
    monkeypatch.setenv("NOTATA_WRAPPER_HOST", "elsewhere")
    monkeypatch.setenv("NOTATA_TASK_OFFSET", "2")  # an outer array's: never the next stage's
    code = ("import json, os; print(json.dumps({k: v for k, v in os.environ.items() "
            "if k.startswith('NOTATA_')}))")
    assert main(["exec", str(manifest), "--task", "0", "--", sys.executable, "-c", code]) == 0
    env = json.loads(_lines(run_dir(base, "plain") / "stdout.txt")[-1])
    assert env["NOTATA_RUN_ID"] == "wplain" and env["NOTATA_WRAPPER_HOST"] != "elsewhere"
    assert "NOTATA_TASK_OFFSET" not in env


DUPLICATES = "name: dup\nrun_id: 'seed{seed}'\ngrid: {seed: [0, 1], lr: [0.1, 0.2]}\n"


def test_tasks_sharing_a_run_id_refuse_to_start_and_status_says_why(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """seed{seed} over seed x lr: task 1 once read task 0's run as its own, said "already
    complete" and exited 0 without running; status said all four were complete."""
    import notata

    manifest = write_sweep(base, DUPLICATES, "dup.yaml")
    assert main(["exec", str(manifest), "--task", "0", "--", "true"]) == 0
    assert main(["exec", str(manifest), "--task", "1", "--", "true"]) == 2
    assert "tasks 0 and 1 have the same run id 'seed0'" in capsys.readouterr().err
    with pytest.raises(notata.ManifestError, match="same run id"):
        notata.task(manifest, 1)
    assert main(["exec", str(manifest), "--task", "2", "--", "true"]) == 0
    capsys.readouterr()
    for args in (["status", str(manifest)], ["status", str(manifest), "--full"]):
        assert main(args) == 2
        assert "same run id" in capsys.readouterr().err
    assert read_meta(base / "outputs" / "log_seed0")["task"] == 0


def test_the_lock_waits_for_every_process_of_the_command(manifest: Path, base: Path) -> None:
    """The usual shell script around Python: the shell dies at once on SIGTERM, the Python
    payload it started checkpoints for a while. The lock once went with the shell."""
    from notata import Logbook, RunLockedError

    payload = base / "payload.py"
    payload.write_text(TRAPS_TERM)  # its checkpoint on SIGTERM takes 1.5 s
    proc = _exec(manifest, "bash", "-c",
                 f"{shlex.quote(sys.executable)} {shlex.quote(str(payload))} 1.5; true")
    d = run_dir(base, "plain")
    child = _child_pid(d)
    proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    wait_for(status_is(d, "terminated"), what="the status")
    time.sleep(0.3)
    assert _pid_alive(child)
    with pytest.raises(RunLockedError):
        Logbook("wplain", base / "outputs", resume=True)
    assert proc.wait(30) == 143  # type: ignore[attr-defined]
    assert (d / "ckpt.txt").exists() and not _pid_alive(child)


@pytest.mark.parametrize("leftover", ["sleep 60 &", "setsid sleep 60 &"],
                         ids=["background", "daemon"])
def test_what_a_command_leaves_running_ends_with_it(manifest: Path, base: Path,
                                                   leftover: str) -> None:
    """A command that exits 0 but leaves a process behind (in its group, or a daemon in a
    session of its own): the wrapper, its subreaper, stops it before letting the run go."""
    assert main(["exec", str(manifest), "--task", "0", "--", "sh", "-c",
                 f"{leftover} echo child up $!"]) == 0
    d = run_dir(base, "plain")
    left = int(next(ln for ln in _lines(d / "stdout.txt")
                    if ln.startswith("child up")).split()[-1])
    assert not _pid_alive(left)
    assert read_meta(d)["status"] == "complete"
    assert "left 1 process(es) running" in (d / "log.txt").read_text()


ATTACHED_CHECKPOINT = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import notata
with notata.task(sys.argv[1]) as log:
    log.on_terminate(lambda log, signum: log.save_text("hook", "ran"))
    try:
        print("child up 0", flush=True)
        while True:
            time.sleep(0.05)
    finally:
        log.save_text("finally", "ran")
"""


def test_an_attached_command_runs_its_hooks_and_finally_blocks_on_sigterm(
        manifest: Path, base: Path) -> None:
    proc = _exec(manifest, sys.executable, "-c", ATTACHED_CHECKPOINT, str(manifest))
    d = run_dir(base, "plain")
    _child_pid(d)
    proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    assert proc.wait(30) == 143  # type: ignore[attr-defined]
    assert (d / "artifacts" / "hook.txt").read_text() == "ran"
    assert (d / "artifacts" / "finally.txt").read_text() == "ran"
    assert read_meta(d)["status"] == "terminated"


def test_an_attached_mark_failed_counts(manifest: Path, base: Path) -> None:
    """The same script gives the same status with and without the wrapper."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import notata\n"
            "log = notata.task(sys.argv[1])\nlog.mark_complete()\n"
            "log.mark_failed('validation: energy is NaN')\n")
    assert main(["exec", str(manifest), "--task", "0", "--", sys.executable, "-c", code,
                 str(manifest)]) == 0
    meta = read_meta(run_dir(base, "plain"))
    assert meta["status"] == "failed"
    assert meta["failure_reason"] == "the command marked the run failed: validation: energy is NaN"


def test_variables_copied_by_hand_attach_to_nothing(manifest: Path, base: Path) -> None:
    """NOTATA_WRAPPER_PID=1 (everyone's ancestor) and the run's folder, set by hand beside a
    live holder: no attach, the lock refuses."""
    import socket

    from notata import RunLockedError

    proc = _exec(manifest, sys.executable, "-c", TRAPS_TERM, "0")
    d = run_dir(base, "plain")
    _child_pid(d)
    try:
        env = {"NOTATA_RUN_DIR": str(d), "NOTATA_WRAPPER_PID": "1",
               "NOTATA_WRAPPER_HOST": socket.gethostname(), "NOTATA_TASK": "0"}
        other = python("import sys, notata\ntry:\n    notata.task(sys.argv[1], 0)\n"
                       "except notata.RunLockedError:\n    print('refused')\n",
                       str(manifest), env=env)
        assert other.communicate(timeout=30)[0].strip() == "refused"
        assert RunLockedError  # the class the refusal is
    finally:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        proc.wait(30)  # type: ignore[attr-defined]


GROWS_THEN_KILLED = """
import os, signal, sys
hold = bytearray(int(sys.argv[1]) * 2**20)  # touched, so resident
for i in range(0, len(hold), 4096):
    hold[i] = 1
os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
"""


def test_a_command_killed_near_its_granted_memory_reads_oom(manifest: Path, base: Path) -> None:
    """SIGKILL after the command's peak reached 90 % of what SLURM granted: ``oom``, with
    what it asked for and what it used; the same kill far below the grant stays failed."""
    import notata
    from notata.resources import OOM_FRACTION

    job = {"SLURM_JOB_ID": "999999", "SLURM_MEM_PER_NODE": "200", "SLURM_CPUS_ON_NODE": "1"}
    sweep = notata.load_sweep(manifest)
    for task, mib, status in [(0, 190, "oom"), (1, 10, "failed")]:  # (the wrapper's own
        # memory, some 50 MiB, is not the command's: 10 MiB is far from 90 %)
        proc = notata_process("exec", str(manifest), "--task", str(task), "--",
                              sys.executable, "-c", GROWS_THEN_KILLED, str(mib),
                              env=job)
        proc.communicate(timeout=60)
        assert proc.returncode == 137
        meta = read_meta(sweep.task(task).run_dir)
        assert meta["status"] == status, meta.get("failure_reason")
        asked, used = meta["resources"]["asked"], meta["resources"]["used"]
        assert asked["mem_bytes"] == 200 * 2**20 and asked["cpus"] == 1
        assert used["runtime_sec"] == meta["runtime_sec"]
        near = used["peak_rss_bytes"] >= OOM_FRACTION * asked["mem_bytes"]
        assert near == (status == "oom"), used
        if status == "oom":
            assert used["peak_rss_bytes"] >= mib * 2**20
            assert meta["failure_reason"].startswith("killed for memory: SIGKILL after a peak")
        else:
            assert meta["failure_reason"].startswith("command killed by SIGKILL")


def test_a_task_run_in_a_process_with_children_of_its_own_leaves_them(
        manifest: Path, base: Path) -> None:
    """A task run in this very process (a notebook's, a test runner's) stops what its
    command leaves running, never the process's own children started before it."""
    import subprocess
    import threading

    own = subprocess.Popen(["sleep", "60.25"])
    later: list[subprocess.Popen[bytes]] = []  # started by another thread during the task
    starter = threading.Timer(0.3, lambda: later.append(subprocess.Popen(["sleep", "60.5"])))
    try:
        script = base / "leave.sh"
        script.write_text("#!/bin/sh\nsleep 63.5 &\nsleep 1\n")
        script.chmod(0o755)
        starter.start()
        assert main(["exec", str(manifest), "--task", "0", "--", str(script)]) == 0
        starter.join()
        assert own.poll() is None  # ours, before the task: left alone
        assert later and later[0].poll() is None  # another thread's, during it: too
        assert subprocess.run(["pgrep", "-f", "^sleep 63.5$"], capture_output=True).stdout \
            == b""  # the command's: stopped
    finally:
        starter.cancel()
        for p in [own, *later]:
            p.kill()
            p.wait()


ATTACHED_WRITER = """
import os, sys, time
import notata
with notata.task(sys.argv[1]) as log:
    try:
        while not os.path.exists(sys.argv[2]):
            log.info("tick"); log.save_text("who", "first"); print("tick", flush=True)
            time.sleep(0.05)
    finally:  # a checkpoint on the way out
        log.save_text("final", "first")
"""
TAKER = """
import fcntl, sys, time
fd = open(sys.argv[1], "w")
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


@contextlib.contextmanager
def _another_attempt_takes(run: Path) -> Iterator[None]:
    """What an attempt breaking the run's lock does: the old .lock renamed aside, a new one
    held by another process (for the block)."""
    os.replace(run / ".lock", run / ".lock.broken-20261205T000000")
    taker = python(TAKER, str(run / ".lock"))
    try:
        assert taker.stdout is not None and taker.stdout.readline().strip() == "held"
        yield
    finally:
        taker.kill()
        taker.wait()


def test_a_command_writes_nothing_once_its_runs_lock_is_broken(
        manifest: Path, base: Path) -> None:
    """Another attempt breaks the run's lock (as one does for a holder on a node cut off,
    which may come back): the old attempt's command, attached through notata.task, writes
    nothing more there, not even the checkpoint of its finally block, and its wrapper
    stops it."""
    go = base / "go"
    proc = notata_process("exec", str(manifest), "--task", "0", "--heartbeat", "0.2", "--",
                          sys.executable, "-c", ATTACHED_WRITER, str(manifest), str(go))
    d = run_dir(base, "plain")
    try:
        wait_for(lambda: (d / "artifacts" / "who.txt").exists(), 30, "the command to write")
        with _another_attempt_takes(d):
            # a command cut off is silent for 20 s at the least before its lock is broken;
            # it asks about the lock at most once a second
            time.sleep(1.2)
            (d / "artifacts" / "who.txt").write_text("second")  # the new attempt's
            _attach.hand_over(d, {"important": 42})  # what its command hands over
            size = (d / "log.txt").stat().st_size
            go.touch()  # the old command leaves its loop: its finally writes a checkpoint
            proc.wait(30)  # type: ignore[attr-defined]
        assert (d / "artifacts" / "who.txt").read_text() == "second"
        assert not (d / "artifacts" / "final.txt").exists()
        assert (d / "log.txt").stat().st_size == size
        # the old wrapper, ending, took nothing the new attempt's command handed over
        assert _attach.take_handed_over(d) == {"important": 42}
    finally:
        if proc.poll() is None:  # type: ignore[attr-defined]
            proc.kill()  # type: ignore[attr-defined]


LATE_ATTACHER = """
import os, sys, time
import notata
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
with notata.task(sys.argv[1]) as log:  # attaches only now, the lock already replaced
    log.save_text("late", "the old attempt's")
"""


def test_a_command_that_attaches_after_its_runs_lock_was_broken_writes_nothing(
        manifest: Path, base: Path) -> None:
    """The old attempt's command opens its run only once another attempt has broken the
    lock (and before that attempt has rewritten metadata.json): it compares the run's
    .lock with the one its wrapper said it holds, not with the one it finds."""
    go = base / "go"
    proc = notata_process("exec", str(manifest), "--task", "0", "--heartbeat", "30", "--",
                          sys.executable, "-c", LATE_ATTACHER, str(manifest), str(go))
    d = run_dir(base, "plain")
    try:
        wait_for(status_is(d, "running"), 30, "the command to start")
        with _another_attempt_takes(d):
            go.touch()
            proc.wait(30)  # type: ignore[attr-defined]
        assert not (d / "artifacts" / "late.txt").exists()
    finally:
        if proc.poll() is None:  # type: ignore[attr-defined]
            proc.kill()  # type: ignore[attr-defined]


def test_a_fifo_planted_as_stdout_is_an_error_not_a_hang(manifest: Path, base: Path) -> None:
    """Where notata writes the command's output must be a regular file: a FIFO there (no
    reader) would block the task for ever; it is one error naming it."""
    assert main(["exec", str(manifest), "--task", "0", "--", "false"]) == 1
    d = run_dir(base, "plain")
    (d / "stdout.txt").unlink()
    os.mkfifo(d / "stdout.txt")
    proc = notata_process("exec", str(manifest), "--task", "0", "--", "true")
    _, err = proc.communicate(timeout=60)  # type: ignore[attr-defined]
    assert proc.returncode != 0 and "not a regular file" in err and "stdout.txt" in err, err
