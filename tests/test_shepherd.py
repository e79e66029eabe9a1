"""The retry shepherd on the real test cluster: ``notata submit --retry`` and then no
command from the test until the sweep has settled.

The dozen-task sweep (:class:`Scenario`) takes minutes (a task that needs more than its
first one-minute limit), so it is submitted as soon as the test session has collected
this module (conftest's ``pytest_collection_finish``) and runs on the cluster while the
other modules' tests run; the tests below wait for it to settle and each checks one
promise of it. The other scenarios are small sweeps of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, ROOT, Hook, notata_process, python, read_meta, wait_for, write_sweep

import notata
from notata import chain
from notata.manifest import parse_indices

#: The payload. ``flaky`` fails its first attempt; ``always`` every one; ``oom`` plays the
#: kernel (the test cluster does not confine memory): it grows to 250 MiB and SIGKILLs
#: itself once its resident memory passes what SLURM granted; ``slow`` needs 110 s,
#: more than a one-minute limit (SLURM ends it between 60 and about 95 s) and less than
#: two minutes.
PAYLOAD = r"""
import os, signal, sys, time
kind, attempt = sys.argv[1], int(sys.argv[2])
if kind == "flaky" and attempt == 1:
    sys.exit("flaky: fails on its first attempt")
if kind == "always":
    sys.exit("always fails")
if kind == "slow":
    time.sleep(110)
if kind == "sleep":
    time.sleep(float(sys.argv[3]))
if kind == "oom":
    granted = int(os.environ["SLURM_MEM_PER_NODE"]) * 2**20
    hold = []
    for _ in range(250):
        block = bytearray(2**20)
        block[::4096] = b"\1" * len(block[::4096])
        hold.append(block)
        with open("/proc/self/statm") as f:
            if int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") > granted:
                os.kill(os.getpid(), signal.SIGKILL)
print("done", kind, attempt, "dependency=" + str(os.environ.get("SLURM_JOB_DEPENDENCY")))
"""
KINDS = ["ok", "flaky", "ok", "oom", "ok", "slow", "flaky", "ok", "always", "ok", "flaky", "ok"]
THEN = "import sys, time; open(sys.argv[1], 'a').write(f'{time.time()}\\n')"
SETTLE_WITHIN = 900.0


def _sweep(base: Path, name: str, kinds: list[str], retry: str) -> Path:
    (base / "payload.py").write_text(PAYLOAD)
    runs = "".join(f"  - {{i: {i}, kind: {k}}}\n" for i, k in enumerate(kinds))
    return write_sweep(base, f"name: {name}\nrun_id: 't{{i}}-{{kind}}'\nruns:\n{runs}"
                       f"retry:\n{retry}")


def _notata(*args: str, timeout: float = 120, cwd: Path | str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args], text=True, capture_output=True,
                          timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def _state(manifest: Path) -> chain.State | None:
    sweep = notata.load_sweep(manifest)
    return chain.read(sweep.base_dir, sweep.name)


def _ended(manifest: Path) -> bool:
    state = _state(manifest)
    return state is not None and state.state in (chain.SETTLED, chain.STOPPED)


def _records(manifest: Path) -> list[dict[str, Any]]:
    sweep = notata.load_sweep(manifest)
    path = sweep.base_dir / ".notata" / "submissions.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines())
            if r.get("backend") and not r.get("intent")]


class Scenario:
    """The dozen-task sweep, submitted once with ``--retry 3 --mem 200M --time 1``."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="notata-shepherd-"))
        self.hook = Hook()
        self.then_file = self.base / "then.txt"
        then = json.dumps([sys.executable, "-c", THEN, str(self.then_file)])
        self.manifest = _sweep(self.base, "dozen", KINDS,
                               f"  then: {then}\n  notify: {self.hook.url}\n")
        self.submitted = _notata("submit", str(self.manifest), "--retry", "3", "--mem",
                                 "200M", "--time", "1", "--", sys.executable,
                                 str(self.base / "payload.py"), "{kind}", "{attempt}")
        self.start = time.time()

    def settled(self) -> Scenario:
        assert self.submitted.returncode == 0, self.submitted.stderr
        wait_for(lambda: _ended(self.manifest), SETTLE_WITHIN, "the sweep to settle")
        return self

    def meta(self, task: int) -> dict[str, Any]:
        return read_meta(notata.load_sweep(self.manifest).task(task).run_dir)


_SCENARIO: Scenario | None = None


