"""``notata shepherd MANIFEST``: one round of a sweep's retries on the cluster, then its
successor, or the sweep's end.

A shepherd is a job, not a daemon (see :mod:`notata.chain` for the chain it belongs to).
When every array of its round has ended, it

1. stands down if it is not the chain's shepherd (another job, or ``notata shepherd`` by
   hand, took the chain over), or if another shepherd of the sweep acts right now (its
   lock);
2. under the sweep's lock (the one ``notata resubmit`` takes: a resubmit by hand at the
   same time never doubles a task), scans the sweep with SLURM's queue;
3. ends the chain if the user cancelled tasks of the round (``scancel``: the user's
   word ends the sweep; a task cancelled before it started reads ``missing``, so SLURM's
   own record of the arrays is asked);
4. gives up the tasks that used their attempts (notata's submissions of the task, the
   first included; SLURM's own requeues are not counted) or that ended the same way at
   their escalation cap, and submits the rest, one array per resource level
   (:func:`notata.retry.plan_round`), recorded in ``submissions.jsonl`` with the chain,
   the round and each task's cause;
5. queues its successor behind the new arrays and the jobs still running tasks, or,
   when nothing is left running or to retry, the sweep's final job (``then``, with the
   sweep's options) that sends the notification; without ``then`` it notifies itself
   (:mod:`notata.settle`).

Every decision is a line of ``.notata/shepherd.log``.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from . import _fs, chain, layout, lock, retry, scheduler, schema, settle, submissions
from .collector import scan
from .errors import NotataError, SchedulerError, UsageError
from .layout import SweepPaths
from .manifest import Sweep, compact, parse_indices
from .manifest import load as load_sweep
from .pack import started_in
from .runstate import PENDING, RunRecord
from .sbatch import SBATCH_TIMEOUT
from .slurm import collector_queue
from .submission import Options, _submit, last_submission


def shepherd(manifest: str | os.PathLike[str] | Sweep, *, then: bool = False,
             as_job: bool = False) -> int:
    """Act once for the sweep's retry chain (the module docstring says how); ``then``:
    run the sweep's final step instead; ``as_job``: run as the chain's job (by hand, it
    always acts). Returns 0 when it acted or stood down, 1 when the chain stopped on an
    error."""
    sweep = manifest if isinstance(manifest, Sweep) else load_sweep(manifest)
    base = sweep.base_dir
    guard = lock.exclusive(SweepPaths(base).shepherd_lock(sweep.name))
    # A job waits a little for its predecessor to finish writing; by hand, a second
    # shepherd exits at once.
    deadline = time.monotonic() + (2 * SBATCH_TIMEOUT + 60 if as_job else 0)
    while not guard.try_acquire():
        if time.monotonic() >= deadline:
            if as_job:  # the chain may now be broken: say so where status looks
                chain.log(base, sweep.name, f"job {_my_job()} gave up waiting for the "
                          "shepherd lock; if status calls the chain broken, run notata "
                          f"shepherd {sweep.path}")
                return 1
            print(f"notata shepherd: another shepherd acts for {sweep.name} right now; "
                  "this one exits")
            return 0
        time.sleep(1.0)
    try:
        state = chain.read(base, sweep.name) or _adopt(sweep)
        policy = retry.policy(sweep.retry, state.attempts, str(sweep.path))
        if policy is None:
            raise UsageError(f"{sweep.path.name} asks for no retries (no retry: section) and "
                             "its chain records no --retry")
        me = _my_job() if as_job else None
        if as_job:
            named = _named(sweep, state, me)
            if named is None:
                return 0
            state = named
            requeued = _restarts()
            if requeued:
                chain.log(base, sweep.name, f"job {me} runs again (SLURM requeued it "
                          f"{requeued} time(s): its node failed, or it was preempted)")
        if then:
            return settle.final(sweep, policy, state, me, guard)
        if not as_job and state.state in (chain.SETTLED, chain.STOPPED):
            chain.log(base, sweep.name, f"by hand: the chain had {state.state} "
                      f"({state.why}); it starts again from round {state.round}")
            state.then_job = state.then_status = state.closer = None
            state.notified, state.given_up, state.failures = False, {}, 0
            state.refused = {}
        if state.state == chain.SETTLING and (chain.job_queued(state.then_job) or
                                              chain.job_queued(state.closer)):
            print(f"notata shepherd: {sweep.name} has settled and its final job "
                  f"{state.then_job} is queued: nothing to do")
            return 0
        if state.manifest_hash != sweep.hash:
            return settle.stop(sweep, state, policy, None, "the manifest changed since the "
                               f"chain began (hash {state.manifest_hash} -> {sweep.hash}): "
                               "submit again", outcome="stopped")
        with _folder(state.cwd):  # the tasks run where the sweep was submitted
            return _round(sweep, policy, state, me)
    finally:
        guard.release()


@contextlib.contextmanager
def _folder(path: str | None) -> Iterator[None]:
    """Submit from ``path`` (sbatch gives a job the folder it was called from), or from
    here when it is gone."""
    here = os.getcwd()
    with contextlib.suppress(OSError):
        os.chdir(path or here)
    try:
        yield
    finally:
        os.chdir(here)


#: sbatch's words when the resources asked for cannot be had at all (not a limit that a
#: later round may be under: a QOS submit limit, a controller that timed out).
_NEVER = re.compile(r"node configuration is not available|Memory specification can not be "
                    r"satisfied|Requested time limit is invalid|Invalid (partition|account|"
                    r"qos)|More processors requested than permitted|Invalid generic resource",
                    re.IGNORECASE)


def _cannot_be_had(err: SchedulerError) -> bool:
    """Whether sbatch refused for good (see :data:`_NEVER`), not for now."""
    return err.returncode is not None and err.returncode > 0 and \
        _NEVER.search(err.stderr or "") is not None


#: Rounds in a row whose submission failed before the chain stops (it never loops).
MAX_FAILURES = 3
#: A shepherd job that the record does not name yet waits this long for it (its
#: predecessor writes the record just after sbatch answered).
NAMED_WITHIN = 10.0


def _named(sweep: Sweep, state: chain.State, me: str | None) -> chain.State | None:
    """The chain's record, if it names this job as the one that acts; else None, said
    in the log (a job of a chain taken over by hand, or one already ended)."""
    deadline = time.monotonic() + NAMED_WITHIN
    while me not in (state.job_id, state.closer) and state.state == chain.WAITING \
            and time.monotonic() < deadline:
        time.sleep(1.0)
        state = chain.read(sweep.base_dir, sweep.name) or state
    if me is not None and me in (state.job_id, state.closer):
        return state
    chain.log(sweep.base_dir, sweep.name, f"job {me} stands down: the chain's shepherd is "
              + (f"job {state.job_id}" if state.job_id else f"none ({state.state})"))
    return None


def _my_job() -> str | None:
    """The job id this process runs in, None by hand."""
    found = scheduler.current(os.environ)
    if found is None:
        return None
    job = found[0].job_id(found[1])
    return None if job is None else str(job)


def _restarts() -> int:
    """How many times SLURM requeued the job this process runs in (0 by hand)."""
    found = scheduler.current(os.environ)
    return 0 if found is None else found[0].restarts(found[1])


def _adopt(sweep: Sweep) -> chain.State:
    """A chain for a sweep submitted without one (``notata shepherd`` by hand on a sweep
    whose manifest has a ``retry:`` section): its last submission's command and options,
    every task."""
    last = last_submission(sweep)
    if last is None or not last.get("command"):
        raise UsageError(f"{sweep.name} was never submitted: notata submit {sweep.path} "
                         "--retry N -- CMD starts its retry chain")
    return chain.State(chain.new_chain(sweep), sweep.name, str(sweep.path), sweep.hash,
                       list(last["command"]), dict(last.get("options") or {}),
                       compact(range(len(sweep))), cwd=os.getcwd())


def _round(sweep: Sweep, policy: retry.Policy, state: chain.State, me: str | None) -> int:
    base, name = sweep.base_dir, sweep.name

    def say(line: str) -> None:
        chain.log(base, name, line)
    looked_after = set(parse_indices(state.tasks, len(sweep)))
    with submissions.sweep_lock(base) as held:
        try:
            queue = collector_queue(base, "shepherd", required=True)
        except SchedulerError as err:  # the controller is busy or down: later
            return _failed(sweep, policy, state, me, f"SLURM's queue could not be read "
                           f"({err})", [], [])
        report = scan(sweep, queue=queue)
        every = submissions.read(base)
        records = [r for r in every if r.get("backend") and not r.get("intent")]
        mine = [r for r in records if r.get("chain") == state.chain
                or r.get("chain") in state.joined]
        last_round = max((int(r.get("round") or 0) for r in mine), default=state.round)
        arrays = [a for r in mine if r.get("round") == last_round for a in r.get("arrays", [])]
        by_task = {r.task: r for r in report.read if r.task is not None}
        ran = {i for r in mine if r.get("round") == last_round
               for i in parse_indices(str(r.get("tasks") or ""), len(sweep))}
        cancelled = {i for i in ran if i in by_task and by_task[i].status == schema.CANCELLED}
        own_output = "output" not in {**sweep.slurm, **state.options}
        recorded, vanished = chain.cancelled_tasks(arrays, base, own_output=own_output)
        cancelled |= {i for i in recorded
                      if i in by_task and by_task[i].status != schema.COMPLETE}
        cancelled |= {i for i, job in vanished.items()  # never started in that array
                      if i in by_task and _not_run_in(by_task[i], job)}
        state.round = max(state.round, last_round)
        if cancelled & looked_after:
            return settle.stop(sweep, state, policy, report,
                               f"tasks {compact(cancelled & looked_after)} were cancelled "
                               "(scancel): a cancel is the user's word, so the chain ends "
                               "here, without more retries or then", outcome="cancelled")
        # the sweep has not settled while any of its tasks runs, looked after or not
        busy = [r for r in by_task.values()
                if r.queued or r.status in schema.OPEN_STATUSES or r.status == PENDING]
        chosen, left = report.to_resubmit(policy.on, None)
        for r, why in left:
            if r.task in looked_after and r not in busy:
                say(f"round {state.round}: task {r.task} left: {why}")
        tries = submissions.tries(every, sweep.hash)
        unbegun = submissions.left(every, sweep.hash, len(sweep))
        todo: list[RunRecord] = []
        given_up: dict[int, str] = {}
        for i in chosen:
            if i not in looked_after or str(i) in state.given_up:
                continue  # a task given up stays so (by hand, a new chain tries again)
            made = tries.get(i, 0)
            if made >= policy.attempts and i in unbegun:  # packs that never began it
                made -= len(unbegun[i] - _began_in(by_task[i]))
            if made >= policy.attempts:
                reason = (by_task[i].reason or "").strip().splitlines()
                given_up[i] = f"{by_task[i].status} after {made} attempt(s), " \
                    "the policy's limit" + (f": {reason[0]}" if reason else "")
            else:
                todo.append(by_task[i])
        groups, capped = retry.plan_round(policy, todo, state.options)
        given_up.update((r.task, why) for r, why in capped if r.task is not None)
        for i, why in sorted(given_up.items()):
            if state.given_up.get(str(i)) != why:
                say(f"task {i} given up: {why}")
            state.given_up[str(i)] = why
        job_ids: list[str] = []
        later: list[int] = []  # refused for now: the next shepherd tries them again
        if groups:
            state.round += 1
        for (time_, mem), tasks in sorted(groups.items(), key=lambda g: g[1][0]):
            given = dict(state.options)
            given.update({k: v for k, v in (("time", time_), ("mem", mem)) if v})
            causes: dict[str, list[int]] = {}
            for i in tasks:
                causes.setdefault(by_task[i].status, []).append(i)
            cause = {status: compact(ts) for status, ts in causes.items()}
            what = ", ".join(f"--{k} {v}" for k, v in (("time", time_), ("mem", mem))
                             if v) or "the same resources"
            try:
                done = _submit(sweep, tasks, state.command, "slurm", Options(), given,
                               progress=None, held=held, again=True,
                               fields={"chain": state.chain, "round": state.round,
                                       "why": cause})
            except SchedulerError as err:
                said = "; ".join(line.strip() for line in (err.stderr or str(err)).splitlines()
                                 if line.strip())
                queued = _queued_in(sweep, state)  # a group split in arrays: some went
                job_ids += [j for j in queued.values() if j not in job_ids]
                tasks = [i for i in tasks if i not in queued]
                here: list[int] = []
                if err.returncode is None or err.returncode <= 0:  # no answer: all later
                    state.round -= 0 if job_ids else 1  # a round with no array did not happen
                    return _failed(sweep, policy, state, me, f"sbatch failed ({err})",
                                   job_ids, busy, queue=queue)
                for i in tasks:  # refused: for good, or for now (a QOS limit says no more)
                    refused = state.refused.get(str(i), 0) + 1
                    state.refused[str(i)] = refused
                    if _cannot_be_had(err) or refused >= MAX_FAILURES:
                        state.given_up[str(i)] = f"{by_task[i].status}; sbatch refused its " \
                            f"next attempt with {what}" + ("" if _cannot_be_had(err) else
                                                           f", {refused} times") + f": {said}"
                    else:
                        here.append(i)
                later += here
                say(f"round {state.round}: sbatch refused tasks {compact(tasks)} with {what}: "
                    f"{said}; " + (f"tasks {compact(here)} are tried again later" if here
                                   else "given up"))
                continue
            except (NotataError, OSError) as err:
                state.round -= 0 if job_ids else 1
                return _failed(sweep, policy, state, me, f"round {state.round + 1} could not "
                               f"be submitted ({err})", job_ids, busy, queue=queue)
            job_ids += done.job_ids
            for i in tasks:
                state.refused.pop(str(i), None)  # taken this time
            say(f"round {state.round}: tasks {compact(tasks)} ("
                + "; ".join(f"{s}: {t}" for s, t in cause.items()) + f") with {what}: "
                f"jobs {', '.join(done.job_ids) or '(none)'}")
        state.failures = 0
    if job_ids or busy or later:
        return _next(sweep, policy, state, job_ids, busy, queue, me)
    return settle.settle(sweep, policy, state, report)


def _failed(sweep: Sweep, policy: retry.Policy, state: chain.State, me: str | None,
            why: str, job_ids: list[str], busy: list[RunRecord], *,
            queue: Any = None) -> int:
    """A round that SLURM did not answer: a later shepherd tries again, at most
    :data:`MAX_FAILURES` rounds in a row (the chain never loops for ever)."""
    state.failures += 1
    if state.failures >= MAX_FAILURES:
        return settle.stop(sweep, state, policy, None, f"{why}, {state.failures} times in "
                           f"a row; once SLURM answers, run notata shepherd {sweep.path}",
                           outcome="stopped")
    chain.log(sweep.base_dir, sweep.name, f"{why}; a shepherd looks again later")
    return _next(sweep, policy, state, job_ids, busy, queue, me, failed=True)


def _queued_in(sweep: Sweep, state: chain.State) -> dict[int, str]:
    """Task -> job id, of what this round recorded as queued so far."""
    return {i: str(j) for r in submissions.submitted(sweep.base_dir)
            if r.get("chain") == state.chain and r.get("round") == state.round
            for j in (r.get("job_ids") or [])[:1]
            for i in parse_indices(str(r.get("tasks") or ""), len(sweep))}


def _began_in(r: RunRecord) -> set[str]:
    """The jobs (array task keys) any attempt of this task's run began in."""
    if r.run_dir is None:
        return set()
    try:
        return started_in(_fs.read_json_object(r.run_dir / layout.METADATA))
    except (OSError, ValueError):
        return set()


