"""Losing a node, on the multi-node test cluster (scripts/slurm-cluster.sh: three nodes,
each slurmd in its own UTS and PID namespace on this machine; SlurmdTimeout=15,
cred_expire=30).

One scenario, started at collection (``start_early``) and run beside the other tests:
two sweeps of six tasks fill the cluster's twelve CPUs, one with SLURM's requeue (the
default) and one submitted ``--no-requeue``; node n2 is killed (its namespace's init gets
SIGKILL: every process on it dies at once, no handler runs); ``notata status`` is
recorded every two seconds while SLURM notices, declares the node down and requeues;
the ``--no-requeue`` sweep is resubmitted; then the tasks are let finish. A second
scenario freezes the node a task runs on (SIGSTOP: a partition, its processes alive and
holding their locks) and checks that the requeued attempt (and, without requeue, the
resubmitted one) takes the run over by the rule for another host's lock holder, and
that the thawed attempt writes nothing more there. Then the node of two packs is
killed; then the nodes of a retry shepherd job and of a sweep's final job; then the
second node of a job over two nodes. The tests assert on what was recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, Hook, read_meta, wait_for, write_sweep

MULTI = Path("/etc/slurm-multi/slurm.conf")
CLUSTER = ROOT / "scripts" / "slurm-cluster.sh"
HOLD = """\
import os, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.2)
"""
_SEEN: dict[str, Any] = {}
_DONE = threading.Event()


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NOTATA_", "SBATCH_", "SQUEUE_"))}
    env.update(SLURM_CONF=str(MULTI), PYTHONPATH=str(ROOT), NOTATA_HEARTBEAT="2", **more)
    return env


def _notata(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "notata", *args], env=_env(**env),
                          capture_output=True, text=True, timeout=180)


def _status(manifest: Path) -> dict[int, dict[str, Any]]:
    out = _notata("status", str(manifest), "--json")
    return {r["task"]: r for r in json.loads(out.stdout)["runs"]} if out.returncode == 0 else {}


#: Runs the cluster script for the scenarios, as a subreaper of its own: a revived node's
#: slurmd outlives the script, and its orphaned launcher must not come to this test
#: process (a subreaper too, once a test has run a task in it, which would stop it as a
#: task's leftover).
KEEPER = """
import ctypes, json, os, subprocess, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)
for line in sys.stdin:
    r = subprocess.run(json.loads(line), capture_output=True, text=True, timeout=120)
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    print(json.dumps([r.returncode, r.stderr[-300:]]), flush=True)
"""
_KEEPER: list[subprocess.Popen[str]] = []


def _cluster(*args: str, check: bool = True) -> None:
    if not _KEEPER:
        _KEEPER.append(subprocess.Popen([sys.executable, "-c", KEEPER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True))
    keeper = _KEEPER[0]
    assert keeper.stdin is not None and keeper.stdout is not None
    keeper.stdin.write(json.dumps([str(CLUSTER), *args]) + "\n")
    keeper.stdin.flush()
    rc, err = json.loads(keeper.stdout.readline())
    if check and rc != 0:
        raise AssertionError(f"slurm-cluster.sh {' '.join(args)}: exit {rc}: {err}")


def multi_up() -> bool:
    if not MULTI.exists() or not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=_env(), capture_output=True,
                         text=True, timeout=30)
    return out.returncode == 0 and len([ln for ln in out.stdout.splitlines()
                                        if ln.split()[1] in ("idle", "mix", "alloc")]) >= 3


def _hosts(manifest: Path, tasks: range) -> dict[int, str]:
    from notata.manifest import load

    sweep = load(manifest)
    out = {}
    for t in tasks:
        with contextlib.suppress(OSError, ValueError):
            out[t] = str(read_meta(sweep.task(t).run_dir).get("host"))
    return out


def _wait(what: str, predicate: Any, timeout: float) -> None:
    """Poll the cluster's state once a second (each look runs notata or squeue)."""
    wait_for(predicate, timeout, what, every=1.0)