def start_early() -> None:
    """Submit the dozen-task sweep now, if the cluster is up (conftest calls this)."""
    global _SCENARIO
    if _SCENARIO is None and shutil.which("sbatch") and subprocess.run(
            ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0:
        _SCENARIO = Scenario()


@pytest.fixture(scope="module")
def dozen(slurm_cluster: str) -> Iterator[Scenario]:
    global _SCENARIO
    if _SCENARIO is None:
        _SCENARIO = Scenario()
    try:
        yield _SCENARIO.settled()
    finally:
        _SCENARIO.hook.close()
        shutil.rmtree(_SCENARIO.base, ignore_errors=True)


def test_every_task_ends_complete_with_exact_attempts(dozen: Scenario) -> None:
    """No command from the test after the submit: each task complete but the one that
    always fails, after exactly the attempts its payload needs."""
    expected = {"ok": 1, "flaky": 2, "oom": 2, "slow": 2, "always": 3}
    for task, kind in enumerate(KINDS):
        meta = dozen.meta(task)
        assert (meta["status"], meta["attempt"]) == (
            "failed" if kind == "always" else "complete", expected[kind]), (task, meta)
        if kind in ("oom", "slow"):  # the first attempt's end, recorded as its cause
            assert meta["attempts"][0]["status"] == {"oom": "oom", "slow": "timeout"}[kind]


def test_each_retry_gets_more_of_what_ran_out(dozen: Scenario) -> None:
    """The OOM task's second attempt asked for 400M, the timed-out one's for two minutes,
    a plain failure for the same again: in the metadata and in the job scripts."""
    def asked(task: int, attempt: int) -> dict[str, Any]:
        meta = dozen.meta(task)
        history = [*meta["attempts"], meta]
        return dict(history[attempt - 1]["resources"]["asked"])

    oom, slow, flaky = KINDS.index("oom"), KINDS.index("slow"), KINDS.index("flaky")
    assert asked(oom, 1)["mem_bytes"] == 200 * 2**20
    assert asked(oom, 2)["mem_bytes"] == 400 * 2**20
    assert asked(slow, 1)["time_limit"] == "00:01:00"
    assert asked(slow, 2)["time_limit"] == "00:02:00"
    assert asked(flaky, 2)["mem_bytes"] == 200 * 2**20
    assert asked(flaky, 2)["time_limit"] == "00:01:00"
    # submitted from inside the shepherd's job, it inherited none of that job's variables
    run = notata.load_sweep(dozen.manifest).task(flaky).run_dir
    assert "done flaky 2 dependency=None" in (run / "stdout.txt").read_text()
    by_round = {}
    for r in _records(dozen.manifest):
        script = Path(r["arrays"][0]["script"]).read_text()
        by_round.setdefault(r["round"], []).append((r["tasks"], r.get("why"), script))
    second = {tasks: (why, script) for tasks, why, script in by_round[2]}
    assert second[str(oom)][0] == {"oom": str(oom)}
    assert '--mem="400M"' in second[str(oom)][1]
    assert second[str(slow)][0] == {"timeout": str(slow)}
    assert '--time="00:02:00"' in second[str(slow)][1]


def test_complete_runs_are_never_submitted_again(dozen: Scenario) -> None:
    records = _records(dozen.manifest)
    later = {int(t) for r in records if r["round"] > 1
             for t in parse_indices(r["tasks"], len(KINDS))}
    assert later == {i for i, k in enumerate(KINDS) if k not in ("ok",)}
    assert {r["round"] for r in records} == {1, 2, 3}
    assert all(r.get("chain") == records[0]["chain"] for r in records)


def test_a_task_that_fails_every_time_is_given_up_and_the_sweep_settles(
        dozen: Scenario) -> None:
    always = KINDS.index("always")
    state = _state(dozen.manifest)
    assert state is not None and state.state == chain.SETTLED
    why = state.given_up[str(always)]
    assert why.startswith("failed after 3 attempt(s), the policy's limit") and \
        "always fails" in why
    status = _notata("status", str(dozen.manifest))
    assert f"gave up task {always}: failed after 3 attempt(s)" in status.stdout
    assert "settled" in status.stdout
    log = (dozen.base / "outputs" / ".notata" / "shepherd.log").read_text()
    assert f"task {always} given up" in log and "round 2:" in log and "round 3:" in log


def test_then_runs_once_after_the_last_task_and_the_notification_arrives(
        dozen: Scenario) -> None:
    [ran_at] = map(float, dozen.then_file.read_text().split())
    last_end = max(dozen.meta(i)["end_unix"] for i in range(len(KINDS)))
    assert ran_at > last_end
    wait_for(lambda: bool(dozen.hook.bodies), 30, "the notification")
    [told] = dozen.hook.bodies
    assert told["sweep"] == "dozen" and told["outcome"] == "settled"
    assert told["counts"]["complete"] == len(KINDS) - 1 and told["counts"]["failed"] == 1
    assert [g["task"] for g in told["given_up"]] == [KINDS.index("always")]
    assert told["then_exit_status"] == 0 and told["rounds"] == 3
    assert _state(dozen.manifest).notified  # type: ignore[union-attr]


def _job_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], text=True,
                          capture_output=True, timeout=30).stdout.strip()


