"""Which code each run ran (notata.provenance): recorded per submission and per run, and
flagged by ``notata status`` when a sweep mixes versions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, python, read_meta, submit, wait_for, write_sweep

from notata import provenance
from notata.cli import main
from notata.manifest import load

SIM = """\
import os, sys, time
go = os.path.join(os.path.dirname(os.path.abspath(__file__)), "go")
if sys.argv[1] == "0":  # the first task waits, so the others start after a change
    while not os.path.exists(go):
        time.sleep(0.05)
print("k", sys.argv[1])
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository holding the sweep's script (the runs' folder ignored)."""
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q")
    git(r, "config", "user.email", "t@example.org")
    git(r, "config", "user.name", "t")
    (r / "sim.py").write_text(SIM)
    (r / ".gitignore").write_text("out/\ngo\n")
    git(r, "add", "-A")
    git(r, "commit", "-qm", "one")
    return r


def meta_of(run: Path) -> dict[str, object]:
    try:
        return read_meta(run)
    except (OSError, ValueError):
        return {}


def change(repo: Path, commit: bool) -> str:
    with (repo / "sim.py").open("a") as f:
        f.write("# changed\n")
    if commit:
        git(repo, "commit", "-qam", "two")
    return git(repo, "rev-parse", "HEAD")


def test_status_flags_a_sweep_that_ran_two_commits_and_names_the_tasks(
        repo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two submissions with a commit between: each run records the commit it ran, the
    submissions theirs; status names which tasks ran which."""
    monkeypatch.chdir(repo)
    manifest = write_sweep(repo, "name: p\nbase_dir: out\nrun_id: 'k{k}'\n"
                                 "grid: {k: [0, 1, 2, 3]}\n")
    (repo / "go").touch()
    first = git(repo, "rev-parse", "HEAD")
    cmd = [sys.executable, "sim.py", "{k}"]
    assert submit(manifest, "--backend", "local", "--tasks", "0-1", "--", *cmd) == 0
    second = change(repo, commit=True)
    assert submit(manifest, "--backend", "local", "--tasks", "2-3", "--", *cmd) == 0
    sweep = load(manifest)
    for task, commit in ((0, first), (1, first), (2, second), (3, second)):
        code = read_meta(sweep.task(task).run_dir)["provenance"]
        assert code["commit"] == commit and code["dirty"] is False and code["diff"] is None
        assert code["repo"] == str(repo.resolve()) and len(code["env"]) == 16
    capsys.readouterr()
    assert main(["status", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "the sweep's runs ran 2 versions of the code:" in out
    assert f"tasks 0-1: commit {first[:10]}" in out and f"tasks 2-3: commit {second[:10]}" in out
    assert "not the code they were submitted with" not in out
    # the package list of the environment, saved once, named by its hash
    packages = list((repo / "out" / ".notata" / "code").glob("env-*.txt"))
    assert len(packages) == 1 and "numpy" in packages[0].read_text().lower()


def test_code_that_changed_while_tasks_waited_is_flagged(
        repo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tasks run what is there when they start: a change made while they waited (here, in
    the local backend's queue behind task 0) is theirs, and status says they did not run
    what was submitted; uncommitted changes are saved as a diff."""
    monkeypatch.chdir(repo)
    manifest = write_sweep(repo, "name: p\nbase_dir: out\nrun_id: 'k{k}'\n"
                                 "grid: {k: [0, 1, 2]}\n")
    proc = python("import sys; from notata.cli import main; sys.exit(main(sys.argv[1:]))",
                  "submit", str(manifest), "--backend", "local", "-j", "1", "--",
                  sys.executable, "sim.py", "{k}", cwd=repo)
    try:
        sweep = load(manifest)
        wait_for(lambda: "provenance" in meta_of(sweep.task(0).run_dir), 60, "task 0 to start")
        first = git(repo, "rev-parse", "HEAD")
        change(repo, commit=False)  # uncommitted: dirty
        (repo / "go").touch()
        assert proc.wait(60) == 0, proc.communicate()
    finally:
        proc.kill()
    metas = [read_meta(sweep.task(t).run_dir)["provenance"] for t in range(3)]
    assert metas[0]["dirty"] is False and metas[1]["dirty"] is metas[2]["dirty"] is True
    assert {m["commit"] for m in metas} == {first}
    capsys.readouterr()
    assert main(["status", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert f"tasks 1-2 ran commit {first[:10]} with uncommitted changes (diff " \
           f"{metas[1]['diff']})" in out
    assert "not the code they were submitted with" in out
    patch = repo / "out" / ".notata" / "code" / f"diff-{metas[1]['diff']}.patch"
    # the diff saved at submission is the one the runs ran only if it was there then:
    # here the change came later, so the runs name a diff no submission saved
    assert not patch.exists()


def test_a_submission_saves_its_uncommitted_diff(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo)
    manifest = write_sweep(repo, "name: p\nbase_dir: out\nrun_id: 'k{k}'\ngrid: {k: [1]}\n")
    change(repo, commit=False)
    assert submit(manifest, "--backend", "local", "--", sys.executable, "sim.py", "{k}") == 0
    code = read_meta(load(manifest).task(0).run_dir)["provenance"]
    patch = repo / "out" / ".notata" / "code" / f"diff-{code['diff']}.patch"
    assert "+# changed" in patch.read_text()


def test_a_run_outside_git_records_that_it_has_none(tmp_path: Path) -> None:
    script = tmp_path / "plain.py"
    script.write_text("import sys\nfrom notata import Logbook\n"
                      "with Logbook('r', sys.argv[1]):\n    pass\n")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    code = read_meta(tmp_path / "log_r")["provenance"]
    assert code["commit"] is None and "not a git repository" in code["why"]
    assert len(code["env"]) == 16 and len(code["state"]) == 16


def test_provenance_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTATA_PROVENANCE", "0")
    from notata import Logbook

    with Logbook("r", tmp_path):
        pass
    assert "provenance" not in read_meta(tmp_path / "log_r")


def test_the_subject_of_a_command_is_its_script(tmp_path: Path) -> None:
    (tmp_path / "sim.py").write_text("")
    assert provenance.subject_of(["python3", "sim.py", "{k}"], str(tmp_path)) == \
        str((tmp_path / "sim.py").resolve())
    assert provenance.subject_of(["--python", "sim.py:run"], str(tmp_path)) == \
        str(tmp_path / "sim.py")
    assert provenance.subject_of([sys.executable, "-c", "pass"], str(tmp_path)) == \
        str(tmp_path)  # the interpreter is not the code


def test_a_repository_that_tracks_the_runs_is_one_version(
        repo: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs write into their base folder: that is not a change of the code, even where
    git tracks it (a careless git add -A after the first tasks)."""
    monkeypatch.chdir(repo)
    (repo / ".gitignore").write_text("go\n")
    manifest = write_sweep(repo, "name: p\nbase_dir: out\nrun_id: 'k{k}'\n"
                                 "grid: {k: [1, 2, 3]}\n")
    cmd = ["--", sys.executable, "sim.py", "{k}"]
    assert submit(manifest, "--backend", "local", "--tasks", "0", *cmd) == 0
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "with the first run")
    assert submit(manifest, "--backend", "local", *cmd) == 0
    metas = [read_meta(load(manifest).task(t).run_dir)["provenance"] for t in (1, 2)]
    assert metas[0]["state"] == metas[1]["state"] and metas[0]["dirty"] is False
    capsys.readouterr()
    assert main(["status", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "not the code they were submitted with" not in out
    assert "versions of the code" in out  # task 0 ran before the commit: two, rightly


def test_a_function_from_a_notebook_names_no_file(tmp_path: Path) -> None:
    """A notebook cell's function names a file that does not exist: its code is the
    working folder's, at submission and in the job alike."""
    namespace: dict[str, object] = {}
    exec(compile("def f(p, log):\n    pass\n", str(tmp_path / "ipykernel_1" / "123.py"),
                 "exec"), namespace)
    assert provenance.subject_of_function(namespace["f"]) == os.getcwd()
