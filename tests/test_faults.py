"""The whole system broken the way a cluster breaks it: kills, ignored signals, no flock,
a full disk, two collectors, 64 writers at once. Each case checks what happened to the run
it targets and that every other run's files are byte-for-byte as they were.

The README's "Guarantees" table maps each promise to the test that proves it; cases
proven in a module of their own (lock rules, SIGKILL storms, hostile input) are named
there rather than repeated here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import (
    job_gone,
    notata_process,
    python,
    read_meta,
    shared_folder,
    status_is,
    submit,
    tree_digest,
    wait_for,
    write_sweep,
)

from notata import submissions
from notata.cli import main
from notata.collector import scan
from notata.manifest import load


def digests(out: Path, *run_ids: str) -> dict[str, dict[str, str]]:
    return {r: tree_digest(out / f"log_{r}") for r in run_ids}


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob(".*.tmp")]


# -- 1. SIGKILL mid-run, stale, resubmitted once, attempt 2 keeps attempt 1's outputs -----------

KEEP_GOING = """
import os, pathlib, sys, time
run = pathlib.Path(os.environ["NOTATA_RUN_DIR"])
attempt = os.environ["NOTATA_ATTEMPT"]
(run / f"out-{attempt}.txt").write_text(f"attempt {attempt}")
if sys.argv[1] == "2" and attempt == "1":
    time.sleep(300)
"""


def test_sigkilled_task_is_stale_then_resubmitted_once(base: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_sweep(base, name="f1", tasks=4)
    payload = base / "payload.py"
    payload.write_text(KEEP_GOING)
    out = base / "outputs"
    cmd = ["--", sys.executable, str(payload), "{k}"]
    assert submit(manifest, "--backend", "local", "--tasks", "0,1,3", *cmd) == 0
    wrapper = notata_process("exec", str(manifest), "--task", "2", *cmd, start_new_session=True)
    wait_for(lambda: (out / "log_k2" / "out-1.txt").exists(), 30, "task 2 to write its output")
    os.killpg(wrapper.pid, signal.SIGKILL)  # wrapper and payload: no chance to write anything
    wrapper.wait()
    before = digests(out, "k0", "k1", "k3")

    [r] = [r for r in scan(load(manifest)).runs if r.task == 2]
    assert (r.status, r.attempt) == ("stale", 1)
    assert "pid" in (r.reason or "")
    capsys.readouterr()
    assert main(["resubmit", str(manifest), "--backend", "local"]) == 0
    assert "resubmitting 1 task(s) with the local backend: 2" in capsys.readouterr().out
    assert main(["resubmit", str(manifest), "--backend", "local"]) == 0
    assert "nothing to resubmit" in capsys.readouterr().out

    meta = read_meta(out / "log_k2")
    assert (meta["status"], meta["attempt"]) == ("complete", 2)
    assert [a["status"] for a in meta["attempts"]] == ["running"]  # as the kill left it
    assert (out / "log_k2" / "out-1.txt").read_text() == "attempt 1"
    assert (out / "log_k2" / "out-2.txt").read_text() == "attempt 2"
    assert digests(out, "k0", "k1", "k3") == before
    assert no_temporaries(out)


# -- 2 and 3. a task that ignores SIGTERM at its time limit, then resumed (real cluster) -------


def test_task_ignoring_sigterm_is_killed_and_never_complete(slurm_cluster: str,
                                                            base: Path) -> None:
    manifest = write_sweep(base, name="f3", tasks=2)
    out = base / "outputs"
    # task 0 traps TERM and would sleep for 5 minutes; task 1 finishes at once
    deaf = ("if [ $1 = 0 ] && [ $NOTATA_ATTEMPT = 1 ]; then trap '' TERM; "
            "echo $$ > \"$2\"/pid; sleep 300 & wait; fi")
    assert submit(manifest, "--backend", "slurm", "--time", "1", "--", "sh", "-c", deaf, "sh",
                  "{k}", "{run_dir}") == 0
    [record] = submissions.submitted(out)
    wait_for(lambda: (out / "log_k0" / "pid").exists(), 120, "task 0 to start")
    pid = int((out / "log_k0" / "pid").read_text())
    wait_for(status_is(out / "log_k1", "complete"), 120, "task 1 to finish")
    before = digests(out, "k1")
    wait_for(job_gone(record["job_ids"][0]), 180, "the time limit and KillWait to end the job")
    wait_for(lambda: not psutil.pid_exists(pid), 30, "the deaf command to be SIGKILLed")
    meta = read_meta(out / "log_k0")  # still whole JSON
    assert meta["status"] in ("timeout", "running")  # never complete
    [r] = [r for r in scan(load(manifest)).runs if r.task == 0]
    assert r.status in ("timeout", "stale")
    assert no_temporaries(out)
    # resubmission (timeout and stale are both taken by default) resumes it as attempt 2
    assert main(["resubmit", str(manifest), "--backend", "slurm"]) == 0
    for j in submissions.submitted(out)[-1]["job_ids"]:
        wait_for(job_gone(j), 120, "the resubmission")
    meta = read_meta(out / "log_k0")
    assert (meta["status"], meta["attempt"]) == ("complete", 2)
    assert [a["status"] for a in meta["attempts"]] in (["timeout"], ["running"])
    assert digests(out, "k1") == before


# -- 5 and 12. scancel, then two collectors at once, on the real cluster --------------------------

CANCEL_ME = """
import os, sys, time
k = int(sys.argv[1])
if os.environ["NOTATA_ATTEMPT"] == "1" and k == 0:
    sys.exit("diverged")
