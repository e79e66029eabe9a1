"""What runs used of what they asked for (notata.efficiency, ``status --resources``),
checked against tasks that hold a known amount of memory for a known time."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import read_meta, status_is, submit, wait_for, write_sweep

from notata import retry, sbatch_options
from notata.cli import main
from notata.efficiency import Efficiency, Usage, measure, round_mem, round_time
from notata.manifest import load

MIB = 2**20
#: What a task holds besides its block: the interpreter (about 10 MiB) and slack.
OVERHEAD = 40 * MIB
HOLD = """\
import sys, time
mb, sec = int(sys.argv[1]), float(sys.argv[2])
block = bytearray(b"\\x01") * (mb * 2**20)  # written, so resident
time.sleep(sec)
"""


def hold_sweep(base: Path) -> tuple[Path, list[str]]:
    script = base / "hold.py"
    script.write_text(HOLD)
    manifest = write_sweep(base, "name: hold\nrun_id: 'm{mb}_s{sec}'\n"
                                 "grid: {mb: [30, 120], sec: [1, 3]}\n")
    return manifest, [sys.executable, str(script), "{mb}", "{sec}"]


def check_figures(manifest: Path) -> Efficiency:
    """Each run's peak is its block plus the interpreter, its runtime its sleep plus a
    start; the percentiles are those of the runs."""
    sweep = load(manifest)
    used = measure(sweep)
    assert len(used.complete) == 4
    for u in used.runs:
        mb, sec = sweep.params(u.task)["mb"], sweep.params(u.task)["sec"]  # type: ignore[arg-type]
        assert u.peak_bytes is not None and mb * MIB <= u.peak_bytes <= mb * MIB + OVERHEAD, u
        assert u.runtime_sec is not None and sec <= u.runtime_sec <= sec + 5, u
    p50, p95, top = used.spread("peak_bytes") or (0, 0, 0)
    assert 120 * MIB <= p95 <= top <= 120 * MIB + OVERHEAD and 30 * MIB <= p50 <= p95
    return used


def test_status_resources_on_the_cluster(slurm_cluster: str, base: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Under SLURM the shares are of what the job was granted (--mem 400M, --time 2), and
    the suggestion is the 95th percentile plus its margin, rounded as --mem is written."""
    manifest, cmd = hold_sweep(base)
    assert submit(manifest, "--backend", "slurm", "--mem", "400M", "--time", "2", "--", *cmd) == 0
    for t in range(4):
        wait_for(status_is(load(manifest).task(t).run_dir, "complete"), 180, f"task {t}")
    used = check_figures(manifest)
    for u in used.runs:
        assert u.mem_bytes == 400 * MIB and u.limit_sec == 120, u
        assert u.mem_share == pytest.approx((u.peak_bytes or 0) / (400 * MIB))
    share = used.spread("mem_share")
    assert share is not None and 0.3 < share[1] < 0.45
    peaks = sorted(max(u.peak_bytes or 0, u.tree_bytes or 0) for u in used.runs)
    assert sbatch_options.mem_bytes(used.suggest["mem"]) >= 1.2 * peaks[-2]  # at least p95 x 1.2
    assert used.suggest["mem"] == "256M" and used.suggest["time"] == "00:01:00"

    capsys.readouterr()
    assert main(["status", str(manifest), "--resources"]) == 0
    out = capsys.readouterr().out
    assert "resources of 4 complete run(s)" in out
    assert "400.0M" in out and "00:02:00" in out
    assert "suggested for the next submission: --time 00:01:00 --mem 256M" in out


