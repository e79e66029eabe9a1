"""notata logs and status --logs: a run's output, one attempt at a time, under a line
saying how it ended; for commands, packed tasks, function tasks and plain Logbook runs."""

from __future__ import annotations

import json
import shlex
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import notata_process, read_meta, wait_for, write_sweep

from notata import Logbook
from notata.cli import main

SCRIPT = """
import os, sys, time
k, folder = int(sys.argv[1]), sys.argv[2]
attempt = int(os.environ["NOTATA_ATTEMPT"])
for i in range(30):
    print(f"out {k} attempt {attempt} line {i}")
print(f"err {k} attempt {attempt}", file=sys.stderr)
if k == 1:
    raise SystemExit(f"task 1 fails in attempt {attempt}")
if k == 2:
    open(os.path.join(folder, "started"), "w").close()
    time.sleep(60)
"""


@pytest.fixture
def sweep(base: Path) -> Path:
    (base / "job.py").write_text(textwrap.dedent(SCRIPT))
    return write_sweep(base, name="lg", tasks=3)


def cmd(base: Path) -> list[str]:
    return [sys.executable, str(base / "job.py"), "{k}", str(base)]


def logs(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["logs", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def run_task(manifest: Path, base: Path, k: int) -> None:
    proc = notata_process("exec", str(manifest), "--task", str(k), "--", *cmd(base))
    proc.communicate(timeout=60)


def test_a_failed_task_shows_its_last_attempt_and_any_earlier_one(
        sweep: Path, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_task(sweep, base, 1)
    run_task(sweep, base, 1)
    rc, out, _ = logs(capsys, str(sweep), "--task", "1")
    assert rc == 0
    first = out.splitlines()[0]
    assert first == ("run k1 (task 1 of sweep lg), attempt 2 of 2: failed: command exited "
                     "with status 1: task 1 fails in attempt 2")
    assert "exit code 1" in out
    assert "--- stdout.txt, attempt 2 (all 30 lines)" in out
    assert "out 1 attempt 2 line 29" in out and "attempt 1" not in out.split("\n", 1)[1]
    assert "--- stderr.txt, attempt 2 (all 2 lines)" in out
    rc, out, _ = logs(capsys, str(sweep), "--task", "1", "--attempt", "1", "--tail", "3")
    assert out.splitlines()[0].startswith("run k1 (task 1 of sweep lg), attempt 1 of 2: failed")
    assert "--- stdout.txt, attempt 1 (last 3 of 30 lines)" in out
    assert "out 1 attempt 1 line 27" in out and "line 26" not in out
    rc, out, _ = logs(capsys, str(sweep), "--task", "1", "--stderr")
    assert "stdout.txt" not in out and "task 1 fails in attempt 2" in out
    rc, _, err = logs(capsys, str(sweep), "--task", "1", "--attempt", "3")
    assert rc == 2 and "no attempt 3 recorded" in err


def test_a_timed_out_task_by_run_id_and_by_folder(sweep: Path, base: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    proc = notata_process("exec", str(sweep), "--task", "2", "--", *cmd(base))
    wait_for(lambda: (base / "started").exists(), 60, "task 2 to start")
    proc.send_signal(signal.SIGUSR1)
    wait_for(lambda: "signals" in read_meta(base / "outputs" / "log_k2"), 10, "the warning")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert read_meta(base / "outputs" / "log_k2")["status"] == "timeout"
    rc, by_id, _ = logs(capsys, str(sweep), "--run", "k2")
    assert rc == 0 and "attempt 1 of 1: timeout: SIGTERM received" in by_id
    assert "err 2 attempt 1" in by_id
    rc, by_folder, _ = logs(capsys, str(base / "outputs" / "log_k2"))
    rc, by_base, _ = logs(capsys, str(base / "outputs"), "--run", "k2")
    assert by_id == by_folder == by_base


def test_a_plain_logbook_run_shows_its_log_and_says_what_it_has_not(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Logbook("plain", base) as log:
        log.info("hello from the run")
    rc, out, _ = logs(capsys, str(base / "log_plain"))
    assert "--- log.txt, attempt 1" in out and "hello from the run" in out
    rc, out, _ = logs(capsys, str(base / "log_plain"), "--stdout")
    assert rc == 0 and "--- stdout.txt: none (this run wrote no stdout.txt)" in out


def test_packed_and_function_tasks(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (base / "fn.py").write_text("def run(params, log):\n"
                                "    print('working on', params['k'])\n"
                                "    if params['k'] == 1:\n"
                                "        raise ValueError('k=1 diverges')\n")
    manifest = write_sweep(base, name="fl", tasks=2)
    proc = notata_process("exec", str(manifest), "--tasks", "0-1", "--python", "fn:run",
                          cwd=base)
    proc.communicate(timeout=60)
    rc, out, _ = logs(capsys, str(manifest), "--task", "1")
    assert "position 1 of a pack of 2" in out and "ValueError: k=1 diverges" in out
    assert "working on 1" in out
    assert "notata/_function.py" not in out  # the traceback starts in the user's code
    assert 'File "' + str(base / "fn.py") in out


def test_the_scheduler_output_file_of_the_array_task(base: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with Logbook("arr", base) as log:
        log.meta(note="x")
    meta = read_meta(base / "log_arr")
    meta["slurm"] = {"job_id": 12, "array_job_id": 10, "array_task_id": 2}
    (base / "log_arr" / "metadata.json").write_text(json.dumps(meta))
    (base / ".notata").mkdir()
    (base / ".notata" / "slurm-10_2.out").write_text("slurmstepd: error: *** JOB 12 ***\n")
    rc, out, _ = logs(capsys, str(base / "log_arr"), "--slurm")
    assert "SLURM job 10_2" in out.splitlines()[1]
    assert "slurm-10_2.out, attempt 1 (all 1 lines)" in out and "*** JOB 12 ***" in out


def test_bad_requests_are_one_line(sweep: Path, base: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert logs(capsys, str(sweep))[0] == 2  # neither --task nor --run
    assert logs(capsys, str(sweep), "--task", "9")[0] == 2
    rc, _, err = logs(capsys, str(sweep), "--task", "0")
    assert rc == 1 and "no run there yet" in err
    assert logs(capsys, str(base))[0] == 2  # a folder of runs needs --run


def test_status_logs_shows_the_end_of_each_failure(sweep: Path, base: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (base / "job.py").write_text(textwrap.dedent(SCRIPT).replace(
        'file=sys.stderr)', 'file=sys.stderr)\nfor i in range(9):\n'
        '    print("more", i, file=sys.stderr)'))
    run_task(sweep, base, 1)
    capsys.readouterr()
    assert main(["status", str(sweep), "--logs"]) == 0
    out = capsys.readouterr().out
    assert "k1 (failed), the end of its stderr.txt:" in out
    assert "    | task 1 fails in attempt 1" in out
    assert f"... 6 more line(s): notata logs {shlex.quote(str(sweep))} --task 1" in out


def test_odd_files_are_shown_as_far_as_they_can_be(base: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An attempt whose output did not end its line, a header the program printed itself,
    a FIFO, control characters, wrong field types: each shown or said, never a hang or a
    traceback."""
    import os

    with Logbook("odd", base) as log:
        log.info("x")
    run = base / "log_odd"
    meta = read_meta(run)
    meta.update(attempt=2, attempts=[{"attempt": 1, "status": "failed"}], pack="x")
    (run / "metadata.json").write_text(json.dumps(meta))
    (run / "stdout.txt").write_text(
        "=== notata attempt 1: job\nhello 1\n=== notata attempt 1: fake, printed\n"
        "after fake\nno newline at the end=== notata attempt 2: job\nsecond \x1b[31mred\n")
    rc, out, _ = logs(capsys, str(run), "--stdout", "--attempt", "1")
    assert "hello 1" in out and "after fake" in out and "no newline at the end" in out
    assert "second" not in out
    rc, out, _ = logs(capsys, str(run), "--stdout")
    assert "second ?[31mred" in out and "hello" not in out
    os.mkfifo(run / "stderr.txt")
    rc, out, _ = logs(capsys, str(run), "--stderr")
    assert rc == 0 and "stderr.txt: not a regular file: not read" in out
    (run / "metadata.json").write_text(json.dumps({**meta, "attempt": "two"}))
    rc, out, err = logs(capsys, str(run), "--log")
    assert rc == 0 and "Traceback" not in err


def test_an_earlier_attempt_beyond_what_is_read_is_said(base: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from notata import logs as logs_module

    monkeypatch.setattr(logs_module, "READ_LIMIT", 1000)
    with Logbook("big", base) as log:
        log.info("x")
    run = base / "log_big"
    meta = read_meta(run)
    meta.update(attempt=2, attempts=[{"attempt": 1, "status": "failed"}])
    (run / "metadata.json").write_text(json.dumps(meta))
    (run / "stdout.txt").write_text("=== notata attempt 1: job\nfirst\n=== notata attempt 2: "
                                    "job\n" + "".join(f"line {i}\n" for i in range(500)))
    rc, out, _ = logs(capsys, str(run), "--stdout", "--attempt", "1")
    assert "attempt 1's lines are before the last" in out and "line 499" not in out
    rc, out, _ = logs(capsys, str(run), "--stdout", "--tail", "2")
    assert "line 499" in out and "of the last" in out