def _kill_scenario(base: Path) -> None:
    hold = base / "hold.py"
    hold.write_text(HOLD)
    release = base / "release"
    cmd = ["--", sys.executable, str(hold), str(release)]
    kept = write_sweep(base, "name: kept\nbase_dir: kept\ngrid: {k: [0, 1, 2, 3, 4, 5]}\n",
                       "kept.yaml")
    gone = write_sweep(base, "name: gone\nbase_dir: gone\ngrid: {k: [0, 1, 2, 3, 4, 5]}\n",
                       "gone.yaml")
    _SEEN["kept"], _SEEN["gone"] = kept, gone
    # Where the tasks go, made certain (SLURM fills nodes in order, and an earlier job may
    # still hold a CPU): two of the no-requeue sweep on n2, its other four off it (the
    # last submission: resubmit takes its options), then the requeue sweep, unpinned (a
    # requeued task must be free to go elsewhere), on the six CPUs left: two on n2.
    no = "--sbatch-line=--no-requeue"
    for manifest, extra in ((gone, [no, "--sbatch-line=--nodelist=n2", "--tasks", "0-1"]),
                            (gone, [no, "--sbatch-line=--exclude=n2", "--tasks", "2-5"]),
                            (kept, [])):
        out = _notata("submit", str(manifest), "--backend", "slurm", *extra, *cmd)
        assert out.returncode == 0, out.stderr
        if manifest is gone:  # each part placed before the next is submitted
            first = 0 if "0-1" in extra else 2
            _wait("the no-requeue tasks to run", lambda m=manifest, f=first: all(
                _status(m).get(t, {}).get("status") == "running" for t in range(f, f + 2)),
                120)
    _wait("twelve tasks running", lambda: len(_hosts(kept, range(6))) + len(
        _hosts(gone, range(6))) == 12 and all(
        r["status"] == "running" for m in (kept, gone) for r in _status(m).values()), 120)
    _SEEN["hosts"] = {"kept": _hosts(kept, range(6)), "gone": _hosts(gone, range(6))}
    _SEEN["killed"] = time.time()
    _cluster("kill-node", "n2")
    snapshots: list[tuple[float, dict[str, dict[int, dict[str, Any]]]]] = []
    on_n2 = {name: [t for t, h in hosts.items() if h == "n2"]
             for name, hosts in _SEEN["hosts"].items()}
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        seen = {"kept": _status(kept), "gone": _status(gone)}
        snapshots.append((time.time() - _SEEN["killed"], seen))
        if all(seen["kept"].get(t, {}).get("status") == "pending" for t in on_n2["kept"]) \
                and all(seen["gone"].get(t, {}).get("status") == "stale"
                        for t in on_n2["gone"]):
            break
        time.sleep(2)
    _SEEN["snapshots"] = snapshots
    _SEEN["resubmit"] = _notata("resubmit", str(gone))
    release.touch()
    _wait("both sweeps complete", lambda: all(
        r["status"] == "complete" for m in (kept, gone) for r in _status(m).values()), 300)
    _SEEN["final"] = {"kept": _status(kept), "gone": _status(gone)}


WRITER = """\
import os, sys, time
import notata
tag = f"attempt={os.environ['NOTATA_ATTEMPT']}"
with notata.task(sys.argv[1]) as log:
    try:
        while not os.path.exists(sys.argv[2]):
            log.info(f"tick {tag}")
            log.save_text("who", tag)
            print(f"tick {tag}", flush=True)
            time.sleep(0.2)
    finally:  # a checkpoint on the way out, as simulations write them
        log.save_text("final", tag)
        log.info(f"final {tag}")
        print(f"final {tag}", flush=True)
"""


