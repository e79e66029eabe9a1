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

import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import _fs, layout, lock, runinfo, slurm, submissions, taskspec
from .errors import ChainRecordError, SchedulerError, UsageError
from .manifest import Sweep
from .sbatch import render_job, submit_job
from .sbatch_options import OPTIONS, options_for
from .taskspec import compact

#: The shepherd job's own needs: a scan and a few sbatch calls (seconds, even at 10^5
#: tasks); the manifest's ``retry: shepherd:`` may say otherwise.
SHEPHERD_OPTIONS = {"time": "00:15:00", "mem": "1G", "cpus_per_task": "1"}
#: Options of the sweep a shepherd job keeps (where it may run, who pays).
KEPT = ("partition", "account", "qos")
#: A shepherd job (and the closer) is always requeued by SLURM when its node fails, even
#: where the cluster's ``JobRequeue=0`` or the sweep's ``--no-requeue`` says otherwise for
#: tasks: run again, it acts only if the chain's record still names it, and what it
#: submitted before its node died is in ``submissions.jsonl`` and SLURM's queue.
SHEPHERD_LINES = ("--requeue",)

WAITING, SETTLING, SETTLED, STOPPED = "waiting", "settling", "settled", "stopped"
STATES = (WAITING, SETTLING, SETTLED, STOPPED)


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
    refused: dict[str, int] = field(default_factory=dict)  # task -> rounds sbatch refused it
    joined: list[str] = field(default_factory=list)  # ids of submissions' chains that joined
    closer: str | None = None  # the job that wraps up if the final job ends early
    cwd: str | None = None  # where the sweep was submitted: its jobs run there
    then_host: str | None = None  # where the final job started then

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


#: The type of each field of a chain record (a hand edit or a torn disk must not reach
#: the shepherd as another type).
_TYPES: dict[str, Any] = {
    "chain": str, "sweep": str, "manifest": str, "manifest_hash": str, "command": list,
    "options": dict, "tasks": str, "attempts": (int, type(None)),
    "started_unix": (int, float), "round": int, "state": str,
    "job_id": (str, type(None)), "after": list, "why": str, "then_job": (str, type(None)),
    "then_status": (int, type(None)), "notified": bool, "given_up": dict, "failures": int,
    "refused": dict, "joined": list,
    "closer": (str, type(None)), "cwd": (str, type(None)), "then_host": (str, type(None))}


def read(base_dir: os.PathLike[str] | str, sweep: str) -> State | None:
    """The chain's record, or None when no chain was started here. A record notata cannot
    read is a :class:`~notata.errors.ChainRecordError` naming the file."""
    path = layout.SweepPaths(base_dir).shepherd(sweep)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:
        raise ChainRecordError(str(path), f"not JSON: {err}") from None
    if not isinstance(data, dict):
        raise ChainRecordError(str(path), "not a JSON object")
    for key, value in data.items():
        if key not in _TYPES:
            raise ChainRecordError(str(path), f"unknown field {key!r}")
        if isinstance(value, bool) and _TYPES[key] is not bool or \
                not isinstance(value, _TYPES[key]):
            raise ChainRecordError(str(path), f"{key} is {value!r}")
    if not taskspec.is_spec(data.get("tasks", "")) or data.get("state") not in STATES:
        raise ChainRecordError(str(path), f"tasks {data.get('tasks')!r} or state "
                                          f"{data.get('state')!r}")
    try:
        return State(**data)
    except TypeError as err:  # a field missing
        raise ChainRecordError(str(path), str(err)) from None


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
    """A chain id: ``<sweep>/<time>-<4 random hex digits>``."""
    return f"{sweep.name}/{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"


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
                    round_: int, then: bool = False, python: str = sys.executable) -> str:
    """Queue ``notata shepherd MANIFEST`` to run once every job of ``after`` has ended
    (none: :data:`LOOK_AGAIN`); its job id. A job SLURM has already purged cannot be
    depended on: then it waits that long instead. ``then``: the closer of the final job."""
    argv = [python, "-m", "notata", "shepherd", str(sweep.path), "--as-job"]
    argv += ["--then"] if then else []
    purpose = "closer (after the final job)" if then else f"shepherd of round {round_ + 1}"
    if after:
        try:
            return submit_job(sweep, argv, options, purpose=purpose, after=after,
                              extra=SHEPHERD_LINES)
        except SchedulerError as err:
            if "dependency" not in str(err).lower():
                raise
    return submit_job(sweep, argv, options, purpose=purpose, begin=LOOK_AGAIN,
                      extra=SHEPHERD_LINES)


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


