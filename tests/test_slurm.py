"""sbatch submission: rendered scripts (text compared), and real arrays on the test cluster."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import job_gone, read_meta, status_is, wait_for

from notata import submissions
from notata.cli import main
from notata.manifest import load
from notata.slurm import ArrayPlan, plan_arrays, render

HOSTILE = [
    "two words",
    "$(id)",
    "`id`",
    "a;b",
    "it's",
    'say "hi"',
    "#x",
    "ünï",
    "tab\tx",
    "line1\nline2",
    "x" * 300,
]


def write_manifest(base: Path, text: str, name: str = "sweep.yaml") -> Path:
    p = base / name
    p.write_text(text)
    return p


def test_plan_arrays_splits_at_the_limit_and_compacts_subsets() -> None:
    assert plan_arrays(list(range(1002)), 1001) == [
        ArrayPlan(0, tuple(range(1001))),
        ArrayPlan(1001, (1001,)),
    ]
    plans = plan_arrays([1, 2, 3, 7, 9, 10, 5000, 5001], 1001)
    assert [(p.offset, p.spec) for p in plans] == [(1, "0-2,6,8-9"), (5000, "0-1")]
    many = plan_arrays(list(range(0, 100_000, 2)), 1_000_000)
    assert sum(len(p.indices) for p in many) == 50_000 and all(len(p.spec) < 4100 for p in many)


EXEC_TAIL = """python3 sim.py '{w}' '$HOME' '`id`' 'a b' 'it'"'"'s' 'line1'$'\\n''line2'"""


def test_rendered_script_quotes_everything(base: Path) -> None:
    manifest = write_manifest(base, "name: q\nzip:\n  w: " + json.dumps(HOSTILE) + "\n")
    sweep = load(manifest)
    argv = ["python3", "sim.py", "{w}", "$HOME", "`id`", "a b", "it's", "line1\nline2"]
    script = base / "job.sbatch"
    text = render(
        sweep,
        ArrayPlan(0, tuple(range(len(sweep)))),
        argv,
        {"partition": "debug", "time": "0:10:00"},
        ["--exclusive"],
        throttle=4,
        warn_before=90,
        script=script,
        python="/venv/bin/python",
    )
    body = re.sub(r"\), .*\.\n", "), TIME.\n", text, count=1)
    out = sweep.base_dir / ".notata" / "slurm-%A_%a.out"
    expected = f"""#!/bin/bash