def test_a_cancelled_shepherd_shows_in_status_and_is_resumed_by_hand(
        slurm_cluster: str, base: Path) -> None:
    manifest = _sweep(base, "resume", ["flaky", "sleep", "ok"], "  attempts: 2\n")
    cmd = [sys.executable, "payload.py", "{kind}", "{attempt}", "5"]  # relative to base
    out = _notata("submit", str(manifest), "--", *cmd, cwd=base)
    assert out.returncode == 0, out.stderr
    state = _state(manifest)
    assert state is not None and state.job_id
    subprocess.run(["scancel", state.job_id], check=True, timeout=30)
    first = _records(manifest)[0]["job_ids"][0]
    wait_for(lambda: _job_state(first) == "" and _job_state(str(state.job_id)) == "", 120,
             "the round and the cancelled shepherd to leave the queue")
    status = _notata("status", str(manifest)).stdout
    assert f"job {state.job_id} is no longer queued and never acted" in status
    assert f"notata shepherd {manifest}" in status
    resumed = _notata("shepherd", str(manifest), cwd="/")  # its jobs run where submitted
    assert resumed.returncode == 0, resumed.stderr
    assert "round 2: tasks 0 (failed: 0)" in resumed.stdout
    wait_for(lambda: _ended(manifest), 180, "the resumed chain to settle")
    assert [(read_meta(notata.load_sweep(manifest).task(i).run_dir)["status"]) for i in
            range(3)] == ["complete"] * 3
    assert _state(manifest).state == chain.SETTLED  # type: ignore[union-attr]


def test_the_users_scancel_of_the_sweep_ends_it(slurm_cluster: str, base: Path) -> None:
    """Tasks cancelled before they started read ``missing``; the shepherd asks SLURM,
    sees the cancel and ends the chain: no retries, no then, one notification."""
    hook = Hook()
    try:
        then = json.dumps([sys.executable, "-c", THEN, str(base / "then.txt")])
        manifest = _sweep(base, "cancel", ["sleep"] * 4,
                          f"  attempts: 3\n  then: {then}\n  notify: {hook.url}\n")
        out = _notata("submit", str(manifest), "--throttle", "1", "--", sys.executable,
                      str(base / "payload.py"), "{kind}", "{attempt}", "120")
        assert out.returncode == 0, out.stderr
        array = _records(manifest)[0]["job_ids"][0]
        sweep = notata.load_sweep(manifest)
        wait_for(lambda: sweep.task(0).run_dir.joinpath("metadata.json").exists() and
                 read_meta(sweep.task(0).run_dir)["status"] == "running", 60, "task 0 to run")
        subprocess.run(["scancel", array], check=True, timeout=30)  # the user's word
        wait_for(lambda: _ended(manifest), 120, "the shepherd to see the cancel")
        state = _state(manifest)
        assert state is not None and state.state == chain.STOPPED
        assert "cancelled (scancel)" in state.why and "0-3" in state.why
        assert {r["round"] for r in _records(manifest)} == {1}
        assert not (base / "then.txt").exists()
        wait_for(lambda: bool(hook.bodies), 30, "the notification")
        [told] = hook.bodies
        assert told["outcome"] == "cancelled" and told["then_exit_status"] is None
        assert "stopped:" in _notata("status", str(manifest)).stdout
    finally:
        hook.close()


