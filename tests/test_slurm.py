"""sbatch submission: rendered scripts (text compared), and real arrays on the test cluster."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import job_gone, read_meta, status_is, submit, wait_for, write_sweep

import notata
from notata import submissions
from notata.cli import main
from notata.manifest import load
from notata.sbatch import ArrayPlan, plan_arrays, render

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


@pytest.mark.parametrize("listed", ["n1", "n[1-3]", "n[1-3,7],gpu[01-02]", "a[1-2]b[08-10]",
                                    "x[1-3],y,z[5]"])
def test_a_jobs_host_list_expands_as_scontrol_expands_it(listed: str) -> None:
    """A multi-node job's SLURM_JOB_NODELIST names each of its nodes, as SLURM's own
    ``scontrol show hostnames`` says (without asking the controller)."""
    from notata.slurm import hostnames

    if not shutil.which("scontrol"):
        pytest.fail("scontrol is not installed: scripts/slurm-local.sh install")
    said = subprocess.run(["scontrol", "show", "hostnames", listed], capture_output=True,
                          text=True, check=True).stdout.split()
    assert hostnames(listed) == said


def test_a_host_list_that_is_not_one_names_no_node() -> None:
    from notata.slurm import hostnames

    for odd in ("", "n[1-2", "n[a-b]", "n1,,n2", "n[0-999999]", "n]1[",
                # more hosts than any sweep task's job has: refused before they are made
                "n[1-4096]x[1-4096]", "n[" + ",".join(["0-4096"] * 2000) + "]",
                ",".join(f"a{i}" for i in range(20000)), "n[1-" + "9" * 5000 + "]"):
        assert hostnames(odd) == [], odd[:40]


def test_a_multi_node_job_is_in_trouble_when_any_of_its_nodes_is() -> None:
    """The collector's node rules hold for a job over several nodes: the first node in
    trouble is named; a job all of whose nodes are well says nothing."""
    from notata.queue import Queue

    meta = {"slurm": {"job_id": 7, "nodelist": "n[1-3]"}}
    queue = Queue({"7": "RUNNING"}, nodes={"n1": "allocated", "n2": "allocated*",
                                           "n3": "down*"})
    assert queue.node_trouble(meta) == "node n2 is not responding"
    well = Queue({"7": "RUNNING"}, nodes={"n1": "allocated", "n2": "mixed", "n3": "idle"})
    assert well.node_trouble(meta) is None


def test_plan_arrays_splits_at_the_limit_and_compacts_subsets() -> None:
    assert plan_arrays(list(range(1002)), 1001) == [
        ArrayPlan(0, tuple(range(1001))),
        ArrayPlan(1001, (1001,)),
    ]
    [plan] = plan_arrays([1, 2, 3, 7, 9, 10], 1001)
    assert (plan.offset, plan.spec, plan.listed) == (1, "0-2,6,8-9", False)
    # two MaxArraySize spans would be two arrays by offset; listed, they are one
    [listed] = plan_arrays([1, 2, 3, 7, 9, 10, 5000, 5001], 1001)
    assert (listed.spec, listed.task_map) == ("0-7", "1-3,7,9-10,5000-5001")
    many = plan_arrays(list(range(0, 100_000, 2)), 1_000_000)
    assert sum(len(p.indices) for p in many) == 50_000 and all(len(p.spec) < 4100 for p in many)
    assert all(p.listed and len(p.task_map) < 31_000 for p in many) and len(many) < 20


def test_tasks_scattered_over_a_large_sweep_share_an_array_by_their_list() -> None:
    """1,000 failures spread over 10^5 tasks: by offset, one array per MaxArraySize span
    (100 of them); listed, one array per MaxArraySize tasks, each task found by its
    position in the list, in the job script and in a job's environment."""
    from notata.array import task_index

    scattered = list(range(99, 100_000, 100))
    [plan] = plan_arrays(scattered, 1001)
    assert plan.listed and plan.spec == "0-999" and plan.task_map == ",".join(map(str, scattered))
    assert len(plan_arrays(scattered, 100)) == 10
    env = {"SLURM_ARRAY_TASK_ID": "7", "NOTATA_TASK_MAP": plan.task_map,
           "NOTATA_TASK_OFFSET": "0"}
    assert task_index(env) == (799, True)
    with pytest.raises(notata.UsageError, match="outside NOTATA_TASK_MAP"):
        task_index({**env, "SLURM_ARRAY_TASK_ID": "1000"})
    with pytest.raises(notata.UsageError, match="is not a task list"):
        task_index({**env, "NOTATA_TASK_MAP": "1;rm -rf"})
    contiguous = plan_arrays(list(range(5, 2500)), 1001)  # as many either way: by offset
    assert [p.listed for p in contiguous] == [False] * 3