# Written by notata submit for sweep q (manifest hash {sweep.hash}), TIME.
# Sweep task index = SLURM_ARRAY_TASK_ID + NOTATA_TASK_OFFSET; this array covers tasks 0-10.
# To run it again as it is: sbatch {shlex.quote(str(script))}
#SBATCH --array=0-10%4
#SBATCH --job-name="q"
#SBATCH --output="{out}"
#SBATCH --partition="debug"
#SBATCH --time="0:10:00"
#SBATCH --signal=B:USR1@90
#SBATCH --exclusive
export NOTATA_TASK_OFFSET=0
# exec: the batch shell becomes notata, so that --signal=B:USR1 reaches it.
exec /venv/bin/python -m notata exec {shlex.quote(str(manifest))} -- {EXEC_TAIL}
"""
    assert body == expected
    # bash reads the exec line back as exactly these words (params never reach the shell)
    words = subprocess.run(
        ["bash", "-c", text.splitlines()[-1].replace("exec ", "printf '%s\\0' ", 1)],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")[:-1]
    assert [w.decode() for w in words] == [
        "/venv/bin/python",
        "-m",
        "notata",
        "exec",
        str(manifest),
        "--",
        *argv,
    ]


def test_values_that_cannot_be_sbatch_options_are_refused(
    base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(base, 'name: q\ngrid: {a: [1]}\nslurm: {partition: "a\\"b"}\n')
    assert main(["submit", str(manifest), "--backend", "slurm", "--dry-run", "--", "true"]) == 2
    assert "cannot be passed to sbatch safely" in capsys.readouterr().err
    manifest = write_manifest(base, "name: q\ngrid: {a: [1]}\nslurm: {nodes: 2}\n")
    assert main(["submit", str(manifest), "--backend", "slurm", "--dry-run", "--", "true"]) == 2
    assert "unknown slurm option 'nodes'" in capsys.readouterr().err
    assert not (base / "outputs").exists()


def test_dry_run_prints_every_array_and_submits_nothing(
    base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_manifest(base, f"name: big\ngrid: {{i: {list(range(2500))}}}\n")
    assert main(["submit", str(manifest), "--backend", "slurm", "--dry-run", "--", "true"]) == 0
    out = capsys.readouterr().out
    assert out.count("# sbatch --parsable") == 3  # test cluster: MaxArraySize=1001
    assert re.findall(r"--array=(\S+)", out) == ["0-1000", "0-1000", "0-497"]
    assert re.findall(r"NOTATA_TASK_OFFSET=(\d+)", out) == ["0", "1001", "2002"]
    assert not (base / "outputs").exists()


# -- on the real test cluster --------------------------------------------------------------------


def wait_all(
    base: Path, run_ids: list[str], status: str = "complete", timeout: float = 300
) -> None:
    for rid in run_ids:
        wait_for(status_is(base / "outputs" / f"log_{rid}", status), timeout, f"{rid} {status}")


def test_a_sweep_of_20_through_sbatch(slurm_cluster: str, base: Path) -> None:
    manifest = write_manifest(
        base, f"name: s20\ngrid: {{i: {list(range(20))}}}\nslurm: {{time: '00:05:00'}}\n"
    )
    assert (
        main(
            [
                "submit",
                str(manifest),
                "--backend",
                "slurm",
                "--",
                "sh",
                "-c",
                "echo task {i} of $NOTATA_RUN_ID",
            ]
        )
        == 0
    )
    [record] = submissions.read(base / "outputs")
    job = record["job_ids"][0]
    assert record["backend"] == "slurm" and record["tasks"] == "0-19" and record["count"] == 20
    wait_all(base, [f"i{i}" for i in range(20)])
    for i in (0, 13):
        d = base / "outputs" / f"log_i{i}"
        meta = read_meta(d)
        assert meta["task"] == i and meta["slurm"]["array_job_id"] == int(job)
        assert meta["slurm"]["array_task_id"] == i
        assert f"task {i} of i{i}" in (d / "stdout.txt").read_text()
    script = Path(record["arrays"][0]["script"])
    assert script.exists() and "--array=0-19" in script.read_text()


def test_throttle_subset_and_split_on_the_cluster(slurm_cluster: str, base: Path) -> None:
    manifest = write_manifest(base, f"name: big\ngrid: {{i: {list(range(1002))}}}\n")
    # a subset across MaxArraySize: two arrays, offsets 0 and 1001
    assert (
        main(
            [
                "submit",
                str(manifest),
                "--backend",
                "slurm",
                "--tasks",
                "0-2,1000-1001",
                "--throttle",
                "2",
                "--",
                "sh",
                "-c",
                "sleep 1",
            ]
        )
        == 0
    )
    [record] = submissions.read(base / "outputs")
    assert [(a["offset"], a["spec"]) for a in record["arrays"]] == [(0, "0-2,1000"), (1001, "0")]
    peak = 0
    deadline = time.monotonic() + 300
    while not all(job_gone(j)() for j in record["job_ids"]):
        out = subprocess.run(
            ["squeue", "-h", "-r", "-t", "R", "-j", record["job_ids"][0], "-o", "%i"],
            capture_output=True,
            text=True,
        ).stdout
        peak = max(peak, len(out.split()))
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert peak <= 2  # %2 held
    wait_all(base, ["i0", "i1", "i2", "i1000", "i1001"])
    assert sorted(p.name for p in (base / "outputs").glob("log_*")) == [
        "log_i0",
        "log_i1",
        "log_i1000",
        "log_i1001",
        "log_i2",
    ]
    assert read_meta(base / "outputs" / "log_i1001")["slurm"]["array_task_id"] == 0


def test_hostile_params_reach_the_payload_verbatim(slurm_cluster: str, base: Path) -> None:
    manifest = write_manifest(
        base,
        "name: h\nrun_id: 'h{n}'\nzip:\n  w: "
        + json.dumps(HOSTILE)
        + f"\n  n: {list(range(len(HOSTILE)))}\n",
    )
    code = (
        "import json, os, sys; open(os.environ['NOTATA_RUN_DIR'] + '/got.json', 'w')"
        ".write(json.dumps([sys.argv[1], json.loads(os.environ['NOTATA_PARAMS'])['w']]))"
    )
    assert (
        main(
            ["submit", str(manifest), "--backend", "slurm", "--", sys.executable, "-c", code, "{w}"]
        )
        == 0
    )
    sweep = load(manifest)
    for t in sweep:
        wait_for(status_is(t.run_dir, "complete"), 300, f"task {t.index}")
        assert json.loads((t.run_dir / "got.json").read_text()) == [HOSTILE[t.index]] * 2


def test_time_limit_warning_and_scancel_are_recorded(slurm_cluster: str, base: Path) -> None:
    payload = base / "payload.py"
    payload.write_text("""
