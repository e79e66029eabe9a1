"""One task of a job array: its index from the environment, and its Logbook."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Mapping
from typing import Any

from . import _attach, _fs, layout, scheduler, schema, taskspec
from .errors import ManifestError, RunCompleteError, UsageError
from .logbook import Logbook
from .manifest import Sweep, Task, load

#: Set by ``notata exec`` for the command it runs: the sweep index, whatever array it came from.
ENV_TASK = "NOTATA_TASK"
#: Added to ``SLURM_ARRAY_TASK_ID`` when a sweep is split into several arrays.
ENV_OFFSET = "NOTATA_TASK_OFFSET"
#: The sweep indices of an array's tasks, in array task id order (a task list): an array
#: of tasks scattered over the sweep (see :class:`notata.sbatch.ArrayPlan`).
ENV_MAP = "NOTATA_TASK_MAP"
#: Tasks per array task of a packed array: array task ``k`` runs entries ``k*N`` to
#: ``k*N+N-1`` of ``NOTATA_TASK_MAP``, one after another (see :mod:`notata.pack`).
ENV_PACK = "NOTATA_PACK"
#: Tasks of a pack run at a time (``--pack-parallel``).
ENV_PACK_PARALLEL = "NOTATA_PACK_PARALLEL"
#: What ``notata exec`` sets for one run's command; never inherited by another task or job.
RUN_VARIABLES = frozenset({ENV_TASK, ENV_OFFSET, ENV_MAP, ENV_PACK, ENV_PACK_PARALLEL,
                           "NOTATA_RUN_DIR",
                           "NOTATA_RUN_ID",
                           "NOTATA_ATTEMPT",
                           "NOTATA_PARAMS", _attach.ENV_WRAPPER_PID, _attach.ENV_WRAPPER_HOST,
                           _attach.ENV_WRAPPER_JOB, _attach.ENV_WRAPPER_LOCK})


def index_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The task index (see :func:`task_index`)."""
    return task_index(environ)[0]


def task_index(environ: Mapping[str, str] | None = None) -> tuple[int, bool]:
    """The task index, and whether it came from the job array's index.

    Under a ``notata exec`` wrapper (one of our ancestors), the ``NOTATA_TASK`` it set.
    Else, inside a job array, the array's task id + ``NOTATA_TASK_OFFSET``: a
    ``NOTATA_TASK`` there was inherited (sbatch exports the submitter's environment, and
    a pipeline stage may submit from inside a task) and names another task. Else
    ``NOTATA_TASK`` (set by hand to run one task). A plain job submitted from inside an
    array task inherits the array's variables too: when both are set, the scheduler is
    asked whether this job really is an array task.
    """
    env = os.environ if environ is None else environ
    raw = env.get(ENV_TASK)
    array = scheduler.array_task(env)
    if raw is not None and (array is None or _attach.under_wrapper(env)
                            or not scheduler.is_array_task(env)):
        return _int(ENV_TASK, raw), False
    if array is None:
        raise UsageError("no task index: pass index=/--task, or run inside a job array")
    if env.get(ENV_PACK):
        raise UsageError(f"this array task runs a pack of tasks ({ENV_PACK}): run them "
                         "through notata exec, or give the task's index")
    listed = env.get(ENV_MAP, "")
    if listed:
        return _listed(listed, array), True
    return array + _int(ENV_OFFSET, env.get(ENV_OFFSET, "0")), True


