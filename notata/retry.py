"""A sweep's retry policy: which failures to run again, how often, and with what more.

The manifest's ``retry:`` section (flags win, as for ``slurm:``)::

    retry:
      attempts: 3                      # per task, the first included
      on: [failed, timeout, oom, preempted, stale, missing]   # the default; never cancelled
      timeout: {time: 2.0, max: "2-00:00:00"}   # next --time = previous x 2, capped
      oom: {mem: 2.0, max: 256G}                # next --mem = previous x 2, capped
      then: python summarize.py sweep.yaml      # once, when the sweep has settled
      notify: https://hooks.example.org/abc     # a JSON POST when it settles or gives up
      shepherd: {partition: short}              # the shepherd job's own sbatch options

:func:`next_resources` says what the next attempt of a task asks for, by the cause of
its last end: a timeout gets the ``timeout`` rule, an oom the ``oom`` rule, anything else
the same resources again; a task already at its cap that ends the same way again is
given up (None), since the same resources failed already.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from . import schema
from .collector import Report, scan
from .errors import ManifestError
from .manifest import Sweep
from .runstate import MISSING, STALE, RunRecord
from .sbatch_options import mem_bytes, mem_text, options_for, time_limit_sec, time_text
from .taskspec import compact


class _Round(Protocol):
    """What :func:`local_rounds` reads of a round (a :class:`notata.submission.Submission`)."""

    status: int


R = TypeVar("R", bound=_Round)

#: What a policy retries when ``on`` is not given. ``cancelled`` is never retried: a
#: cancel is the user's word.
DEFAULT_ON = (schema.FAILED, schema.TIMEOUT, schema.OOM, schema.PREEMPTED, STALE, MISSING)
RETRIABLE = frozenset({*DEFAULT_ON, schema.TERMINATED})
DEFAULT_FACTOR = 2.0


@dataclass(frozen=True)
class Rule:
    """Escalation of one resource: the next attempt asks ``factor`` x the last one,
    at most ``cap`` (seconds for time, bytes for memory; None: no cap)."""

    factor: float = DEFAULT_FACTOR
    cap: int | None = None

    def next(self, last: int) -> int | None:
        """The next amount after ``last``; None when ``last`` is at the cap already."""
        if self.cap is not None and last >= self.cap:
            return None
        grown = int(last * self.factor + 0.5)
        return min(grown, self.cap) if self.cap is not None else grown


@dataclass(frozen=True)
class Policy:
    """How a sweep's failures are retried (see the module docstring): ``attempts`` per
    task, the first included; the statuses retried (``on``); the escalation rules; the
    ``then`` command and the ``notify`` address for when the sweep settles."""

    attempts: int
    on: frozenset[str] = frozenset(DEFAULT_ON)
    timeout: Rule = Rule()
    oom: Rule = Rule()
    then: tuple[str, ...] = ()
    notify: str | None = None
    shepherd: Mapping[str, str] = field(default_factory=dict)


def policy(section: Mapping[str, Any] | None, attempts: int | None, where: str) -> Policy | None:
    """The policy of a manifest's ``retry:`` section and ``--retry N`` (which wins over
    ``attempts``); None when neither asks for retries. A value that cannot be used is a
    :class:`ManifestError` naming it (the command line exits 2, nothing is submitted)."""
    def fail(problem: str) -> ManifestError:
        return ManifestError(where, f"retry: {problem}")

    section = dict(section or {})
    known = {"attempts", "on", "timeout", "oom", "then", "notify", "shepherd"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise fail(f"unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    asked = attempts is not None or "attempts" in section
    n = attempts if attempts is not None else section.get("attempts", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < (1 if asked else 0):
        raise fail(f"attempts {n!r}: give a whole number, at least 1 (the first attempt counts)")
    on = section.get("on", list(DEFAULT_ON))
    if isinstance(on, str) or not isinstance(on, list) or not on:
        raise fail(f"on {on!r}: give a list of statuses, e.g. [failed, timeout, oom]")
    for status in on:
        if status == schema.CANCELLED:
            raise fail("on: cancelled is never retried (a cancel is the user's word)")
        if status not in RETRIABLE:
            raise fail(f"on: unknown status {status!r}; known: {', '.join(sorted(RETRIABLE))}")
    then = section.get("then") or ()
    if isinstance(then, str):
        try:
            then = shlex.split(then)
        except ValueError as err:
            raise fail(f"then {then!r}: {err}") from None
    if not isinstance(then, (list, tuple)) or not all(isinstance(a, str) for a in then):
        raise fail(f"then {then!r}: give a command, as a string or a list of arguments")
    notify = section.get("notify")
    if notify is not None and (not isinstance(notify, str)
                               or not notify.startswith(("http://", "https://"))):
        raise fail(f"notify {notify!r}: give an http:// or https:// address")
    timeout, oom = _rule(section, "timeout", "time", fail), _rule(section, "oom", "mem", fail)
    own = section.get("shepherd") or {}
    if not isinstance(own, Mapping) or set(own) - set(SHEPHERD_KEYS) or any(
            isinstance(v, (bool, list, dict)) or v is None for v in own.values()):
        raise fail(f"shepherd {own!r}: give sbatch options for the shepherd job, among "
                   f"{', '.join(SHEPHERD_KEYS)}")
    try:  # the same checks as the sweep's own options
        options_for({}, {k: str(v) for k, v in own.items()}, where)
    except ManifestError as err:
        raise fail(f"shepherd: {err.problem}") from None
    if not n:  # checked whole, but nothing asks for retries
        return None
    return Policy(n, frozenset(on), timeout, oom, tuple(then), notify,
                  {k: str(v) for k, v in own.items()})


#: The sbatch options a manifest's ``retry: shepherd:`` may set for the shepherd job.
SHEPHERD_KEYS = ("partition", "account", "qos", "time", "mem")


def _rule(section: Mapping[str, Any], cause: str, what: str, fail: Any) -> Rule:
    spec = section.get(cause, {})
    if not isinstance(spec, Mapping) or set(spec) - {what, "max"}:
        raise fail(f"{cause} {spec!r}: give {{{what}: FACTOR, max: CAP}}")
    factor = spec.get(what, DEFAULT_FACTOR)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1 \
            or not math.isfinite(factor):
        raise fail(f"{cause}.{what} {factor!r}: give a factor of at least 1")
    cap = spec.get("max")
    if cap is None:
        return Rule(float(factor))
    amount = time_limit_sec(str(cap)) if what == "time" else mem_bytes(cap)
    if not amount:
        example = '"2-00:00:00"' if what == "time" else "256G"
        raise fail(f"{cause}.max {cap!r}: not a {'time' if what == 'time' else 'memory'} "
                   f"amount (e.g. {example})")
    return Rule(float(factor), amount)


def next_resources(policy: Policy, cause: str, time: str | None, mem: str | None
                   ) -> dict[str, str] | None:
    """The ``--time`` and ``--mem`` of a task's next attempt after it ended with ``cause``,
    from its last attempt's (None: not given, left as the manifest has it); None when the
    task is given up (at its cap already, for the resource that ran out)."""
    out = {k: v for k, v in (("time", time), ("mem", mem)) if v is not None}
    rules = {schema.TIMEOUT: ("time", policy.timeout, time_limit_sec, time_text),
             schema.OOM: ("mem", policy.oom, mem_bytes, mem_text)}
    if cause not in rules or rules[cause][0] not in out:
        return out  # the same resources again (or nothing given to grow)
    key, rule, read, write = rules[cause]
    amount = read(out[key])
    if not amount:
        return out  # unlimited, or not understood: left as it was
    grown = rule.next(amount)
    if grown is None:
        return None  # at its cap already: the same resources failed once
    out[key] = write(grown)
    return out


def plan_round(policy: Policy, chosen: list[RunRecord], given: Mapping[str, Any]
               ) -> tuple[dict[tuple[str | None, str | None], list[int]],
                          list[tuple[RunRecord, str]]]:
    """The next round on a scheduler: the ``chosen`` tasks grouped by the ``(--time,
    --mem)`` their next attempt asks for (one array per group), and those given up, with
    why. A task's last resources are what its last attempt recorded it asked for
    (``resources.asked``), else the options ``given`` to the sweep (``time``, ``mem``)."""
    groups: dict[tuple[str | None, str | None], list[int]] = {}
    given_up: list[tuple[RunRecord, str]] = []
    for r in chosen:
        asked = r.asked or {}
        time_ = asked.get("time_limit")
        if time_limit_sec(None if time_ is None else str(time_)) is None:
            time_ = given.get("time")  # UNLIMITED, or not recorded: as the sweep asked
        mem = mem_text(asked["mem_bytes"]) if asked.get("mem_bytes") \
            else given.get("mem")
        nxt = next_resources(policy, r.status, None if time_ is None else str(time_),
                             None if mem is None else str(mem))
        if nxt is None:
            what = "--time" if r.status == schema.TIMEOUT else "--mem"
            given_up.append((r, f"{r.status} again with {what} at its cap"))
        elif r.task is not None:  # "2" and "00:02:00" are one array (one pack)
            groups.setdefault((_same_time(nxt.get("time")), _same_mem(nxt.get("mem"))),
                              []).append(r.task)
    return groups, given_up


def _same_time(value: str | None) -> str | None:
    """A ``--time`` value as one spelling (``2`` -> ``00:02:00``); as given if not read."""
    sec = time_limit_sec(value)
    return value if sec is None else time_text(sec)


def _same_mem(value: str | None) -> str | None:
    """A ``--mem`` value as one spelling (``4096M`` -> ``4G``); as given if not read."""
    n = mem_bytes(value)
    return value if n is None else mem_text(n)


def local_rounds(sweep: Sweep, policy: Policy, first: R, tasks: list[int],
                 again: Callable[[list[int]], R]) -> R:
    """The local backend's retries, in this process: after each round, the ``tasks``
    whose status is in ``policy.on`` and that have attempts left run again
    (``again(tasks)``, the same resources: escalation needs a scheduler, and it says so),
    never one that ``resubmit`` would leave (a survivor of its last attempt still runs, a
    live process holds it, it is queued), at most ``attempts - 1`` rounds. When no task is
    left running anywhere, ``then`` runs once and ``notify`` is told; an interrupted round
    ends it all. Returns the last round's :class:`~notata.submission.Submission`, with
    ``status`` 0 when every task is complete, 1 when some were given up or left."""
    done, started, wanted, report = first, time.monotonic(), set(tasks), None
    if policy.timeout != Rule() or policy.oom != Rule():
        print("notata submit: --backend local: failures are retried with the same "
              "resources (timeout and oom escalation needs a scheduler)", file=sys.stderr)
    for round_ in range(2, policy.attempts + 1):
        if done.status not in (0, 1):
            return done  # interrupted: nothing more, no then, no notify
        report = scan(sweep)
        chosen, left = report.to_resubmit(policy.on, policy.attempts)
        todo = [i for i in chosen if i in wanted]
        for r, why in left:
            if r.task in wanted and r.attempt < policy.attempts:
                print(f"notata submit: leaving task {r.task} ({r.run_id}): {why}",
                      file=sys.stderr)
        if not todo:
            break  # this scan is the sweep as it settled
        report = None
        print(f"notata submit: retry round {round_}: tasks {compact(todo)}", file=sys.stderr)
        done = again(todo)
    if done.status not in (0, 1):
        return done
    report = report or scan(sweep)
    mine = [r for r in report.read if r.task in wanted]
    busy = [r for r in mine if r.status in schema.OPEN_STATUSES or r.queued]
    given_up = [r for r in mine if r not in busy and r.status != schema.COMPLETE]
    for r in given_up:
        print(f"notata submit: gave up task {r.task} ({r.run_id}) after {r.attempt} "
              f"attempt(s): {r.status}" + (f": {r.reason}" if r.reason else ""),
              file=sys.stderr)
    done.status = 1 if given_up or busy else 0
    if busy:  # another process runs them: the sweep has not settled
        print(f"notata submit: tasks {compact(r.task for r in busy if r.task is not None)} "
              "still run elsewhere: the sweep has not settled, so then and notify wait for "
              "a submit that sees it settle", file=sys.stderr)
        return done
    try:
        settle(sweep, policy, report, given_up, time.monotonic() - started)
    except KeyboardInterrupt:
        print("notata submit: interrupted while the sweep settled", file=sys.stderr)
        done.status = 130
    return done


def settle(sweep: Sweep, policy: Policy, report: Report, given_up: list[RunRecord],
           elapsed: float) -> None:
    """The sweep has settled: run ``then`` once (no shell; its exit status is told), then
    send the notification (one JSON POST, a short timeout; a failure is said, never fatal)."""
    then_status = None
    if policy.then:
        try:
            then_status = subprocess.run(list(policy.then), cwd=sweep.path.parent).returncode
        except OSError as err:
            print(f"notata: then {shlex.join(policy.then)}: {err}", file=sys.stderr)
            then_status = 127
    if policy.notify:
        notify(policy.notify, summary(sweep, report, given_up, then_status, elapsed))


def summary(sweep: Sweep, report: Report, given_up: list[RunRecord],
            then_status: int | None, elapsed: float, outcome: str = "settled",
            why: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The notification's JSON: the sweep, how it ended (``settled``, ``cancelled``),
    its counts by status, the tasks given up with why, the ``then`` command's exit
    status, and the seconds it took."""
    why = why or {}
    return {"sweep": sweep.name, "manifest": str(sweep.path), "outcome": outcome,
            "counts": report.counts,
            "given_up": [{"task": r.task, "run_id": r.run_id, "status": r.status,
                          "attempts": r.attempt,
                          "reason": why.get(r.task if r.task is not None else -1, r.reason)}
                         for r in given_up],
            "then_exit_status": then_status, "seconds": round(elapsed, 1)}


NOTIFY_TIMEOUT = 10.0


def notify(url: str, payload: Mapping[str, Any]) -> bool:
    """POST ``payload`` as JSON to ``url``, waiting :data:`NOTIFY_TIMEOUT` seconds in all;
    whether it was taken. A failure (a bad address, a server that trickles, a refused
    connection) is one line on stderr, never raised: a notification must not fail a
    sweep. A server that has not answered in time is left to a daemon thread."""
    outcome: list[object] = []

    def post() -> None:
        request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=NOTIFY_TIMEOUT) as answer:
                outcome.append(answer.status)
        except Exception as err:  # anything: http.client raises more than OSError
            outcome.append(err)

    worker = threading.Thread(target=post, name="notata-notify", daemon=True)
    worker.start()
    worker.join(NOTIFY_TIMEOUT)
    said = outcome[0] if outcome else f"no answer in {NOTIFY_TIMEOUT:.0f} s"
    if isinstance(said, int) and 200 <= said < 300:
        return True
    print(f"notata: could not notify {url}: {said}", file=sys.stderr)
    return False