def test_only_one_shepherd_acts(slurm_cluster: str, base: Path) -> None:
    """A shepherd that finds another holding the sweep's shepherd lock exits saying so;
    two started at once by hand never submit a task twice; a second ``submit --retry``
    while a shepherd waits does not queue another one."""
    manifest = _sweep(base, "two", ["flaky", "flaky", "sleep"], "  attempts: 3\n")
    cmd = [sys.executable, str(base / "payload.py"), "{kind}", "{attempt}", "8"]
    out = _notata("submit", str(manifest), "--tasks", "0-1", "--", *cmd)
    assert out.returncode == 0, out.stderr
    state = _state(manifest)
    assert state is not None and state.tasks == "0-1"
    other = _notata("submit", str(manifest), "--tasks", "2", "--retry", "5", "--", *cmd)
    assert other.returncode == 2 and "with another --retry" in other.stderr, other.stderr
    assert len(_records(manifest)) == 1  # refused before anything was queued
    again = _notata("submit", str(manifest), "--tasks", "2", "--", *cmd)
    assert again.returncode == 0 and f"shepherd job {state.job_id} already looks after" \
        in again.stderr
    joined = _state(manifest)
    assert joined is not None and (joined.job_id, joined.tasks) == (state.job_id, "0-2")
    assert {r["chain"] for r in _records(manifest)} == {state.chain}  # one chain
    subprocess.run(["scancel", str(state.job_id)], check=True, timeout=30)
    arrays = [r["job_ids"][0] for r in _records(manifest)]
    wait_for(lambda: all(_job_state(j) == "" for j in arrays), 120, "the first round to end")

    lock_path = notata.load_sweep(manifest).base_dir / ".notata" / "shepherd-two.lock"
    holder = python("""
        import sys, time
        from pathlib import Path
        from notata import lock
        with lock.exclusive(Path(sys.argv[1])):
            print("held", flush=True)
            time.sleep(60)
        """, str(lock_path))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        blocked = _notata("shepherd", str(manifest))
        assert blocked.returncode == 0
        assert "another shepherd acts for two right now" in blocked.stdout
        assert {r["round"] for r in _records(manifest)} == {1}
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.communicate(timeout=30)
    both = [notata_process("shepherd", str(manifest)) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in both]
    assert [p.returncode for p in both] == [0, 0], outs
    second = [r for r in _records(manifest) if r["round"] == 2]
    retried = [t for r in second for t in parse_indices(r["tasks"], 3)]
    assert sorted(retried) == [0, 1], outs  # each failed task once, whoever acted
    wait_for(lambda: _ended(manifest), 180, "the chain to settle")
    assert _state(manifest).state == chain.SETTLED  # type: ignore[union-attr]


def test_a_final_job_that_ends_before_then_finishes_is_wrapped_up(
        slurm_cluster: str, base: Path) -> None:
    """The final job cancelled while ``then`` runs: its closer says so, notifies once,
    and the chain reads settled; ``then`` is not run again by a job."""
    hook = Hook()
    try:
        then = json.dumps([sys.executable, "-c", "import time; time.sleep(300)"])
        manifest = _sweep(base, "closer", ["ok"],
                          f"  attempts: 2\n  then: {then}\n  notify: {hook.url}\n")
        out = _notata("submit", str(manifest), "--", sys.executable,
                      str(base / "payload.py"), "{kind}", "{attempt}")
        assert out.returncode == 0, out.stderr

        def then_runs() -> bool:
            state = _state(manifest)
            return state is not None and state.then_status == -1
        wait_for(then_runs, 120, "the final job to start then")
        final = _state(manifest)
        assert final is not None and final.state == chain.SETTLING and final.closer
        by_hand = _notata("shepherd", str(manifest), "--then")  # never then twice at once
        assert by_hand.returncode == 0 and "it runs then; nothing to do" in by_hand.stdout
        subprocess.run(["scancel", str(final.then_job)], check=True, timeout=30)
        wait_for(lambda: _ended(manifest), 120, "the closer to wrap up")
        state = _state(manifest)
        assert state is not None and state.state == chain.SETTLED
        assert f"the final job {final.then_job} ended before then finished" in state.why
        wait_for(lambda: bool(hook.bodies), 30, "the notification")
        time.sleep(2)
        [told] = hook.bodies
        assert told["outcome"] == "settled" and told["then_exit_status"] is None
    finally:
        hook.close()