def cancelled_tasks(arrays: Iterable[Mapping[str, Any]], base_dir: os.PathLike[str] | str,
                    *, own_output: bool = True) -> tuple[set[int], dict[int, str]]:
    """The sweep tasks of these arrays (``job_id``, ``spec``, ``offset`` or ``map``) that
    SLURM's record (``scontrol show job``, which remembers a job for ``MinJobAge`` after
    it ended) says the user cancelled: those recorded ``CANCELLED``, and those that
    vanished: missing from the records of an array SLURM still knows, without the output
    file every started element writes (SLURM 22.05 forgets a pending element cancelled
    on its own at once). An element that ran and was forgotten after ``MinJobAge`` has
    its output file; the caller counts a vanished task only if it did not run in that
    array (its last attempt ran in another job, or it has no run). Without
    notata's own output files (``own_output`` False: the sweep sets ``--output``) nothing
    vanishes. A job SLURM no longer knows tells nothing. Returns (cancelled, vanished)."""
    cancelled: set[int] = set()
    vanished: dict[int, str] = {}  # task -> the array job it vanished from
    paths = layout.SweepPaths(base_dir)
    for array in arrays:
        job, index = array.get("job_id"), submissions.array_index(dict(array))
        if job is None:
            continue
        try:
            text = slurm.run(["scontrol", "-o", "show", "job", str(job)])
        except SchedulerError:
            continue
        known: set[int] = set()
        for line in text.splitlines():
            record = slurm.parse_record(line)
            ids = _ids(record.get("ArrayTaskId", ""))
            known |= ids
            if record.get("JobState") == "CANCELLED":
                cancelled.update(i for k in ids for i in index(k))
        if not known or not own_output:
            continue
        for k in _ids(str(array.get("spec", ""))) - known:
            if not paths.job_output(job, k).exists():
                vanished.update(dict.fromkeys(index(k), str(job)))
    return cancelled, vanished


def _ids(spec: str) -> set[int]:
    """Array task ids of ``3,5-7`` (SLURM's ``%N`` throttle suffix dropped)."""
    out: set[int] = set()
    for part in spec.split("%")[0].split(","):
        first, _, last = part.partition("-")
        if first.isdigit():
            out.update(range(int(first), (int(last) if last.isdigit() else int(first)) + 1))
    return out


def joinable(sweep: Sweep, command: Sequence[str], given: Mapping[str, Any],
             attempts: int | None) -> State | None:
    """The chain a new ``submit --retry`` of this sweep joins: one whose shepherd is still
    queued (not one that has settled), and that would retry the new tasks as this submit
    asks (the same manifest version, command, options, ``--retry`` and folder); a chain
    that would not is a :class:`~notata.errors.UsageError` (nothing submitted). None: a
    new chain starts."""
    current = read(sweep.base_dir, sweep.name)
    if current is None or current.state != WAITING or job_queued(current.job_id) is False:
        return None
    ours = (sweep.hash, list(command), dict(given), attempts, os.getcwd())
    theirs = (current.manifest_hash, current.command, current.options, current.attempts,
              current.cwd or os.getcwd())  # a chain adopted by hand has no folder
    if ours != theirs:
        differ = [name for name, a, b in zip(("manifest version", "command", "options",
                                              "--retry", "folder"), ours, theirs,
                                             strict=True) if a != b]
        raise UsageError(f"the retry chain {current.chain} (shepherd job {current.job_id}) "
                         f"already looks after {sweep.name} with another "
                         f"{', '.join(differ)}: its shepherd would retry these tasks as "
                         f"that chain says; submit them after it has settled, or scancel "
                         f"{current.job_id} first; nothing was submitted")
    return current