import os, signal, sys, time
def warned(signum, frame):
    open(os.environ["NOTATA_RUN_DIR"] + "/warned", "w").write("USR1")
signal.signal(signal.SIGUSR1, warned)
while True:
    time.sleep(0.1)
""")
    manifest = write_manifest(base, "name: t\nruns: [{case: limit}, {case: cancel}]\n")
    assert (
        main(
            [
                "submit",
                str(manifest),
                "--backend",
                "slurm",
                "--time",
                "2",  # the warning must fit: 30 s + SLURM's 60 s slack + 30 s to start
                "--warn-before",
                "30",
                "--",
                sys.executable,
                str(payload),
            ]
        )
        == 0
    )
    [record] = submissions.read(base / "outputs")
    limit, cancel = (base / "outputs" / f"log_case{c}" for c in ("limit", "cancel"))
    wait_for(status_is(cancel, "running"), 120, "the task to start")
    subprocess.run(["scancel", f"{record['job_ids'][0]}_1"], check=True)
    wait_for(status_is(cancel, "cancelled"), 60, "cancelled")
    wait_for(job_gone(record["job_ids"][0]), 300, "the time limit")
    meta = read_meta(limit)
    assert meta["status"] == "timeout" and (limit / "warned").read_text() == "USR1"
    assert [s["signal"] for s in meta["signals"]] == ["SIGUSR1", "SIGTERM"]


def test_sbatch_errors_are_one_clear_line(slurm_cluster: str, base: Path) -> None:
    manifest = write_manifest(base, "name: e\ngrid: {a: [1]}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "notata",
            "submit",
            str(manifest),
            "--backend",
            "slurm",
            "--partition",
            "nosuch",
            "--",
            "true",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("notata submit: sbatch failed:") and "partition" in line.lower()
    assert submissions.read(base / "outputs") == []


def test_a_warning_that_cannot_fit_the_time_limit_is_moved_or_dropped(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SLURM may send --signal up to 60 s early: at a 1-minute limit, a 120 s warning came
    at once and killed the batch shell before notata started (seen on the test cluster)."""
    from notata.slurm import fit_warning, time_limit_sec

    assert [time_limit_sec(v) for v in ("1", "1:30", "2:00:00", "1-0", "1-2:3", "INFINITE")] \
        == [60, 90, 7200, 86400, 93780, None]
    assert fit_warning(120, "1") == 0 and fit_warning(120, "3") == 90
    assert fit_warning(120, "3:30") == 120 and fit_warning(120, None) == 120
    manifest = write_manifest(base, "name: w\nruns: [{case: a}]\n")
    for time_limit, expected in (("1", None), ("3", "90"), ("10", "120")):
        assert main(["submit", str(manifest), "--backend", "slurm", "--dry-run", "--time",
                     time_limit, "--", "true"]) == 0
        out, err = capsys.readouterr()
        signal_lines = [line for line in out.splitlines() if line.startswith("#SBATCH --signal")]
        if expected is None:
            assert signal_lines == [] and "not asking for one" in err
        else:
            assert signal_lines == [f"#SBATCH --signal=B:USR1@{expected}"]
            assert ("does not fit" in err) == (expected != "120")
