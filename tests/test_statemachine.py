"""A seeded random walk over real processes on a small sweep, with invariants judged from
outside notata: from /proc (which processes live, which one holds each run's flock),
from the files themselves, and from digests of files outside the base folder.

Steps: start a task (``notata exec`` or ``notata.task``), SIGTERM / SIGKILL / SIGHUP a
wrapper or a payload, start the same task again, resume or overwrite a run from another
process, plant a symlink where a run directory belongs, scan, plan a resubmit, resubmit
for real (local backend), two collectors at once. After every step:

- **one writer**: every live payload of a run has an ancestor that holds that run's
  flock (a payload never runs on while its run is free or someone else's);
- **the index**: a task the index records complete has a metadata.json that says
  complete; every metadata.json parses;
- **outside**: no file outside the base folder changed (a planted symlink's target
  included);
- **statuses a human would agree with**: a run whose lock a live process holds is never
  ``stale``; a run recorded open whose processes are all gone is ``stale``;
- **resubmit**: never chooses a complete run, or one whose lock a live process holds.

CI runs a short profile (``WALKS`` walks of ``STEPS`` steps, seeds printed). By hand:
``NOTATA_WALK_SEED=7 NOTATA_WALK_STEPS=300 NOTATA_WALKS=5 pytest tests/test_statemachine.py``.
A failure prints the seed and the steps taken, so it can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import ROOT, tree_digest, write_sweep

from notata import index
from notata.collector import scan
from notata.manifest import Sweep, load

WALKS = int(os.environ.get("NOTATA_WALKS", "3"))
STEPS = int(os.environ.get("NOTATA_WALK_STEPS", "30"))
SEED = os.environ.get("NOTATA_WALK_SEED")
TASKS = 3
MARK = "notata-walk"

PAYLOAD = """
import os, pathlib, signal, sys, time
run = pathlib.Path(os.environ["NOTATA_RUN_DIR"])
if sys.argv[2] == "trap":            # a checkpoint on SIGTERM that takes a while
    def on_term(signum, frame):
        time.sleep(0.4)
        (run / "trapped.txt").write_text(str(os.getpid()))
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
(run / f"out-{os.environ['NOTATA_ATTEMPT']}.txt").write_text(str(os.getpid()))
time.sleep(float(sys.argv[3]))
(run / "done.txt").write_text(str(os.getpid()))
sys.exit(int(sys.argv[4]))
"""

TASK = """
import sys, time, notata
manifest, i, how = sys.argv[2], int(sys.argv[3]), sys.argv[4]
seconds, rc = float(sys.argv[5]), int(sys.argv[6])
from notata import Logbook
if how == "task":
    log = notata.task(manifest, i, heartbeat=0.2)
else:
    sweep = notata.load_sweep(manifest)
    t = sweep.task(i)
    log = Logbook(t.run_id, sweep.base_dir, heartbeat=0.2, **{how: True})
with log:
    log.save_text("progress", "started")
    time.sleep(seconds)
    if rc:
        raise RuntimeError("walk failure")
