"""The sweep index: tasks record their status in it; a scan trusts it only for ``complete``."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import submit, tree_digest, write_sweep

import notata
from notata import Logbook, _fs, index
from notata.cli import main
from notata.collector import scan
from notata.manifest import Sweep, load
from notata.queue import Queue

SWEEP = "name: ix\nrun_id: 'k{k}'\ngrid: {k: [0, 1, 2, 3, 4, 5]}\n"
FAIL_1_4 = "import sys; sys.exit(2 if int(sys.argv[1]) in (1, 4) else 0)"


@pytest.fixture
def sweep(base: Path) -> Sweep:
    """Six tasks run for real through ``notata submit --backend local``: 1 and 4 fail."""
    p = write_sweep(base, SWEEP)
    rc = submit(p, "--backend", "local", "--", sys.executable, "-c", FAIL_1_4, "{k}")
    assert rc == 1
    return load(p)


def files(root: Path) -> dict[str, bytes]:
    return {str(q): q.read_bytes() for q in root.rglob("*") if q.is_file()}


def records(s: Sweep) -> np.ndarray:
    raw = index.path_for(s.base_dir, s.hash).read_bytes()
    return np.frombuffer(raw, dtype=index.DTYPE)


def test_each_task_records_its_status(sweep: Sweep) -> None:
    recs = records(sweep)
    assert len(recs) == 6
    names = [index.schema.STATUSES[c - 1] for c in recs["status"]]
    assert names == ["complete", "failed", "complete", "complete", "failed", "complete"]
    assert (recs["tag"] == recs["tag2"]).all() and (recs["magic"] == index.MAGIC).all()
    done = index.complete_tasks(sweep.base_dir, sweep.hash, len(sweep))
    assert done is not None and done["task"].tolist() == [0, 2, 3, 5]


def test_scan_takes_complete_from_the_index_and_reads_the_rest(sweep: Sweep) -> None:
    # Spoil a complete run's metadata.json: the index scan does not open it; --full does.
    (sweep.task(0).run_dir / "metadata.json").write_text("{")
    report = scan(sweep)
    assert report.indexed["task"].tolist() == [0, 2, 3, 5]
    assert [r.task for r in report.read] == [1, 4]  # the failed ones, read from their files
    assert report.counts["complete"] == 4 and report.counts["failed"] == 2
    assert [r.reason for r in report.read] == ["command exited with status 2"] * 2
    assert [(r.task, r.run_id, r.status) for r in report.runs] == [
        (0, "k0", "complete"), (1, "k1", "failed"), (2, "k2", "complete"),
        (3, "k3", "complete"), (4, "k4", "failed"), (5, "k5", "complete")]
    assert report.indices("complete") == [0, 2, 3, 5]
    full = scan(sweep, full=True)
    assert not len(full.indexed)
    assert [r.status for r in full.runs][:2] == ["corrupt", "failed"]


def test_a_deleted_run_reads_complete_until_a_full_scan(sweep: Sweep) -> None:
    shutil.rmtree(sweep.task(2).run_dir)
    assert scan(sweep).runs[2].status == "complete"
    assert scan(sweep, full=True).runs[2].status == "missing"


def test_resumed_attempts_are_recorded(sweep: Sweep) -> None:
    rc = submit(sweep.path, "--backend", "local", "--", sys.executable, "-c", "pass")
    assert rc == 0
    recs = records(sweep)
    assert recs["attempt"].tolist() == [1, 2, 1, 1, 2, 1]
    report = scan(sweep)
    assert len(report.indexed) == 6 and not report.read
    assert [(r.status, r.attempt) for r in report.runs][:2] == [("complete", 1), ("complete", 2)]


def test_overwrite_clears_the_record_before_the_run_changes(sweep: Sweep) -> None:
    t = sweep.task(3)
    log = Logbook(t.run_id, sweep.base_dir, overwrite=True)
    try:
        r = scan(sweep).runs[3]
        assert (r.status, r.task) == ("running", 3)  # not "complete" from a stale record
        assert records(sweep)["status"][3] == 0
    finally:
        log.close()


@pytest.mark.parametrize("spoil", ["torn", "garbage", "short"])
def test_a_damaged_record_is_not_trusted(sweep: Sweep, spoil: str) -> None:
    path = index.path_for(sweep.base_dir, sweep.hash)
    raw = bytearray(path.read_bytes())
    shutil.rmtree(sweep.task(5).run_dir)  # the index still says complete...
    at = 5 * index.SIZE
    if spoil == "torn":  # ...but its second tag differs from the first
        raw[at + 28:at + 32] = (int.from_bytes(raw[at:at + 4], "little") ^ 1).to_bytes(4, "little")
    elif spoil == "garbage":
        raw[at:at + index.SIZE] = b"\xff" * index.SIZE
    else:
        del raw[at + 20:]
    path.write_bytes(bytes(raw))
    report = scan(sweep)
    assert report.runs[5].status == "missing"
    assert report.counts["complete"] == 3


def test_no_index_and_foreign_runs(base: Path) -> None:
    """A run outside any sweep writes no record; a bare folder scan never uses one."""
    with Logbook("plain", base / "outputs"):
        pass
    assert not (base / "outputs" / ".notata").exists()
    [r] = scan(base / "outputs").runs
    assert (r.run_id, r.status) == ("plain", "complete")


def test_complete_reaches_the_index_only_after_metadata_json(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If metadata.json cannot say complete (disk full at close), neither does the index."""
    p = write_sweep(base, SWEEP)
    real = _fs.atomic_write_json

    def full_disk_at_complete(path: Path, obj: dict, **kw: object) -> bool:
        if obj.get("status") == "complete":
            raise OSError(28, "No space left on device", str(path))
        return real(path, obj, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_fs, "atomic_write_json", full_disk_at_complete)
    with pytest.raises(OSError, match="No space left"), notata.task(p, 0):
        pass
    s = load(p)
    assert index.schema.STATUSES[records(s)["status"][0] - 1] == "running"
    assert index.complete_tasks(s.base_dir, s.hash, len(s))["task"].tolist() == []
    assert scan(s).runs[0].status != "complete"


