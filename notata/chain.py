"""The retry shepherd's chain on SLURM: its record, its log, and its own jobs.

``notata submit --retry N`` on SLURM starts a chain: next to the sweep's arrays it
submits a small job that runs ``notata shepherd MANIFEST`` once every array of the round
has ended (``--dependency=afterany``). That job acts once (:mod:`notata.shepherd`) and
submits its successor behind the arrays it submitted, or the sweep's final job. No
process stays alive between rounds: the chain is SLURM's queue plus two files,

- ``<base_dir>/.notata/shepherd-<sweep>.json`` (:class:`State`): what the chain looks
  after (the tasks, the command and options of the first round, ``--retry``), its round,
  the shepherd job that acts next, and how it ended;
- ``<base_dir>/.notata/shepherd.log``: one line per decision, oldest first.

Only the shepherd job named in the record acts; any other shepherd job stands down (a
chain replaced by ``notata shepherd`` run by hand). ``notata shepherd`` by hand always
acts, and its successor becomes the chain's.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import _fs, layout, runinfo, slurm, submissions
from .errors import SchedulerError
from .manifest import Sweep
from .sbatch import OPTIONS, options_for, submit_job

#: The shepherd job's own needs: a scan and a few sbatch calls (seconds, even at 10^5
#: tasks); the manifest's ``retry: shepherd:`` may say otherwise.
SHEPHERD_OPTIONS = {"time": "00:15:00", "mem": "1G", "cpus_per_task": "1"}
#: Options of the sweep a shepherd job keeps (where it may run, who pays).
KEPT = ("partition", "account", "qos")

WAITING, SETTLING, SETTLED, STOPPED = "waiting", "settling", "settled", "stopped"


@dataclass
class State:
    """The chain's record (``shepherd-<sweep>.json``)."""

    chain: str
    sweep: str
    manifest: str
    manifest_hash: str
    command: list[str]
    options: dict[str, Any]  # the first round's (scheduler options given on the command line)
    tasks: str  # the tasks the chain looks after (compact spec)
    attempts: int | None = None  # --retry; None: the manifest's retry.attempts
    started_unix: float = field(default_factory=time.time)
    round: int = 1
    state: str = WAITING
    job_id: str | None = None  # the shepherd job that acts next
    after: list[str] = field(default_factory=list)  # the jobs it waits on
    why: str = ""  # the last decision, one line
    then_job: str | None = None
    then_status: int | None = None
    notified: bool = False
    given_up: dict[str, str] = field(default_factory=dict)  # task -> why
    failures: int = 0  # rounds in a row whose sbatch failed

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def read(base_dir: os.PathLike[str] | str, sweep: str) -> State | None:
    """The chain's record, or None when no chain was started here. A record notata cannot
    read is a :class:`ValueError` naming the file."""
    path = layout.SweepPaths(base_dir).shepherd(sweep)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return State(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: not a shepherd record notata can read ({err})") from None


def write(base_dir: os.PathLike[str] | str, state: State) -> None:
    path = layout.SweepPaths(base_dir).shepherd(state.sweep)
    _fs.atomic_write_json(path, state.as_json(), durable=True)


def log(base_dir: os.PathLike[str] | str, sweep: str, line: str) -> None:
    """One decision, one line of ``shepherd.log`` (and of the shepherd's own output)."""
    text = f"{runinfo.now_iso()} {sweep}: {line}"
    print(text, flush=True)
    path = layout.SweepPaths(base_dir).shepherd_log
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, (text.replace("\n", " ") + "\n").encode())
    finally:
        os.close(fd)


def new_chain(sweep: Sweep) -> str:
    """A chain id: ``<sweep>/<time>``."""
    return f"{sweep.name}/{time.strftime('%Y%m%dT%H%M%S')}"


def shepherd_options(sweep: Sweep, given: Mapping[str, Any],
                     own: Mapping[str, str]) -> dict[str, str]:
    """The shepherd job's sbatch options: where the sweep runs and who pays
    (:data:`KEPT`, from its manifest and the options given), with
    :data:`SHEPHERD_OPTIONS` and the manifest's ``retry: shepherd:`` on top."""
    options, _, _ = options_for(sweep.slurm, {k: given.get(k) for k in KEPT},
                                str(sweep.path))
    kept = {k: v for k, v in options.items() if k in KEPT}
    return {**kept, **SHEPHERD_OPTIONS, **{k: str(v) for k, v in own.items()}}


#: When a shepherd has no job to wait for (tasks run in a process outside SLURM, or a job
#: it would wait for is gone already), it looks again this much later.
LOOK_AGAIN = "now+300"


def submit_shepherd(sweep: Sweep, options: Mapping[str, str], after: Sequence[str], *,
                    round_: int, python: str = sys.executable) -> str:
    """Queue ``notata shepherd MANIFEST`` to run once every job of ``after`` has ended
    (none: :data:`LOOK_AGAIN`); its job id. A job SLURM has already purged cannot be
    depended on: then it waits that long instead."""
    argv = [python, "-m", "notata", "shepherd", str(sweep.path), "--as-job"]
    purpose = f"shepherd of round {round_ + 1}"
    if after:
        try:
            return submit_job(sweep, argv, options, purpose=purpose, after=after)
        except SchedulerError as err:
            if "dependency" not in str(err).lower():
                raise
    return submit_job(sweep, argv, options, purpose=purpose, begin=LOOK_AGAIN)


