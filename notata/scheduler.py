"""The seam between notata and a batch scheduler: what the rest of the package may ask.

A scheduler module (:mod:`notata.slurm`) implements :class:`SchedulerProvider` and is
registered with :func:`register` (``notata/__init__.py`` registers SLURM's). Everything
else asks through the functions below, and never names a scheduler's environment
variables, job states or metadata fields: a second scheduler (PBS, LSF) is one new
module and one ``register`` call.

A run's metadata holds, under the provider's :attr:`~SchedulerProvider.name` (``"slurm"``),
the context the provider gave when the run started; the functions that take ``meta``
find it there.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol


class SchedulerProvider(Protocol):
    """What notata asks of a batch scheduler, inside a job and from the login node."""

    #: The metadata field holding the job's context (``"slurm"``).
    name: str
    #: How messages name it (``"SLURM"``).
    title: str

    # -- inside a job --

    def context(self, environ: Mapping[str, str]) -> dict[str, Any] | None:
        """Fields to record when this process runs under the scheduler, else None.

        Fast (the environment only): it is recorded in the run's first write."""

    def details(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """The context completed (or corrected) by asking the scheduler (slow); the context
        as it is when it cannot answer."""

    def array_task(self, environ: Mapping[str, str]) -> int | None:
        """This job's task id in its job array, by the environment, else None."""

    def is_array_task(self, environ: Mapping[str, str]) -> bool:
        """Whether this job really is an array task (asks the scheduler: an inherited
        environment may say so wrongly); True when it cannot answer."""

    def requeued(self, context: Mapping[str, Any]) -> bool:
        """Whether this job has run before (the scheduler requeued it)."""

    def restarts(self, context: Mapping[str, Any]) -> int:
        """How many times the scheduler had requeued this job when the record was made."""

    def termination_status(self, context: Mapping[str, Any], now: float) -> str | None:
        """The status a SIGTERM means for this job (timeout, cancelled, preempted), or None."""

    def out_of_memory(self, context: Mapping[str, Any], base_dir: Path) -> str | None:
        """The scheduler's own word that this job was killed for memory (a line of its
        output file under ``base_dir``'s ``.notata/``), else None."""

    def output_file(self, context: Mapping[str, Any], base_dir: Path) -> Path | None:
        """The scheduler's own output file of this job as notata's job scripts name it
        (under ``base_dir``'s ``.notata/``), else None."""

    def requested(self, context: Mapping[str, Any], environ: Mapping[str, str]
                  ) -> dict[str, Any]:
        """What the job asked for, as far as it is known: ``time_limit`` (as the scheduler
        prints it), ``mem_bytes``, ``cpus``, ``gpus`` (see :mod:`notata.resources`)."""

    # -- a job as a run's metadata records it, and as the queue lists it --

    def job_id(self, context: Mapping[str, Any]) -> object:
        """The id of the job itself as recorded (an array task's own job id, not the
        array's), else None."""

    def job_key(self, context: Mapping[str, Any]) -> str | None:
        """How the scheduler's queue names this job (``"123"``, or ``"123_4"`` in an array)."""

    def array_of(self, context: Mapping[str, Any]) -> tuple[int, int] | None:
        """(array job id, array task id) of a job that ran as an array task, else None."""

    def split_key(self, key: str) -> tuple[str, int | None]:
        """A queue key as (job or array job id, array task id or None)."""

    def is_alive(self, state: str) -> bool:
        """Whether a job in this queue state is alive: its run is never judged stale."""

    def is_running(self, state: str) -> bool:
        """Whether a job in this queue state is running now (not pending, not ending)."""

    def is_waiting(self, state: str) -> bool:
        """Whether a job in this queue state waits to start (again, after a requeue)."""

    # -- the nodes a job ran on --

    def nodes_of(self, context: Mapping[str, Any]) -> list[str]:
        """The nodes a job ran on, as its record says (none when it does not say)."""

    def node_trouble(self, state: str) -> str | None:
        """What is wrong with a node in this state (``"is down"``, ``"is not
        responding"``), else None."""

    def ended_with_node(self, context: Mapping[str, Any]) -> str | None:
        """Why the scheduler ended the job for a node failure (``"its job 240 ended
        NODE_FAIL"``: asks it, slow), else None (also when it cannot say)."""

    def node_lost(self, context: Mapping[str, Any]) -> str | None:
        """``"node n2 is down"`` when the scheduler says a node the job ran on is down or
        not responding (asks it: slow), else None (also when it cannot answer)."""


_PROVIDERS: list[SchedulerProvider] = []


def register(provider: SchedulerProvider) -> None:
    """Make ``provider`` known to every Logbook and scan from now on."""
    if all(p.name != provider.name for p in _PROVIDERS):
        _PROVIDERS.append(provider)


def default() -> SchedulerProvider | None:
    """The first registered scheduler (a :class:`~notata.queue.Queue` made without a
    provider reads keys and states with it)."""
    return _PROVIDERS[0] if _PROVIDERS else None


def names() -> frozenset[str]:
    """The metadata fields the registered schedulers fill."""
    return frozenset(p.name for p in _PROVIDERS)


def current(
    environ: Mapping[str, str],
) -> tuple[SchedulerProvider, dict[str, Any]] | None:
    """The provider whose scheduler runs this process, and its context, if any."""
    for provider in _PROVIDERS:
        ctx = provider.context(environ)
        if ctx is not None:
            return provider, ctx
    return None


def array_task(environ: Mapping[str, str]) -> int | None:
    """The job array task id the scheduler's environment gives this process, if any."""
    for provider in _PROVIDERS:
        task = provider.array_task(environ)
        if task is not None:
            return task
    return None


def is_array_task(environ: Mapping[str, str]) -> bool:
    """Whether the array task id of the environment is this job's own (scheduler asked)."""
    return all(p.is_array_task(environ) for p in _PROVIDERS if p.array_task(environ) is not None)


def job_of(meta: Mapping[str, Any]) -> tuple[SchedulerProvider, Mapping[str, Any]] | None:
    """The scheduler a run ran under, and the context it recorded, from its metadata."""
    for provider in _PROVIDERS:
        ctx = meta.get(provider.name)
        if isinstance(ctx, Mapping) and ctx:  # an empty record names no job
            return provider, ctx
    return None


def array_of(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """(array job id, array task id) a run ran as, by its metadata, else None."""
    job = job_of(meta)
    return job[0].array_of(job[1]) if job is not None else None


def out_of_memory(meta: Mapping[str, Any], base_dir: Path) -> str | None:
    """The scheduler's word that the job a run's metadata names was killed for memory."""
    job = job_of(meta)
    return job[0].out_of_memory(job[1], base_dir) if job is not None else None


def output_file(meta: Mapping[str, Any], base_dir: Path) -> Path | None:
    """The scheduler's output file of the job a run's metadata (or an attempt's) names."""
    job = job_of(meta)
    return job[0].output_file(job[1], base_dir) if job is not None else None


def trouble_among(provider: SchedulerProvider, names: Iterable[str],
                  states: Mapping[str, str]) -> str | None:
    """``"node n2 is down"`` for the first of ``names`` whose state (as the scheduler
    lists its nodes) is trouble, else None: a job over several nodes is in trouble when
    any of them is."""
    for node in names:
        trouble = provider.node_trouble(states[node]) if node in states else None
        if trouble:
            return f"node {node} {trouble}"
    return None


def ended_with_node(meta: Mapping[str, Any]) -> str | None:
    """:meth:`SchedulerProvider.ended_with_node` of the job a run's metadata names."""
    job = job_of(meta)
    return job[0].ended_with_node(job[1]) if job is not None else None


def node_lost(meta: Mapping[str, Any]) -> str | None:
    """The scheduler's word that the node a run's metadata (or an attempt's) names is down
    or not responding (asked now), else None."""
    job = job_of(meta)
    return job[0].node_lost(job[1]) if job is not None else None


def describe(meta: Mapping[str, Any]) -> str | None:
    """``"SLURM job 123_4"`` for the job a run's metadata names, else None."""
    job = job_of(meta)
    key = job[0].job_key(job[1]) if job is not None else None
    return f"{job[0].title} job {key}" if job is not None and key is not None else None