if os.environ["NOTATA_ATTEMPT"] == "1" and k == 1:
    time.sleep(300)
"""


def test_cancelled_stays_cancelled_and_two_collectors_resubmit_once(
        slurm_cluster: str, base: Path) -> None:
    manifest = write_sweep(base, name="f12", tasks=4)
    payload = base / "payload.py"
    payload.write_text(CANCEL_ME)
    out = base / "outputs"
    assert submit(manifest, "--backend", "slurm", "--", sys.executable, str(payload), "{k}") == 0
    job = submissions.submitted(out)[0]["job_ids"][0]
    wait_for(status_is(out / "log_k1", "running"), 120, "task 1 to start")
    subprocess.run(["scancel", f"{job}_1"], check=True)
    wait_for(job_gone(job), 120, "the array to end")
    statuses = {k: read_meta(out / f"log_k{k}")["status"] for k in range(4)}
    assert statuses == {0: "failed", 1: "cancelled", 2: "complete", 3: "complete"}
    before = digests(out, "k1", "k2", "k3")

    # two collectors at the same instant: each failed task is submitted once in total
    both = [notata_process("resubmit", str(manifest), "--backend", "slurm") for _ in range(2)]
    said = [p.communicate(timeout=120)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0]
    took = "resubmitting 1 task(s) with the slurm backend: 0"
    assert sorted(took in s for s in said) == [False, True], said
    resubmits = submissions.submitted(out)[1:]
    assert [r["tasks"] for r in resubmits] == ["0"]
    for j in resubmits[0]["job_ids"]:
        wait_for(job_gone(j), 120, "the resubmission")
    assert read_meta(out / "log_k0")["status"] == "complete"
    assert digests(out, "k1", "k2", "k3") == before  # the cancelled run was not taken

    assert main(["resubmit", str(manifest), "--backend", "slurm", "--cancelled"]) == 0
    for j in submissions.submitted(out)[-1]["job_ids"]:
        wait_for(job_gone(j), 120, "the resubmission of the cancelled task")
    meta = read_meta(out / "log_k1")
    assert (meta["status"], meta["attempt"]) == ("complete", 2)
    assert digests(out, "k2", "k3") == {k: before[k] for k in ("k2", "k3")}


# -- 8. a filesystem without flock --------------------------------------------------------------

NO_FLOCK = """
import errno, fcntl, sys, time
def unsupported(*args, **kwargs):
    raise OSError(errno.ENOSYS, "Function not implemented")
fcntl.flock = unsupported  # what Lustre mounted without flock, or NFS with nolock, answers
from notata import Logbook
from notata.errors import RunLockedError
try:
    log = Logbook("r", sys.argv[1], resume=True)
except RunLockedError as err:
    print("locked:", err, flush=True)
    sys.exit(3)
print("open", log.attempt, flush=True)
if sys.argv[2] == "hold":
    time.sleep(300)
