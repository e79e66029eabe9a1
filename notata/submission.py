"""Submitting a sweep's tasks, and resubmitting exactly those that need it: the Python API
that ``notata submit`` and ``notata resubmit`` wrap.

Both take the sweep's lock (:func:`notata.submissions.sweep_lock`): ``submit`` while it
submits and records, ``resubmit`` from its scan to its record, so that two collectors,
or a collector and a submitter, never take a task twice. A local run holds the lock
only while it records: its tasks then count as queued for other collectors while its
process runs (:func:`notata.submissions.live_local`).

Every submission records the scheduler options it was given (``options``), its backend
and its command; ``resubmit`` reuses those of the sweep's last submission unless told
otherwise, and says so.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import (
    _function,
    chain,
    local,
    lock,
    provenance,
    retry,
    sbatch,
    sbatch_options,
    schema,
    slurm,
    submissions,
)
from .array import is_complete
from .collector import Report, scan
from .errors import SchedulerError, UsageError
from .manifest import Sweep, compact, parse_indices
from .manifest import load as load_sweep
from .pack import check_size, size_for
from .runstate import DEFAULT_RESUBMIT, PENDING, SELECTORS

BACKENDS = ("slurm", "local")
#: Scheduler options by their Python names (``--cpus-per-task`` is ``cpus_per_task``).
SCHEDULER_OPTIONS = (*sbatch_options.OPTIONS, "throttle", "warn_before", "sbatch_line")
#: Exit statuses: a task failed; interrupted by Ctrl-C; by a hangup or SIGTERM.
FAILED, INTERRUPTED = 1, 130


@dataclass
class Options:
    """How to submit: what ``notata submit`` and ``resubmit`` take besides the manifest.

    ``scheduler`` holds sbatch options by their Python names (:data:`SCHEDULER_OPTIONS`);
    None values mean "not given". ``backend`` None: for ``submit``, slurm where sbatch is
    found, else local; for ``resubmit``, the backend of the sweep's last submission.
    """

    backend: str | None = None
    tasks: Sequence[int] | None = None
    dry_run: bool = False
    jobs: int | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    retry: int | None = None  # attempts per task (see notata.retry); wins over the manifest's
    pack: int | None = None  # tasks run one after another per array task (see notata.pack)
    pack_parallel: int | None = None  # tasks of a pack at a time (at most its CPUs)
    pack_time: float | None = None  # seconds of work per array task: sets pack from runtimes
    task_time: float | None = None  # seconds one task takes, until some have completed

    def check(self) -> None:
        """Raise :class:`UsageError` for a value that cannot be used, before anything runs."""
        if self.backend is not None and self.backend not in BACKENDS:
            raise UsageError(f"backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        for key, what in (("jobs", "a number of tasks at a time"),
                          ("retry", "a number of attempts per task")):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise UsageError(f"{key} {value!r}: give {what}, at least 1")
        if self.pack is not None:
            check_size(self.pack)
        if self.pack_time is not None and self.pack is not None:
            raise UsageError("give --pack or --pack-time, not both")
        for key in ("pack_time", "task_time"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float))
                                          and not isinstance(value, bool) and value > 0):
                raise UsageError(f"{key} {value!r}: give a positive number of seconds")
        if self.task_time is not None and self.pack_time is None:
            raise UsageError("--task-time goes with --pack-time")
        unknown = sorted(set(self.scheduler) - set(SCHEDULER_OPTIONS))
        if unknown:
            raise UsageError(f"unknown scheduler option {unknown[0]!r}; known: "
                             f"{', '.join(SCHEDULER_OPTIONS)}")
        for key, least in (("throttle", 1), ("warn_before", 0)):
            value = self.scheduler.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < least):
                raise UsageError(f"{key} {value!r}: give a whole number, at least {least}")
        lines = self.scheduler.get("sbatch_line")
        if lines is not None and (isinstance(lines, str) or not all(
                isinstance(x, str) for x in lines)):
            raise UsageError("sbatch_line: give a list of #SBATCH lines")

    def given(self) -> dict[str, Any]:
        """The options given (not None), as recorded in submissions.jsonl."""
        out = {k: (list(v) if k == "sbatch_line" else v)
               for k, v in self.scheduler.items() if v is not None}
        for key in ("jobs", "pack", "pack_parallel"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass
class Submission:
    """What one :func:`submit` or :func:`resubmit` did.

    ``status`` is the command's exit status (0: submitted, ran, or nothing to do; 1: a
    local task failed; 128+N: a local run stopped by signal N). ``id`` names the
    submission's lines in submissions.jsonl (None when no line was written).
    """

    status: int = 0
    id: str | None = None
    backend: str | None = None
    tasks: list[int] = field(default_factory=list)  # submitted, or run here
    skipped: list[int] = field(default_factory=list)  # complete: left out
    busy: list[int] = field(default_factory=list)  # still queued or running: left out
    job_ids: list[str] = field(default_factory=list)  # the scheduler's, one per array
    dry_run: bool = False


def submit(manifest: str | os.PathLike[str] | Sweep, command: Sequence[str],
           options: Options | None = None, *,
           progress: Callable[[local.LocalResult, int, int], None] | None = None
           ) -> Submission:
    """Submit the sweep's tasks (all, or ``options.tasks``). Complete tasks are left out,
    and so are tasks still queued or running (a second ``submit``, or one beside a
    ``resubmit``, never runs a task twice); it says so.

    Returns the :class:`Submission`; its ``status`` is 0 when submitted (or, locally,
    every task complete), 1 when a local task failed, 130 when a local run was
    interrupted (129, 143: a hangup or SIGTERM). Raises :class:`~notata.ManifestError`,
    :class:`UsageError`, :class:`~notata.SchedulerError`.
    """
    options = options or Options()
    options.check()
    command = _command(command)
    sweep = manifest if isinstance(manifest, Sweep) else load_sweep(manifest)
    options = _sized(sweep, options)
    indices = sweep.check_indices(options.tasks if options.tasks is not None
                                  else range(len(sweep)))
    sweep.check_unique(remember=not options.dry_run)
    backend = options.backend or _default_backend()
    policy = retry.policy(sweep.retry, options.retry, str(sweep.path))
    if policy is not None and backend != "local":
        if options.dry_run:  # checked, nothing written
            chain.shepherd_options(sweep, options.given(), policy.shepherd)
            return _submit(sweep, indices, command, backend, options, options.given(),
                           progress=progress, held=None)
        return _submit_chained(sweep, indices, command, options, policy, progress)
    done = _submit(sweep, indices, command, backend, options, options.given(),
                   progress=progress, held=None)
    if policy is None or options.dry_run:
        return done
    return retry.local_rounds(sweep, policy, done, indices, lambda todo: _submit(
        sweep, todo, command, backend, options, options.given(), progress=progress,
        held=None, again=True))


def _submit_chained(sweep: Sweep, indices: list[int], command: list[str], options: Options,
                    policy: retry.Policy, progress: Any) -> Submission:
    """``submit --retry`` on SLURM: refuse a chain it could not join and check a new one
    (before anything is queued), submit, then start the chain or add the tasks to it
    (:func:`notata.chain.start` decides again under the sweep's shepherd lock)."""
    given = options.given()
    chain.shepherd_options(sweep, given, policy.shepherd)
    joined = chain.joinable(sweep, command, given, options.retry)
    chain_id, round_ = (joined.chain, joined.round) if joined else (chain.new_chain(sweep), 1)
    if joined is None:
        chain.check(sweep, given, policy.shepherd)
    done = _submit(sweep, indices, command, "slurm", options, given, progress=progress,
                   held=None, fields={"chain": chain_id, "round": round_})
    if done.tasks or done.busy:
        try:
            if chain.start(sweep, chain_id, command=command, given=given, tasks=indices,
                           attempts=options.retry, own=policy.shepherd,
                           after=done.job_ids) is None:
                done.status = FAILED
        except SchedulerError as err:
            print(f"notata submit: the tasks were submitted, but not their retry shepherd "
                  f"({err}); once they end, run: notata shepherd {sweep.path}",
                  file=sys.stderr)
            done.status = FAILED
    return done


def resubmit(manifest: str | os.PathLike[str] | Sweep, statuses: Iterable[str] = (),
             command: Sequence[str] = (), options: Options | None = None, *,
             max_attempts: int | None = None, stale_after: float | None = None,
             full: bool = False,
             progress: Callable[[local.LocalResult, int, int], None] | None = None
             ) -> Submission:
    """Scan the sweep and submit again exactly the tasks that need it (see the README).

    ``statuses``: the selectors (none: :data:`~notata.runstate.DEFAULT_RESUBMIT`);
    ``options.tasks`` narrows the choice. The command, backend and scheduler options are
    the sweep's last submission's unless given (given options override recorded ones
    key by key), and it says what it reused. Where SLURM is but its queue cannot be read,
    it refuses (:class:`~notata.SchedulerError`): it could not tell which tasks are still
    queued. Returns the :class:`Submission`: ``status`` 0 when the scan worked and what
    was chosen was submitted (or there was nothing to do); as :func:`submit` for a local
    run.
    """
    options = options or Options()
    options.check()
    statuses = list(statuses) or list(DEFAULT_RESUBMIT)
    bad = [s for s in statuses if s not in SELECTORS]
    if bad:
        raise UsageError(f"unknown status {bad[0]!r}; known: {', '.join(SELECTORS)}")
    if max_attempts is not None and (isinstance(max_attempts, bool)
                                     or not isinstance(max_attempts, int) or max_attempts < 1):
        raise UsageError(f"max_attempts {max_attempts!r}: give a whole number, at least 1")
    if stale_after is not None and not (isinstance(stale_after, (int, float))
                                        and math.isfinite(stale_after) and stale_after >= 0):
        raise UsageError(f"stale_after {stale_after!r}: give a number of seconds, at least 0")
    if command:
        command = _command(command)
    # Two tasks with one run id would share a run directory: refused here (an index scan
    # does not compute every run id; the check is remembered per manifest hash).
    sweep = manifest if isinstance(manifest, Sweep) else load_sweep(manifest)
    sweep.check_indices(options.tasks or ())
    if options.pack_time is not None:  # a recorded --time stays
        options = _sized(sweep, options, (last_submission(sweep) or {}).get("options"))
    sweep.check_unique(remember=not options.dry_run)
    sweep_lock = (lock.no_lock() if options.dry_run
                  else submissions.sweep_lock(sweep.base_dir))
    with sweep_lock as held:
        last = last_submission(sweep)
        report = scan(sweep, stale_after=stale_after, full=full,
                      queue=slurm.collector_queue(sweep.base_dir, "resubmit", required=True))
        indices = _choose(report, statuses, max_attempts, options.tasks)
        if not indices:
            print(f"nothing to resubmit among: {', '.join(statuses)}")
            return Submission(dry_run=options.dry_run)
        backend = options.backend or _recorded_backend(last)
        cmd = list(command) or list((last or {}).get("command") or [])
        if not cmd:
            raise UsageError(f"no earlier submission of {sweep.name} records a command; "
                             "give one after --")
        recorded = dict((last or {}).get("options") or {})
        given = {**recorded, **options.given()}
        verb = "would resubmit" if options.dry_run else "resubmitting"
        print(f"{verb} {len(indices)} task(s) with the {backend} backend: {compact(indices)}")
        if last is not None:
            reused = [f"the {backend} backend"] if not options.backend else []
            reused += [] if command else [f"the command {shlex.join(cmd)}"]
            reused += [f"{k}={v}" for k, v in recorded.items() if k not in options.given()]
            if reused:
                print(f"  from the last submission ({last.get('time', '?')}): "
                      f"{', '.join(reused)}")
        elif options.dry_run:
            print(f"  command: {shlex.join(cmd)}")
        return _submit(sweep, indices, cmd, backend, options, given, progress=progress,
                       held=held, again=True)


def _sized(sweep: Sweep, options: Options, recorded: Mapping[str, Any] | None = None
           ) -> Options:
    """``options`` with ``--pack-time`` made a pack size (:func:`notata.pack.size_for`),
    and, where no ``--time`` is given, a time limit that holds it (``--pack-time`` plus a
    tenth and five minutes); says both."""
    if options.pack_time is None:
        return options
    parallel = options.pack_parallel or (recorded or {}).get("pack_parallel") or 1
    pack, how = size_for(sweep, options.pack_time, options.task_time, int(parallel))
    scheduler = dict(options.scheduler)
    said = f"notata: {pack} task(s) per array task, to fill {options.pack_time:g} s ({how})"
    if scheduler.get("time") is None and "time" not in sweep.slurm \
            and "time" not in (recorded or {}):
        scheduler["time"] = sbatch_options.time_text(math.ceil(options.pack_time * 1.1) + 300)
        said += f"; --time {scheduler['time']}"
    print(said, file=sys.stderr)
    return replace(options, pack=pack, pack_time=None, task_time=None, scheduler=scheduler)


def _choose(report: Report, statuses: list[str], max_attempts: int | None,
            only: Sequence[int] | None) -> list[int]:
    """The tasks to resubmit, saying on stderr why each selected one is left."""
    indices, left = report.to_resubmit(statuses, max_attempts)
    wanted = set(only) if only is not None else None
    for r, why in left:
        if wanted is None or r.task in wanted:
            print(f"notata resubmit: leaving task {r.task} ({r.run_id}, {r.status}): {why}",
                  file=sys.stderr)
    if wanted is None:
        return indices
    chosen = [i for i in indices if i in wanted]
    named = {r.task for r, _ in left}
    by_task = {r.task: r for r in report.read}
    for i in sorted(wanted - set(chosen) - named):
        seen = by_task.get(i)
        status = seen.status if seen is not None else "complete"
        print(f"notata resubmit: task {i} is {status}, which is not among "
              f"{', '.join(statuses)}: not resubmitted", file=sys.stderr)
    return chosen


def _not_to_submit(sweep: Sweep, indices: list[int]) -> dict[int, str]:
    """Task -> why it is left out of a submit: complete, or still queued or running. Once
    this manifest has been submitted, a queue that cannot be read is refused (it could
    not tell which tasks are still queued)."""
    earlier = any(r.get("manifest") == str(sweep.path)
                  for r in submissions.submitted(sweep.base_dir))
    report = scan(sweep, queue=slurm.collector_queue(sweep.base_dir, "submit",
                                                     required=earlier))
    wanted = set(indices)
    out = {i: "complete" for i in report.indices(schema.COMPLETE) if i in wanted}
    for r in report.read:
        if r.task in wanted and (r.queued or r.status in (schema.RUNNING, PENDING)):
            out[r.task] = f"still {'queued: ' + r.queued if r.queued else r.status}"
    return out


def _submit(sweep: Sweep, indices: list[int], cmd: list[str], backend: str, options: Options,
            given: Mapping[str, Any], *, progress: Any, held: lock.Exclusive | None,
            again: bool = False, fields: Mapping[str, Any] | None = None) -> Submission:
    """Submit ``indices`` (``again``: chosen by resubmit, else the complete, queued and
    running ones left out) and record each part as it goes, under the sweep's lock
    (``held``: already taken by the caller); ``fields`` go into every record (a retry
    chain's ``chain`` and ``round``)."""
    sub_id = submissions.new_id()
    more = dict(fields or {})
    if not options.dry_run:  # the code submitted (a dry run writes nothing)
        more[provenance.FIELD] = provenance.at_submission(sweep.base_dir,
                                                          provenance.subject_of(cmd))

    def record(tasks: list[int], **parts: Any) -> dict[str, Any]:
        return submissions.entry(sweep, backend, sub_id, tasks, command=cmd,
                                 options=dict(given), **more, **parts)
    flags = {k: given.get(k) for k in sbatch_options.OPTIONS}
    flags.update(extra=given.get("sbatch_line"), throttle=given.get("throttle"),
                 warn_before=given.get("warn_before"), pack=given.get("pack"),
                 pack_parallel=given.get("pack_parallel"))
    if backend == "slurm":  # refuse bad options before anything is written
        sbatch_options.options_for(sweep.slurm, flags, str(sweep.path))
    if options.dry_run:  # a dry run writes nothing, the sweep's lock file included
        held = held or lock.no_lock()
    with held or submissions.sweep_lock(sweep.base_dir) as sweep_lock:
        if again:
            left: dict[int, str] = {i: "complete" for i in indices
                                    if is_complete(sweep, i)}
        else:
            left = _not_to_submit(sweep, indices)
        todo = [i for i in indices if i not in left]
        skipped = sorted(i for i, why in left.items() if why == "complete")
        busy = sorted(set(left) - set(skipped))
        done = Submission(0, sub_id, backend, todo, skipped, busy, dry_run=options.dry_run)
        if busy:
            print(f"notata submit: {len(busy)} task(s) still queued or running, left out: "
                  f"{compact(busy)}", file=sys.stderr)
        if backend == "local":
            jobs = options.jobs or given.get("jobs") or os.cpu_count() or 1
            pack = check_size(given.get("pack") or 1)
            if (given.get("pack_parallel") or 1) != 1:
                raise UsageError("--pack-parallel is for SLURM array tasks; locally, -j runs "
                                 "packs side by side")
            if options.dry_run:
                print(f"would run tasks {compact(todo) or '(none)'} here, {jobs} at a time"
                      + (f", {pack} per process" if pack > 1 else ""))
                return done
            submissions.append(sweep.base_dir, record(todo, job_ids=[],
                                                      **submissions.this_process()))
            sweep_lock.release()  # a local run may take hours; its tasks now read queued
            done.status = _run_here(sweep, todo, skipped, cmd, jobs, pack, sub_id, progress)
            return done
        if skipped:
            print(f"notata submit: {len(skipped)} task(s) already complete, skipped",
                  file=sys.stderr)
        if not todo:
            done.id = None
            return done
        done.job_ids = _sbatch(sweep, todo, cmd, flags, options.dry_run, sub_id, record)
        return done


def _sbatch(sweep: Sweep, todo: list[int], cmd: list[str], flags: Mapping[str, Any],
            dry_run: bool, sub_id: str, record: Callable[..., dict[str, Any]]) -> list[str]:
    """The SLURM backend: one array per plan, each recorded as intended (with the tag its
    comment carries) before sbatch and as queued (with its job id) after. The job ids."""
    done: list[dict[str, Any]] = []
    trying: list[dict[str, Any]] = []

    def intended(array: dict[str, Any], part: int, parts: int) -> None:
        submissions.append(sweep.base_dir, {
            "submission": sub_id, "part": part, "parts": parts, "intent": True,
            "manifest": str(sweep.path), "manifest_hash": sweep.hash,
            "arrays": [array], "tasks": array["tasks"]})
        trying[:] = [array]

    def submitted(array: dict[str, Any], part: int, parts: int) -> None:
        print(f"submitted job {array['job_id']}: tasks {array['tasks']} ({array['script']})")
        done.append(array)
        submissions.append(sweep.base_dir, record(
            parse_indices(array["tasks"], len(sweep)), part=part, parts=parts,
            arrays=[array], job_ids=[array["job_id"]]))
        trying.clear()

    try:
        sbatch.submit(sweep, todo, cmd, flags=flags, dry_run=dry_run, name=sub_id,
                     intended=intended, submitted=submitted)
    except BaseException as err:
        sbatch.say_what_was_submitted(sweep, todo, done, trying, err)
        raise
    return [str(a["job_id"]) for a in done if a.get("job_id") is not None]


def _run_here(sweep: Sweep, todo: list[int], skipped: list[int], cmd: list[str], jobs: int,
              pack: int, sub_id: str, progress: Any) -> int:
    """The local backend: run the tasks here; record the submission's end."""
    t0 = time.monotonic()
    try:
        result = local.run_local(sweep, todo, cmd, jobs=jobs, pack=pack, skipped=skipped,
                                  progress=progress)
    finally:
        submissions.append(sweep.base_dir, {"submission": sub_id, "ended": True,
                                            "manifest_hash": sweep.hash,
                                            "manifest": str(sweep.path)})
    print(result.summary(time.monotonic() - t0), file=sys.stderr)
    if result.failed:  # where to look next
        name = shlex.quote(str(sweep.path))
        print(f"notata: why they failed: notata status {name} --logs; one task's output: "
              f"notata logs {name} --task {result.failed[0]}", file=sys.stderr)
    if result.interrupted:
        return 128 + result.signal if result.signal else INTERRUPTED
    return FAILED if result.failed else 0


def last_submission(sweep: Sweep) -> dict[str, Any] | None:
    """The latest recorded submission of this sweep (same manifest hash), if any."""
    for record in reversed(submissions.read(sweep.base_dir)):
        if record.get("manifest_hash") == sweep.hash and record.get("backend"):
            return dict(record)
    return None


def _recorded_backend(last: Mapping[str, Any] | None) -> str:
    if last is None:
        return _default_backend()
    backend = str(last.get("backend"))
    if backend in BACKENDS:
        return backend
    raise UsageError(f"the sweep was last submitted through {backend}: resubmit it from "
                     "Python (notata.submitit.submit_sweep(fn, manifest, executor, "
                     "tasks=notata.collect(manifest).to_resubmit()[0])), or choose --backend")


def _default_backend() -> str:
    if slurm.available():
        return "slurm"
    print("notata: no sbatch here; running on this machine (--backend local)", file=sys.stderr)
    return "local"


def _command(command: Sequence[str]) -> list[str]:
    if isinstance(command, (str, bytes)):
        raise UsageError(f"command {command!r}: give a list of arguments, e.g. "
                         f"{shlex.split(str(command))!r} (no shell is involved)")
    if not all(isinstance(c, str) for c in command):
        raise UsageError(f"command {list(command)!r}: every argument must be a string")
    cmd = list(command)
    if not cmd:
        raise UsageError("no command given: put it after --, e.g. -- python sim.py {omega}")
    if cmd[0] == _function.FLAG:  # a typo is an error now, not in every task
        if len(cmd) != 2:
            raise UsageError(f"{_function.FLAG} takes one MODULE:FUNCTION, not {cmd[1:]!r}")
        _function.resolve(cmd[1])
    return cmd


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")


def duration(text: str | None, what: str = "--stale-after") -> float | None:
    """``"90s"``, ``"10m"``, ``"2h"``, ``"1d"`` or plain seconds, as seconds (None stays
    None); anything else is a :class:`UsageError` naming ``what``."""
    if text is None:
        return None
    m = _DURATION.match(str(text))
    if not m:
        raise UsageError(f"{what}: invalid duration {text!r}: use e.g. 90s, 10m, 2h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