def test_a_pending_task_cancelled_alone_is_not_run_again(slurm_cluster: str,
                                                          base: Path) -> None:
    """SLURM forgets an array element cancelled while pending at once: the task reads
    missing, yet it was the user's cancel, so the chain ends instead of retrying it."""
    manifest = _sweep(base, "vanish", ["ok", "ok"], "  attempts: 3\n")
    out = _notata("submit", str(manifest), "--sbatch-line=--hold", "--", sys.executable,
                  str(base / "payload.py"), "{kind}", "{attempt}")
    assert out.returncode == 0, out.stderr
    array = _records(manifest)[0]["job_ids"][0]
    subprocess.run(["scancel", f"{array}_1"], check=True, timeout=30)
    subprocess.run(["scontrol", "release", array], check=True, timeout=30)
    wait_for(lambda: _ended(manifest), 120, "the shepherd to see the cancel")
    state = _state(manifest)
    assert state is not None and state.state == chain.STOPPED
    assert "tasks 1 were cancelled" in state.why, state.why
    assert {r["round"] for r in _records(manifest)} == {1}
    assert read_meta(notata.load_sweep(manifest).task(0).run_dir)["status"] == "complete"


def test_an_escalation_the_cluster_cannot_give_is_given_up_and_the_sweep_settles(
        slurm_cluster: str, base: Path) -> None:
    """The OOM rule asks for more memory than any node has: sbatch refuses it, so the
    task is given up with sbatch's words, the other tasks go on, and the sweep settles."""
    hook = Hook()
    try:
        manifest = _sweep(base, "toomuch", ["oom", "flaky"],
                          f"  attempts: 3\n  oom: {{mem: 100}}\n  notify: {hook.url}\n")
        out = _notata("submit", str(manifest), "--mem", "100M", "--", sys.executable,
                      str(base / "payload.py"), "{kind}", "{attempt}")
        assert out.returncode == 0, out.stderr
        wait_for(lambda: _ended(manifest), 180, "the sweep to settle")
        state = _state(manifest)
        assert state is not None and state.state == chain.SETTLED, state
        # (the --time before it is what SLURM reported the job had: UNLIMITED, not carried;
        # once seen as 365-00:00:00, which is carried)
        why = state.given_up["0"]
        assert "sbatch refused its next attempt with" in why and "--mem 10000M" in why, why
        assert "Memory specification can not be satisfied" in why
        sweep = notata.load_sweep(manifest)
        assert read_meta(sweep.task(1).run_dir)["status"] == "complete"
        wait_for(lambda: bool(hook.bodies), 30, "the notification")
        assert [g["task"] for g in hook.bodies[0]["given_up"]] == [0]
    finally:
        hook.close()


def test_a_corrupt_chain_record_is_one_line_and_nothing_is_submitted(
        slurm_cluster: str, base: Path) -> None:
    manifest = _sweep(base, "bad", ["ok"], "  attempts: 2\n")
    record = base / "outputs" / ".notata" / "shepherd-bad.json"
    record.parent.mkdir(parents=True)
    for text, says in [("{bad", "not JSON"), ('{"tasks": 5}', "tasks is 5")]:
        record.write_text(text)
        for args in (["submit", str(manifest), "--", "true"], ["shepherd", str(manifest)],
                     ["status", str(manifest)]):
            out = _notata(*args)
            said = out.stderr + out.stdout
            assert "not a retry chain record notata can read" in said and says in said, said
            assert "Traceback" not in said
            assert out.returncode == (0 if args[0] == "status" else 1), said
    assert not (base / "outputs" / ".notata" / "submissions.jsonl").exists()


def test_a_shepherd_that_cannot_read_the_queue_tries_again_later(
        slurm_cluster: str, base: Path) -> None:
    """squeue times out (a busy controller): the shepherd queues a successor that looks
    again later instead of leaving the chain broken; the third time in a row it stops,
    saying how to resume."""
    manifest = _sweep(base, "busy", ["flaky"], "  attempts: 2\n")
    out = _notata("submit", str(manifest), "--sbatch-line=--hold", "--", "true")
    assert out.returncode == 0, out.stderr
    state = _state(manifest)
    assert state is not None
    jobs = [state.job_id, _records(manifest)[0]["job_ids"][0]]
    shim = base / "bin"
    shim.mkdir()
    (shim / "squeue").write_text("#!/bin/sh\necho 'squeue: error: Socket timed out' >&2\n"
                                 "exit 1\n")
    (shim / "squeue").chmod(0o755)
    try:
        for n in (1, 2):
            late = _notata("shepherd", str(manifest),
                           env={"PATH": f"{shim}:{os.environ['PATH']}"})
            state = _state(manifest)
            assert state is not None
            jobs.append(str(state.job_id))  # cancelled at the end, whatever happens
            assert late.returncode == 1, late.stderr
            assert state.failures == n and state.state == chain.WAITING
            assert "SLURM's queue could not be read" in state.why or \
                "sbatch failed" in state.why or "squeue" in (late.stdout + late.stderr)
        last = _notata("shepherd", str(manifest), env={"PATH": f"{shim}:{os.environ['PATH']}"})
        state = _state(manifest)
        assert last.returncode == 1 and state is not None and state.state == chain.STOPPED
        assert "3 times in a row" in state.why and "run notata shepherd" in state.why
    finally:
        subprocess.run(["scancel", *[j for j in jobs if j]], timeout=30)