log.close()
"""


def test_without_flock_the_soft_lock_still_excludes_and_frees_the_dead(base: Path) -> None:
    """filelock falls back to its soft lock (an O_EXCL file naming host and pid): a live
    holder still excludes a second opener; one killed on this host is taken over."""
    from notata import Logbook

    with Logbook("neighbour", base) as log:
        log.save_text("note", "unchanged")
    before = digests(base, "neighbour")
    (base / "log_r").mkdir()
    (base / "log_r" / ".lock").touch()  # what a run opened where flock works leaves behind
    holder = python(NO_FLOCK, str(base), "hold")
    assert holder.stdout and holder.stdout.readline().split() == ["open", "1"]
    second = python(NO_FLOCK, str(base), "once")
    said, _ = second.communicate(timeout=60)
    assert second.returncode == 3 and f"pid {holder.pid}" in said
    assert read_meta(base / "log_r")["attempt"] == 1  # the refused opener changed nothing
    holder.kill()
    holder.wait()
    third = python(NO_FLOCK, str(base), "once")
    said, _ = third.communicate(timeout=60)
    assert third.returncode == 0 and said.split() == ["open", "2"]
    meta = read_meta(base / "log_r")
    assert (meta["status"], meta["attempt"]) == ("complete", 2)
    assert digests(base, "neighbour") == before


# -- 9. disk full --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, mounted for this test (root only)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    where = tmp_path / "small disk"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_disk_full_raises_names_the_file_and_keeps_the_old_metadata(small_disk: Path) -> None:
    import numpy as np

    from notata import Logbook

    with Logbook("neighbour", small_disk) as other:
        other.save_numpy("x", np.arange(100))
    before_other = digests(small_disk, "neighbour")
    log = Logbook("r", small_disk, heartbeat=3600)
    log.save_numpy("small", np.arange(10))
    before = (log.path / "metadata.json").read_bytes()
    filler = fill(small_disk)
    with pytest.raises(OSError) as err:
        log.save_numpy("big", np.zeros(1_000_000))
    assert err.value.errno == 28 and "big" in str(err.value)
    with pytest.raises(OSError) as err:
        log.meta(note="x" * 100_000)
    assert err.value.errno == 28 and "metadata.json" in str(err.value)
    assert (log.path / "metadata.json").read_bytes() == before  # intact, still running
    assert json.loads(before)["status"] == "running"
    assert not (log.path / "data" / "big.npy").exists()
    assert no_temporaries(small_disk)
    filler.unlink()
    log.close()
    assert read_meta(log.path)["status"] == "complete"
    assert digests(small_disk, "neighbour") == before_other


# -- 16. 64 processes at once, and a scan beside them --------------------------------------------


def test_64_writers_and_a_scan_beside_them(base: Path) -> None:
    n = 64
    manifest = write_sweep(base, name="f16", tasks=n)
    code = textwrap.dedent("""
        import sys, notata
        import numpy as np
        with notata.task(sys.argv[1], int(sys.argv[2]), heartbeat=0.05) as log:
            for i in range(20):
                log.save_numpy(f"a{i % 3}", np.full(100, i))
                log.meta(step=i)
    """)
    sweep = load(manifest)
    seen: list[tuple[str, str | None]] = []
    done = threading.Event()

    def scan_until_done() -> None:  # by the files and by the index, in turn
        full = True
        while not done.is_set():
            for r in scan(sweep, full=full).runs:
                seen.append((r.status, r.reason))
            full = not full

    scanner = threading.Thread(target=scan_until_done)
    scanner.start()
    try:
        procs = [subprocess.Popen([sys.executable, "-c", code, str(manifest), str(k)],
                                  stderr=subprocess.PIPE, text=True) for k in range(n)]
        errors = [p.communicate(timeout=600)[1] for p in procs]
    finally:
        done.set()
        scanner.join()
    assert [p.returncode for p in procs] == [0] * n, [e for e in errors if e][:3]
    report = scan(sweep, full=True)
    assert report.counts["complete"] == n
    assert len(scan(sweep).indexed) == n  # every task recorded itself in the index
    for k in range(n):
        meta = read_meta(base / "outputs" / f"log_k{k}")
        assert meta["step"] == 19 and meta["heartbeat"]["interval_sec"] == 0.05
    assert no_temporaries(base / "outputs")
    statuses = {s for s, _ in seen}
    assert statuses <= {"missing", "running", "complete", "corrupt"}, statuses
    # never a torn file: a run can only be caught between its mkdir and its lock, or
    # between its lock and its first write ("starting")
    assert {why for s, why in seen if s == "corrupt"} <= {"no metadata.json"}
    assert len(seen) > n  # the scan really ran beside the writers


# -- 13 and 15. what a manifest can never do ------------------------------------------------------


@pytest.mark.parametrize("text, problem", [
    ('name: n\ngrid: {v: ["a\\0b"]}\n', "grid.v.0 contains a NUL character"),
    ('name: n\nparams: {"k\\0": 1}\n', "contains a NUL character"),
    ("name: n\ngrid: {i: !!python/object/apply:os.system ['touch pwned']}\n",
     "could not determine a constructor"),
])
def test_a_manifest_cannot_smuggle_nul_or_code(base: Path, text: str, problem: str,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write_sweep(base, text)
    before = sorted(p.name for p in base.iterdir())
    monkeypatch.chdir(base)
    assert submit(manifest, "--backend", "local", "--", "true") == 2
    err = capsys.readouterr().err
    assert problem in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in base.iterdir()) == before  # no outputs/, no pwned


# -- a sweep shared by a group: two users, umask 002 --------------------------------------------


GROUP_HOLD = """
    import sys, time, notata
    log = notata.task(sys.argv[1], 0)
    print("open", flush=True)
    time.sleep(120)
    """

GROUP_SECOND = """
    import sys, notata
    from notata import lock
    from notata.submission import Options, submit
    manifest = sys.argv[1]
    try:
        notata.task(manifest, 0)
        print("opened a run another user holds")
    except notata.RunLockedError as err:
        print("locked:", err)
    print("held:", lock.is_held(notata.load_sweep(manifest).task(0).run_dir))
    done = submit(manifest, ["true"], Options(backend="local", tasks=[int(sys.argv[2])]))
    print("submit:", done.status)
    print("dry run:", notata.resubmit(manifest, backend="local", dry_run=True))
    """


def test_a_sweep_shared_by_a_group_works_for_every_member(
        group_users: tuple[str, list[str], str]) -> None:
    """Lock, index and record files honour the umask (filelock 3.13 made them 0644, and a
    colleague got a PermissionError traceback), and one user's live run is held for all."""
    from helpers import as_user

    py, (a, b), group = group_users
    shared = shared_folder(group)
    try:
        manifest = str(shared / "sweep.yaml")
        first = as_user(a, py, GROUP_SECOND.replace("notata.task(manifest, 0)", "pass"),
                        manifest, "1")
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0 and "submit: 0" in out, (out, err)
        holder = as_user(a, py, GROUP_HOLD, manifest)
        assert holder.stdout and holder.stdout.readline().strip() == "open"
        run = shared / "outputs" / "log_k0"
        for made in (run / ".lock", shared / "outputs" / ".notata" / "resubmit.lock",
                     shared / "outputs" / ".notata" / "submissions.jsonl"):
            assert made.stat().st_mode & 0o020, f"{made} is not group-writable"
        second = as_user(b, py, GROUP_SECOND, manifest, "2")
        out, err = second.communicate(timeout=120)
        assert second.returncode == 0, (out, err)
        assert f"locked: {run} is in use by another process" in out and f"pid {holder.pid}" in out
        assert "held: True" in out and "submit: 0" in out and "dry run: 0" in out
        assert "Traceback" not in err
        holder.kill()
        holder.wait()
        third = as_user(b, py, "import sys, notata\nwith notata.task(sys.argv[1], 0) as log:\n"
                        "    print(log.attempt)", manifest)
        out, err = third.communicate(timeout=60)
        assert (third.returncode, out.strip()) == (0, "2"), err
        statuses = {k: read_meta(shared / "outputs" / f"log_k{k}")["status"] for k in (0, 1, 2)}
        assert statuses == {0: "complete", 1: "complete", 2: "complete"}
        users = {r["user"] for r in submissions.submitted(shared / "outputs") if r.get("backend")}
        assert users == {a, b}
    finally:
        shutil.rmtree(shared, ignore_errors=True)