def _freeze_scenario(base: Path) -> None:
    """A task's node frozen: the requeued attempt breaks its lock (the node is down, so
    after 3 heartbeats; NOTATA_LOCK_BREAK_SEC=20 shortens the minute) and completes; the
    thawed old attempt writes nothing over it. Beside it on the frozen node, a task
    submitted --no-requeue: stale with its lock held from there, resubmitted, its new
    attempt breaks the lock and completes. Each task's command writes through notata
    every 0.2 s, and a checkpoint on its way out."""
    (base / "writer.py").write_text(WRITER)
    release = base / "release-frozen"
    manifest = write_sweep(base, "name: cut\nbase_dir: cut\ngrid: {k: [0]}\n", "cut.yaml")
    alone = write_sweep(base, "name: cutn\nbase_dir: cutn\ngrid: {k: [0, 1]}\n", "cutn.yaml")
    _SEEN["cut"], _SEEN["cutn"] = manifest, alone
    def cmd(m: Path) -> list[str]:
        return ["--", sys.executable, str(base / "writer.py"), str(m), str(release)]
    out = _notata("submit", str(manifest), "--backend", "slurm", *cmd(manifest),
                  NOTATA_LOCK_BREAK_SEC="20")
    assert out.returncode == 0, out.stderr
    _wait("the task to run", lambda: _status(manifest).get(0, {}).get("status") == "running",
          120)
    node = _hosts(manifest, range(1))[0]
    _SEEN["frozen"] = node
    # task 0 beside it; task 1 elsewhere, last, so that resubmit takes its options
    for tasks, where in (("0", f"--nodelist={node}"), ("1", f"--exclude={node}")):
        out = _notata("submit", str(alone), "--backend", "slurm",
                      "--sbatch-line=--no-requeue", f"--sbatch-line={where}", "--tasks", tasks,
                      *cmd(alone))
        assert out.returncode == 0, out.stderr
        _wait("the no-requeue task to run", lambda t=int(tasks): _status(alone).get(
            t, {}).get("status") == "running", 120)
    _cluster("freeze-node", node)
    _SEEN["frozen_at"] = time.time()
    release.touch()  # the new attempts finish at once; so do the old ones, if thawed
    try:
        _wait("the no-requeue task to read stale", lambda: _status(alone).get(0, {}).get(
            "status") == "stale", 120)
        _SEEN["cutn_stale"] = _status(alone)[0]
        _SEEN["cutn_resubmit"] = _notata("resubmit", str(alone), NOTATA_LOCK_BREAK_SEC="20")
        _wait("both new attempts to complete", lambda: all(
            _status(m).get(0, {}).get("status") == "complete"
            and read_meta(_run(m)).get("attempt") == 2 for m in (manifest, alone)), 300)
    finally:
        _cluster("thaw-node", node)
    time.sleep(15)  # the thawed attempts find their locks gone; slurmd ends them
    _SEEN["after_thaw"] = {m.stem: read_meta(_run(m)) for m in (manifest, alone)}


PACKED_HOLD = """\
import os, sys, time
if int(sys.argv[2]) % 4:  # the first task of each pack of four ends at once
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.2)
"""


def _pack_scenario(base: Path) -> None:
    """Two packs of four, their node killed while each runs its second task: the running
    task is lost and requeued with its pack, the first stays complete, the rest run."""
    hold = base / "packed_hold.py"
    hold.write_text(PACKED_HOLD)
    release = base / "release-packed"
    manifest = write_sweep(base, "name: packed\nbase_dir: packed\ngrid: {k: [0, 1, 2, 3, 4, 5, "
                                 "6, 7]}\n", "packed.yaml")
    _SEEN["packed"] = manifest
    out = _notata("submit", str(manifest), "--backend", "slurm", "--pack", "4", "--",
                  sys.executable, str(hold), str(release), "{k}")
    assert out.returncode == 0, out.stderr
    _wait("the second task of each pack to run", lambda: all(
        _status(manifest).get(t, {}).get("status") == s
        for t, s in ((0, "complete"), (1, "running"), (4, "complete"), (5, "running"))), 120)
    hosts = _hosts(manifest, range(8))
    node = hosts[1]
    _SEEN["packed_hosts"], _SEEN["packed_node"] = hosts, node
    _SEEN["packed_killed"] = time.time()
    _cluster("kill-node", node)
    try:
        _wait("the lost tasks to read pending", lambda: all(
            _status(manifest).get(t, {}).get("status") == "pending"
            for t, h in hosts.items() if h == node and t % 4 == 1), 120)
        _SEEN["packed_outage"] = _status(manifest)
        release.touch()
        _wait("the packs to complete", lambda: all(
            r["status"] == "complete" for r in _status(manifest).values()), 300)
    finally:
        _cluster("revive-node", node, check=False)


