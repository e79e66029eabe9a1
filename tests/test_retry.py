"""The retry policy: what a manifest's retry: section may say, and what the next attempt
of a task asks for after a timeout, an oom or a plain failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from notata import ManifestError
from notata.retry import DEFAULT_ON, Rule, next_resources, plan_round, policy
from notata.sbatch_options import mem_bytes, mem_text, time_limit_sec, time_text


def test_time_and_memory_values_read_and_write_as_sbatch_takes_them() -> None:
    assert [time_text(s) for s in (60, 3600 + 61, 2 * 86400 + 5)] == [
        "00:01:00", "01:01:01", "2-00:00:05"]
    assert all(time_limit_sec(time_text(s)) == s for s in (1, 59, 3600, 86400 * 3 + 7))
    assert [mem_bytes(v) for v in ("200M", "4G", "512", "1.5G", "10K", 300, "x", None)] == [
        200 * 2**20, 4 * 2**30, 512 * 2**20, 1536 * 2**20, 10 * 2**10, 300 * 2**20, None, None]
    assert [mem_text(n) for n in (400 * 2**20, 8 * 2**30, 2**20 + 1)] == ["400M", "8G", "2M"]


def test_escalation_by_cause_with_caps() -> None:
    p = policy({"timeout": {"time": 2.0, "max": "00:03:00"}, "oom": {"mem": 2, "max": "1G"}},
               3, "m.yaml")
    assert p is not None and p.attempts == 3 and p.on == frozenset(DEFAULT_ON)
    assert next_resources(p, "timeout", "00:01:00", "200M") == {"time": "00:02:00",
                                                                "mem": "200M"}
    assert next_resources(p, "timeout", "00:02:00", None) == {"time": "00:03:00"}  # capped
    assert next_resources(p, "timeout", "00:03:00", None) is None  # at the cap: given up
    assert next_resources(p, "oom", "00:01:00", "200M") == {"time": "00:01:00", "mem": "400M"}
    assert next_resources(p, "oom", None, "600M") == {"mem": "1G"}
    assert next_resources(p, "oom", None, "1G") is None
    for cause in ("failed", "stale", "missing", "preempted"):  # the same resources again
        assert next_resources(p, cause, "00:03:00", "1G") == {"time": "00:03:00", "mem": "1G"}
    assert next_resources(p, "timeout", None, None) == {}  # nothing given: the manifest's
    assert Rule(1.5).next(100) == 150 and Rule(2.0, 150).next(100) == 150


def test_no_policy_without_attempts_and_flags_win() -> None:
    assert policy(None, None, "m.yaml") is None
    assert policy({"on": ["failed"]}, None, "m.yaml") is None
    p = policy({"attempts": 5, "then": "python summarize.py 'a b'"}, 2, "m.yaml")
    assert p is not None and p.attempts == 2 and p.then == ("python", "summarize.py", "a b")


@pytest.mark.parametrize("section, says", [
    ({"attempts": 0}, "attempts 0"),
    ({"attempts": True}, "attempts True"),
    ({"attempts": 3, "on": ["cancelled"]}, "cancelled is never retried"),
    ({"attempts": 3, "on": ["faild"]}, "unknown status 'faild'"),
    ({"attempts": 3, "on": "failed"}, "give a list of statuses"),
    ({"attempts": 3, "timeout": {"time": 0.5}}, "factor of at least 1"),
    ({"attempts": 3, "oom": {"mem": 2, "max": "lots"}}, "oom.max 'lots'"),
    ({"attempts": 3, "timeout": {"time": 2, "max": "soon"}}, "timeout.max 'soon'"),
    ({"attempts": 3, "timeout": {"memory": 2}}, "give {time: FACTOR, max: CAP}"),
    ({"attempts": 3, "timeout": {"time": float("inf")}}, "timeout.time inf"),
    ({"attempts": 3, "notify": "hooks.example.org"}, "http:// or https://"),
    ({"attempts": 3, "then": 5}, "give a command"),
    ({"attempts": 3, "tries": 2}, "unknown key 'tries'"),
])
def test_a_bad_retry_section_is_one_clear_error(section: dict[str, object], says: str) -> None:
    with pytest.raises(ManifestError) as err:
        policy(section, None, "sweep.yaml")
    assert str(err.value).startswith("sweep.yaml: retry: ") and says in str(err.value)


RETRY_PAYLOAD = (
    "import os, sys; k = int(sys.argv[1]); attempt = int(os.environ['NOTATA_ATTEMPT']); "
    "sys.exit(1 if k == 1 or (k == 0 and attempt < 3) else 0)"
)


def test_a_local_sweep_with_retries_settles_then_runs_once_and_notifies(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    from helpers import Hook, read_meta, write_sweep

    from notata import load_sweep
    from notata.cli import main

    hook = Hook()
    then = [sys.executable, "-c", "open('then.txt', 'a').write('ran\\n')"]
    try:
        manifest = write_sweep(base, "name: r\nrun_id: 'k{k}'\ngrid: {k: [0, 1, 2]}\n"
                               f"retry: {{attempts: 3, then: {then!r}, notify: {hook.url}}}\n")
        rc = main(["submit", str(manifest), "--backend", "local", "--", sys.executable,
                   "-c", RETRY_PAYLOAD, "{k}"])
        err = capsys.readouterr().err
        assert rc == 1, err  # task 1 was given up
        sweep = load_sweep(manifest)
        metas = [read_meta(sweep.task(i).run_dir) for i in range(3)]
        assert [(m["status"], m["attempt"]) for m in metas] == [
            ("complete", 3), ("failed", 3), ("complete", 1)]
        assert "retry round 2: tasks 0-1" in err and "retry round 3: tasks 0-1" in err
        assert "gave up task 1 (k1) after 3 attempt(s): failed" in err
        assert (base / "then.txt").read_text() == "ran\n"  # once, after the last task
        [told] = hook.bodies
        assert told["sweep"] == "r" and told["counts"]["complete"] == 2
        assert [g["task"] for g in told["given_up"]] == [1] and told["then_exit_status"] == 0
        # --retry wins over the manifest, and a settled sweep runs nothing again
        assert main(["submit", str(manifest), "--backend", "local", "--retry", "4", "--",
                     sys.executable, "-c", RETRY_PAYLOAD, "{k}"]) == 1
        assert read_meta(sweep.task(1).run_dir)["attempt"] == 4
        assert read_meta(sweep.task(0).run_dir)["attempt"] == 3
        assert (base / "then.txt").read_text() == "ran\nran\n" and len(hook.bodies) == 2
    finally:
        hook.close()


def test_a_bad_policy_is_refused_before_anything_is_submitted(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad retry: section (the shepherd job's options included): one line, exit 2,
    nothing written, nothing submitted."""
    from helpers import write_sweep

    from notata.cli import main

    for text, says in [("retry: {attempts: 3, on: [cancelled]}\n", "cancelled is never"),
                       ("retry: {attempts: 3, oom: {mem: 0.5}}\n", "factor of at least 1"),
                       ("retry: {attempts: 2, shepherd: {nodes: 3}}\n",
                        "give sbatch options for the shepherd job"),
                       ("retry: {attempts: 2, shepherd: {partition: 'a\"b'}}\n",
                        "cannot be passed to sbatch safely")]:
        manifest = write_sweep(base, "name: r\ngrid: {k: [0, 1]}\n" + text)
        assert main(["submit", str(manifest), "--backend", "slurm", "--", "true"]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert main(["submit", str(manifest), "--backend", "local", "--retry", "0", "--",
                 "true"]) == 2
    assert "retry 0" in capsys.readouterr().err
    assert not (base / "outputs").exists()


def test_retries_stay_within_the_tasks_asked_for_and_the_rounds_are_bounded(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--tasks narrows the retries too; a round that cannot raise any attempt (here the
    manifest is gone, so no task can start) does not make the loop go on for ever."""
    import subprocess
    import sys

    from helpers import ROOT, read_meta, write_sweep

    from notata import load_sweep
    from notata.cli import main

    manifest = write_sweep(base, "name: r\nrun_id: 'k{k}'\ngrid: {k: [0, 1, 2, 3]}\n")
    fails = [sys.executable, "-c", "import sys; sys.exit(1)"]
    assert main(["submit", str(manifest), "--backend", "local", "--tasks", "0",
                 "--retry", "2", "--", *fails]) == 1
    err = capsys.readouterr().err
    sweep = load_sweep(manifest)
    assert read_meta(sweep.task(0).run_dir)["attempt"] == 2
    assert not any(sweep.task(i).run_dir.exists() for i in (1, 2, 3))
    assert "gave up task 0" in err and "gave up task 1" not in err
    moves_it = [sys.executable, "-c", f"import os, sys; os.replace({str(manifest)!r}, "
                f"{str(manifest)!r} + '.away'); sys.exit(1)"]
    proc = subprocess.run([sys.executable, "-m", "notata", "submit", str(manifest),
                           "--backend", "local", "--tasks", "1", "--retry", "5", "--",
                           *moves_it], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and proc.stderr.count("retry round") <= 4, proc.stderr


def test_a_notification_never_fails_or_hangs_the_sweep(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    import socket
    import threading
    import time

    from notata import retry

    assert retry.notify("http://127.0.0.1:abc/hook", {"a": 1}) is False  # a bad address
    trickle = socket.socket()
    trickle.bind(("127.0.0.1", 0))
    trickle.listen(1)

    def answer_slowly() -> None:
        conn, _ = trickle.accept()
        for byte in b"HTTP/1.1 200 OK\r\n":
            conn.send(bytes([byte]))
            time.sleep(0.5)

    threading.Thread(target=answer_slowly, daemon=True).start()
    monkeypatch.setattr(retry, "NOTIFY_TIMEOUT", 1.0)
    t0 = time.monotonic()
    assert retry.notify(f"http://127.0.0.1:{trickle.getsockname()[1]}/", {"a": 1}) is False
    assert time.monotonic() - t0 < 3
    assert "no answer in 1 s" in capsys.readouterr().err
    trickle.close()


@pytest.mark.parametrize("section, says", [
    ({"notify": "ftp://nowhere"}, "http:// or https://"),
    ({"then": "python summarize.py 'unterminated"}, "No closing quotation"),
    ({"on": ["cancelled"]}, "cancelled is never retried"),
])
def test_a_retry_section_is_checked_whole_even_without_attempts(
        section: dict[str, object], says: str) -> None:
    with pytest.raises(ManifestError, match="retry: ") as err:
        policy(section, None, "sweep.yaml")
    assert says in str(err.value)


def test_a_round_groups_tasks_by_the_resources_their_next_attempt_asks_for() -> None:
    from notata.runstate import RunRecord

    p = policy({"timeout": {"time": 2, "max": "00:04:00"}, "oom": {"mem": 2, "max": "1G"}},
               3, "m.yaml")
    assert p is not None

    def run(task: int, status: str, asked: dict[str, object] | None = None) -> RunRecord:
        return RunRecord(task, f"k{task}", status, 1, asked=asked)

    chosen = [run(0, "failed", {"time_limit": "00:01:00", "mem_bytes": 200 * 2**20}),
              run(1, "timeout", {"time_limit": "00:01:00", "mem_bytes": 200 * 2**20}),
              run(2, "oom", {"time_limit": "00:01:00", "mem_bytes": 200 * 2**20}),
              run(3, "missing"),  # never started: the sweep's options
              run(4, "timeout", {"time_limit": "00:04:00"}),  # at its cap
              run(5, "oom", {"mem_bytes": 2**30}),  # at its cap
              run(6, "timeout", {"time_limit": "00:02:00", "mem_bytes": 200 * 2**20})]
    groups, given_up = plan_round(p, chosen, {"time": "00:01:00", "mem": "200M"})
    assert groups == {("00:01:00", "200M"): [0, 3], ("00:02:00", "200M"): [1],
                      ("00:01:00", "400M"): [2], ("00:04:00", "200M"): [6]}
    assert [(r.task, why) for r, why in given_up] == [
        (4, "timeout again with --time at its cap"), (5, "oom again with --mem at its cap")]
    # the sweep's "1" and "200" are the recorded 00:01:00 and 200M: one array, one pack
    groups, _ = plan_round(p, chosen[:4], {"time": "1", "mem": "200"})
    assert groups[("00:01:00", "200M")] == [0, 3]


def test_the_oom_rule() -> None:
    from notata.resources import killed_for_memory

    granted = 200 * 2**20
    assert killed_for_memory(-9, 190 * 2**20, granted)
    assert killed_for_memory(137, 190 * 2**20, granted)  # a shell or srun saying SIGKILL
    assert not killed_for_memory(-9, 100 * 2**20, granted)
    assert not killed_for_memory(1, 199 * 2**20, granted)
    assert not killed_for_memory(-9, 199 * 2**20, None)


def test_a_then_that_finishes_after_its_final_job_was_taken_for_lost_is_recorded(
        tmp_path: Path) -> None:
    """The final job's node was cut off while ``then`` ran; the requeued final job wrapped
    the chain up as "ended before then finished". The old ``then``, thawed, finishes: the
    record says so (and not to run it again), instead of inviting a second run by hand.
    A record that moved on to another chain is left as it is."""
    import dataclasses

    from notata import chain, settle
    from notata.manifest import load

    manifest = tmp_path / "t.yaml"
    manifest.write_text("name: t\ngrid: {k: [0]}\nretry:\n  attempts: 2\n  then: [\"true\"]\n")
    sweep = load(manifest)
    rule = policy(sweep.retry, None, str(sweep.path))
    assert rule is not None
    wrapped = chain.State(chain.new_chain(sweep), sweep.name, str(sweep.path), sweep.hash,
                          ["true"], {}, "0", state=chain.SETTLED, then_job="518",
                          then_host="n3", why="settled; the final job 518 ended before then "
                          "finished (on n3: node n3 is not responding)")
    (sweep.base_dir / ".notata").mkdir(parents=True)
    chain.write(sweep.base_dir, wrapped)
    held = dataclasses.replace(wrapped, then_status=settle.STARTED)  # what the old job had
    assert settle.then_ended(sweep, rule, held, 0) == 0
    now = chain.read(sweep.base_dir, sweep.name)
    assert now is not None and now.then_status == 0 and now.state == chain.SETTLED
    assert "finished after all (exit 0 on n3): do not run it again" in now.why
    other = dataclasses.replace(wrapped, chain="t/another", then_status=None, why="a new chain")
    chain.write(sweep.base_dir, other)
    assert settle.then_ended(sweep, rule, held, 3) == 0
    assert chain.read(sweep.base_dir, sweep.name) == other