EXEC_TAIL = """python3 sim.py '{w}' '$HOME' '`id`' 'a b' 'it'"'"'s' 'line1'$'\\n''line2'"""


def test_rendered_script_quotes_everything(base: Path) -> None:
    manifest = write_sweep(base, "name: q\nzip:\n  w: " + json.dumps(HOSTILE) + "\n")
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
    from notata.array import RUN_VARIABLES

    assert "NOTATA_TASK" in RUN_VARIABLES and "NOTATA_WRAPPER_PID" in RUN_VARIABLES
    UNSET = " ".join(sorted(RUN_VARIABLES))  # noqa: N806
    expected = f"""#!/bin/bash
# Written by notata submit for sweep q (manifest hash {sweep.hash}), TIME.
# Sweep task index = SLURM_ARRAY_TASK_ID + NOTATA_TASK_OFFSET, or, when NOTATA_TASK_MAP lists
# the tasks, its (SLURM_ARRAY_TASK_ID)-th entry; packed (NOTATA_PACK=N), array task K runs
# entries K*N to K*N+N-1 of the list, one after another; this array covers tasks 0-10.
# To run it again as it is: sbatch {shlex.quote(str(script))}
#SBATCH --array=0-10%4
#SBATCH --job-name="q"
#SBATCH --output="{out}"
#SBATCH --partition="debug"
#SBATCH --time="0:10:00"
#SBATCH --signal=B:USR1@90
#SBATCH --exclusive
# A task that submits the next sweep passes on its environment: none of its run's variables.
unset {UNSET}
export NOTATA_TASK_OFFSET=0 NOTATA_TASK_MAP='' NOTATA_PACK= NOTATA_PACK_PARALLEL=
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
    manifest = write_sweep(base, 'name: q\ngrid: {a: [1]}\nslurm: {partition: "a\\"b"}\n')
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--", "true") == 2
    assert "cannot be passed to sbatch safely" in capsys.readouterr().err
    manifest = write_sweep(base, "name: q\ngrid: {a: [1]}\nslurm: {nodes: 2}\n")
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--", "true") == 2
    assert "unknown slurm option 'nodes'" in capsys.readouterr().err
    assert not (base / "outputs").exists()


@pytest.mark.parametrize("line", ["--mem=100M", "#SBATCH --time 10", "-t 5", "-c4",
                                  "--partition=debug", "--parti=debug", "--outp=x.out",
                                  "--qo=normal", "-Qt 7", "-Hp debug", "-Qc2",
                                  "#SBATCH--partition=x"])
def test_an_extra_line_may_not_set_an_option_notata_sets(
        base: Path, capsys: pytest.CaptureFixture[str], line: str) -> None:
    """A later #SBATCH line wins over an earlier one: a raw --mem would undo a retry's
    escalated --mem without a word. So a line setting a named option is refused, naming
    the option to use; --mem-per-cpu gives way to a --mem that is given."""
    from notata.sbatch_options import options_for

    manifest = write_sweep(base, "name: q\ngrid: {a: [1]}\n")
    assert submit(manifest, "--backend", "slurm", "--dry-run", f"--sbatch-line={line}",
                  "--", "true") == 2
    err = capsys.readouterr().err
    assert "has a name of its own: give it as --" in err and len(err.splitlines()) == 1, err
    _, extra, _ = options_for({"extra": ["--mem-per-cpu=2G", "--exclusive", "--mail-type=END",
                                         "--comment=x", "--constraint=a", "--mem-per-c=1G",
                                         "-w node-p1", "-N 1", '--comment="run -t 3"']},
                              {"mem": "4G"}, "x.yaml")
    assert extra == ["--exclusive", "--mail-type=END", "--comment=x", "--constraint=a",
                     "-w node-p1", "-N 1", '--comment="run -t 3"']
    with pytest.raises(notata.ManifestError, match="notata sets the job array"):
        options_for({"extra": ["--arr=0-3"]}, {}, "x.yaml")
    assert "--mem 4G replaces --mem-per-c=1G; --mem-per-cpu=2G" in capsys.readouterr().err
    assert not (base / "outputs").exists()


def test_a_percent_sign_in_the_base_folder_stays_itself_in_output_paths(
        tmp_path: Path) -> None:
    """sbatch fills %A, %a, %j... in --output: a folder named "100%x" must not become
    "100<job name>"."""
    from notata.sbatch import render_job

    folder = tmp_path / "runs 100%x"
    folder.mkdir()
    sweep = load(write_sweep(folder, "name: pc\ngrid: {a: [1]}\n"))
    script = render(sweep, ArrayPlan(0, (0,)), ["true"], {}, [], throttle=None, warn_before=0,
                    script=tmp_path / "a.sbatch")
    assert f'--output="{folder}/outputs/.notata/slurm-%A_%a.out"'.replace(
        "100%x", "100%%x") in script
    job = render_job(sweep, ["true"], {}, script=tmp_path / "j.sbatch", purpose="x")
    assert "100%%x/outputs/.notata/job-%j.out" in job


def test_dry_run_prints_every_array_and_submits_nothing(
    base: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write_sweep(base, f"name: big\ngrid: {{i: {list(range(2500))}}}\n")
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--", "true") == 0
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
    manifest = write_sweep(
        base, f"name: s20\ngrid: {{i: {list(range(20))}}}\nslurm: {{time: '00:05:00'}}\n")
    assert submit(manifest, "--backend", "slurm", "--", "sh", "-c",
                  "echo task {i} of $NOTATA_RUN_ID") == 0
    [record] = submissions.submitted(base / "outputs")
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
    manifest = write_sweep(base, f"name: big\ngrid: {{i: {list(range(1002))}}}\n")
    # a subset across MaxArraySize: by offset two arrays (0 and 1001); one listing its tasks
    assert submit(manifest, "--backend", "slurm", "--tasks", "0-2,1000-1001", "--throttle", "2",
                  "--", "sh", "-c", "sleep 1") == 0
    records = submissions.submitted(base / "outputs")  # one line per array, one submission
    assert [(r["part"], r["parts"]) for r in records] == [(0, 1)]
    assert [(a["offset"], a["spec"], a["map"]) for r in records for a in r["arrays"]] == [
        (0, "0-4", "0-2,1000-1001")]
    job_ids = [j for r in records for j in r["job_ids"]]
    from notata import collect
    seen = {r.task: r.status for r in collect(manifest).read if r.task in (0, 1, 2, 1000, 1001)}
    assert "missing" not in seen.values() and len(seen) == 5, seen  # queued: pending
    peak = 0
    deadline = time.monotonic() + 300
    while not all(job_gone(j)() for j in job_ids):
        out = subprocess.run(
            ["squeue", "-h", "-r", "-t", "R", "-j", job_ids[0], "-o", "%i"],
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
    meta = read_meta(base / "outputs" / "log_i1001")  # the 5th task of the list
    assert (meta["task"], meta["slurm"]["array_task_id"]) == (1001, 4)


def test_hostile_params_reach_the_payload_verbatim(slurm_cluster: str, base: Path) -> None:
    manifest = write_sweep(
        base,
        "name: h\nrun_id: 'h{n}'\nzip:\n  w: "
        + json.dumps(HOSTILE)
        + f"\n  n: {list(range(len(HOSTILE)))}\n",
    )
    code = (
        "import json, os, sys; open(os.environ['NOTATA_RUN_DIR'] + '/got.json', 'w')"
        ".write(json.dumps([sys.argv[1], json.loads(os.environ['NOTATA_PARAMS'])['w']]))"
    )
    assert submit(manifest, "--backend", "slurm", "--", sys.executable, "-c", code, "{w}") == 0
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
    manifest = write_sweep(base, "name: t\nruns: [{case: limit}, {case: cancel}]\n")
    # the warning must fit the time limit: 30 s + SLURM's 60 s slack + 30 s to start
    assert submit(manifest, "--backend", "slurm", "--time", "2", "--warn-before", "30", "--",
                  sys.executable, str(payload)) == 0
    [record] = submissions.submitted(base / "outputs")
    limit, cancel = (base / "outputs" / f"log_case{c}" for c in ("limit", "cancel"))
    wait_for(status_is(cancel, "running"), 120, "the task to start")
    subprocess.run(["scancel", f"{record['job_ids'][0]}_1"], check=True)
    wait_for(status_is(cancel, "cancelled"), 60, "cancelled")
    wait_for(job_gone(record["job_ids"][0]), 300, "the time limit")
    meta = read_meta(limit)
    assert meta["status"] == "timeout" and (limit / "warned").read_text() == "USR1"
    assert [s["signal"] for s in meta["signals"]] == ["SIGUSR1", "SIGTERM"]


def test_sbatch_errors_are_one_clear_line(slurm_cluster: str, base: Path) -> None:
    manifest = write_sweep(base, "name: e\ngrid: {a: [1]}\n")
    proc = subprocess.run([sys.executable, "-m", "notata", "submit", str(manifest), "--backend",
                           "slurm", "--partition", "nosuch", "--", "true"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("notata submit: sbatch failed:") and "partition" in line.lower()
    assert submissions.submitted(base / "outputs") == []


def test_a_warning_that_cannot_fit_the_time_limit_is_moved_or_dropped(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SLURM may send --signal up to 60 s early: at a 1-minute limit, a 120 s warning came
    at once and killed the batch shell before notata started (seen on the test cluster)."""
    from notata.sbatch_options import fit_warning, time_limit_sec

    assert [time_limit_sec(v) for v in ("1", "1:30", "2:00:00", "1-0", "1-2:3", "INFINITE")] \
        == [60, 90, 7200, 86400, 93780, None]
    assert fit_warning(120, "1") == 0 and fit_warning(120, "3") == 90
    assert fit_warning(120, "3:30") == 120 and fit_warning(120, None) == 120
    manifest = write_sweep(base, "name: w\nruns: [{case: a}]\n")
    for time_limit, expected in (("1", None), ("3", "90"), ("10", "120")):
        assert submit(manifest, "--backend", "slurm", "--dry-run", "--time", time_limit, "--",
                      "true") == 0
        out, err = capsys.readouterr()
        signal_lines = [line for line in out.splitlines() if line.startswith("#SBATCH --signal")]
        if expected is None:
            assert signal_lines == [] and "not asking for one" in err
        else:
            assert signal_lines == [f"#SBATCH --signal=B:USR1@{expected}"]
            assert ("does not fit" in err) == (expected != "120")