def test_records_carry_the_slurm_array_task(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete record names the array job and task it ran as, so a scan that opens no
    complete run can still map a user's own array to the sweep (see test_collect_slurm)."""
    p = write_sweep(base, SWEEP)
    monkeypatch.setenv("SLURM_JOB_ID", "999999")  # a job the test cluster does not know
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("NOTATA_TASK_OFFSET", "2")
    for k in (2, 3):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(k - 2))  # array task 0 is task 2
        with notata.task(p):
            pass
    with notata.task(p, 5):  # in the array, but by an index of its own: says nothing of it
        pass
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    with notata.task(p, 4):  # not an array task
        pass
    s = load(p)
    done = index.complete_tasks(s.base_dir, s.hash, len(s))
    assert done.tolist() == [(2, 1, 4240, 0), (3, 1, 4240, 1), (4, 1, 0, -1), (5, 1, 0, -1)]


def test_resubmit_refuses_duplicate_run_ids_even_when_the_index_answers(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = write_sweep(base, "name: d\nrun_id: 'k{k}'\ngrid: {k: [0, 1, 2, 3, '3']}\n")
    for k in range(3):  # run one by one (a whole submit refuses the manifest at once)
        assert main(["exec", str(p), "--task", str(k), "--", sys.executable, "-c", "pass"]) == 0
    s = load(p)
    assert len(index.complete_tasks(s.base_dir, s.hash, len(s))) == 3  # the index answers
    before = files(base / "outputs")
    assert main(["resubmit", str(p), "--backend", "local", "--", sys.executable, "-c",
                 "pass"]) == 2
    assert "tasks 3 and 4 have the same run id 'k3'" in capsys.readouterr().err
    assert files(base / "outputs") == before  # nothing submitted, nothing written


def test_queued_array_tasks_map_only_through_a_consistent_offset(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Array 600 ran tasks 4 and 5 as its array tasks 1 and 2 (by their array index, with
    NOTATA_TASK_OFFSET=3): its queued array task 0 is sweep task 3 (pending). Array 500 ran
    task 1 as array task 0 and task 0 as array task 2, each by an index of its own (a map
    over chosen tasks, as submitit's map_array makes, or a user's --task $((2*ID))): no
    offset is learned from it, so its queued array tasks name no task (either guess would
    wrongly name task 2), and task 2 stays missing rather than guessed."""
    p = write_sweep(base, SWEEP)
    monkeypatch.setenv("SLURM_JOB_ID", "999999")  # a job the test cluster does not know
    for job, array_task, k in [(600, 1, 4), (600, 2, 5), (500, 0, 1), (500, 2, 0)]:
        monkeypatch.setenv("SLURM_ARRAY_JOB_ID", str(job))
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(array_task))
        if job == 600:
            monkeypatch.setenv("NOTATA_TASK_OFFSET", "3")
            with notata.task(p):
                pass
        else:
            with notata.task(p, k):
                pass
    s = load(p)
    queue = Queue({"600_0": "PENDING", "500_1": "PENDING", "500_4": "PENDING",
                   "700+0": "RUNNING", "7x_1": "PENDING"})  # a het job, a key not understood
    report = scan(s, queue=queue)
    assert report.indexed["task"].tolist() == [0, 1, 4, 5]  # the scan opened none of them
    assert [(r.task, r.status, r.queued) for r in report.read] == [
        (2, "missing", None), (3, "pending", "PENDING")]


def test_a_symlinked_run_directory_reads_the_same_on_both_paths(
        sweep: Sweep, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A task whose run directory is a symlink is refused before anything is written (it
    once wrote its whole run, complete record included, into the link's target); the
    index scan and the full scan agree, and resubmit --corrupt leaves it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("not notata's")
    link = sweep.task(1).run_dir
    shutil.rmtree(link)
    link.symlink_to(elsewhere)
    before = tree_digest(elsewhere)
    assert main(["exec", str(sweep.path), "--task", "1", "--", "true"]) == 2
    assert "is a symlink" in capsys.readouterr().err
    assert main(["resubmit", str(sweep.path), "--corrupt", "--backend", "local"]) == 0
    said = capsys.readouterr()
    assert "leaving task 1" in said.err and "symlink" in said.err
    assert tree_digest(elsewhere) == before
    fast, full = scan(sweep), scan(sweep, full=True)
    assert {r.task: r.status for r in fast.runs} == {r.task: r.status for r in full.runs
                                                     if r.task is not None}
    assert [r.status for r in fast.runs if r.task == 1] == ["corrupt"]