def submit_then(sweep: Sweep, given: Mapping[str, Any], *,
                python: str = sys.executable) -> str:
    """Queue the sweep's final job: ``notata shepherd MANIFEST --then``, which runs the
    policy's ``then`` command and sends the notification, with the sweep's own options
    (a summary gets real resources; ``--mail-type`` lines pass through)."""
    flags: dict[str, Any] = {k: v for k, v in given.items() if k in OPTIONS}
    flags["extra"] = given.get("sbatch_line")
    options, extra, _ = options_for(sweep.slurm, flags, str(sweep.path))
    options.pop("output", None)  # its output is its own, not the array pattern's
    options.pop("error", None)
    argv = [python, "-m", "notata", "shepherd", str(sweep.path), "--then", "--as-job"]
    return submit_job(sweep, argv, options, purpose="then (the sweep's final job)",
                      extra=extra)


def job_queued(job_id: str | None) -> bool | None:
    """Whether SLURM still lists the job (pending or running); None when it cannot say."""
    if not job_id:
        return False
    try:
        return any(key.split("_")[0] == str(job_id)
                   for key, _, _ in slurm.queue(jobs=[str(job_id)]))
    except SchedulerError:
        return None


def cancelled_tasks(arrays: Iterable[Mapping[str, Any]]) -> set[int]:
    """The sweep tasks of these arrays (``job_id``, ``offset``) that SLURM records as
    cancelled (``scontrol show job``, which remembers a job for ``MinJobAge`` after it
    ended): a task cancelled before it started has no run to say so. A job SLURM no
    longer knows tells nothing."""
    out: set[int] = set()
    for array in arrays:
        job, index = array.get("job_id"), submissions.array_index(dict(array))
        if job is None:
            continue
        try:
            text = slurm.run(["scontrol", "-o", "show", "job", str(job)])
        except SchedulerError:
            continue
        for line in text.splitlines():
            record = slurm.parse_record(line)
            if record.get("JobState") != "CANCELLED":
                continue
            for part in record.get("ArrayTaskId", "").split("%")[0].split(","):
                first, _, last = part.partition("-")
                if first.isdigit():
                    end = int(last) if last.isdigit() else int(first)
                    out.update(i for k in range(int(first), end + 1)
                               if (i := index(k)) is not None)
    return out


def start(sweep: Sweep, chain_id: str, *, command: Sequence[str], given: Mapping[str, Any],
          tasks: str, attempts: int | None, own: Mapping[str, str],
          after: Sequence[str]) -> State | None:
    """After a submission's first round: queue the chain's first shepherd behind the
    round's arrays (``after``) and write the chain's record. None, with a line saying
    so, when a shepherd already looks after the sweep (a second one is never started:
    that one sees the new tasks as busy and waits for them too)."""
    base = sweep.base_dir
    current = read(base, sweep.name)
    if current is not None and current.state in (WAITING, SETTLING) \
            and job_queued(current.job_id) is not False:
        print(f"notata submit: shepherd job {current.job_id} already looks after "
              f"{sweep.name} (round {current.round}); it will wait for these tasks too, "
              "under its own policy", file=sys.stderr)
        return None
    state = State(chain_id, sweep.name, str(sweep.path), sweep.hash, list(command),
                  dict(given), tasks, attempts)
    job = submit_shepherd(sweep, shepherd_options(sweep, given, own), after, round_=1)
    state.job_id, state.after = job, list(after)
    state.why = f"round 1 submitted; shepherd job {job} waits for jobs " \
        f"{', '.join(after) or '(none)'}"
    write(base, state)
    log(base, sweep.name, f"chain {chain_id} started: tasks {tasks}, "
        f"attempts {attempts or 'from the manifest'}; {state.why}")
    return state


def active(base_dir: os.PathLike[str] | str, sweep: Sweep) -> bool:
    """Whether the sweep's chain will still act: a shepherd or final job is queued."""
    try:
        state = read(base_dir, sweep.name)
    except ValueError:
        return False
    return state is not None and state.state in (WAITING, SETTLING) \
        and job_queued(state.job_id) is not False


def describe(base_dir: os.PathLike[str] | str, sweep: Sweep) -> list[str]:
    """What ``notata status`` says of the sweep's retry chain (nothing without one)."""
    try:
        state = read(base_dir, sweep.name)
    except ValueError as err:
        return [f"shepherd: {err}"]
    if state is None:
        return []
    head = f"shepherd (chain {state.chain}, round {state.round}): "
    if state.state == WAITING:
        queued = job_queued(state.job_id)
        if queued is False:
            return [head + f"job {state.job_id} is no longer queued and never acted "
                    "(cancelled or killed): the chain is broken; resume it with "
                    f"notata shepherd {sweep.path}"]
        return [head + f"job {state.job_id} waits for jobs {', '.join(state.after) or '-'}, "
                "then retries what failed among tasks " + state.tasks]
    lines = [head + ("stopped: " if state.state == STOPPED else "") + state.why]
    if state.state == SETTLING and job_queued(state.then_job) is False \
            and state.then_status is None:
        lines.append(f"  its final job {state.then_job} is no longer queued and never ran: "
                     f"notata shepherd {sweep.path} --then runs it here")
    for task, why in sorted(state.given_up.items(), key=lambda kv: int(kv[0])):
        lines.append(f"  gave up task {task}: {why}")
    return lines
