"""The notata command: sweep, status, local submit (with failures and Ctrl-C), bad input."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, read_meta, wait_for, write_sweep

import notata
from notata import Logbook
from notata.cli import main
from notata.manifest import compact, parse_indices

SWEEP = """
name: osc
run_id: "omega{omega}_dt{dt}"
grid:
  omega: [1.0, 2.0, 3.0]
  dt: [0.01, 0.001]
params:
  steps: 10
"""


@pytest.fixture
def manifest(base: Path) -> Path:
    return write_sweep(base, SWEEP)


def cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "notata", *args], capture_output=True,
                          text=True, env=env, timeout=120, **kw)  # type: ignore[call-overload]


def test_sweep_prints_tasks(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sweep osc: 6 tasks, manifest hash ")
    assert "task 0: omega1.0_dt0.01" in out
    assert [ln.split(":")[0].strip() for ln in out.splitlines()[2:]] == [
        f"task {i}" for i in range(6)]  # all six: no task hidden without an ellipsis
    assert main(["sweep", str(manifest), "--task", "3"]) == 0
    task = json.loads(capsys.readouterr().out)
    assert task == {"task": 3, "run_id": "omega2.0_dt0.001",
                    "params": {"steps": 10, "omega": 2.0, "dt": 0.001},
                    "run_dir": str(manifest.parent / "outputs" / "log_omega2.0_dt0.001")}
    assert main(["sweep", str(manifest), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(ln)["task"] for ln in lines] == list(range(6))


def test_status_json_shape(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = manifest.parent / "outputs"
    with Logbook("omega1.0_dt0.01", out):
        pass
    with pytest.raises(ValueError), Logbook("omega2.0_dt0.01", out):
        raise ValueError("nan energy")
    with Logbook("stranger", out):
        pass
    (out / "log_broken").mkdir()
    (out / "log_broken" / "metadata.json").write_text("{")
    assert main(["status", str(manifest), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"counts", "runs"}
    assert report["counts"]["complete"] == 2 and report["counts"]["failed"] == 1
    assert report["counts"]["missing"] == 4 and report["counts"]["corrupt"] == 1
    runs = report["runs"]
    assert [r["task"] for r in runs] == [0, 1, 2, 3, 4, 5, None, None]
    assert {k: runs[0][k] for k in ("task", "run_id", "status", "attempt")} == {
        "task": 0, "run_id": "omega1.0_dt0.01", "status": "complete", "attempt": 1}
    assert runs[1]["status"] == "missing" and runs[1]["attempt"] == 0
    assert runs[2]["status"] == "failed" and runs[2]["reason"] == "nan energy"
    assert [(r["run_id"], r["status"]) for r in runs[6:]] == [("broken", "corrupt"),
                                                              ("stranger", "complete")]
    # the bare folder: the same runs, no missing
    assert main(["status", str(out), "--json"]) == 0
    bare = json.loads(capsys.readouterr().out)
    assert "missing" not in bare["counts"] and len(bare["runs"]) == 4
    assert main(["status", str(manifest)]) == 0
    text = capsys.readouterr().out
    assert "failed (attempt 1): nan energy" in text
    # tasks that never ran are one line of ranges, not one line each (issue 15)
    assert "  tasks 1,3-5                   missing (4, never started)" in text.splitlines()


def test_local_submit_runs_everything_and_reports_failures(manifest: Path) -> None:
    # task 2 (omega=2.0, dt=0.01) fails on its first attempt
    cmd = ["--", sys.executable, "-c",
           "import sys, os; sys.exit(3 if sys.argv[1] == '2.0' and os.environ['NOTATA_ATTEMPT'] "
           "== '1' and sys.argv[2] == '0.01' else 0)", "{omega}", "{dt}"]
    first = cli("submit", str(manifest), "--backend", "local", "-j", "2", *cmd)
    assert first.returncode == 1
    assert "5 done, 1 failed, 0 already complete" in first.stderr
    assert first.stderr.strip().splitlines()[-2].endswith("failed tasks: 2")
    assert "notata logs" in first.stderr.strip().splitlines()[-1]  # where to look next
    out = manifest.parent / "outputs"
    assert read_meta(out / "log_omega2.0_dt0.01")["status"] == "failed"
    second = cli("submit", str(manifest), "--backend", "local", "-j", "2", *cmd)
    assert second.returncode == 0, second.stderr
    assert "1 done, 0 failed, 5 already complete" in second.stderr
    meta = read_meta(out / "log_omega2.0_dt0.01")
    assert meta["status"] == "complete" and meta["attempt"] == 2
    assert read_meta(out / "log_omega1.0_dt0.01")["attempt"] == 1  # not run again


def test_local_submit_subset(manifest: Path) -> None:
    proc = cli("submit", str(manifest), "--backend", "local", "--tasks", "1,4-5", "--", "true")
    assert proc.returncode == 0
    out = manifest.parent / "outputs"
    assert sorted(p.name for p in out.glob("log_*")) == [
        "log_omega1.0_dt0.001", "log_omega3.0_dt0.001", "log_omega3.0_dt0.01"]


@pytest.mark.parametrize("to_group", [True, False], ids=["terminal-ctrl-c", "kill-int-parent"])
def test_ctrl_c_during_a_local_sweep_leaves_nothing_running(manifest: Path,
                                                            to_group: bool) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "notata", "submit", str(manifest),
                             "--backend", "local", "-j", "2",
                             "--", "sleep", "61.5"], env=env, start_new_session=True,
                            stderr=subprocess.PIPE, text=True)
    out = manifest.parent / "outputs"

    def running() -> int:
        n = 0
        for d in out.glob("log_*"):
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                n += read_meta(d)["status"] == "running"
        return n

    wait_for(lambda: running() == 2, what="two running tasks")
    if to_group:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    statuses = sorted(read_meta(d)["status"] for d in out.glob("log_*"))
    assert statuses == ["cancelled", "cancelled"]
    assert "0 done, 0 failed, 2 cancelled" in err and "(cancelled)" in err  # not "failed"
    assert subprocess.run(["pgrep", "-f", "^sleep 61.5$"], capture_output=True).stdout == b""


BAD = ["name: x\ngrid: {a: [1, 2}\n", "name: x\ngrid: {a: [1]}\nbogus: 1\n",
       "name: x\ngrid: {a: [1]}\nrun_id: 'r{b}'\n", "name: x\ngrid: {a: []}\n"]


@pytest.mark.parametrize("text", BAD)
@pytest.mark.parametrize("command", ["sweep", "status", "submit", "exec"])
def test_bad_manifest_one_line_exit_2_nothing_written(base: Path, text: str,
                                                      command: str) -> None:
    path = write_sweep(base, text, "bad.yaml")
    extra = {"submit": ["--", "true"], "exec": ["--task", "0", "--", "true"]}.get(command, [])
    before = sorted(base.rglob("*"))
    proc = cli(command, str(path), *extra)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "Traceback" not in proc.stderr
    assert sorted(base.rglob("*")) == before


def test_parse_and_compact_indices() -> None:
    assert parse_indices("3,7,10-12", 20) == [3, 7, 10, 11, 12]
    assert parse_indices("5, 1-2,2", 20) == [1, 2, 5]
    for bad in ("x", "3-1", "19-20", "-1"):
        with pytest.raises(ValueError, match="--tasks"):
            parse_indices(bad, 20)
    assert compact([1, 2, 3, 7, 9, 10]) == "1-3,7,9-10"
    assert compact([5]) == "5" and compact([]) == ""


def test_help_for_each_subcommand() -> None:
    for command in ("sweep", "exec", "submit", "status"):
        proc = cli(command, "--help")
        assert proc.returncode == 0 and "usage: notata" in proc.stdout


def test_every_argument_has_help_and_every_subcommand_examples() -> None:
    """Each positional and option of every subcommand says what it is (but the internal
    ones, which --help hides), and each subcommand ends with examples."""
    import argparse

    from notata.parser import build_parser

    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(sub.choices) == {"sweep", "exec", "submit", "status", "logs", "table",
                                "shepherd", "resubmit", "report"}
    for name, command in [("notata", parser), *sub.choices.items()]:
        for action in command._actions:
            if action.help == argparse.SUPPRESS:
                assert action.dest in ("report_fd", "queue_fd", "pack_size", "as_job"), name
                continue
            assert action.help, f"notata {name}: {action.option_strings or action.dest}"
        assert "example" in (command.epilog or ""), name
        assert isinstance(command.formatter_class, type) and issubclass(
            command.formatter_class, argparse.RawDescriptionHelpFormatter), name
    submit = sub.choices["submit"].format_help()
    for said in ("{param}", "{run_dir}", "{run_id}", "{task}", "{attempt}", "base_dir",
                 "stdout.txt", "stderr.txt", "log.txt"):
        assert said in submit, said
    statuses = " ".join(sub.choices["table"].format_help().split())
    assert ("initialized, running, complete, failed, timeout, cancelled, preempted, "
            "terminated, oom, stale, pending, missing, corrupt, mismatch") in statuses


def test_usage_errors_are_one_line_and_change_nothing(
        manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = manifest.parent / "outputs"
    cases = [
        (["sweep", str(manifest), "--task", "99"], "task 99 is outside"),
        (["exec", str(manifest), "--task", "0", "--heartbeat", "0", "--", "true"],
         "--heartbeat: heartbeat interval must be positive"),
        (["submit", str(manifest), "--backend", "local", "-j", "-1", "--", "true"],
         "jobs -1: give a number of tasks at a time, at least 1"),
        (["submit", str(manifest), "--backend", "local", "-j", "0", "--", "true"], "jobs 0"),
        (["submit", str(manifest), "--backend", "local", "--tasks", "", "--", "true"],
         "--tasks is empty"),
        (["resubmit", str(manifest), "--backend", "local", "--tasks", " ", "--", "true"],
         "--tasks is empty"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_errors_a_user_causes_are_notatas_and_keep_their_builtin_bases(
        base: Path, manifest: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from notata.errors import NotataError, RunExistsError, RunIdError, UsageError

    with pytest.raises(RunIdError) as bad_id:
        Logbook("../escape", base)
    assert isinstance(bad_id.value, ValueError) and isinstance(bad_id.value, NotataError)
    Logbook("r", base).close()
    with pytest.raises(RunExistsError) as exists:
        Logbook("r", base)
    assert isinstance(exists.value, FileExistsError)
    assert "resume=True" in str(exists.value) and "overwrite=True" in str(exists.value)
    with pytest.raises(UsageError):
        Logbook("r", base, overwrite=True, resume=True)
    from notata import load_sweep
    with pytest.raises(IndexError) as outside:  # submit_sweep raised IndexError before
        load_sweep(manifest).check_indices([0, 99])
    assert isinstance(outside.value, UsageError)
    with Logbook("s", base) as log, pytest.raises(ValueError):  # as notata 0.3 raised
        log.save_text("../out", "x")
    # no task index anywhere: a usage error, exit 2, one line
    monkeypatch.delenv("NOTATA_TASK", raising=False)
    assert main(["exec", str(manifest), "--", "true"]) == 2
    err = capsys.readouterr().err
    assert "no task index" in err and len(err.strip().splitlines()) == 1
    # NOTATA_DEBUG=1 shows the traceback instead
    monkeypatch.setenv("NOTATA_DEBUG", "1")
    with pytest.raises(UsageError):
        main(["exec", str(manifest), "--", "true"])


def test_resubmit_with_nothing_to_do_and_no_record_exits_0(
        manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import notata

    for i in range(6):
        with notata.task(manifest, i):
            pass
    assert main(["resubmit", str(manifest)]) == 0  # no command recorded, none needed
    assert "nothing to resubmit" in capsys.readouterr().out
    assert notata.collect(manifest).counts["complete"] == 6  # a Path to a manifest


def test_a_malformed_run_is_corrupt_and_never_stops_a_scan(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import notata

    with Logbook("fine", base):
        pass
    for name, meta in [("hb", {"status": "running", "heartbeat": 5}),
                       ("slurm", {"status": "running", "slurm": "x", "host": "h"}),
                       ("attempt", {"status": "failed", "attempt": "two"}),
                       ("pid", {"status": "running", "pid": "1", "host": "x"})]:
        (base / f"log_{name}").mkdir()
        (base / f"log_{name}" / "metadata.json").write_text(json.dumps(meta))
    assert main(["status", str(base), "--json"]) == 0
    runs = {r["run_id"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert runs["fine"]["status"] == "complete"
    for name in ("hb", "slurm", "attempt", "pid"):
        assert runs[name]["status"] == "corrupt" and "malformed" in runs[name]["reason"], runs
    report = notata.collect(Path(base))  # a Path works as well as a str
    assert report.counts["corrupt"] == 4


def test_a_pipe_closed_early_and_ctrl_c_end_quietly(tmp_path: Path) -> None:
    """`notata sweep --json | head -1` and Ctrl-C out of `status --watch`: no traceback,
    the exit statuses of a pipe closed early (141) and of Ctrl-C (130)."""
    manifest = write_sweep(tmp_path, tasks=20000)
    proc = subprocess.Popen([sys.executable, "-m", "notata", "sweep", str(manifest), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["task"] == 0
    proc.stdout.close()  # as head does after one line
    err = proc.stderr.read()
    assert proc.wait(60) == 141 and err == "", err
    watch = subprocess.Popen([sys.executable, "-m", "notata", "status", str(manifest),
                              "--watch", "0.2"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert watch.stdout is not None
    assert watch.stdout.readline().startswith("sweep sweep: 20000 tasks")
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=60)
    assert watch.returncode == 130 and "Traceback" not in err, err


def test_pipes_that_head_closes_end_quietly(tmp_path: Path) -> None:
    """`notata sweep --json | head -1`, `notata status --json | head -c 20` and `notata
    status | head -1` in a shell, over 10,000 tasks: nothing on stderr, and the exit status
    of a pipe closed early (141) where the pipe closed before the output ended."""
    manifest = write_sweep(tmp_path, tasks=10000)
    script = ('"$0" -m notata sweep "$1" --json | head -1; echo "rc ${PIPESTATUS[0]}"; '
              '"$0" -m notata status "$1" --json | head -c 20; echo " rc ${PIPESTATUS[0]}"; '
              '"$0" -m notata status "$1" | head -1; echo "rc ${PIPESTATUS[0]}"')
    proc = subprocess.run(["bash", "-c", script, sys.executable, str(manifest)],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stderr == "", proc.stderr
    out = proc.stdout.splitlines()
    assert json.loads(out[0])["task"] == 0 and out[1] == "rc 141"
    assert out[2] == '{"counts": {"initial rc 141'  # 700 kB of JSON, cut after 20 bytes
    assert out[3].startswith("sweep sweep: 10000 tasks") and out[4] in ("rc 0", "rc 141")


def test_a_sweep_of_seven_tasks_shows_an_ellipsis(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sweep", str(write_sweep(tmp_path, tasks=7))]) == 0
    assert [ln.split(":")[0].strip() for ln in capsys.readouterr().out.splitlines()[2:]] == [
        "task 0", "task 1", "task 2", "task 3", "task 4", "...", "task 6"]


def test_the_progress_line_fits_the_terminal_and_elsewhere_is_said_now_and_then(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import os as _os

    from notata.local import LocalResult
    from notata.views import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("shutil.get_terminal_size",
                        lambda fallback=(80, 24): _os.terminal_size((60, 20)))
    screen = Terminal()
    progress = Progress(screen)
    result = LocalResult(done=[0, 1], failed=[2])
    progress(result, 3, 400)
    drawn = screen.getvalue().split("\r")[-1].replace("\033[K", "")
    assert 0 < len(drawn) <= 59 and drawn.startswith("3/400")  # no bar at 60 columns
    log = io.StringIO()
    quiet = Progress(log)
    quiet.every = 0.0
    quiet(result, 3, 400)
    assert log.getvalue().startswith("notata: 3/400  done 2  failed 1") and "\r" not in \
        log.getvalue()


def test_a_local_sweep_with_failures_says_where_to_look(manifest: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    assert main(["submit", str(manifest), "--backend", "local", "--tasks", "0", "--",
                 "false"]) == 1
    err = capsys.readouterr().err
    name = shlex.quote(str(manifest))
    assert f"notata status {name} --logs" in err and f"notata logs {name} --task 0" in err


def test_status_groups_runs_that_share_a_reason_and_aligns_its_columns(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Seven tasks that failed alike are one line of ranges, the one that failed its own
    way a line of its own; the task and run columns line up. A base folder of the same
    runs shows each run's task, from its metadata."""
    manifest = write_sweep(base, tasks=12)
    assert main(["submit", str(manifest), "--backend", "local", "--tasks", "0-9", "--", "sh",
                 "-c", 'case $0 in 6) echo "ValueError: bad k" >&2; exit 2;; [01]) exit 0;; '
                 '*) exit 1;; esac', "{k}"]) == 1
    capsys.readouterr()
    assert main(["status", str(manifest)]) == 0
    text = capsys.readouterr().out.splitlines()
    listed = [
        "  tasks 2-5,7-9      failed (7, attempt 1): command exited with status 1",
        "  task 6         k6  failed (attempt 1): command exited with status 2: "
        "ValueError: bad k",
        "  tasks 10-11        missing (2, never started)"]
    assert text[text.index("not complete:") + 1:] == listed, text
    assert main(["status", str(manifest), "--json"]) == 0  # one record per task, as before
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["task"], r["status"]) for r in runs] == [
        (0, "complete"), (1, "complete"), *((i, "failed") for i in range(2, 10)),
        (10, "missing"), (11, "missing")]
    assert main(["status", str(base / "outputs")]) == 0  # no manifest: tasks from metadata
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "10 runs" and "no task" not in "\n".join(text)
    assert text[text.index("not complete:") + 1:] == listed[:2], text
    assert main(["status", str(base / "outputs"), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert sorted(r["task"] for r in runs) == list(range(10))
    # a folder scan names no manifest: nothing to resubmit from it
    assert notata.collect(base / "outputs").to_resubmit() == ([], [])


def test_status_watch_keeps_the_counts_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal 12 lines high, --watch draws the counts and as much of the list as
    fits, each line within the width, and a last line saying how many more and where to
    see them all; without --watch every line is printed."""
    import fcntl
    import pty
    import socket
    import struct
    import termios
    import time

    for k in range(20):  # twenty runs that each failed their own way
        d = tmp_path / f"log_r{k:02d}"
        d.mkdir()
        (d / "metadata.json").write_text(json.dumps({
            "status": "failed", "run_id": f"r{k:02d}", "attempt": 1, "task": k,
            "failure_reason": f"error number {k} " + "x" * 80}))
    (tmp_path / "log_live").mkdir()  # and one still running (this process): watched on
    (tmp_path / "log_live" / "metadata.json").write_text(json.dumps({
        "status": "running", "run_id": "live", "attempt": 1, "task": 20, "pid": os.getpid(),
        "host": socket.gethostname(), "heartbeat": {"unix": time.time() + 3600, "beat": 1}}))
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 12, 70, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    watch = subprocess.Popen([sys.executable, "-m", "notata", "status", str(tmp_path),
                              "--watch", "0.2"], stdin=slave, stdout=slave,
                             stderr=subprocess.PIPE, env={**env, "PYTHONPATH": str(ROOT)})
    os.close(slave)
    seen = b""
    try:
        while seen.count(b"\033[H\033[J") < 2:  # one whole screen, and the next begun
            seen += os.read(master, 65536)
    finally:
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=60)
        os.close(master)
    assert watch.returncode == 130 and err == b"", err
    screen = seen.decode().split("\033[H\033[J")[1].replace("\r", "").splitlines()
    assert screen[:4] == ["21 runs", f"  {'running':<11} {1:>8}", f"  {'failed':<11} {20:>8}",
                          "not complete:"], screen
    assert len(screen) == 11 and all(len(line) < 70 for line in screen), screen
    assert screen[4].startswith("  task 0   r00   failed (attempt 1): error number 0 xx")
    assert screen[-1] == ("... and 15 more line(s): notata status without --watch lists "
                          "them all")[:69]
    proc = cli("status", str(tmp_path))
    assert len(proc.stdout.splitlines()) == 25 and "more line(s)" not in proc.stdout