def pack_parallel(environ: Mapping[str, str] | None = None) -> int:
    """How many tasks of this array task's pack run at a time (``NOTATA_PACK_PARALLEL``;
    1 when unset)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_PACK_PARALLEL, "")
    return max(1, _int(ENV_PACK_PARALLEL, raw)) if raw else 1


def pack_tasks(environ: Mapping[str, str] | None = None) -> list[int] | None:
    """The sweep indices this array task runs one after another when its array is packed
    (``NOTATA_PACK``), in order; None when it is not (outside a packed array, or under
    a ``notata exec`` wrapper, whose ``NOTATA_TASK`` names the one task)."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV_PACK, "")
    array = scheduler.array_task(env)
    if not raw or array is None or _attach.under_wrapper(env):
        return None
    size = _int(ENV_PACK, raw)
    listed = env.get(ENV_MAP, "")
    if size < 1 or not taskspec.is_spec(listed):
        raise UsageError(f"{ENV_PACK}={raw!r} with {ENV_MAP}={listed[:60]!r}: not a pack "
                         "(a size of at least 1 and a task list)")
    tasks = list(itertools.islice(taskspec.expand(listed), array * size, (array + 1) * size))
    if not tasks:
        raise UsageError(f"array task {array} is outside {ENV_MAP} (it lists fewer tasks)")
    return tasks


def _listed(spec: str, array: int) -> int:
    """The ``array``-th sweep index of a ``NOTATA_TASK_MAP`` task list."""
    if not taskspec.is_spec(spec):
        raise UsageError(f"{ENV_MAP}={spec[:60]!r} is not a task list (e.g. 3,7,10-12)")
    for k, index in enumerate(taskspec.expand(spec)):
        if k == array:
            return index
    raise UsageError(f"array task {array} is outside {ENV_MAP} (it lists fewer tasks)")


def _int(name: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not an integer") from None


def sweep_of(manifest: str | os.PathLike[str] | Sweep) -> Sweep:
    return manifest if isinstance(manifest, Sweep) else load(manifest)


def check_same_sweep(sweep: Sweep, t: Task, meta: Mapping[str, Any]) -> None:
    """Refuse to open a run that another task, or another version of the manifest, wrote.

    A run directory recording another task index means two tasks share a run id (the
    manifest's template does not tell them apart): the second must not read the first's
    run as its own (say "already complete" without running, or resume its failed attempt).
    Called by the Logbook under the run's lock, so two such tasks cannot race past it.
    """
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


def open_task(sweep: Sweep, index: int, *, from_array: bool = False,
              pack: tuple[int, int] | None = None, **logbook_kwargs: Any) -> Logbook:
    """Open task ``index``'s Logbook with resume semantics and the sweep's fields in metadata
    (``task_from``: ``array`` when the index is the job array's own, ``pack`` when it ran
    in a pack, else ``given``; a collector learns a user's own array's offset only from
    the first). ``pack``: (position, size) of the task in the pack that runs it,
    recorded as ``pack: {position, size}``.

    Raises :class:`RunCompleteError` for a complete task, and what :class:`Logbook` raises.
    """
    t = sweep.task(index)
    where = ({"task_from": "pack", "pack": {"position": pack[0], "size": pack[1]}}
             if pack is not None else {"task_from": "array" if from_array else "given"})
    log = Logbook(t.run_id, sweep.base_dir, params=t.params, resume=True,
                  _check=lambda meta: check_same_sweep(sweep, t, meta),
                  _fields={"task": t.index, "sweep": sweep.name, "manifest": str(sweep.path),
                           "manifest_hash": sweep.hash, "tasks": len(sweep), **where},
                  **logbook_kwargs)
    log.task = t
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
    i, from_array = task_index() if index is None else (index, False)
    try:
        return open_task(sweep, i, from_array=from_array, **logbook_kwargs)
    except RunCompleteError as err:
        if not exit_if_complete:
            raise
        print(f"notata: task {i}: {err}", file=sys.stderr)
        raise SystemExit(0) from None

def is_complete(sweep: Sweep, index: int) -> bool:
    """Whether task ``index`` has a run directory recorded as complete."""
    try:
        meta = _fs.read_json_object(sweep.task(index).run_dir / layout.METADATA)
    except (FileNotFoundError, ValueError):
        return False
    return meta.get("status") == schema.COMPLETE