def start(sweep: Sweep, chain_id: str, *, command: Sequence[str], given: Mapping[str, Any],
          tasks: Sequence[int], attempts: int | None, own: Mapping[str, str],
          after: Sequence[str]) -> State | None:
    """After a submission's first round, under the sweep's shepherd lock (held for one
    sbatch at most): the tasks join the chain that waits for the sweep, if it would
    retry them as this submission asked (:func:`joinable`, asked again: another submit
    may have started a chain meanwhile); or a new chain starts, its first shepherd
    behind the round's arrays (``after``). A chain that settled but whose final job has
    not run gives way: its final job and closer are cancelled (the sweep has not
    settled after all). None, said on stderr, when another chain took the sweep
    meanwhile with other options: it waits for these tasks, but does not retry them."""
    base = sweep.base_dir
    with lock.exclusive(layout.SweepPaths(base).shepherd_lock(sweep.name)):
        current = read(base, sweep.name)
        try:
            joined = joinable(sweep, command, given, attempts)
        except UsageError as err:
            print(f"notata submit: the tasks were submitted, but {err}".replace(
                "; nothing was submitted", ""), file=sys.stderr)
            return None
        if joined is not None:
            mine = set(tasks)
            joined.tasks = compact(sorted(set(taskspec.expand(joined.tasks)) | mine))
            for i in map(str, mine):  # submitted again: the chain tries them afresh
                joined.given_up.pop(i, None)
                joined.refused.pop(i, None)
            if chain_id != joined.chain and chain_id not in joined.joined:
                joined.joined.append(chain_id)
            write(base, joined)
            log(base, sweep.name, f"tasks {compact(tasks)} joined the chain; shepherd job "
                f"{joined.job_id} waits for them too")
            print(f"notata submit: shepherd job {joined.job_id} already looks after "
                  f"{sweep.name} (round {joined.round}); these tasks join its chain",
                  file=sys.stderr)
            return joined
        if current is not None and current.state == SETTLING:
            ended = [j for j in (current.then_job, current.closer) if j]
            if ended:
                with contextlib.suppress(SchedulerError):
                    slurm.run(["scancel", *ended])
            log(base, sweep.name, f"chain {current.chain} gives way to a new submission: "
                f"its final job {current.then_job} is cancelled, the new chain settles "
                "the sweep")
        state = State(chain_id, sweep.name, str(sweep.path), sweep.hash, list(command),
                      dict(given), compact(tasks), attempts, cwd=os.getcwd())
        job = submit_shepherd(sweep, shepherd_options(sweep, given, own), after, round_=1)
        state.job_id, state.after = job, list(after)
        state.why = f"round 1 submitted; shepherd job {job} waits for jobs " \
            f"{', '.join(after) or '(none)'}"
        write(base, state)
    log(base, sweep.name, f"chain {chain_id} started: tasks {state.tasks}, "
        f"attempts {attempts or 'from the manifest'}; {state.why}")
    return state


def check(sweep: Sweep, given: Mapping[str, Any], own: Mapping[str, str]) -> None:
    """Before anything is queued: SLURM would take the shepherd job as it is (``sbatch
    --test-only``: a partition that does not exist, a time or memory it cannot give)."""
    options = shepherd_options(sweep, given, own)
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "shepherd.sbatch"
        script.write_text(render_job(sweep, ["true"], options, script=script,
                                     purpose="shepherd (checked, not submitted)",
                                     extra=SHEPHERD_LINES))
        try:
            slurm.run(["sbatch", "--test-only", str(script)],
                      env=slurm.submit_env(os.environ, ("time", "mem", "partition", "account",
                                                        "qos", "cpus-per-task")))
        except SchedulerError as err:
            said = "did not answer" if err.returncode is None else "would refuse it"
            raise SchedulerError(err.argv, err.returncode, f"sbatch {said} for the retry "
                                 f"shepherd's job ({err.stderr.strip()}); its options: "
                                 f"{options}; nothing was submitted") from None


def active(base_dir: os.PathLike[str] | str, sweep: Sweep) -> bool:
    """Whether the sweep's chain will still act: a shepherd or final job is queued."""
    try:
        state = read(base_dir, sweep.name)
    except ChainRecordError:
        return False
    return state is not None and state.state in (WAITING, SETTLING) \
        and job_queued(state.job_id) is not False


def describe(base_dir: os.PathLike[str] | str, sweep: Sweep) -> list[str]:
    """What ``notata status`` says of the sweep's retry chain (nothing without one)."""
    try:
        state = read(base_dir, sweep.name)
    except ChainRecordError as err:
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
            and job_queued(state.closer) is False:
        lines.append(f"  its final job {state.then_job} is no longer queued and did not "
                     f"finish: notata shepherd {sweep.path} --then runs it here")
    for task, why in sorted(state.given_up.items(), key=lambda kv: int(kv[0])):
        lines.append(f"  gave up task {task}: {why}")
    return lines
