"""Attaching: a process that ``notata exec`` runs opens the same run as its wrapper.

The wrapper holds the run's lock, heartbeat and status. A Python command it runs that
opens the same run (``notata.task`` or ``Logbook``) gets an *attached* handle: it writes
outputs and log lines itself, and hands its ``meta()`` fields and its failure reason to
the wrapper through ``<run>/.attached.json``, which the wrapper merges into metadata.json.
The wrapper is recognised by ``NOTATA_RUN_DIR`` and ``NOTATA_WRAPPER_PID`` naming the same
run and one of our ancestor processes.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from . import _fs, layout, runinfo, schema

#: Set by ``notata exec`` for its command: the wrapper's pid, host and scheduler job.
ENV_WRAPPER_PID = "NOTATA_WRAPPER_PID"
ENV_WRAPPER_HOST = "NOTATA_WRAPPER_HOST"
ENV_WRAPPER_JOB = "NOTATA_WRAPPER_JOB"


def wrapper_environment(job: object = None) -> dict[str, str]:
    """What ``notata exec`` adds to its command's environment so the command can find it
    (``job``: the scheduler's job id the wrapper runs in, if any)."""
    env = {ENV_WRAPPER_PID: str(os.getpid()), ENV_WRAPPER_HOST: socket.gethostname()}
    if job is not None:
        env[ENV_WRAPPER_JOB] = str(job)
    return env


def under_wrapper(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the wrapper the environment names runs this process: one of our ancestors
    on this host, or (a command started through ``srun`` inside the wrapper's job, which
    slurmstepd, not the wrapper, parents, maybe on another node) the same scheduler job.

    Variables inherited from elsewhere (a job submitted from inside a task, which sbatch's
    ``--export=ALL`` carries to another node) name a pid that is not our ancestor there,
    and another job.
    """
    env = os.environ if environ is None else environ
    wrapper, host = env.get(ENV_WRAPPER_PID, ""), env.get(ENV_WRAPPER_HOST)
    if not wrapper.isdigit() or int(wrapper) <= 1:
        return False
    job = env.get(ENV_WRAPPER_JOB)
    if job:
        sched = runinfo.scheduler(env)
        if sched is not None and str(sched[1].get("job_id")) == job:
            return True
    if host != socket.gethostname():
        return False
    try:
        return int(wrapper) in {p.pid for p in psutil.Process().parents()}
    except psutil.Error:
        return False


def wrapper_holds(path: Path) -> bool:
    """Whether a ``notata exec`` wrapper of ours holds the run at ``path``: the environment
    names the run and the wrapper (see :func:`under_wrapper`), and the run's metadata
    names that wrapper as its live holder (variables copied by hand attach to nothing)."""
    env = os.environ
    run_dir = env.get("NOTATA_RUN_DIR")
    if not run_dir:
        return False
    try:
        if not os.path.samefile(run_dir, path):
            return False
        meta = _fs.read_json_object(path / layout.METADATA)
    except (OSError, ValueError):
        return False
    if (str(meta.get("pid")), meta.get("host")) != (env.get(ENV_WRAPPER_PID),
                                                    env.get(ENV_WRAPPER_HOST)):
        return False
    return meta.get("status") in schema.OPEN_STATUSES and under_wrapper(env)


def hand_over(run_dir: Path, fields: dict[str, Any]) -> None:
    """Attached side: give fields to the wrapper, which merges them into metadata.json."""
    side = run_dir / layout.ATTACHED
    try:
        current = _fs.read_json_object(side)
    except (FileNotFoundError, ValueError):
        current = {}
    _fs.atomic_write_json(side, {**current, **fields})


def take_handed_over(run_dir: Path) -> dict[str, Any]:
    """Wrapper side: take (read and remove) what an attached process handed over.

    The file is first renamed to a private name, so that a hand-over written while the
    take reads (by a process the command left behind) is a new file, never one removed
    unread by this take.
    """
    side = run_dir / layout.ATTACHED
    taken = side.with_name(f"{side.name}.{os.getpid()}-taken{_fs.TMP_SUFFIX}")  # a temporary
    try:
        os.replace(side, taken)
    except FileNotFoundError:
        return {}
    try:
        return _fs.read_json_object(taken)
    except (FileNotFoundError, ValueError):
        return {}
    finally:
        with contextlib.suppress(FileNotFoundError):
            taken.unlink()
