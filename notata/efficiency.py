"""How much of what it asked for each run used, and what to ask for next time.

From each run's ``resources`` record (:mod:`notata.resources`: what its last attempt asked
the scheduler for and what it used), with no scheduler accounting (``sacct``, ``seff``):

- **time**: runtime / the job's time limit;
- **memory**: the peak / the memory granted (``--mem``, or ``--mem-per-cpu`` x CPUs). The
  peak is notata's one definition (the largest resident set of any one process of the
  run's command, from the kernel's count for every process reaped); the suggestion takes
  the larger of that and the heartbeat's sampled total of the whole process tree, which is
  closer to what a cgroup counts;
- **CPU**: CPU time / (CPUs granted x runtime); ``cores`` is CPU time / runtime.

Over a sweep: the 50th and 95th percentiles of each, over its complete runs (a failed
run's figures stop where it failed), and a **suggestion** for the next submission:
``--time`` at the 95th percentile of the runtimes plus 25 % (at least 30 s more),
``--mem`` at the 95th percentile of the peaks plus 20 %, each rounded up as SLURM users
write them (:func:`round_time`, :func:`round_mem`); ``--cpus-per-task`` only when the runs
used under half of the CPUs they had. Runs that timed out or were killed for memory did
not show what they need: the suggestion is then at least what the retry policy's
escalation (:func:`notata.retry.next_resources`: the manifest's ``retry:`` rules, else x2)
gives their next attempt (taken as it is, not rounded), so that the two never disagree.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import retry, schema, submissions
from .collector import Report, scan
from .manifest import Sweep
from .resources import size_text
from .sbatch_options import mem_bytes, mem_text, time_limit_sec, time_text

#: The margins of the suggestion over the 95th percentile.
TIME_MARGIN, MEM_MARGIN = 1.25, 1.20
#: ... and at least this much more time (a task's start, Python's imports).
TIME_FLOOR_SEC = 30


@dataclass(frozen=True)
class Usage:
    """One run's figures (None: not recorded)."""

    run_id: str
    task: int | None
    status: str
    runtime_sec: float | None
    peak_bytes: int | None  # the peak (the largest resident set of any one process)
    tree_bytes: int | None  # the heartbeat's largest sampled total of the process tree
    cpu_sec: float | None
    time_limit: str | None  # as the scheduler prints it
    mem_bytes: int | None  # granted
    cpus: int | None
    pack: int | None = None  # the size of the pack it ran in (its job's --time covers all)

    @property
    def limit_sec(self) -> int | None:
        return time_limit_sec(self.time_limit)

    @property
    def time_share(self) -> float | None:
        """Runtime / the time limit; None in a pack (the limit is the whole pack's)."""
        limit = self.limit_sec
        return self.runtime_sec / limit \
            if self.runtime_sec is not None and limit and not self.pack else None

    @property
    def mem_share(self) -> float | None:
        return self.peak_bytes / self.mem_bytes \
            if self.peak_bytes is not None and self.mem_bytes else None

    @property
    def cores(self) -> float | None:
        """CPU time / runtime; None under a second (CPU time is counted in 10 ms steps)."""
        return self.cpu_sec / self.runtime_sec \
            if self.cpu_sec is not None and self.runtime_sec and self.runtime_sec >= 1 \
            else None

    @property
    def cpu_share(self) -> float | None:
        cores = self.cores
        return cores / self.cpus if cores is not None and self.cpus else None


#: A figure beyond this is no figure (a corrupt record: no run runs for 30,000 years,
#: nor holds an exabyte).
LARGEST = 1e18


def _number(value: Any) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        return None
    return number if math.isfinite(number) and 0 <= number < LARGEST else None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def figures(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a run's metadata that :class:`Usage` holds (a scan's ``keep``: never
    raises for odd field types)."""
    res = _mapping(meta.get("resources"))
    used, asked = _mapping(res.get("used")), _mapping(res.get("asked"))
    hb = _mapping(meta.get("heartbeat"))
    peak, tree, mem, cpus = (_number(x) for x in (
        used.get("peak_rss_bytes"), hb.get("peak_rss_bytes"), asked.get("mem_bytes"),
        asked.get("cpus")))
    limit = asked.get("time_limit")
    return {"runtime_sec": _number(used.get("runtime_sec", meta.get("runtime_sec"))),
            "peak_bytes": None if peak is None else int(peak),
            "tree_bytes": None if tree is None else int(tree),
            "cpu_sec": _number(used.get("cpu_time_sec")),
            "time_limit": str(limit) if isinstance(limit, (str, int)) else None,
            "mem_bytes": None if mem is None else int(mem),
            "cpus": None if cpus is None else int(cpus),
            "pack": _pack_size(meta)}


def _pack_size(meta: Mapping[str, Any]) -> int | None:
    pack = _mapping(meta.get("pack")) if meta.get("task_from") == "pack" else {}
    size = _number(pack.get("size"))
    return int(size) if size else None


def round_time(sec: float) -> int:
    """Seconds rounded up as a time limit is written: to the minute up to 10 minutes, to
    5 minutes up to an hour, to 15 minutes up to a day, then to the hour."""
    grain = 60 if sec <= 600 else 300 if sec <= 3600 else 900 if sec <= 86400 else 3600
    return max(grain, math.ceil(sec / grain) * grain)


def round_mem(n: float) -> int:
    """Bytes rounded up as ``--mem`` is written: to 128 MiB under a GiB, then to the GiB."""
    grain = 2**27 if n < 2**30 else 2**30
    return max(grain, math.ceil(n / grain) * grain)


def _pct(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(50th percentile, 95th, max), or None without values."""
    if not values:
        return None
    p50, p95 = np.percentile(np.asarray(values, dtype=float), [50, 95])
    return float(p50), float(p95), float(max(values))


