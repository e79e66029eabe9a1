"""Everything SLURM: its environment variables, and calls to its commands through one function.

The core never imports this module; ``notata/__init__.py`` registers
:data:`SLURM` as a scheduler provider (see :mod:`notata.runinfo`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from . import schema
from .errors import SchedulerError

#: SLURM environment variables recorded in a run's ``slurm`` metadata, and their field names.
ENV_FIELDS = {
    "SLURM_JOB_ID": "job_id",
    "SLURM_ARRAY_JOB_ID": "array_job_id",
    "SLURM_ARRAY_TASK_ID": "array_task_id",
    "SLURM_RESTART_COUNT": "restart_count",
    "SLURM_JOB_NODELIST": "nodelist",
    "SLURM_JOB_PARTITION": "partition",
    "SLURM_JOB_NAME": "job_name",
    "SLURM_CLUSTER_NAME": "cluster",
    "SLURM_SUBMIT_DIR": "submit_dir",
    "SLURM_JOB_END_TIME": "end_unix",
    "SLURM_JOB_START_TIME": "start_unix",
}
_INT_FIELDS = {"job_id", "array_job_id", "array_task_id", "restart_count", "end_unix",
               "start_unix"}
COMMAND_TIMEOUT = 30.0


def run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> str:
    """Run one SLURM command and return its stdout; failures raise :class:`SchedulerError`."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SchedulerError(list(argv), None, str(err)) from err
    if proc.returncode != 0:
        raise SchedulerError(list(argv), proc.returncode, proc.stderr)
    return proc.stdout


def parse_record(text: str) -> dict[str, str]:
    """``scontrol -o show job`` output (``Key=Value`` pairs) as a dict."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:  # the first occurrence wins: later fields (paths) may hold spaces and "="
            fields.setdefault(key, value)
    return fields


class SlurmProvider:
    """SLURM as seen from inside a job: environment variables and ``scontrol show job``."""

    name = "slurm"

    def context(self, environ: Mapping[str, str]) -> dict[str, Any] | None:
        """The job's fields from the environment, plus its time limit from ``scontrol``."""
        if "SLURM_JOB_ID" not in environ:
            return None
        ctx: dict[str, Any] = {"restart_count": 0}
        for var, field in ENV_FIELDS.items():
            if var in environ:
                value = environ[var]
                ctx[field] = int(value) if field in _INT_FIELDS and value.isdigit() else value
        try:
            record = show_job(ctx["job_id"])
        except SchedulerError:
            return ctx  # the controller is busy or gone: the environment still says a lot
        if "TimeLimit" in record:
            ctx["time_limit"] = record["TimeLimit"]
        return ctx

    def termination_status(self, context: Mapping[str, Any], now: float) -> str | None:
        """Why SLURM is ending this job, from ``scontrol show job`` at SIGTERM time.

        Seen on SLURM 22.05: the job shows ``JobState=COMPLETING`` whatever the
        cause, so the cause is read from the rest of the record: ``Reason=TimeLimit``
        is a timeout; ``Restarts`` above the job's own ``SLURM_RESTART_COUNT`` is a
        requeue (``scontrol requeue`` or preemption with requeue), recorded as
        ``preempted`` since the job will run again; a ``Preempt*`` reason or state is
        ``preempted``; anything else ending a job early is ``cancelled`` (scancel).
        Preemption in CANCEL mode may therefore read as ``cancelled``.
        """
        end = context.get("end_unix")
        if isinstance(end, int) and now >= end - 1:
            return schema.TIMEOUT
        record = show_job(context["job_id"])
        state, reason = record.get("JobState", ""), record.get("Reason", "")
        restarts = int(record.get("Restarts", "0") or 0)
        if reason == "TimeLimit" or state in ("TIMEOUT", "DEADLINE"):
            return schema.TIMEOUT
        if restarts > int(context.get("restart_count", 0)) or state.startswith("REQUEUE"):
            return schema.PREEMPTED
        if reason.startswith("Preempt") or state == "PREEMPTED":
            return schema.PREEMPTED
        if state in ("CANCELLED", "COMPLETING"):
            return schema.CANCELLED
        return None


def show_job(job_id: object) -> dict[str, str]:
    """``scontrol -o show job ID`` as a dict; a short timeout, since signals wait on it."""
    return parse_record(run(["scontrol", "-o", "show", "job", str(job_id)], timeout=5))


SLURM = SlurmProvider()