def test_status_resources_locally(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Outside a scheduler nothing was granted: the figures and a suggestion, no shares."""
    manifest, cmd = hold_sweep(base)
    assert submit(manifest, "--backend", "local", "-j", "2", "--", *cmd) == 0
    used = check_figures(manifest)
    assert all(u.mem_share is None and u.time_share is None for u in used.runs)
    assert set(used.suggest) == {"time", "mem"}
    capsys.readouterr()
    assert main(["status", str(manifest), "--resources", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["complete"] == 4
    assert data["resources"]["complete_runs"] == 4
    assert data["resources"]["suggest"] == used.suggest
    assert "mem_share" not in data["resources"]["percentiles"]
    # a run's own figures are those of its metadata
    one = read_meta(load(manifest).task(3).run_dir)["resources"]["used"]
    assert one["peak_rss_bytes"] in {u.peak_bytes for u in used.runs}


def test_no_complete_run_says_so(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_sweep(base, tasks=2)
    assert main(["status", str(manifest), "--resources"]) == 0
    assert "resources: no complete run yet to measure" in capsys.readouterr().out


def usage(status: str, runtime: float, peak: int, limit: str | None = None,
          mem: int | None = None, cpus: int | None = None, cpu: float | None = None) -> Usage:
    return Usage("r", 0, status, runtime, peak, None, cpu, limit, mem, cpus)


def test_the_suggestion_agrees_with_the_retry_escalation() -> None:
    """Runs that timed out or were killed for memory did not show what they need: the
    suggestion is at least what the retry rule gives their next attempt."""
    runs = [usage("complete", 300, 500 * MIB, "00:10:00", 2**30),
            usage("timeout", 600, 600 * MIB, "00:10:00", 2**30),
            usage("oom", 100, 2**30, "00:10:00", 2**30)]
    default = Efficiency(runs)
    assert default.suggest == {"time": "00:20:00", "mem": "2G"}  # x 2, the default rule
    rules = retry.policy({"attempts": 3, "timeout": {"time": 3}, "oom": {"mem": 1.5}}, None,
                         "m.yaml")
    assert rules is not None
    nxt = retry.next_resources(rules, "timeout", "00:10:00", "1G")
    escalated = Efficiency(runs, rules)
    assert nxt is not None and escalated.suggest["time"] == nxt["time"] == "00:30:00"
    assert escalated.suggest["mem"] == "1536M"
    assert any("timed out" in w for w in escalated.why)


def test_cpus_are_suggested_only_when_most_went_unused() -> None:
    idle = Efficiency([usage("complete", 100, MIB, cpus=8, cpu=150) for _ in range(3)])
    assert idle.suggest["cpus-per-task"] == "2"  # 1.5 cores used of 8
    busy = Efficiency([usage("complete", 100, MIB, cpus=8, cpu=700) for _ in range(3)])
    assert "cpus-per-task" not in busy.suggest


@pytest.mark.parametrize("sec, limit", [(1, 60), (61, 120), (601, 900), (3601, 4500),
                                        (86401, 90000)])
def test_time_is_rounded_up_as_slurm_users_write_it(sec: float, limit: int) -> None:
    assert round_time(sec) == limit


@pytest.mark.parametrize("n, mem", [(1, "128M"), (200 * MIB, "256M"), (1000 * MIB, "1G"),
                                    (1.1 * 2**30, "2G"), (13.5 * 2**30, "14G")])
def test_memory_is_rounded_up_as_slurm_users_write_it(n: float, mem: str) -> None:
    assert sbatch_options.mem_text(round_mem(n)) == mem


def test_a_timeout_without_a_recorded_limit_escalates_the_sweeps_own() -> None:
    """As the retry shepherd does: the sweep's --time when the run's limit is unknown."""
    runs = [usage("complete", 60, MIB, "00:10:00"), usage("timeout", 600, MIB, None),
            usage("timeout", 600, MIB, "UNLIMITED")]
    assert Efficiency(runs, given={"time": "00:10:00"}).suggest["time"] == "00:20:00"
    # nothing known at all: twice what it ran before it was stopped
    assert Efficiency(runs[1:]).suggest["time"] == "00:20:00"


def test_packed_runs_get_a_time_per_task() -> None:
    """A pack's --time covers its tasks together: the suggestion is --task-time."""
    runs = [Usage("r", 0, "complete", 45.0, MIB, None, 1.0, "00:04:00", 2**30, 1, pack=3)
            for _ in range(3)]
    used = Efficiency(runs)
    assert "time" not in used.suggest and used.suggest["task-time"] == "2m"
    assert used.spread("time_share") is None
