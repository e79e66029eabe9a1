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
#: What ``scontrol show job`` says of a job being ended, as a run status.
_STATE_STATUS = {
    "TIMEOUT": schema.TIMEOUT,
    "DEADLINE": schema.TIMEOUT,
    "CANCELLED": schema.CANCELLED,
    "PREEMPTED": schema.PREEMPTED,
    "REQUEUED": schema.PREEMPTED,
    "REQUEUE_FED": schema.PREEMPTED,
    "REQUEUE_HOLD": schema.PREEMPTED,
    "NODE_FAIL": schema.TERMINATED,
}
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
        if sep:
            fields[key] = value
    return fields


class SlurmProvider:
    """SLURM as seen from inside a job: environment variables and ``scontrol show job``."""

    name = "slurm"

    def context(self, environ: Mapping[str, str]) -> dict[str, Any] | None:
        if "SLURM_JOB_ID" not in environ:
            return None
        ctx: dict[str, Any] = {"restart_count": 0}
        for var, field in ENV_FIELDS.items():
            if var in environ:
                value = environ[var]
                ctx[field] = int(value) if field in _INT_FIELDS and value.isdigit() else value
        return ctx

    def termination_status(self, context: Mapping[str, Any], now: float) -> str | None:
        end = context.get("end_unix")
        if isinstance(end, int) and now >= end - 1:
            return schema.TIMEOUT
        job = context.get("job_id")
        if job is None:
            return None
        record = parse_record(run(["scontrol", "-o", "show", "job", str(job)], timeout=5))
        state = record.get("JobState", "")
        return _STATE_STATUS.get(state)


SLURM = SlurmProvider()