@dataclass
class Efficiency:
    """A sweep's figures: per run (:attr:`runs`), their percentiles over the complete runs
    (:meth:`spread`), and the suggestion (:attr:`suggest`, with :attr:`why`)."""

    runs: list[Usage]
    policy: retry.Policy | None = None
    #: The sweep's own options (``time``, ``mem``: the manifest's ``slurm:`` section and
    #: the last submission's flags), for a run whose limit was not recorded, as the
    #: retry shepherd reads them (:func:`notata.retry.plan_round`).
    given: Mapping[str, Any] = field(default_factory=dict)
    suggest: dict[str, str] = field(default_factory=dict)
    why: list[str] = field(default_factory=list)
    complete: list[Usage] = field(default_factory=list, init=False, repr=False)
    _spreads: dict[str, tuple[float, float, float] | None] = field(
        default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.complete = [u for u in self.runs if u.status == schema.COMPLETE]
        self._suggest()

    def spread(self, name: str) -> tuple[float, float, float] | None:
        """(p50, p95, max) over the complete runs of a :class:`Usage` figure
        (``runtime_sec``, ``peak_bytes``, ``cores``, ``time_share``...), worked out once."""
        if name not in self._spreads:
            self._spreads[name] = _pct([v for u in self.complete
                                        if (v := getattr(u, name)) is not None])
        return self._spreads[name]

    def asked(self, name: str) -> list[Any]:
        """The distinct amounts the runs were granted (``time_limit``, ``mem_bytes``,
        ``cpus``), most common first."""
        counts: dict[Any, int] = {}
        for u in self.runs:
            value = getattr(u, name)
            if value is not None:
                counts[value] = counts.get(value, 0) + 1
        return sorted(counts, key=lambda v: -counts[v])

    def _suggest(self) -> None:
        rule = self.policy or retry.Policy(attempts=2)  # the default escalation: x 2
        done = self.complete
        runtime = self.spread("runtime_sec")
        time_need = mem_need = 0  # measured, rounded up; an escalation is taken as it is
        if runtime is not None and runtime[1] > 0:
            time_need = round_time(max(runtime[1] * TIME_MARGIN, runtime[1] + TIME_FLOOR_SEC))
        peaks = [max(u.peak_bytes or 0, u.tree_bytes or 0) for u in done]
        if any(peaks):
            mem_need = round_mem(float(np.percentile(peaks, 95)) * MEM_MARGIN)
        if done:
            self.why.append(f"from the {len(done)} complete run(s): the 95th percentile "
                            f"+{TIME_MARGIN - 1:.0%} time, +{MEM_MARGIN - 1:.0%} memory")
        for status, what in ((schema.TIMEOUT, "time"), (schema.OOM, "mem")):
            hit = [u for u in self.runs if u.status == status]
            grown: list[int] = []
            for u in hit:
                limit = u.time_limit if u.limit_sec else self.given.get("time")
                if time_limit_sec(None if limit is None else str(limit)) is None \
                        and u.runtime_sec:  # unknown: it ran this long before it was stopped
                    limit = time_text(int(u.runtime_sec))
                mem = mem_text(u.mem_bytes) if u.mem_bytes else self.given.get("mem")
                nxt = retry.next_resources(rule, status, None if limit is None else str(limit),
                                           None if mem is None else str(mem)) or {}
                amount = (time_limit_sec(nxt.get("time")) if what == "time"
                          else mem_bytes(nxt.get("mem")))
                if amount:
                    grown.append(amount)
            if grown:
                top = max(grown)
                said = time_text(top) if what == "time" else mem_text(top)
                word = "timed out" if status == schema.TIMEOUT else "were killed for memory"
                self.why.append(f"{len(hit)} run(s) {word}: the retry policy gives their "
                                f"next attempt --{what} {said}")
                if what == "time":
                    time_need = max(time_need, top)
                else:
                    mem_need = max(mem_need, top)
        packs = [u.pack for u in done if u.pack]
        if time_need and packs:  # a pack's --time is its tasks' together: say per task
            self.suggest["task-time"] = _duration(time_need)
            self.why.append(f"the runs ran in packs (of up to {max(packs)}): --time covers a "
                            "whole pack; per task, for --pack-time's --task-time, as shown")
        elif time_need:
            self.suggest["time"] = time_text(time_need)
        if mem_need:
            self.suggest["mem"] = mem_text(mem_need)
        cores, cpus = self.spread("cores"), self.asked("cpus")
        if cores and cpus and cpus[0] > 1 and cores[1] < cpus[0] / 2:
            self.suggest["cpus-per-task"] = str(max(1, math.ceil(cores[1])))
            self.why.append(f"the runs used {cores[1]:.1f} of their {cpus[0]} CPUs at the "
                            "95th percentile")

    def lines(self) -> list[str]:
        """The text ``notata status --resources`` prints."""
        done = self.complete
        if not done:
            return ["resources: no complete run yet to measure"]
        out = [f"resources of {len(done)} complete run(s) (of {len(self.runs)} read); "
               "memory: the largest resident set of any one process",
               f"  {'':<9}{'p50':>10}{'p95':>10}{'max':>10}{'asked':>12}   used of asked "
               "(p50 / p95)"]
        rows: Iterable[tuple[str, str, str, str, Any]] = (
            ("runtime", "runtime_sec", "time_share", "time_limit", _clock),
            ("memory", "peak_bytes", "mem_share", "mem_bytes", size_text),
            ("cores", "cores", "cpu_share", "cpus", lambda v: f"{v:.2f}"))
        for label, name, share_name, asked_name, fmt in rows:
            spread = self.spread(name)
            if spread is None:
                continue
            asked = self.asked(asked_name)
            asked_text = "" if not asked else (
                size_text(asked[0]) if asked_name == "mem_bytes" else str(asked[0])) + (
                "+" if len(asked) > 1 else "")
            share = self.spread(share_name)
            share_text = f"{share[0]:.0%} / {share[1]:.0%}" if share else "-"
            out.append(f"  {label:<9}" + "".join(f"{fmt(v):>10}" for v in spread)
                       + f"{asked_text or '-':>12}   {share_text}")
        if self.suggest:
            out.append("suggested for the next submission: "
                       + " ".join(f"--{k} {v}" for k, v in self.suggest.items()))
            out += [f"  ({w})" for w in self.why]
        return out

    def as_json(self) -> dict[str, Any]:
        names = ("runtime_sec", "peak_bytes", "cores", "time_share", "mem_share", "cpu_share")
        return {"complete_runs": len(self.complete), "runs": len(self.runs),
                "percentiles": {n: dict(zip(("p50", "p95", "max"), s, strict=True))
                                for n in names if (s := self.spread(n)) is not None},
                "suggest": self.suggest, "why": self.why}


def _duration(sec: int) -> str:
    """Seconds as ``--task-time`` takes them: ``90s``, ``5m``, ``2h``."""
    for unit, size in (("h", 3600), ("m", 60)):
        if sec % size == 0:
            return f"{sec // size}{unit}"
    return f"{sec}s"


def _clock(sec: float) -> str:
    if sec < 60:
        return f"{sec:.1f}s"
    whole = int(round(sec))
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def measure(target: Sweep | str | os.PathLike[str], report: Report | None = None
            ) -> Efficiency:
    """The figures of a sweep (its manifest's retry policy applies) or a folder of runs,
    from ``report`` (a full scan with ``keep=figures``: ``status --resources`` scans once)
    or from a scan of its own (one read of each run's metadata.json)."""
    runs = (report or scan(target, full=True, keep=figures)).runs
    return Efficiency([Usage(r.run_id, r.task, r.status, **r.kept) for r in runs
                       if r.kept is not None], *policy_of(target))


def policy_of(target: Sweep | str | os.PathLike[str]
              ) -> tuple[retry.Policy | None, dict[str, Any]]:
    """A sweep's retry policy and its own options (the manifest's ``slurm:``, then the
    last submission's flags over them); none for a folder of runs."""
    if not isinstance(target, Sweep):
        return None, {}
    policy = retry.policy(target.retry, None, str(target.path)) if target.retry else None
    given = dict(target.slurm)
    last = [r for r in submissions.submitted(target.base_dir)
            if r.get("manifest_hash") == target.hash and isinstance(r.get("options"), dict)]
    if last:
        given.update({k: v for k, v in last[-1]["options"].items() if v is not None})
    return policy, given