def test_two_submits_at_once_make_one_chain(slurm_cluster: str, base: Path) -> None:
    manifest = _sweep(base, "both", ["flaky", "flaky"], "  attempts: 2\n")
    cmd = [sys.executable, str(base / "payload.py"), "{kind}", "{attempt}"]
    both = [notata_process("submit", str(manifest), "--tasks", str(t), "--", *cmd)
            for t in (0, 1)]
    outs = [p.communicate(timeout=120) for p in both]
    assert [p.returncode for p in both] == [0, 0], outs
    state = _state(manifest)
    assert state is not None and state.tasks == "0-1", state
    assert {r["chain"] for r in _records(manifest)} <= {state.chain, *state.joined}
    wait_for(lambda: _ended(manifest), 180, "the chain to settle")
    sweep = notata.load_sweep(manifest)
    assert [read_meta(sweep.task(i).run_dir)["attempt"] for i in (0, 1)] == [2, 2]


def test_a_retry_cancelled_while_pending_ends_the_chain(slurm_cluster: str,
                                                        base: Path) -> None:
    """Round 2's element for task 1 is cancelled while pending: SLURM forgets it, the task
    still has its failed run of round 1, and the cancel is still the user's word."""
    manifest = _sweep(base, "late", ["flaky", "flaky"], "  attempts: 3\n")
    out = _notata("submit", str(manifest), "--sbatch-line=--begin=now+10", "--",
                  sys.executable, str(base / "payload.py"), "{kind}", "{attempt}")
    assert out.returncode == 0, out.stderr

    def second_round() -> list[dict[str, Any]]:
        return [r for r in _records(manifest) if r["round"] == 2]
    wait_for(lambda: bool(second_round()), 120, "round 2")
    array = second_round()[0]["job_ids"][0]
    subprocess.run(["scancel", f"{array}_1"], check=True, timeout=30)
    wait_for(lambda: _ended(manifest), 120, "the shepherd to see the cancel")
    state = _state(manifest)
    assert state is not None and state.state == chain.STOPPED, state
    assert "tasks 1 were cancelled" in state.why
    assert {r["round"] for r in _records(manifest)} == {1, 2}


def test_a_refusal_for_now_is_tried_again_and_the_other_tasks_go_on(
        slurm_cluster: str, base: Path) -> None:
    """sbatch refuses the OOM task's larger memory with a QOS limit's words (which may
    lift): that task waits for a later round, the plain failure is retried now."""
    import shutil
    real = shutil.which("sbatch")
    shim = base / "bin"
    shim.mkdir()
    (shim / "sbatch").write_text(
        "#!/bin/sh\nfor a; do script=$a; done\n"
        "if grep -q -- '--mem=\"200M\"' \"$script\" 2>/dev/null; then\n"
        "  echo 'sbatch: error: Batch job submission failed: Job violates accounting/QOS "
        "policy (job submit limit, user'\"'\"'s size and/or time limits)' >&2; exit 1\nfi\n"
        f"exec {real} \"$@\"\n")
    (shim / "sbatch").chmod(0o755)
    manifest = _sweep(base, "qos", ["oom", "flaky"], "  attempts: 3\n")
    env = {"PATH": f"{shim}:{os.environ['PATH']}"}  # the shepherd job inherits it
    out = _notata("submit", str(manifest), "--mem", "100M", "--", sys.executable,
                  str(base / "payload.py"), "{kind}", "{attempt}", env=env)
    assert out.returncode == 0, out.stderr

    def refused_once() -> bool:
        state = _state(manifest)
        return state is not None and state.refused.get("0") == 1
    wait_for(refused_once, 180, "the shepherd to meet the refusal")
    state = _state(manifest)
    assert state is not None and state.state == chain.WAITING and "0" not in state.given_up
    [second] = [r for r in _records(manifest) if r["round"] == 2]
    assert second["tasks"] == "1"  # the plain failure went on
    log = (base / "outputs" / ".notata" / "shepherd.log").read_text()
    assert "tasks 0 are tried again later" in log
    subprocess.run(["scancel", str(state.job_id), *second["job_ids"]], timeout=30)