def _not_run_in(r: RunRecord, job: str) -> bool:
    """Whether the run's last attempt did not run in array ``job`` (and is over)."""
    if r.status == schema.COMPLETE or r.status in schema.OPEN_STATUSES:
        return False
    return r.array is None or str(r.array[0]) != job


def _next(sweep: Sweep, policy: retry.Policy, state: chain.State, job_ids: list[str],
          busy: list[RunRecord], queue: Any, me: str | None, failed: bool = False) -> int:
    """Queue the successor behind this round's arrays and the jobs that still run tasks."""
    base = sweep.base_dir
    waits = set(job_ids)
    for r in busy:
        if r.array is not None:
            waits.add(str(r.array[0]))
    if queue is not None:  # arrays of this sweep still queued (pending tasks have no run)
        recorded = {str(a["job_id"]) for rec in submissions.submitted(base)
                    if rec.get("manifest_hash") == sweep.hash
                    for a in rec.get("arrays", []) if a.get("job_id") is not None}
        waits |= {queue.provider.split_key(k)[0] for k in queue.jobs} & recorded
    waits.discard(me or "")
    after = sorted(waits, key=lambda j: (len(j), j))
    options = chain.shepherd_options(sweep, state.options, policy.shepherd)
    try:  # busy without a job (a process here runs tasks): it looks again later
        job = chain.submit_shepherd(sweep, options, after, round_=state.round)
    except (SchedulerError, OSError) as err:
        return settle.stop(sweep, state, policy, None, "could not queue the next shepherd "
                           f"({err}): run notata shepherd {sweep.path} to resume",
                           outcome="stopped")
    state.state, state.job_id, state.after = chain.WAITING, job, after
    state.why = (f"round {state.round}: " + ("sbatch failed; " if failed else "")
                 + f"shepherd job {job} waits for jobs {', '.join(after) or '(a while)'}")
    chain.write(base, state)
    chain.log(base, sweep.name, state.why)
    return 1 if failed else 0