"""


@dataclass
class Walk:
    """The walk's world: the sweep, the processes it started, what it did."""

    rng: random.Random
    root: Path
    sweep: Sweep
    payload: Path
    outside: Path
    procs: list[tuple[int, str, subprocess.Popen[bytes]]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    outside_digest: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.sweep.base_dir

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NOTATA_", "SLURM_"))}
        return {**env, "PYTHONPATH": str(ROOT)}

    def spawn(self, task: int, kind: str, argv: list[str]) -> None:
        proc = subprocess.Popen(argv, env=self.env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append((task, kind, proc))

    def live(self) -> list[tuple[int, str, subprocess.Popen[bytes]]]:
        return [(t, k, p) for t, k, p in self.procs if p.poll() is None]


# -- observing from outside ------------------------------------------------------------------


def flock_holders() -> dict[int, set[int]]:
    """inode -> pids holding an flock on it (/proc/locks)."""
    out: dict[int, set[int]] = {}
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and not parts[0].endswith("->"):
                inode = int(parts[5].split(":")[-1])
                out.setdefault(inode, set()).add(int(parts[4]))
    return out


def holder_of(run: Path, holders: dict[int, set[int]]) -> set[int]:
    try:
        ino = os.stat(run / ".lock").st_ino
    except OSError:
        return set()
    return {pid for pid in holders.get(ino, set()) if psutil.pid_exists(pid)}


def payloads() -> Iterator[tuple[int, psutil.Process]]:
    """(task, process) of every live payload the walk started (through notata exec)."""
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = p.info["cmdline"] or []
        if p.info["status"] == psutil.STATUS_ZOMBIE or MARK not in " ".join(cmd):
            continue
        if len(cmd) >= 4 and cmd[1].endswith("payload.py"):
            yield int(cmd[2].split("-")[-1]), p


def check(w: Walk) -> None:
    """Every invariant, from outside notata."""
    time.sleep(0.25)  # what the kernel does at a death (pdeathsig, dropped flocks) settles
    holders = flock_holders()
    held = {i: holder_of(w.sweep.task(i).run_dir, holders) for i in range(TASKS)}
    # one writer: a live payload's wrapper holds its run
    for task, proc in payloads():
        try:
            ancestors = {a.pid for a in proc.parents()}
        except psutil.Error:
            continue
        if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            assert held[task] & ancestors, (
                f"payload {proc.pid} of task {task} runs, but its run's lock is held by "
                f"{held[task] or 'nobody'} (its ancestors: {sorted(ancestors)})")
    # the index, and whole files
    metas: dict[int, dict[str, object] | None] = {}
    for i in range(TASKS):
        run = w.sweep.task(i).run_dir
        if run.is_symlink() or not (run / "metadata.json").exists():
            metas[i] = None
            continue
        metas[i] = json.loads((run / "metadata.json").read_text())  # never a torn file
    ipath = index.path_for(w.base, w.sweep.hash)
    if ipath.exists():
        done = index.complete_tasks(w.base, w.sweep.hash, TASKS)
        assert done is not None
        for t in done["task"].tolist():
            m = metas.get(int(t))
            assert m is not None and m["status"] == "complete", (t, m)
    # nothing outside the base folder changed
    assert tree_digest(w.outside) == w.outside_digest
    # statuses a human would agree with: a run whose lock a live process holds is not
    # stale; one recorded open whose writer is gone (its pid dead here, nobody holding
    # its lock) is
    full = bool(w.rng.getrandbits(1))
    report = scan(w.sweep, full=full)
    after = flock_holders()  # a task starting meanwhile may have taken its lock since
    by_task = {r.task: r for r in report.runs}
    for i in range(TASKS):
        r = by_task[i]
        m = metas[i]
        if held[i]:
            assert r.status != "stale", (i, r, held[i])
        elif m is not None and m["status"] in ("running", "initialized") \
                and not psutil.pid_exists(int(m["pid"])) \
                and not holder_of(w.sweep.task(i).run_dir, after):  # type: ignore[call-overload]
            assert r.status == "stale", (i, r)
    chosen, _ = report.to_resubmit()
    for i in chosen:  # a holder before and after the choice held it throughout
        still = held[i] & holder_of(w.sweep.task(i).run_dir, after)
        assert not still, f"resubmit chose task {i}, whose lock {still} held throughout"
        run = w.sweep.task(i).run_dir
        now = json.loads((run / "metadata.json").read_text()) if not run.is_symlink() and (
            run / "metadata.json").exists() else None
        both = [m for m in (metas[i], now) if m is not None and m["status"] == "complete"]
        assert len(both) < 2 or both[0]["attempt"] != both[1]["attempt"], \
            f"resubmit chose task {i}, complete before and after"


# -- steps -------------------------------------------------------------------------------------


def start(w: Walk) -> str:
    i = w.rng.randrange(TASKS)
    seconds = w.rng.choice([0.2, 1.0, 3.0])
    rc = w.rng.choice([0, 0, 1])
    if w.rng.random() < 0.6:
        trap = w.rng.choice(["trap", "plain"])
        w.spawn(i, "exec", [sys.executable, "-m", "notata", "exec", str(w.sweep.path),
                            "--task", str(i), "--heartbeat", "0.2", "--", sys.executable,
                            str(w.payload), f"{MARK}-{i}", trap, str(seconds), str(rc)])
        return f"exec task {i} ({trap}, {seconds}s, rc {rc})"
    how = w.rng.choice(["task", "task", "resume", "overwrite"])
    w.spawn(i, how, [sys.executable, "-c", TASK, MARK, str(w.sweep.path), str(i), how,
                     str(seconds), str(rc)])
    return f"python {how} task {i} ({seconds}s, rc {rc})"


def signal_one(w: Walk) -> str:
    live = w.live()
    if not live:
        return start(w)
    task, kind, proc = w.rng.choice(live)
    signum = w.rng.choice([signal.SIGTERM, signal.SIGTERM, signal.SIGKILL, signal.SIGHUP])
    target = "wrapper"
    pid = proc.pid
    if kind == "exec" and w.rng.random() < 0.4:
        kids = [p for t, p in payloads() if t == task and proc.pid in
                {a.pid for a in p.parents()}]
        if kids:
            pid, target = kids[0].pid, "payload"
    if w.rng.random() < 0.2 and target == "wrapper":
        os.killpg(proc.pid, signum)  # a whole job step
        target = "group"
    else:
        os.kill(pid, signum)
    return f"{signal.Signals(signum).name} to the {target} of {kind} task {task}"


def wait(w: Walk) -> str:
    seconds = w.rng.choice([0.1, 0.5, 1.5])
    time.sleep(seconds)
    return f"wait {seconds}s"


def plant_symlink(w: Walk) -> str:
    i = w.rng.randrange(TASKS)
    run = w.sweep.task(i).run_dir
    if os.path.lexists(run):
        return f"(task {i} has a run directory: no symlink planted)"
    run.parent.mkdir(parents=True, exist_ok=True)
    run.symlink_to(w.outside)
    return f"plant a symlink as task {i}'s run directory"


def remove_symlink(w: Walk) -> str:
    for i in range(TASKS):
        run = w.sweep.task(i).run_dir
        if run.is_symlink():
            run.unlink()
            return f"remove the symlink of task {i}"
    return "(no symlink to remove)"


def resubmit(w: Walk) -> str:
    """A real resubmit (local backend), sometimes two collectors at once."""
    n = w.rng.choice([1, 1, 2])
    cmd = [sys.executable, "-m", "notata", "resubmit", str(w.sweep.path), "--backend", "local",
           "--", sys.executable, str(w.payload), f"{MARK}-{{k}}", "plain", "0.2", "0"]
    for _ in range(n):
        w.spawn(-1, "collector", cmd)
    return f"resubmit (local) x{n}"


STEPS_BY_WEIGHT = [(start, 5), (signal_one, 4), (wait, 3), (plant_symlink, 1),
                   (remove_symlink, 1), (resubmit, 1)]


def run_walk(seed: int, steps: int, root: Path) -> None:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    manifest = write_sweep(root, name="walk", tasks=TASKS)
    outside = root / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the sweep's")
    (outside / "metadata.json").write_text('{"status": "failed"}')
    payload = root / "payload.py"
    payload.write_text(PAYLOAD)
    w = Walk(rng, root, load(manifest), payload, outside)
    w.outside_digest = tree_digest(outside)
    funcs, weights = zip(*STEPS_BY_WEIGHT, strict=True)
    try:
        for n in range(steps):
            step = rng.choices(funcs, weights)[0]
            w.log.append(f"{n}: {step(w)}")
            check(w)
        for _, _, proc in w.procs:  # let everything end, then judge once more
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        w.log.append("end: every process has ended")
        check(w)
        assert not list(payloads()), "a payload outlived everything"
    except BaseException:
        print(f"random walk seed {seed}; steps:\n  " + "\n  ".join(w.log))
        raise
    finally:
        for _, _, proc in w.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for _, p in payloads():
            p.kill()


@pytest.mark.parametrize("walk", range(WALKS))
def test_a_random_walk_keeps_every_promise(tmp_path: Path, walk: int) -> None:
    seed = int(SEED) + walk if SEED else int.from_bytes(os.urandom(4), "little")
    print(f"random walk seed {seed} ({STEPS} steps)")
    run_walk(seed, STEPS, tmp_path / f"walk{walk}")


def test_the_walks_observers_see_a_held_lock(tmp_path: Path) -> None:
    """The invariants are only as good as the observers: /proc/locks names the holder."""
    from notata import Logbook

    with Logbook("seen", tmp_path) as log:
        assert holder_of(log.path, flock_holders()) == {os.getpid()}
    assert holder_of(log.path, flock_holders()) == set()
    assert np.iinfo(np.int64).max > 0
