"""One task of a job array: its index from the environment, and its Logbook."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from . import _attach, _fs, layout
from .errors import ManifestError, NotataError, RunCompleteError
from .logbook import Logbook
from .manifest import Sweep, Task, load

#: Set by ``notata exec`` for the command it runs: the sweep index, whatever array it came from.
ENV_TASK = "NOTATA_TASK"
#: Added to ``SLURM_ARRAY_TASK_ID`` when a sweep is split into several arrays.
ENV_OFFSET = "NOTATA_TASK_OFFSET"
#: What ``notata exec`` sets for one run's command; never inherited by another task or job.
RUN_VARIABLES = frozenset({ENV_TASK, "NOTATA_RUN_DIR", "NOTATA_RUN_ID", "NOTATA_ATTEMPT",
                           "NOTATA_PARAMS", _attach.ENV_WRAPPER_PID, _attach.ENV_WRAPPER_HOST})


def index_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The task index.

    Under a ``notata exec`` wrapper (one of our ancestors), the ``NOTATA_TASK`` it set.
    Else, inside a SLURM job array, ``SLURM_ARRAY_TASK_ID + NOTATA_TASK_OFFSET``: a
    ``NOTATA_TASK`` there was inherited (sbatch exports the submitter's environment, and
    a pipeline stage may submit from inside a task) and names another task. Else
    ``NOTATA_TASK`` (set by hand to run one task).
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV_TASK)
    array = env.get("SLURM_ARRAY_TASK_ID")
    if raw is not None and (array is None or _attach.under_wrapper(env)):
        return _int(ENV_TASK, raw)
    if array is None:
        raise NotataError("no task index: pass index=/--task, or run inside a SLURM job array")
    return _int("SLURM_ARRAY_TASK_ID", array) + _int(ENV_OFFSET, env.get(ENV_OFFSET, "0"))


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise NotataError(f"{name}={raw!r} is not an integer") from None


def sweep_of(manifest: str | os.PathLike[str] | Sweep) -> Sweep:
    return manifest if isinstance(manifest, Sweep) else load(manifest)


def check_same_sweep(sweep: Sweep, t: Task) -> None:
    """Refuse to open a run that another task, or another version of the manifest, wrote.

    A run directory recording another task index means two tasks share a run id (the
    manifest's template does not tell them apart): the second must not read the first's
    run as its own (say "already complete" without running).
    """
    try:
        meta = _fs.read_json_object(t.run_dir / layout.METADATA)
    except (FileNotFoundError, ValueError, OSError):
        return  # a corrupt file is reported by the Logbook itself, naming it
    recorded = meta.get("manifest_hash")
    if recorded not in (None, sweep.hash):
        raise ManifestError(
            str(sweep.path),
            f"{t.run_dir} was written by a different version of this manifest "
            f"(hash {recorded}, now {sweep.hash}); index {t.index} may now mean another task. "
            "Restore the manifest, or use a new base_dir")
    other = meta.get("task")
    if recorded == sweep.hash and isinstance(other, int) and other != t.index:
        raise ManifestError(
            str(sweep.path),
            f"tasks {other} and {t.index} have the same run id {t.run_id!r}: its run directory "
            f"belongs to task {other}. Give run_id a template that tells them apart")


def open_task(sweep: Sweep, index: int, **logbook_kwargs: Any) -> Logbook:
    """Open task ``index``'s Logbook with resume semantics and the sweep's fields in metadata.

    Raises :class:`RunCompleteError` for a complete task, and what :class:`Logbook` raises.
    """
    t = sweep.task(index)
    check_same_sweep(sweep, t)
    log = Logbook(t.run_id, sweep.base_dir, params=t.params, resume=True, **logbook_kwargs)
    log.task = t
    if not log.attached:
        log.meta(task=t.index, sweep=sweep.name, manifest=str(sweep.path),
                 manifest_hash=sweep.hash, tasks=len(sweep))
    return log


def task(manifest: str | os.PathLike[str] | Sweep, index: int | None = None, *,
         exit_if_complete: bool = True, **logbook_kwargs: Any) -> Logbook:
    """The Logbook of the current task of a sweep: ``with notata.task("sweep.yaml") as log:``.

    ``index`` defaults to :func:`index_from_env`. The task's params are saved and
    readable as ``log.task.params``; its index, the sweep's name and the manifest
    hash go into metadata. The run is opened with ``resume=True``: a failed or
    interrupted task continues as its next attempt. A task that is already
    complete is not run again: with ``exit_if_complete`` (the default) this says
    so on stderr and exits the process with status 0, so that a resubmitted array
    skips finished work; otherwise :class:`RunCompleteError` is raised.
    Inside ``notata exec`` for the same task this attaches to the wrapper's run.
    """
    sweep = sweep_of(manifest)
    i = index_from_env() if index is None else index
    try:
        return open_task(sweep, i, **logbook_kwargs)
    except RunCompleteError as err:
        if not exit_if_complete:
            raise
        print(f"notata: task {i}: {err}", file=sys.stderr)
        raise SystemExit(0) from None