def _cancel(records: list[dict[str, object]]) -> None:
    for r in records:
        for j in r.get("job_ids", []):  # type: ignore[union-attr]
            subprocess.run(["scancel", str(j)], check=False)


def test_an_inherited_notata_task_never_picks_the_task(
        slurm_cluster: str, base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipeline stage that submits the next sweep from inside a task: sbatch's
    --export=ALL carries NOTATA_TASK=0 into every array task, which once ran task 0
    three times instead of tasks 0, 1 and 2."""
    manifest = write_sweep(base, name="inh", tasks=3)
    for var, value in {"NOTATA_TASK": "0", "NOTATA_RUN_DIR": "/elsewhere",
                       "NOTATA_WRAPPER_PID": "1", "NOTATA_WRAPPER_HOST": "x"}.items():
        monkeypatch.setenv(var, value)
    assert submit(manifest, "--backend", "slurm", "--", sys.executable, "-c",
                  "import os, sys; print(os.environ['NOTATA_TASK'], sys.argv[1])", "{k}") == 0
    wait_all(base, ["k0", "k1", "k2"])
    for k in range(3):
        assert read_meta(base / "outputs" / f"log_k{k}")["task"] == k
        lines = (base / "outputs" / f"log_k{k}" / "stdout.txt").read_text().splitlines()
        assert lines[-1] == f"{k} {k}"


def test_a_submission_that_fails_halfway_records_what_it_submitted(
        slurm_cluster: str, base: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The second of two arrays is refused (here by an sbatch in front of the real one
    that refuses its second call, as a QOS limit would): the first, already queued, is
    recorded, so a resubmit never takes its tasks a second time."""
    import shutil

    real = shutil.which("sbatch")
    gate = tmp_path / "bin"
    gate.mkdir()
    (gate / "sbatch").write_text(
        "#!/bin/sh\n"
        f"if [ -e {shlex.quote(str(tmp_path / 'once'))} ]; then\n"
        "  echo 'sbatch: error: Batch job submission failed: Job violates accounting/QOS "
        "policy (job submit limit, user' \"'\"'s size and/or time limits)' >&2; exit 1\nfi\n"
        f"touch {shlex.quote(str(tmp_path / 'once'))}\nexec {real} \"$@\"\n")
    (gate / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{gate}:{os.environ['PATH']}")
    manifest = write_sweep(base, f"name: half\ngrid: {{i: {list(range(1002))}}}\n")
    out = base / "outputs"
    try:
        rc = submit(manifest, "--backend", "slurm", "--tasks", "0-1001", "--sbatch-line=--hold",
                    "--", "true")
        said = capsys.readouterr()
        assert rc == 1
        [record] = submissions.submitted(out)
        assert record["tasks"] == "0-1000" and record["parts"] == 2 and record["job_ids"][0]
        assert f"submitted job {record['job_ids'][0]}: tasks 0-1000" in said.out
        assert "not submitted: tasks 1001" in said.err and "QOS policy" in said.err
        assert main(["resubmit", str(manifest), "--tasks", "0-1,1001", "--dry-run"]) == 0
        plan = capsys.readouterr()
        assert "would resubmit 1 task(s) with the slurm backend: 1001" in plan.out, plan
        assert "task 0 is pending" in plan.err and "task 1 is pending" in plan.err
    finally:
        _cancel(submissions.submitted(out))


def test_two_submissions_in_one_second_write_two_scripts(slurm_cluster: str,
                                                        base: Path) -> None:
    manifest = write_sweep(base, "name: same\ngrid: {i: [0, 1, 2, 3]}\n")
    out = base / "outputs"
    try:
        for tasks in ("0-1", "2-3"):
            assert submit(manifest, "--backend", "slurm", "--tasks", tasks, "--sbatch-line=--hold",
                          "--", "true") == 0
        records = submissions.submitted(out)
        scripts = [r["arrays"][0]["script"] for r in records]
        assert len(set(scripts)) == 2
        for r, script in zip(records, scripts, strict=True):
            assert f"this array covers tasks {r['tasks']}." in Path(script).read_text()
    finally:
        _cancel(submissions.submitted(out))


def test_resubmit_reuses_the_recorded_options_and_dry_run_shows_the_script(
        slurm_cluster: str, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_sweep(base, name="opt", tasks=2)
    out = base / "outputs"
    assert submit(manifest, "--backend", "slurm", "--time", "00:05:00", "--mem", "100M", "--",
                  "sh", "-c", "exit {k}") == 0
    [first] = submissions.submitted(out)
    assert first["options"] == {"time": "00:05:00", "mem": "100M"}
    wait_for(job_gone(first["job_ids"][0]), 300, "the array")
    capsys.readouterr()
    assert main(["resubmit", str(manifest), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert plan.startswith("would resubmit 1 task(s) with the slurm backend: 1\n"
                           "  from the last submission (")
    assert "time=00:05:00" in plan.splitlines()[1] and "mem=100M" in plan.splitlines()[1]
    assert '#SBATCH --time="00:05:00"' in plan and '#SBATCH --mem="100M"' in plan
    assert "# sbatch --parsable" in plan and "--array=0" in plan
    assert len(submissions.submitted(out)) == 1  # a dry run records nothing
    assert main(["resubmit", str(manifest), "--mem", "200M"]) == 0
    second = submissions.submitted(out)[-1]
    assert second["options"] == {"time": "00:05:00", "mem": "200M"}
    text = Path(second["arrays"][0]["script"]).read_text()
    assert '#SBATCH --time="00:05:00"' in text and '#SBATCH --mem="200M"' in text
    wait_for(job_gone(second["job_ids"][0]), 300, "the resubmission")


def _shim(tmp_path: Path, name: str, body: str) -> Path:
    """A command in front of the real one (it calls the real one by its full path)."""
    import shutil

    real = shutil.which(name)
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!/bin/sh\nREAL={shlex.quote(str(real))}\n{body}\n")
    (folder / name).chmod(0o755)
    return folder


def test_an_array_queued_but_never_recorded_is_still_found(
        slurm_cluster: str, base: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """sbatch queued the array but answered too late (a busy controller), or the submitter
    was killed while it ran: no job id was recorded. The tag in the job's comment, recorded
    before sbatch ran, still lets status see the tasks queued and resubmit leave them."""
    from notata import sbatch

    folder = _shim(tmp_path, "sbatch", 'out=$("$REAL" "$@"); sleep 5; echo "$out"')
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setattr(sbatch, "SBATCH_TIMEOUT", 2.0)
    manifest = write_sweep(base, name="late", tasks=3)
    out = base / "outputs"
    try:
        assert submit(manifest, "--backend", "slurm", "--sbatch-line=--hold", "--", "true") == 1
        err = capsys.readouterr().err
        assert "may have been queued" in err and "notata:" in err
        assert submissions.submitted(out) == []  # no job id came back
        monkeypatch.setenv("PATH", os.environ["PATH"].split(":", 1)[1])
        wait_for(lambda: bool(subprocess.run(["squeue", "--me", "-h", "-o", "%k"],
                                             capture_output=True, text=True).stdout.strip()),
                 30, "the late array in the queue")
        import notata

        report = notata.collect(manifest)
        assert {r.task: r.status for r in report.runs} == {0: "pending", 1: "pending",
                                                           2: "pending"}
        assert main(["resubmit", str(manifest), "--dry-run", "--", "true"]) == 0
        assert "nothing to resubmit" in capsys.readouterr().out
    finally:
        tags = [r["arrays"][0]["tag"] for r in submissions.read(out) if r.get("intent")]
        for line in subprocess.run(["squeue", "--me", "-h", "-o", "%i|%k"], capture_output=True,
                                   text=True).stdout.splitlines():
            job, _, comment = line.partition("|")
            if comment.removeprefix("notata:") in tags:
                subprocess.run(["scancel", job], check=False)


def test_resubmit_refuses_when_the_queue_cannot_be_read(
        slurm_cluster: str, base: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """squeue timed out once and resubmit went on "from files alone", queuing every task a
    second time beside the first."""
    manifest = write_sweep(base, name="blind", tasks=2)
    out = base / "outputs"
    try:
        assert submit(manifest, "--backend", "slurm", "--sbatch-line=--hold", "--", "true") == 0
        folder = _shim(tmp_path, "squeue",
                       "echo 'squeue: error: Socket timed out on send/recv operation' >&2; exit 1")
        monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
        capsys.readouterr()
        assert main(["resubmit", str(manifest)]) == 1
        assert "cannot be read" in capsys.readouterr().err
        assert len(submissions.submitted(out)) == 1
        assert main(["status", str(manifest)]) == 0  # status says so and goes on
    finally:
        _cancel(submissions.submitted(out))


def test_a_queued_array_of_an_earlier_manifest_version_counts(
        slurm_cluster: str, base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The array runs the manifest as it is when it starts: after an edit, its tasks are
    still queued, not missing."""
    manifest = write_sweep(base, name="ed", tasks=2, extra="params: {steps: 1000}\n")
    out = base / "outputs"
    try:
        assert submit(manifest, "--backend", "slurm", "--sbatch-line=--hold", "--", "true") == 0
        manifest.write_text(manifest.read_text().replace("1000", "2000"))
        capsys.readouterr()
        assert main(["resubmit", str(manifest), "--dry-run", "--", "true"]) == 0
        assert "nothing to resubmit" in capsys.readouterr().out
    finally:
        _cancel(submissions.submitted(out))


def test_a_plain_job_submitted_from_an_array_task_is_not_that_task(
        slurm_cluster: str, base: Path) -> None:
    """sbatch exports the submitter's SLURM_ARRAY_* into a plain job: its NOTATA_TASK must
    win, and its run must not be filed under the outer array's task."""
    manifest = write_sweep(base, name="pl", tasks=4)
    job = subprocess.run(
        ["sbatch", "--parsable", "--export=ALL,SLURM_ARRAY_TASK_ID=3,SLURM_ARRAY_JOB_ID=1,"
         "NOTATA_TASK=1", f"--output={base}/plain.out", "--wrap",
         shlex.join([sys.executable, "-m", "notata", "exec", str(manifest), "--", "true"])],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    ).stdout.strip()
    wait_for(job_gone(job), 120, "the plain job")
    meta = read_meta(base / "outputs" / "log_k1")
    assert meta["task"] == 1 and meta["status"] == "complete"
    assert "array_task_id" not in meta["slurm"] and "array_job_id" not in meta["slurm"]


def test_a_command_started_through_srun_attaches_to_its_wrappers_run(
        slurm_cluster: str, base: Path) -> None:
    """The usual MPI launch: `notata exec ... -- srun python payload.py`. srun's task is
    slurmstepd's child, not the wrapper's; it once failed on its own wrapper's lock."""
    manifest = write_sweep(base, name="sr", tasks=1)
    payload = base / "payload.py"
    payload.write_text("import sys, notata\nwith notata.task(sys.argv[1]) as log:\n"
                       "    log.save_text('from_srun', 'attached')\n")
    assert submit(manifest, "--backend", "slurm", "--", "srun", "-n", "1", sys.executable,
                  str(payload), str(manifest)) == 0
    [record] = submissions.submitted(base / "outputs")
    wait_for(job_gone(record["job_ids"][0]), 120, "the job")
    run = base / "outputs" / "log_k0"
    assert read_meta(run)["status"] == "complete", (run / "stderr.txt").read_text()
    assert (run / "artifacts" / "from_srun.txt").read_text() == "attached"


def test_a_base_dir_that_cannot_sit_in_a_job_script_is_refused(
        base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_sweep(base, 'name: nl\ngrid: {a: [1]}\nbase_dir: "out\\ntouch PWNED #"\n')
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--", "true") == 2
    assert "cannot sit in a job script" in capsys.readouterr().err
    assert not list(base.glob("out*")) and not (base / "PWNED").exists()


def test_a_users_own_comment_keeps_notatas_tag(base: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Many sites ask for --comment (accounting): it once replaced the tag that finds an
    array queued but never recorded."""
    manifest = write_sweep(base, "name: cm\ngrid: {a: [1]}\n")
    assert submit(manifest, "--backend", "slurm", "--dry-run", "--sbatch-line=--comment=project42",
                  "--", "true") == 0
    script = capsys.readouterr().out
    comments = [ln for ln in script.splitlines() if "--comment" in ln]
    assert len(comments) == 1 and re.fullmatch(r'#SBATCH --comment="notata:\S+ project42"',
                                               comments[0]), comments


def test_submit_refuses_when_the_queue_cannot_be_read(
        slurm_cluster: str, base: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Once a manifest has been submitted, a second submit that cannot read the queue once
    queued every task again."""
    manifest = write_sweep(base, name="sb", tasks=2)
    out = base / "outputs"
    try:
        assert submit(manifest, "--backend", "slurm", "--sbatch-line=--hold", "--", "true") == 0
        folder = _shim(tmp_path, "squeue", "echo 'squeue: error: Socket timed out' >&2; exit 1")
        monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
        capsys.readouterr()
        assert submit(manifest, "--backend", "slurm", "--", "true") == 1
        assert "cannot be read" in capsys.readouterr().err
        assert len(submissions.submitted(out)) == 1
    finally:
        _cancel(submissions.submitted(out))


def test_a_job_after_the_sweeps_jobs_starts_only_once_they_have_ended(
        slurm_cluster: str, base: Path, tmp_path: Path) -> None:
    """The building block of the retry shepherd and the final job: a plain job that SLURM
    holds back (Dependency) until every job it follows has ended, however it ended."""
    from helpers import sbatch

    from notata.sbatch import render_job, submit_job

    sweep = load(write_sweep(base, name="dep", tasks=2))
    held_script = tmp_path / "held.sh"
    held_script.write_text("#!/bin/sh\nsleep 1\nexit 3\n")  # it fails: afterany still fires
    held = sbatch(held_script, "--hold", f"--output={tmp_path}/held.out")
    marker = tmp_path / "it's done.txt"
    argv = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('ran')",
            str(marker)]
    job = submit_job(sweep, argv, {"time": "1"}, purpose="final job", after=[held])
    try:
        def state(j: str) -> str:
            return subprocess.run(["squeue", "-h", "-j", j, "-o", "%T %r"], text=True,
                                  capture_output=True, timeout=30).stdout.strip()

        wait_for(lambda: state(job) != "", 30, "the dependent job in the queue")
        time.sleep(3)  # long enough for it to start, were it free to
        assert state(job) == "PENDING Dependency" and not marker.exists()
        subprocess.run(["scontrol", "release", held], check=True, timeout=30)
        wait_for(marker.exists, 120, "the dependent job to run after the held one ended")
        assert marker.read_text() == "ran"
        script = next((base / "outputs" / ".notata" / "jobs").glob("dep-final-*.sbatch"))
        assert f"#SBATCH --dependency=afterany:{held}" in script.read_text()
    finally:
        subprocess.run(["scancel", held, job], timeout=30)
    for after in (["123; rm -rf ~"], "12345", ["١٢٣"]):  # a string is not a list of ids
        with pytest.raises(ValueError, match="not a list of SLURM job ids"):
            render_job(sweep, ["true"], {}, script=tmp_path / "x.sbatch", purpose="x",
                       after=after)
    with pytest.raises(notata.ManifestError, match="cannot be passed to sbatch safely"):
        render_job(sweep, ["true"], {"partition": 'debug" --comment="x'},
                   script=tmp_path / "x.sbatch", purpose="x")


def test_the_users_sbatch_and_squeue_variables_never_override_notata(
        slurm_cluster: str, base: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """sbatch lets SBATCH_TIMELIMIT win over the script's --time (a retry's longer time
    would be undone); squeue with SQUEUE_STATES=RUNNING hides pending tasks (they would
    be taken for gone and run twice). notata's own calls run without them."""
    manifest = write_sweep(base, "name: env\ngrid: {k: [0, 1]}\n")
    monkeypatch.setenv("SBATCH_TIMELIMIT", "00:01:00")
    monkeypatch.setenv("SBATCH_MEM_PER_NODE", "50M")
    monkeypatch.setenv("SQUEUE_STATES", "RUNNING")
    try:
        assert submit(manifest, "--backend", "slurm", "--time", "00:10:00", "--mem", "300M",
                      "--sbatch-line=--hold", "--", "true") == 0
        [record] = submissions.submitted(base / "outputs")
        shown = subprocess.run(["scontrol", "-o", "show", "job", record["job_ids"][0]],
                               text=True, capture_output=True, check=True).stdout
        assert "TimeLimit=00:10:00" in shown and "mem=300M" in shown, shown
        capsys.readouterr()
        assert main(["resubmit", str(manifest), "--dry-run"]) == 0
        said = capsys.readouterr()
        assert "nothing to resubmit" in said.out, said
    finally:
        _cancel(submissions.submitted(base / "outputs"))


@pytest.mark.parametrize(("record", "status"), [
    ({"JobState": "COMPLETING", "Reason": "None", "Restarts": "0"}, "cancelled"),
    ({"JobState": "COMPLETING", "Reason": "TimeLimit", "Restarts": "0"}, "timeout"),
    ({"JobState": "COMPLETING", "Reason": "None", "Restarts": "1"}, "preempted"),
    # the user's scancel of a job SLURM had requeued meanwhile (a thawed node's attempt)
    ({"JobState": "CANCELLED", "Reason": "None", "Restarts": "1"}, "cancelled"),
    # a node failure without requeue: SLURM's doing, not the run's nor the user's
    ({"JobState": "NODE_FAIL", "Reason": "NodeDown", "Restarts": "0"}, "preempted"),
    ({"JobState": "COMPLETING", "Reason": "NodeDown", "Restarts": "0"}, "preempted"),
])
def test_why_slurm_ends_a_job_is_read_from_its_record(
        monkeypatch: pytest.MonkeyPatch, record: dict[str, str], status: str) -> None:
    """The cause of a SIGTERM, from the job's record at that moment (the records as SLURM
    22.05 words them; the live ones are checked by test_signals and test_nodes)."""
    from notata import slurm

    monkeypatch.setattr(slurm, "show_job", lambda job: record)
    assert slurm.SLURM.termination_status({"job_id": 7, "restart_count": 0}, time.time()) \
        == status


def test_an_earlier_jobs_node_failure_is_read_from_its_record(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from notata import slurm

    records = {"240": {"JobState": "NODE_FAIL"}, "241": {"JobState": "FAILED"}}
    monkeypatch.setattr(slurm, "show_job", lambda job: records[str(job)])
    assert slurm.SLURM.ended_with_node({"job_id": 240}) == "its job 240 ended NODE_FAIL"
    assert slurm.SLURM.ended_with_node({"job_id": 241}) is None


def test_an_attempt_left_open_by_a_job_that_ended_for_a_node_failure_is_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A task resubmitted without requeue after its node failed, and run on that node
    once it was back: the attempt left open there is closed as node_fail (SLURM's record
    of the old job says NODE_FAIL), not left running in the history."""
    from notata import _attempt, slurm

    monkeypatch.setattr(slurm, "show_job", lambda job: {"JobState": "NODE_FAIL"}
                        if str(job) == "240" else {"JobState": "RUNNING"})
    meta = {"host": "n2", "slurm": {"job_id": 241, "restart_count": 0},
            "attempts": [{"attempt": 1, "status": "running", "host": "n2",
                          "slurm": {"job_id": 240, "restart_count": 0}}]}
    _attempt.close_lost(meta)
    [first] = meta["attempts"]
    assert first["status"] == "node_fail" and "its job 240 ended NODE_FAIL" in \
        first["failure_reason"], first
