"""The Logbook's API (seed and notata 0.3 names), resume, and refusal of bad input."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from notata import CorruptMetadataError, Logbook, LogReader, RunCompleteError


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>")
        for p in sorted(root.rglob("*"))
    }


def test_seed_loop_creates_the_documented_layout(base: Path) -> None:
    for omega, dt in [(1.0, 1e-2), (2.0, 1e-3)]:
        params = {"omega": omega, "dt": dt, "steps": 10}
        with Logbook(f"omega{omega}_dt{dt}", params=params, base_dir=base) as log:
            log.save_numpy("x", np.arange(10.0))
            log.save_json("final_state", {"x": 1.5, "v": np.float64(0.25)})
    run = base / "log_omega1.0_dt0.01"
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "artifacts",
        "data",
        "log.txt",
        "metadata.json",
        "params.yaml",
    ]
    assert np.load(run / "data" / "x.npy").tolist() == list(np.arange(10.0))
    assert json.loads((run / "artifacts" / "final_state.json").read_text()) == {"x": 1.5, "v": 0.25}
    assert yaml.safe_load((run / "params.yaml").read_text()) == {
        "omega": 1.0,
        "dt": 0.01,
        "steps": 10,
    }
    meta = json.loads((run / "metadata.json").read_text())
    assert (
        meta["status"] == "complete"
        and meta["attempt"] == 1
        and meta["run_id"] == "omega1.0_dt0.01"
    )
    assert meta["runtime_sec"] >= 0 and meta["end_time"] >= meta["start_time"]
    for key in ("host", "pid", "user", "python", "notata", "argv", "heartbeat", "schema"):
        assert key in meta
    for line in (run / "log.txt").read_text().splitlines():
        assert re.fullmatch(
            r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\] (INFO|WARNING|ERROR|DEBUG) .+", line
        )


def test_exception_marks_failed_and_propagates(base: Path) -> None:
    with pytest.raises(RuntimeError, match="diverged"), Logbook("r", base_dir=base) as log:
        raise RuntimeError("diverged at step 7")
    meta = json.loads((log.path / "metadata.json").read_text())
    assert meta["status"] == "failed" and meta["failure_reason"] == "diverged at step 7"
    assert log.current_status() == "failed" and log.status == "failed"


def test_keyboard_interrupt_is_cancelled(base: Path) -> None:
    with pytest.raises(KeyboardInterrupt), Logbook("r", base_dir=base) as log:
        raise KeyboardInterrupt
    assert LogReader(log.path).meta["status"] == "cancelled"


def test_manual_lifecycle_and_callback(base: Path) -> None:
    seen = []
    log = Logbook("manual", base, callback=lambda lb: seen.append(lb.status))
    assert log.status == "running"
    log.mark_failed("bad input")
    log.mark_complete()  # the first terminal status wins
    assert seen == ["failed"] and LogReader(log.path).meta["failure_reason"] == "bad input"


def test_existing_run_raises_and_overwrite_starts_afresh(base: Path) -> None:
    with Logbook("r", base_dir=base) as log:
        log.save_text("old", "x")
    with pytest.raises(FileExistsError):
        Logbook("r", base_dir=base)
    with Logbook("r", base_dir=base, overwrite=True) as log:
        assert not log.exists("artifacts/old.txt")
    assert LogReader(log.path).meta["attempt"] == 1


def test_all_writers_and_categories(base: Path) -> None:
    with Logbook("w", base_dir=base) as log:
        log.save_arrays("traj", x=np.zeros(3), v=np.ones(3))
        log.save_text("note", "hello")
        log.save_pickle("obj", {"a": 1})
        log.save_bytes("blob.bin", b"\x00\x01")
        log.save_numpy("fine", np.ones(2), category="diagnostics")
        log.save_json("deep", {"k": 1}, category="diagnostics/level2")
        p = log.artifact_path("custom", "f.dat")
        p.write_text("mine")
        log.log("warned", logging.WARNING)
        log.log("said", "ERROR")
        log.debug("not written at INFO level")
    r = log.path
    assert (r / "data/traj.npz").exists() and (r / "artifacts/note.txt").read_text() == "hello"
    assert (r / "artifacts/blob.bin").read_bytes() == b"\x00\x01"
    assert (r / "diagnostics/fine.npy").exists() and (r / "diagnostics/level2/deep.json").exists()
    assert (r / "custom/f.dat").read_text() == "mine" and log.exists("custom/f.dat")
    text = (r / "log.txt").read_text()
    assert "WARNING warned" in text and "ERROR said" in text and "not written" not in text


def test_notata_03_names_write_the_same_files(base: Path) -> None:
    with Logbook("old", base) as log:
        log.array("energy", np.arange(3))
        log.array("states/T_step100", np.ones(2))
        log.arrays("trajectory", x=np.zeros(2), v=np.ones(2))
        log.json("metrics", {"drift": 1e-9})
        log.text("stdout", "done")
        log.pickle("model", [1, 2])
        log.bytes("weights.bin", b"\x01")
        log.note("a note")
        log.params(omega=2.0)
        log.params(dt=0.1)
        log.meta(solver="verlet")
        log["artifacts/custom/config.json"].write_text("{}")
        assert log.path.name == "log_old" and log.log_path.name == "log.txt"
        assert (log.datadir, log.plotdir, log.artifactsdir) == (
            log.path / "data",
            log.path / "plots",
            log.path / "artifacts",
        )
    reader = LogReader(log.path)
    assert reader.params == {"omega": 2.0, "dt": 0.1}
    assert reader.meta["solver"] == "verlet" and reader.meta["status"] == "complete"
    assert reader.arrays == ["energy", "states/T_step100", "trajectory:v", "trajectory:x"]
    assert reader.artifacts == [
        "custom/config.json",
        "metrics.json",
        "model.pkl",
        "stdout.txt",
        "weights.bin",
    ]
    assert reader.load_array("trajectory:v").tolist() == [1.0, 1.0]
    assert reader.load_json("metrics") == {"drift": 1e-9}
    assert "a note" in log.log_path.read_text()


def test_params_json_and_bad_ext(base: Path) -> None:
    with Logbook("p", base) as log:
        log.params(ext="json", a=1)
        with pytest.raises(ValueError, match="yaml"):
            log.params(ext="toml", a=1)
    assert json.loads((log.path / "params.json").read_text()) == {"a": 1}


def test_save_plot(base: Path) -> None:
    with Logbook("plot", base) as log:
        try:
            import matplotlib
        except ImportError:
            with pytest.raises(RuntimeError, match="matplotlib"):
                log.save_plot("energy")
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots()
        ax.plot([1, 2])
        log.save_plot("energy", fig=fig, formats=("png", "svg"))
    assert (log.plotdir / "energy.png").read_bytes()[:4] == b"\x89PNG"
    assert LogReader(log.path).plots == ["energy.png", "energy.svg"]


def test_params_conversion_and_refusal(base: Path) -> None:
    params = {
        "n": np.int64(3),
        "x": np.float32(0.5),
        "v": np.arange(3),
        "t": (1, 2),
        "p": Path("a/b"),
    }
    with Logbook("conv", base, params=params) as log:
        pass
    assert LogReader(log.path).params == {"n": 3, "x": 0.5, "v": [0, 1, 2], "t": [1, 2], "p": "a/b"}
    with pytest.raises(TypeError, match=r"params\['obj'\]"):
        Logbook("bad", base, params={"ok": 1, "obj": object()})
    with pytest.raises(TypeError, match=r"params\['big'\].*save_numpy"):
        Logbook("bad", base, params={"big": np.zeros(10_000)})
    assert not (base / "log_bad").exists()


@pytest.mark.parametrize(
    "run_id",
    ["", ".", "..", ".hidden", "-x", "a/b", "a\\b", "a\0b", "tab\there", "x" * 252, "é" * 126],
)
def test_bad_run_ids_are_refused_and_create_nothing(base: Path, run_id: str) -> None:
    before = snapshot(base)
    with pytest.raises(ValueError, match="invalid run id"):
        Logbook(run_id, base)
    assert snapshot(base) == before


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/../../b", ""])
def test_names_that_leave_the_run_are_refused(base: Path, name: str) -> None:
    with Logbook("n", base) as log:
        before = snapshot(base.parent)
        for call in (
            lambda: log.save_text(name, "x"),
            lambda: log.save_text("ok", "x", category=name),
            lambda: log[name],
        ):
            with pytest.raises(ValueError, match="invalid"):
                call()
        assert snapshot(base.parent) == before


def test_planted_symlink_is_not_followed(base: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    with Logbook("s", base) as log:
        (log.path / "artifacts").symlink_to(outside)
        with pytest.raises(ValueError, match="symlink"):
            log.save_text("x", "data")
        with pytest.raises(ValueError, match="symlink"):
            log["artifacts/sub/y.txt"]
    assert list(outside.iterdir()) == []


def test_corrupt_metadata_is_named_never_reset(base: Path) -> None:
    with Logbook("c", base) as log:
        pass
    meta = log.path / "metadata.json"
    meta.write_text('{"status": "fail')
    with pytest.raises(CorruptMetadataError, match=re.escape(str(meta))):
        Logbook("c", base, resume=True)
    assert meta.read_text() == '{"status": "fail'


def test_resume_keeps_outputs_and_history(base: Path) -> None:
    with pytest.raises(ValueError), Logbook("r", base, params={"a": 1}) as log:
        log.save_text("first", "attempt 1 output")
        raise ValueError("boom")
    with Logbook("r", base, params={"a": 1}, resume=True) as log2:
        assert log2.attempt == 2
        log2.save_text("second", "attempt 2 output")
    meta = LogReader(log.path).meta
    assert meta["status"] == "complete" and meta["attempt"] == 2 and "failure_reason" not in meta
    [first] = meta["attempts"]
    assert first["attempt"] == 1 and first["status"] == "failed"
    assert first["failure_reason"] == "boom" and first["end_time"] and first["start_time"]
    assert (log.artifactsdir / "first.txt").read_text() == "attempt 1 output"
    text = log.log_path.read_text()
    assert "Marked failed: boom" in text and "resumed as attempt 2" in text
    with pytest.raises(RunCompleteError, match="already complete"):
        Logbook("r", base, resume=True)
    assert LogReader(log.path).meta["attempt"] == 2


def test_resume_of_a_new_run_starts_attempt_one(base: Path) -> None:
    with Logbook("fresh", base, resume=True) as log:
        assert log.attempt == 1


def test_resume_cleans_leftover_temporaries(base: Path) -> None:
    with pytest.raises(ValueError), Logbook("t", base) as log:
        raise ValueError
    leftover = log.artifactsdir / ".metrics.json.123-abcd.tmp"
    leftover.parent.mkdir()
    leftover.write_text("{half")
    assert LogReader(log.path).artifacts == []
    with Logbook("t", base, resume=True):
        assert not leftover.exists()


def test_overwrite_and_resume_together_is_an_error(base: Path) -> None:
    with pytest.raises(ValueError, match="choose one"):
        Logbook("x", base, overwrite=True, resume=True)
    assert not (base / "log_x").exists()


def test_params_dict_as_second_argument_is_explained(base: Path) -> None:
    with pytest.raises(TypeError, match="base_dir"):
        Logbook("x", {"a": 1})  # type: ignore[arg-type]


def test_elapsed_and_int_run_id(base: Path) -> None:
    with Logbook(7, base) as log:
        assert log.run_id == "7" and log.elapsed >= 0
    assert (base / "log_7").is_dir()


def test_forgotten_run_is_marked_failed_at_exit(base: Path) -> None:
    from helpers import python

    proc = python(
        """
        import sys
        from notata import Logbook
        log = Logbook("forgot", sys.argv[1])
        log.info("never marked")
        """,
        str(base),
    )
    assert proc.wait(30) == 0
    meta = LogReader(base / "log_forgot").meta
    assert meta["status"] == "failed" and "without marking" in meta["failure_reason"]


def test_umask_decides_file_modes(base: Path) -> None:
    with Logbook("m", base) as log:
        log.save_text("x", "y")
    mode = (log.artifactsdir / "x.txt").stat().st_mode & 0o777
    old = os.umask(0)
    os.umask(old)
    assert mode == 0o666 & ~old


def test_longest_run_id_a_file_name_can_hold(base: Path) -> None:
    with Logbook("x" * 251, base) as log:
        pass
    assert log.path.is_dir()


@pytest.mark.parametrize("how", ["overwrite", "resume", "new"])
def test_a_run_directory_that_is_a_symlink_is_refused(base: Path, tmp_path: Path,
                                                       how: str) -> None:
    """Guarantee 14: a symlinked run directory is never followed (overwrite once emptied
    its target), and nothing outside the base folder changes."""
    from helpers import tree_digest

    from notata.errors import RunDirError

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    (precious / "metadata.json").write_text('{"status": "failed"}')
    (base / "log_r").symlink_to(precious)
    before = tree_digest(precious)
    kwargs = {"overwrite": {"overwrite": True}, "resume": {"resume": True}, "new": {}}[how]
    with pytest.raises(RunDirError, match="symlink"):
        Logbook("r", base, params={"a": 1}, **kwargs)
    assert tree_digest(precious) == before
    assert sorted(p.name for p in base.iterdir()) == ["log_r"]  # nothing else was made


def test_a_run_path_that_is_a_file_is_refused(base: Path) -> None:
    from notata.errors import RunDirError

    (base / "log_f").write_text("not a folder")
    with pytest.raises(RunDirError, match="not a folder"):
        Logbook("f", base, resume=True)
    assert (base / "log_f").read_text() == "not a folder"


def test_numpy_scalars_in_params_are_plain_values(base: Path) -> None:
    """np.float64 subclasses float and np.str_ str, but YAML refused them, after the
    run directory was made; the most common sweep is ``for omega in np.linspace(...)``."""
    import datetime

    params = {"omega": np.linspace(0, 1, 3)[1], "name": np.str_("a"), "zero_d": np.array(2.5),
              "flag": np.bool_(True), "n": np.int32(4), "items": [np.float64(1.5)]}
    with Logbook("np", base, params=params) as log:
        log.params(extra=np.float64(0.25))
    text = (log.path / "params.yaml").read_text()
    assert "!!" not in text
    assert yaml.safe_load(text) == {"omega": 0.5, "name": "a", "zero_d": 2.5, "flag": True,
                                    "n": 4, "items": [1.5], "extra": 0.25}
    with pytest.raises(TypeError, match=r"params\['when'\]"):
        Logbook("bad", base, params={"when": datetime.datetime(2026, 1, 1)})
    assert not (base / "log_bad").exists()


def test_params_json_merges_from_params_json_and_readers_see_every_key(base: Path) -> None:
    with Logbook("pj", base, params={"x": 1}) as log:
        log.params(ext="json", a=1)
        log.params(ext="json", b=2)
        assert json.loads((log.path / "params.json").read_text()) == {"a": 1, "b": 2}
        assert log.load_params() == {"x": 1, "a": 1, "b": 2}
    assert LogReader(log.path).params == {"x": 1, "a": 1, "b": 2}
    with Logbook("pj", base, overwrite=True) as log2:
        log2.params(ext="json", a=1)
        log2.save_params({"only": True})  # replaces: params.json goes
    assert LogReader(log2.path).params == {"only": True}


def test_reopening_a_run_in_the_same_process_supersedes_the_older_handle(base: Path) -> None:
    """A notebook cell run again: notata 0.3's own tests open ``Logbook("dup")`` and then
    ``Logbook("dup", overwrite=True)`` in one process."""
    from notata.errors import RunSupersededError

    first = Logbook("dup", base)
    first.info("from the first cell")
    second = Logbook("dup", base, overwrite=True)
    with pytest.raises(RunSupersededError, match="superseded"):
        first.save_text("late", "x")
    with pytest.raises(RunSupersededError):
        first.mark_complete()
    second.save_text("ok", "y")
    second.mark_complete()
    meta = LogReader(second.path).meta
    assert meta["status"] == "complete" and meta["attempt"] == 1
    assert not (second.artifactsdir / "late.txt").exists()
    # resume: the older attempt is recorded as superseded
    third = Logbook("nb", base)
    fourth = Logbook("nb", base, resume=True)
    fourth.close()
    meta = LogReader(fourth.path).meta
    assert meta["attempt"] == 2 and meta["attempts"][0]["status"] == "superseded"
    assert third.status == "running"  # it writes nothing more, not even its own end


def test_an_open_inside_a_with_block_or_another_thread_is_not_superseded(base: Path) -> None:
    import threading

    from notata import RunLockedError

    with Logbook("w", base) as log:
        with pytest.raises(RunLockedError, match="with block"):
            Logbook("w", base, resume=True)
        log.save_text("still", "mine")
    other: list[Logbook] = []
    t = threading.Thread(target=lambda: other.append(Logbook("t", base)))
    t.start()
    t.join()
    with pytest.raises(RunLockedError, match="another thread"):
        Logbook("t", base, overwrite=True)
    other[0].mark_complete()
    assert LogReader(log.path).meta["status"] == "complete"


def test_a_superseded_handle_is_not_marked_failed_at_exit(base: Path) -> None:
    from helpers import python

    proc = python(
        """
        import sys
        from notata import Logbook
        a = Logbook("cell", sys.argv[1])
        b = Logbook("cell", sys.argv[1], overwrite=True)
        b.mark_complete()
        """,
        str(base),
    )
    assert proc.wait(30) == 0, proc.communicate()
    assert LogReader(base / "log_cell").meta["status"] == "complete"


def test_mark_failed_after_mark_complete_is_honoured(base: Path) -> None:
    calls: list[str] = []
    log = Logbook("mf", base, callback=lambda lb: calls.append(lb.status))
    log.mark_complete()
    log.mark_failed("checked the results: wrong")
    meta = LogReader(log.path).meta
    assert meta["status"] == "failed" and meta["failure_reason"] == "checked the results: wrong"
    assert calls == ["complete", "failed"]
    assert "Marked failed: checked the results: wrong" in log.log_path.read_text()


def test_notata_03_logger_and_target_dir(base: Path) -> None:
    import io

    buf = io.StringIO()
    with Logbook("lg", base) as log:
        log.logger.addHandler(logging.StreamHandler(buf))
        log.info("hello")
        assert log._target_dir(None, log.datadir) == log.datadir
        assert log._target_dir("diag", log.datadir) == log.path / "diag"
        assert (log.path / "diag").is_dir()
    assert "hello" in buf.getvalue()
    assert "INFO hello" in log.log_path.read_text()


def test_closed_runs_leave_no_logger_behind_unless_it_has_a_handler(base: Path) -> None:
    """logging keeps every named logger, and each setLevel walks them all: a pack of
    50,000 runs in one process grew slower with every run."""
    names = logging.Logger.manager.loggerDict
    before = len(names)
    for i in range(200):
        with Logbook(f"many{i}", base) as log:
            log.info("x")
    assert len(names) <= before + 1  # the "notata.logbook" placeholder, at most
    with Logbook("kept", base) as log:
        log.logger.addHandler(logging.NullHandler())
    assert names.get("notata.logbook.kept") is log.logger  # a user's handler: kept
    log.logger.handlers.clear()
    # two handles of one run id (a notebook cell run again; or two base folders): closing
    # one leaves the logger the other one writes through
    a = Logbook("twice", base, resume=True)
    b = Logbook("twice", base, resume=True)  # supersedes a, whose log file closes
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("notata.logbook.twice").addHandler(handler)
    b.info("to b's handlers")
    b.close()
    assert "to b's handlers" in seen and a.logger is b.logger


def test_a_run_moved_aside_while_open_is_no_longer_written(base: Path) -> None:
    """A careless `mv` (or `rm -rf`) of a live run and a new start: the old handle once
    went on writing into the new run, its "complete" included."""
    from notata.errors import RunLostError

    old = Logbook("mv", base, heartbeat=0.05)
    (base / "log_mv").rename(base / "aside")
    with Logbook("mv", base) as new:
        with pytest.raises(RunLostError, match="moved, replaced"):
            old.save_text("late", "x")
        with pytest.raises(RunLostError):
            old.mark_complete()
        new.save_text("mine", "y")
    meta = LogReader(new.path).meta
    assert meta["pid"] == os.getpid() and meta["status"] == "complete"
    assert not (new.artifactsdir / "late.txt").exists()


def test_a_closed_handle_writes_nothing_into_a_newer_attempt(base: Path) -> None:
    from notata.errors import RunSupersededError

    first = Logbook("c", base)
    first.close()
    first.meta(note="after close, before anyone else")  # still its run: allowed
    assert LogReader(first.path).meta["note"] == "after close, before anyone else"
    second = Logbook("c", base, overwrite=True)
    for write in (lambda: first.meta(note="late"), lambda: first.save_json("x", {})):
        with pytest.raises(RunSupersededError):
            write()
    second.close()
    assert "note" not in LogReader(second.path).meta


def test_a_forked_child_never_ends_its_parents_run(base: Path) -> None:
    """A worker forked inside a `with` block leaves it by sys.exit, and returns through the
    interpreter's exit hooks: the parent's run once read complete, or failed."""
    import atexit

    with Logbook("fork", base, heartbeat=0.05) as log:
        pid = os.fork()
        if pid == 0:  # the child: whatever happens, it never returns into pytest
            try:
                log.save_text("from_child", "outputs are allowed")
                log.__exit__(SystemExit, SystemExit(0), None)  # the inherited block, left
                atexit._run_exitfuncs()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert LogReader(log.path).meta["status"] == "running"
    assert LogReader(log.path).meta["status"] == "complete"
    assert (log.artifactsdir / "from_child.txt").exists()


def test_meta_refuses_notatas_own_fields(base: Path) -> None:
    with Logbook("m", base) as log:
        for field in ("status", "heartbeat", "attempt", "task", "user"):
            with pytest.raises(ValueError, match=f"{field!r} is notata's own"):
                log.meta(**{field: "converged"})
        log.meta(solver_status="converged")
    assert LogReader(log.path).meta["solver_status"] == "converged"


def test_runs_whose_lives_overlap_keep_the_users_handler(base: Path) -> None:
    import signal

    def mine(signum: int, frame: object) -> None:
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        b = Logbook("b", base)
        a = Logbook("a", base)
        b.close()
        a.close()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("kind", ["folder", "dangling", "outside"])
def test_a_lock_path_that_is_not_a_plain_file_is_refused(base: Path, tmp_path: Path,
                                                         kind: str) -> None:
    from notata.errors import RunDirError

    with pytest.raises(ValueError), Logbook("odd", base):
        raise ValueError("fails")
    lock = base / "log_odd" / ".lock"
    lock.unlink()
    outside = tmp_path / "outside.txt"
    outside.write_text("not notata's")
    if kind == "folder":
        lock.mkdir()
    else:
        lock.symlink_to(tmp_path / "nothing" if kind == "dangling" else outside)
    with pytest.raises(RunDirError, match="not a plain file"):
        Logbook("odd", base, resume=True)
    assert outside.read_text() == "not notata's" and not (tmp_path / "nothing").exists()
    from notata.collector import scan

    [r] = scan(base).runs
    assert r.status == "corrupt" and ".lock" in (r.reason or "")


def test_an_overwrite_killed_while_it_clears_the_old_run_never_reads_complete(
        base: Path) -> None:
    """overwrite=True deletes the old files before its first write; a kill in between once
    left the old "complete" over half the outputs."""
    from helpers import python

    from notata.collector import scan

    with Logbook("o", base) as log:
        for i in range(20):
            log.save_text(f"out{i}", "old")
    proc = python("""
        import pathlib, sys, time
        real = pathlib.Path.unlink
        def slow_unlink(self, *a, **k):
            real(self, *a, **k)
            print("deleting", flush=True)
            time.sleep(30)
        pathlib.Path.unlink = slow_unlink
        import notata, shutil
        shutil.rmtree = lambda p, *a, **k: slow_unlink(pathlib.Path(p))
        notata.Logbook("o", sys.argv[1], overwrite=True)
        """, str(base))
    assert proc.stdout and proc.stdout.readline().strip() == "deleting"
    proc.kill()
    proc.wait()
    assert read_meta_status(log.path) == "initialized"
    [r] = scan(base).runs
    assert r.status == "stale"


def read_meta_status(run: Path) -> str:
    return str(json.loads((run / "metadata.json").read_text())["status"])


def test_a_forked_worker_never_keeps_its_parents_run_locked(base: Path) -> None:
    from helpers import python

    from notata import lock

    proc = python("""
        import os, sys, time
        from notata import Logbook
        log = Logbook("w", sys.argv[1])
        worker = os.fork()
        if worker == 0:
            os.write(1, f"worker {os.getpid()}\\n".encode())  # one write: never interleaved
            time.sleep(60)  # a worker that outlives its parent
            os._exit(0)
        os.write(1, b"open\\n")
        time.sleep(60)
        """, str(base))
    assert proc.stdout
    lines = [proc.stdout.readline().split() for _ in range(2)]  # both ready, in any order
    assert ["open"] in lines
    [worker] = [words[1] for words in lines if words[0] == "worker"]
    proc.kill()  # the run's process dies; its forked worker lives on
    proc.wait()
    try:
        assert not lock.is_held(base / "log_w")
        with Logbook("w", base, resume=True) as log:
            assert log.attempt == 2
    finally:
        os.kill(int(worker), 9)


def test_a_logbook_cannot_be_pickled_or_copied_and_its_job_id_is_as_recorded(
        base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import copy
    import pickle

    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # scontrol cannot find it: the environment says
    with Logbook("r", base) as log:
        for copy_it in (pickle.dumps, copy.deepcopy, copy.copy):
            with pytest.raises(TypeError, match="cannot be pickled"):
                copy_it(log)
        assert log.job_id == 4242
        assert json.loads((log.path / "metadata.json").read_text())["slurm"]["job_id"] == 4242


def test_each_attempt_records_its_own_peak(base: Path) -> None:
    """The kernel keeps one high-water mark per process: a later run in the same process
    must not inherit an earlier run's peak."""
    from helpers import python

    proc = python("""
        import sys, time
        from notata import Logbook
        with Logbook("big", sys.argv[1], heartbeat=0.05):
            import subprocess
            subprocess.run(["true"])  # a small child: its figure is not the run's peak
            hold = bytearray(300 * 2**20)
            for i in range(0, len(hold), 4096):
                hold[i] = 1
            time.sleep(0.4)  # a beat samples it
            del hold
        with Logbook("small", sys.argv[1], heartbeat=0.05):
            time.sleep(0.4)
        """, str(base))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    used = {name: json.loads((base / f"log_{name}" / "metadata.json").read_text())
            ["resources"]["used"] for name in ("big", "small")}
    assert used["big"]["peak_rss_bytes"] >= 300 * 2**20
    assert used["small"]["peak_rss_bytes"] < 200 * 2**20, used
    assert "asked" not in json.loads((base / "log_small" / "metadata.json").read_text())[
        "resources"]  # no scheduler: nothing was asked of one
