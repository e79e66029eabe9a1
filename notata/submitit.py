"""The submitit bridge: a sweep submitted from Python as submitit jobs (submitit imported lazily).

::

    import submitit
    from notata.submitit import submit_sweep

    def simulate(params, log):                 # runs on the cluster, inside the task's Logbook
        ...
        return {"E": energy}                   # saved as artifacts/result.json, and job.result()

    executor = submitit.AutoExecutor(folder="submitit")
    executor.update_parameters(timeout_min=60, slurm_array_parallelism=50)
    jobs = submit_sweep(simulate, "sweep.yaml", executor)

Each job opens its task's Logbook with resume semantics. When submitit's time-limit
signal arrives, the run is recorded as ``timeout`` and submitit requeues the job; the
requeued job resumes the same run as its next attempt, outputs kept (``log.attempt``
tells ``fn`` where it stands). A complete task is not run again: its saved result is
returned. Complete tasks are left out at submission, and every submission is recorded
in the sweep's submissions.jsonl like sbatch ones.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import layout, submissions
from .array import is_complete, open_task, sweep_of
from .errors import RunCompleteError
from .logbook import Logbook
from .manifest import Sweep

RESULT = "result"


class SweepTask:
    """The callable submitit runs for one task index; checkpointable, so a timeout requeues it."""

    def __init__(self, fn: Callable[[dict[str, Any], Logbook], Any], manifest: Path) -> None:
        self.fn = fn
        self.manifest = manifest
        self._log: Logbook | None = None

    def __call__(self, index: int) -> Any:
        sweep = sweep_of(self.manifest)
        try:
            log = open_task(sweep, index)
        except RunCompleteError:
            return load_result(sweep.task(index).run_dir)
        self._log = log
        with log:
            assert log.task is not None
            value = self.fn(dict(log.task.params), log)
            save_result(log, value)
        self._log = None
        return value

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on its time-limit signal: record ``timeout``, then requeue."""
        import submitit

        if self._log is not None:
            self._log.mark_timeout("time limit reached; requeued by submitit")
            self._log = None
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "manifest": self.manifest, "_log": None}


def save_result(log: Logbook, value: Any) -> None:
    """``artifacts/result.json`` when the value is JSON, else ``artifacts/result.pkl``."""
    if value is None:
        return
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        log.save_pickle(RESULT, value)
    else:
        log.save_json(RESULT, value)


def load_result(run_dir: Path) -> Any:
    """The saved result of a complete task. A pickle written by this task is trusted."""
    folder = run_dir / layout.ARTIFACTS
    if (folder / f"{RESULT}.json").exists():
        return json.loads((folder / f"{RESULT}.json").read_text(encoding="utf-8"))
    if (folder / f"{RESULT}.pkl").exists():
        with open(folder / f"{RESULT}.pkl", "rb") as f:
            return pickle.load(f)
    return None


def _array_limit(executor: Any) -> int | None:
    """MaxArraySize when the executor submits to SLURM, else no limit."""
    name = type(getattr(executor, "_executor", executor)).__name__
    if name != "SlurmExecutor":
        return None
    from . import sbatch

    return sbatch.max_array_size()


def submit_sweep(fn: Callable[[dict[str, Any], Logbook], Any],
                 manifest: str | os.PathLike[str] | Sweep, executor: Any,
                 tasks: Sequence[int] | None = None) -> list[Any]:
    """Submit the sweep's tasks (all, or ``tasks``) as ``executor.map_array`` calls.

    One call per array: a sweep larger than the cluster's MaxArraySize is split.
    ``fn(params, log)`` runs in the task's Logbook; its return value is saved as an
    artifact and returned by ``job.result()``. Returns the submitit jobs, in task order.
    """
    sweep = sweep_of(manifest)
    indices = sweep.check_indices(range(len(sweep)) if tasks is None else tasks)
    sweep.check_unique()
    if (sweep.retry or {}).get("attempts"):
        warnings.warn(f"{sweep.path.name}: its retry: section applies to notata submit, not "
                      "to submit_sweep (submitit requeues timeouts and preemptions itself; "
                      "see the README, submitit)", stacklevel=2)
    todo = [i for i in indices if not is_complete(sweep, i)]
    if not todo:
        return []
    limit = _array_limit(executor) or len(todo)
    task = SweepTask(fn, sweep.path)
    jobs: list[Any] = []
    sub_id = submissions.new_id()
    chunks = [todo[start:start + limit] for start in range(0, len(todo), limit)]
    with submissions.sweep_lock(sweep.base_dir):
        for part, chunk in enumerate(chunks):  # each array recorded as soon as it is queued
            submitted = executor.map_array(task, chunk)
            jobs += submitted
            backend = f"submitit:{type(getattr(executor, '_executor', executor)).__name__}"
            submissions.append(sweep.base_dir, submissions.entry(
                sweep, backend, sub_id, chunk, part=part, parts=len(chunks),
                job_ids=[j.job_id for j in submitted], options={},
                function=getattr(fn, "__qualname__", repr(fn))))
    return jobs


__all__ = ["SweepTask", "load_result", "save_result", "submit_sweep"]
