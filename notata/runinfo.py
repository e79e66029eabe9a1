"""Where and how a run is running: host, process, versions, and its scheduler's view.

Scheduler facts come from providers registered with :func:`register_scheduler`
(``notata/__init__.py`` registers SLURM's), so this core module knows no
scheduler by name.
"""

from __future__ import annotations

import getpass
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol


class SchedulerProvider(Protocol):
    """What the core asks of a batch scheduler: its view of this process, and why it was ended."""

    name: str

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

    def job_key(self, context: Mapping[str, Any]) -> str | None:
        """How the scheduler's queue names this job (``"123"``, or ``"123_4"`` in an array)."""

    def termination_status(self, context: Mapping[str, Any], now: float) -> str | None:
        """The status a SIGTERM means for this job (timeout, cancelled, preempted), or None."""


_PROVIDERS: list[SchedulerProvider] = []


def register_scheduler(provider: SchedulerProvider) -> None:
    """Make ``provider`` known to every Logbook opened from now on."""
    if all(p.name != provider.name for p in _PROVIDERS):
        _PROVIDERS.append(provider)


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


def scheduler_names() -> frozenset[str]:
    """The names of the registered schedulers (the metadata keys they fill)."""
    return frozenset(p.name for p in _PROVIDERS)


def scheduler(
    environ: Mapping[str, str] | None = None,
) -> tuple[SchedulerProvider, dict[str, Any]] | None:
    """The provider whose scheduler runs this process, and its context, if any."""
    env = os.environ if environ is None else environ
    for provider in _PROVIDERS:
        ctx = provider.context(env)
        if ctx is not None:
            return provider, ctx
    return None


def now_iso(t: float | None = None) -> str:
    """Local time as ISO-8601 to the second, as notata 0.3 wrote it."""
    return datetime.fromtimestamp(time.time() if t is None else t).isoformat(timespec="seconds")


def user() -> str:
    """The user name of this process (its uid when there is no passwd entry)."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


def process_fields() -> dict[str, Any]:
    """Host, pid, user, versions and command line of this process."""
    from . import __version__

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": user(),
        "cwd": os.getcwd(),
        "argv": list(sys.argv),
        "python": platform.python_version(),
        "notata": __version__,
    }
