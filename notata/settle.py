"""The end of a sweep's retry chain on SLURM: the final job that runs ``then`` once, the
one notification, and a chain stopped with why (see :mod:`notata.shepherd` for a round,
:mod:`notata.chain` for the record).

``then`` is never run twice by a job: it may have done part of its work (a summary half
written, the next sweep submitted) when its job ended early (cancelled, out of time,
requeued after its node failed). The final job running again, or else its closer, wraps
up instead: the chain reads settled, saying where ``then`` was lost, and the
notification goes out once; ``notata shepherd MANIFEST --then`` runs ``then`` by hand.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
import time
from pathlib import Path

from . import chain, lock, retry, schema, slurm
from .collector import Report, scan
from .errors import NotataError
from .manifest import Sweep, parse_indices


def settle(sweep: Sweep, policy: retry.Policy, state: chain.State, report: Report) -> int:
    """Nothing runs, nothing to retry: the final job (and its closer, which wraps up if
    the final job ends before ``then`` has), or the notification now."""
    base = sweep.base_dir
    counts = ", ".join(f"{n} {s}" for s, n in report.counts.items() if n)
    if policy.then:
        try:
            job = chain.submit_then(sweep, state.options)
        except (NotataError, OSError) as err:
            return stop(sweep, state, policy, report, f"settled ({counts}), but its final "
                        f"job could not be queued ({err})", outcome="settled")
        try:
            closer: str | None = chain.submit_shepherd(
                sweep, chain.shepherd_options(sweep, state.options, policy.shepherd), [job],
                round_=state.round, then=True)
        except (NotataError, OSError) as err:
            closer = None
            chain.log(base, sweep.name, f"no closer after final job {job} ({err}): if it "
                      f"ends early, notata shepherd {sweep.path} --then runs then here")
        state.state, state.job_id, state.then_job, state.after = chain.SETTLING, job, job, []
        state.closer, state.then_status = closer, None
        state.why = f"settled ({counts}); final job {job} runs: {shlex.join(policy.then)}"
        chain.write(base, state)
        chain.log(base, sweep.name, state.why)
        return 0
    state.state, state.job_id, state.after = chain.SETTLED, None, []
    state.why = f"settled ({counts}) after {state.round} round(s)"
    notify(sweep, policy, state, report, "settled")
    chain.write(base, state)
    chain.log(base, sweep.name, state.why)
    return 0


#: ``then_status`` while ``then`` runs: a final job that ends before it has a status.
STARTED = -1


def final(sweep: Sweep, policy: retry.Policy, state: chain.State, me: str | None,
          guard: lock.Exclusive) -> int:
    """The sweep's final step: ``then``, once, then the notification. Run by the final
    job, by hand (``--then``), or by the closer, which only wraps up a final job that
    ended early (killed, out of time, requeued): said, notified, never run again."""
    base = sweep.base_dir
    if state.state not in (chain.SETTLING, chain.SETTLED):
        print(f"notata shepherd --then: the chain is {state.state}: the sweep has not "
              "settled, nothing to do")
        return 0
    if me is None and state.state == chain.SETTLING \
            and chain.job_queued(state.then_job) is not False:
        print(f"notata shepherd --then: the final job {state.then_job} is queued or running "
              "(or SLURM cannot say): it runs then; nothing to do here")
        return 0
    closing = me is not None and me == state.closer
    if closing or (me is not None and state.then_status is not None):
        if state.state == chain.SETTLED:
            chain.log(base, sweep.name, f"job {me}: the final job finished; nothing to do")
            return 0
        ended = f"before then finished ({_where_lost(state)})" \
            if state.then_status == STARTED else \
            "before then started (killed, out of time or requeued)"
        state.then_status = None
        state.state, state.job_id, state.closer = chain.SETTLED, None, None
        state.why = f"settled after {state.round} round(s); the final job {state.then_job} " \
            f"ended {ended}; then is never run twice by a job: notata shepherd " \
            f"{sweep.path} --then runs it here"
        notify(sweep, policy, state, scan(sweep), "settled")
        chain.write(base, state)
        chain.log(base, sweep.name, state.why)
        return 0
    state.then_status = STARTED  # a requeued final job does not run it twice
    state.then_host = socket.gethostname()
    chain.write(base, state)
    chain.log(base, sweep.name, f"then: {shlex.join(policy.then)}")
    guard.release()  # then may take hours: a submit meanwhile must not wait for it
    try:
        status = subprocess.run(list(policy.then), cwd=Path(sweep.path).parent).returncode
    except OSError as err:
        chain.log(base, sweep.name, f"then could not start: {err}")
        status = 127
    with guard:
        return then_ended(sweep, policy, state, status)


def then_ended(sweep: Sweep, policy: retry.Policy, state: chain.State, status: int) -> int:
    """Record how ``then`` ended (under the shepherd lock). A ``then`` whose final job was
    wrapped up meanwhile as lost (its node cut off, then back) and that finished anyway
    says so in the record, so that nobody runs it again by hand; the notification has
    gone out already."""
    base = sweep.base_dir
    now = chain.read(base, sweep.name)
    if now is not None and now.chain == state.chain and now.then_status == STARTED:
        return _finish_then(sweep, policy, now, status)
    if now is not None and now.chain == state.chain and now.state == chain.SETTLED \
            and now.then_status is None and now.then_job == state.then_job:
        where = f" on {now.then_host}" if now.then_host else ""
        now.then_status = status
        now.why = f"settled after {now.round} round(s); then, taken for lost with its final " \
            f"job {now.then_job}, finished after all (exit {status}{where}): do not run it " \
            "again"
        chain.write(base, now)
        chain.log(base, sweep.name, now.why)
        return 0
    chain.log(base, sweep.name, f"then exited {status}; the chain's record moved on "
              f"meanwhile ({now.why if now else 'gone'}): not recorded again")
    return 0


def _finish_then(sweep: Sweep, policy: retry.Policy, state: chain.State, status: int) -> int:
    base = sweep.base_dir
    state.then_status = status
    state.state, state.job_id = chain.SETTLED, None
    state.why = f"settled after {state.round} round(s); then exited {status}"
    notify(sweep, policy, state, scan(sweep), "settled")
    chain.write(base, state)
    chain.log(base, sweep.name, state.why)
    return 0


def stop(sweep: Sweep, state: chain.State, policy: retry.Policy, report: Report | None,
          why: str, outcome: str | None = None) -> int:
    """End the chain, saying why; notify when the sweep ended (``outcome``: settled,
    cancelled; stopped, by an error: exit status 1)."""
    state.state, state.job_id, state.after, state.why = chain.STOPPED, None, [], why
    if outcome is not None:
        notify(sweep, policy, state, report or scan(sweep), outcome)
    chain.write(sweep.base_dir, state)
    chain.log(sweep.base_dir, sweep.name, f"stopped: {why}")
    return 1 if outcome in (None, "stopped") else 0


def notify(sweep: Sweep, policy: retry.Policy, state: chain.State, report: Report,
            outcome: str) -> None:
    """The one notification of the chain (never twice)."""
    if not policy.notify or state.notified:
        return
    looked_after = set(parse_indices(state.tasks, len(sweep)))
    left = [r for r in report.read if r.task in looked_after and r.status != schema.COMPLETE]
    why = {int(k): v for k, v in state.given_up.items()}
    then = None if state.then_status == STARTED else state.then_status
    payload = retry.summary(sweep, report, left, then, time.time() - state.started_unix,
                            outcome, why)
    payload["rounds"] = state.round
    sent = retry.notify(policy.notify, payload)
    state.notified = True  # once, taken or not: a failure is said, never sent again
    with contextlib.suppress(OSError):
        chain.log(sweep.base_dir, sweep.name, f"notify {policy.notify}: "
                  + ("sent" if sent else "not taken (see the line above)"))

def _where_lost(state: chain.State) -> str:
    """Why the final job ended before ``then`` finished, as far as SLURM says: its node is
    down (or not responding), else the usual causes."""
    host = state.then_host
    lost = slurm.SLURM.node_lost({"nodelist": host}) if host else None
    return (f"on {host}: " if host else "") + (lost or "killed, out of time or requeued")