HERD_TASK = """\
import sys
sys.exit(1 if sys.argv[1:] == ["1", "1"] else 0)  # task 1 fails its first attempt
"""
HERD_THEN = """\
import os, sys, time
with open(sys.argv[1], "a") as f:
    f.write(os.uname().nodename + "\\n")
while not os.path.exists(sys.argv[2]):
    time.sleep(0.2)
"""
LOCKER = """\
import os, sys, time
from pathlib import Path
from notata import lock
with lock.exclusive(Path(sys.argv[1])):
    print("held", flush=True)
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.2)
"""


def _squeue(job: str) -> tuple[str, str]:
    """(state, node list) of a job as squeue says it; ("", "") once it has left."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%N"], env=_env(),
                         capture_output=True, text=True, timeout=30)
    state, _, node = out.stdout.strip().partition("|")
    return state, node


def _waits_on(path: Path) -> bool:
    """Whether a process waits for the flock on ``path`` (a ``->`` line of /proc/locks)."""
    inode = path.stat().st_ino
    return any(" -> " in f" {line} " and any(t.endswith(f":{inode}") for t in line.split())
               for line in Path("/proc/locks").read_text().splitlines())


def _herd_scenario(base: Path) -> None:
    """The retry shepherd's jobs on nodes that die. Every CPU but n2's is taken (two
    blocker jobs), and a hand-held sweep lock keeps the round-1 shepherd job waiting on n2
    (as a resubmit by hand would); n2 is killed, the blockers ended: SLURM requeues the
    shepherd job, which runs again elsewhere and goes on (task 1 retried). Then the
    final job's node is killed while ``then`` runs: the requeued final job wraps up
    (settled, notified once) without running ``then`` again."""
    (base / "herd_task.py").write_text(HERD_TASK)
    (base / "herd_then.py").write_text(HERD_THEN)
    (base / "locker.py").write_text(LOCKER)
    hook = Hook()
    _SEEN["herd_hook"] = hook  # its bodies are read by the tests once it is closed
    try:
        _herd(base, hook)
    finally:
        hook.close()


def _herd(base: Path, hook: Hook) -> None:
    from notata import chain
    from notata.layout import SweepPaths

    ran, release = base / "then-ran", base / "release-then"
    then = json.dumps([sys.executable, str(base / "herd_then.py"), str(ran), str(release)])
    manifest = write_sweep(base, "name: herd\nbase_dir: herd\ngrid: {k: [0, 1]}\nretry:\n"
                                 f"  attempts: 3\n  then: {then}\n  notify: {hook.url}\n",
                           "herd.yaml")
    _SEEN["herd"], _SEEN["herd_ran"] = manifest, ran
    for node in ("n1", "n3"):
        subprocess.run(["sbatch", "-J", "herd-block", f"--nodelist={node}", "-c", "4",
                        "--output=/dev/null", "--wrap", "sleep 900"], env=_env(), check=True,
                       capture_output=True, timeout=60)
    _wait("the blockers to run", lambda: subprocess.run(
        ["squeue", "-h", "-n", "herd-block", "-t", "RUNNING", "-o", "%N"], env=_env(),
        capture_output=True, text=True, timeout=30).stdout.split() == ["n1", "n3"], 60)
    sweep_lock = SweepPaths(base / "herd").resubmit_lock
    out = _notata("submit", str(manifest), "--backend", "slurm", "--", sys.executable,
                  str(base / "herd_task.py"), "{k}", "{attempt}")
    assert out.returncode == 0, out.stderr
    unlock = base / "unlock"
    locker = subprocess.Popen([sys.executable, str(base / "locker.py"), str(sweep_lock),
                               str(unlock)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "held"
        state = chain.read(base / "herd", "herd")
        assert state is not None and state.job_id
        job = _SEEN["herd_job"] = state.job_id
        _wait("the shepherd job to wait for the sweep lock on n2", lambda: _squeue(job) == (
            "RUNNING", "n2") and _waits_on(sweep_lock), 120)
        _cluster("kill-node", "n2")
        subprocess.run(["scancel", "-n", "herd-block"], env=_env(), timeout=60)
        unlock.touch()
        _wait("SLURM to requeue the shepherd job", lambda: _squeue(job)[0] == "PENDING", 120)
        _SEEN["herd_outage"] = _notata("status", str(manifest)).stdout
        _wait("the final job to run then", lambda: (chain.read(base / "herd", "herd")
                                                    or state).then_status == -1, 300)
    finally:
        unlock.touch()
        locker.wait(30)
        _cluster("revive-node", "n2", check=False)
    _SEEN["herd_job_record"] = subprocess.run(
        ["scontrol", "-o", "show", "job", job], env=_env(), capture_output=True, text=True,
        timeout=30).stdout
    _wait("n2 back", multi_up, 120)
    final = chain.read(base / "herd", "herd")
    assert final is not None and final.then_job and final.closer
    _wait("the final job's node", lambda: _squeue(str(final.then_job))[0] == "RUNNING", 60)
    node = _SEEN["herd_then_node"] = _squeue(str(final.then_job))[1]
    _cluster("kill-node", node)
    try:
        _wait("the chain to settle", lambda: (chain.read(base / "herd", "herd") or final)
              .state == chain.SETTLED, 240)
        _wait("the closer to end", lambda: not _squeue(str(final.closer))[0], 120)
    finally:
        release.touch()
        _cluster("revive-node", node, check=False)
    _SEEN["herd_settled"] = chain.read(base / "herd", "herd")


def _wide_scenario(base: Path) -> None:
    """A task whose job spans two nodes (its wrapper on n1, the batch host) loses n2:
    SLURM ends the job on n1 and requeues it; the wrapper records preempted (not
    cancelled: the chain would end); the job runs again once n2 is back (it asked for
    n1 and n2) and the task completes as attempt 2."""
    (base / "hold.py").write_text(HOLD)
    release = base / "release-wide"
    manifest = write_sweep(base, "name: wide\nbase_dir: wide\ngrid: {k: [0]}\n", "wide.yaml")
    _SEEN["wide"] = manifest
    out = _notata("submit", str(manifest), "--backend", "slurm", "--sbatch-line=--nodes=2",
                  "--sbatch-line=--nodelist=n1,n2", "--", sys.executable, str(base / "hold.py"),
                  str(release))
    assert out.returncode == 0, out.stderr
    _wait("the two-node task to run", lambda: _status(manifest).get(0, {}).get(
        "status") == "running", 120)
    _SEEN["wide_meta"] = read_meta(_run(manifest))
    _cluster("kill-node", "n2")
    try:
        _wait("the wrapper on n1 to record the end", lambda: _status(manifest).get(0, {}).get(
            "status") not in ("running", None), 120)
        _SEEN["wide_outage"] = _status(manifest)[0]
    finally:
        release.touch()
        _cluster("revive-node", "n2", check=False)
    _wait("the task to complete once n2 is back", lambda: _status(manifest).get(0, {}).get(
        "status") == "complete", 240)
    _SEEN["wide_final"] = read_meta(_run(manifest))


def _run(manifest: Path, task: int = 0) -> Path:
    from notata.manifest import load

    return load(manifest).task(task).run_dir


#: The job names the scenarios submit to the multi-node cluster (their sweeps' names, the
#: herd scenario's blockers, its shepherd, final and closer jobs).
NAMES = "kept,gone,cut,cutn,packed,wide,herd-block,herd-shepherd,herd-then,herd-closer"


def _cancel_ours() -> None:
    """End this module's jobs on the multi-node cluster (of an earlier run stopped midway,
    or left by this one): they would hold its CPUs."""
    subprocess.run(["scancel", "-n", NAMES], env=_env(), capture_output=True, timeout=60)


def _scenarios() -> None:
    base = Path(tempfile.mkdtemp(prefix="notata-nodes-"))
    _cancel_ours()
    began = time.monotonic()
    try:
        _kill_scenario(base)
    except BaseException as err:  # noqa: BLE001 - said by the tests that read it
        _SEEN["error"] = repr(err)
    finally:
        _cluster("revive-node", "n2", check=False)
    took = [f"kill {time.monotonic() - began:.0f} s"]
    for scenario, error in ((_freeze_scenario, "freeze_error"), (_pack_scenario, "pack_error"),
                            (_herd_scenario, "herd_error"), (_wide_scenario, "wide_error")):
        began = time.monotonic()
        try:
            _wait("every node back", multi_up, 120)
            scenario(base)
        except BaseException as err:  # noqa: BLE001 - said by the tests that read it
            _SEEN[error] = repr(err)
        took.append(f"{error.split('_')[0]} {time.monotonic() - began:.0f} s")
    _cancel_ours()
    _SEEN["took"] = took  # how long each scenario took: conftest says it at the end
    _DONE.set()


def start_early() -> None:
    """Start the scenarios now if the multi-node cluster is up (conftest calls this)."""
    if _SEEN.get("started") or not multi_up():
        return
    _SEEN["started"] = True
    threading.Thread(target=_scenarios, daemon=True).start()


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    if not shutil.which("sbatch"):
        pytest.skip("no sbatch here, and no root to start scripts/slurm-cluster.sh")
    if not _SEEN.get("started") and not multi_up():  # (once started, nodes go down on purpose)
        pytest.fail("the multi-node test cluster is not up: scripts/slurm-cluster.sh start")
    start_early()
    assert _DONE.wait(1200), "the node-loss scenarios did not end in 20 minutes"
    return _SEEN


def _phases(seen: dict[str, Any], sweep: str) -> list[tuple[float, list[tuple[str, str]]]]:
    """(seconds after the kill, [(status, reason) of each of the sweep's tasks on n2])."""
    on_n2 = [t for t, h in seen["hosts"][sweep].items() if h == "n2"]
    return [(t, [(s[sweep].get(k, {}).get("status", "?"), s[sweep].get(k, {}).get(
        "reason") or "") for k in on_n2]) for t, s in seen["snapshots"]]


def test_a_lost_node_reads_running_then_pending_once_slurm_requeues(
        scenario: dict[str, Any]) -> None:
    """Until SLURM gives up on the node its tasks read running (SLURM's RUNNING wins),
    with "node n2 is not responding" once it says so; after the requeue, pending
    ("requeued"), never running again while nothing runs, never stale or missing."""
    assert "error" not in scenario, scenario.get("error")
    assert "n2" in scenario["hosts"]["kept"].values(), scenario["hosts"]
    phases = _phases(scenario, "kept")
    statuses = [{s for s, _ in tasks} for _, tasks in phases]
    assert statuses[0] == {"running"}
    first_pending = next(i for i, s in enumerate(statuses) if s == {"pending"})
    assert all(s == {"running"} for s in statuses[:first_pending] if len(s) == 1), statuses
    assert all(s == {"pending"} for s in statuses[first_pending:]), statuses
    said = [r for _, tasks in phases for s, r in tasks if s == "running"]
    assert any("node n2 is not responding" in r for r in said), said
    assert all("requeued" in r and "node n2 is down" in r
               for _, tasks in phases[first_pending:] for _, r in tasks)


def test_without_requeue_a_lost_node_is_stale_at_once_and_resubmitted(
        scenario: dict[str, Any]) -> None:
    """With --no-requeue SLURM drops the job: stale as soon as the node is down (not after
    the heartbeat's 126 s), and resubmit takes those tasks."""
    assert "error" not in scenario, scenario.get("error")
    assert "n2" in scenario["hosts"]["gone"].values(), scenario["hosts"]
    phases = _phases(scenario, "gone")
    stale_at = next(t for t, tasks in phases if {s for s, _ in tasks} == {"stale"})
    assert stale_at < 100, phases
    reasons = [r for t, tasks in phases for s, r in tasks if s == "stale"]
    assert all("job is gone and node n2 is down" in r for r in reasons), reasons
    on_n2 = sorted(t for t, h in scenario["hosts"]["gone"].items() if h == "n2")
    assert scenario["resubmit"].returncode == 0, scenario["resubmit"].stderr
    assert f"tasks {on_n2[0]}" in scenario["resubmit"].stderr + scenario["resubmit"].stdout \
        or f"task {on_n2[0]}" in scenario["resubmit"].stderr + scenario["resubmit"].stdout


@pytest.mark.parametrize("sweep", ["kept", "gone"])
def test_the_lost_tasks_end_complete_as_a_second_attempt_elsewhere(
        scenario: dict[str, Any], sweep: str) -> None:
    """Every task complete; each lost one as attempt 2 on another node, its first attempt
    closed as node_fail on n2 by the attempt that took over, which started after the node
    died (never two live holders); the other runs untouched (one attempt)."""
    assert "error" not in scenario, scenario.get("error")
    from notata.manifest import load

    final = scenario["final"][sweep]
    assert {r["status"] for r in final.values()} == {"complete"}
    sweep_ = load(scenario[sweep])
    for task, host in scenario["hosts"][sweep].items():
        meta = read_meta(sweep_.task(task).run_dir)
        if host != "n2":
            assert meta["attempt"] == 1 and meta["host"] == host
            continue
        first = meta["attempts"][0]
        assert meta["attempt"] == 2 and meta["host"] not in ("n2", None), meta
        assert first["host"] == "n2" and first["status"] == "node_fail", first
        assert "node n2" in first["failure_reason"]
        assert meta["start_unix"] > scenario["killed"]


@pytest.mark.parametrize("sweep", ["cut", "cutn"])
def test_a_frozen_nodes_lock_is_taken_over_and_the_thawed_attempt_writes_nothing(
        scenario: dict[str, Any], sweep: str) -> None:
    """The requeued attempt (cut), or the resubmitted one (cutn, --no-requeue: stale with
    its lock held from the down node, and resubmit takes it), breaks the lock and
    completes; the old attempt, thawed, adds nothing to log.txt or stdout.txt after the
    new attempt began, and its checkpoint on the way out replaces none of the new
    attempt's files."""
    assert "freeze_error" not in scenario, scenario.get("freeze_error")
    meta = scenario["after_thaw"][sweep]
    assert meta["status"] == "complete" and meta["attempt"] == 2, meta
    first = meta["attempts"][0]
    assert first["host"] == scenario["frozen"] and first["status"] == "node_fail", first
    assert meta["host"] != scenario["frozen"]
    run = _run(scenario[sweep])
    assert list(run.glob(".lock.broken-*")), "the lock was not broken"
    if sweep == "cutn":
        stale = scenario["cutn_stale"]
        assert "its lock is still held from there" in stale["reason"], stale
        said = scenario["cutn_resubmit"]
        assert said.returncode == 0 and "leaving task 0" not in said.stdout + said.stderr, \
            said.stdout + said.stderr
    for name in ("log.txt", "stdout.txt"):
        lines = (run / name).read_text().splitlines()
        second = next(i for i, ln in enumerate(lines) if "attempt=2" in ln)
        assert not [ln for ln in lines[second:] if "attempt=1" in ln], (name, lines)
    assert (run / "artifacts" / "final.txt").read_text() == "attempt=2"


def test_a_packed_element_on_a_lost_node_resumes_elsewhere(scenario: dict[str, Any]) -> None:
    """The task running when the node died reads pending with its pack's requeue, and is
    attempt 2 elsewhere (attempt 1 node_fail); the pack's complete first task is not run
    again; the tasks it had not started run once."""
    assert "pack_error" not in scenario, scenario.get("pack_error")
    from notata.manifest import load

    node = scenario["packed_node"]
    outage = scenario["packed_outage"]
    sweep = load(scenario["packed"])
    for t in range(8):
        meta = read_meta(sweep.task(t).run_dir)
        assert meta["status"] == "complete", (t, meta)
        if scenario["packed_hosts"].get(t) != node:
            continue
        if t % 4 == 0:  # complete before the kill: untouched
            assert meta["attempt"] == 1 and meta["host"] == node
        elif t % 4 == 1:  # running at the kill
            assert outage[t]["status"] == "pending" and "node " + node in outage[t]["reason"]
            assert meta["attempt"] == 2 and meta["host"] != node
            assert meta["attempts"][0]["status"] == "node_fail"
            assert meta["start_unix"] > scenario["packed_killed"]
        else:  # not started before the kill: run once, after it
            assert meta["attempt"] == 1 and meta["host"] != node


def test_a_shepherd_job_lost_with_its_node_runs_again_and_the_chain_goes_on(
        scenario: dict[str, Any]) -> None:
    """The shepherd job, killed with n2 while it waited for the sweep's lock, is requeued
    by SLURM and runs again on another node: it acts (task 1 retried once, as attempt 2)
    and the chain goes on to its final job; status never called the chain broken."""
    assert "herd_error" not in scenario, scenario.get("herd_error")
    from notata.layout import SweepPaths
    from notata.manifest import load

    job = scenario["herd_job"]
    assert "broken" not in scenario["herd_outage"], scenario["herd_outage"]
    record = dict(f.split("=", 1) for f in scenario["herd_job_record"].split() if "=" in f)
    assert record["Restarts"] == "1" and record["JobState"] == "COMPLETED", record
    assert record["NodeList"] in ("n1", "n3"), record
    sweep = load(scenario["herd"])
    log = SweepPaths(sweep.base_dir).shepherd_log.read_text()
    assert f"job {job} runs again (SLURM requeued it 1 time(s)" in log, log
    assert len([ln for ln in log.splitlines() if ": round 2: tasks 1 " in ln]) == 1, log
    first, second = (read_meta(sweep.task(t).run_dir) for t in (0, 1))
    assert first["status"] == "complete" and first["attempt"] == 1, first
    assert second["status"] == "complete" and second["attempt"] == 2, second


def test_a_final_job_lost_with_its_node_wraps_up_without_running_then_twice(
        scenario: dict[str, Any]) -> None:
    """The final job's node killed while ``then`` runs: SLURM requeues it, and it wraps up
    instead of running ``then`` again: the chain reads settled, naming the node that is
    down, and the notification goes out once."""
    assert "herd_error" not in scenario, scenario.get("herd_error")
    node, state = scenario["herd_then_node"], scenario["herd_settled"]
    assert state.state == "settled" and state.then_status is None, state
    assert re.search(f"ended before then finished \\(on {node}: node {node} is (down|not "
                     "responding)\\)", state.why), state.why  # as sinfo said it then
    assert scenario["herd_ran"].read_text().split() == [node]  # then ran once, there
    [told] = scenario["herd_hook"].bodies
    assert told["outcome"] == "settled" and told["then_exit_status"] is None, told


def test_a_job_over_two_nodes_that_loses_one_is_preempted_and_runs_again(
        scenario: dict[str, Any]) -> None:
    """Its record names both nodes; the wrapper on the batch host, which outlives n2,
    records preempted when SLURM ends the job for the node failure (not cancelled, which
    would read as the user's scancel); once n2 is back the requeued job completes it as
    attempt 2, attempt 1 preempted on n1."""
    assert "wide_error" not in scenario, scenario.get("wide_error")
    first = scenario["wide_meta"]
    assert first["host"] == "n1" and first["slurm"]["nodelist"] == "n[1-2]", first
    outage = scenario["wide_outage"]
    assert outage["status"] == "preempted", outage
    final = scenario["wide_final"]
    assert final["status"] == "complete" and final["attempt"] == 2, final
    assert final["attempts"][0]["status"] == "preempted" and \
        final["attempts"][0]["host"] == "n1", final["attempts"]
