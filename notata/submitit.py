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

import os
import signal
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import _fs, layout, provenance, submissions
from ._function import Function, load_result, save_result
from .array import is_complete, open_task, sweep_of
from .errors import RunCompleteError, TasksFailedError
from .logbook import Logbook
from .manifest import Sweep, compact
from .pack import check_size, exec_pack


class PackTask:
    """The callable submitit runs for one pack of task indices (``submit_sweep(...,
    pack=N)``): each task its own run, called in a worker forked from this process
    (:mod:`notata._function`), as ``notata submit --pack N --python`` runs them.

    submitit's warning signal (``SIGUSR2`` unless ``SUBMITIT_PREEMPT_SIGNAL`` says
    otherwise) is the time-limit warning and then a SIGTERM to this process, as a pack
    hears them from SLURM: no further task is started, the running one is recorded
    ``timeout`` (its worker stopped first), the unstarted ones are left untouched; then
    submitit checkpoints and requeues the job, whose next life runs the pack again
    (complete tasks skipped, the timed-out one resumed as its next attempt). Returns the
    pack's results in its order; :class:`~notata.errors.TasksFailedError` when a task
    did not complete (the others' results are saved in their runs all the same).
    """

    def __init__(self, fn: Callable[[dict[str, Any], Logbook], Any], manifest: Path) -> None:
        self.fn = fn
        self.manifest = manifest
        self._requeue = False

    def __call__(self, indices: Sequence[int]) -> list[Any]:
        import submitit

        sweep = sweep_of(self.manifest)
        provenance.use_subject(provenance.subject_of_function(self.fn))
        warning = getattr(signal, "SIG" + str(submitit.JobEnvironment.USR_SIG), signal.SIGUSR2)
        name = f"{getattr(self.fn, '__module__', '?')}:{getattr(self.fn, '__qualname__', '?')}"
        function = Function(self.fn, name, ignore=(warning,))
        previous = signal.signal(warning, self._warned)
        try:
            exec_pack(sweep, list(indices), function, element=True, ending=False)
        except SystemExit:
            if not self._requeue or not callable(previous):
                raise
            signal.signal(warning, previous)
            previous(warning, None)  # submitit: checkpoint() and requeue; it exits
            raise
        finally:
            function.close()
            if signal.getsignal(warning) == self._warned:
                signal.signal(warning, previous)
        results, failures = [], {}
        for i in indices:
            meta = _status_of(sweep, i)
            if meta.get("status") != "complete":
                failures[i] = (f"{meta.get('status', 'not run')}: "
                               f"{meta.get('failure_reason') or 'no reason recorded'}")
            results.append(load_result(sweep.task(i).run_dir))
        if failures:
            raise TasksFailedError(failures)
        return results

    def _warned(self, signum: int, frame: Any) -> None:
        """submitit's warning: the pack hears the time-limit warning, then SIGTERM."""
        self._requeue = True
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)

    def checkpoint(self, indices: Sequence[int]) -> Any:
        """What submitit requeues: this pack again (its complete tasks are skipped)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, indices)

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "manifest": self.manifest, "_requeue": False}


def _status_of(sweep: Sweep, index: int) -> dict[str, Any]:
    try:
        return _fs.read_json_object(sweep.task(index).run_dir / layout.METADATA)
    except (OSError, ValueError):
        return {}


class SweepTask:
    """The callable submitit runs for one task index; checkpointable, so a timeout requeues it."""

    def __init__(self, fn: Callable[[dict[str, Any], Logbook], Any], manifest: Path) -> None:
        self.fn = fn
        self.manifest = manifest
        self._log: Logbook | None = None

    def __call__(self, index: int) -> Any:
        sweep = sweep_of(self.manifest)
        provenance.use_subject(provenance.subject_of_function(self.fn))
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


def _array_limit(executor: Any) -> int | None:
    """MaxArraySize when the executor submits to SLURM, else no limit."""
    name = type(getattr(executor, "_executor", executor)).__name__
    if name != "SlurmExecutor":
        return None
    from . import sbatch

    return sbatch.max_array_size()


def submit_sweep(fn: Callable[[dict[str, Any], Logbook], Any],
                 manifest: str | os.PathLike[str] | Sweep, executor: Any,
                 tasks: Sequence[int] | None = None, pack: int | None = None) -> list[Any]:
    """Submit the sweep's tasks (all, or ``tasks``) as ``executor.map_array`` calls.

    One call per array: a sweep larger than the cluster's MaxArraySize is split.
    ``fn(params, log)`` runs in the task's Logbook; its return value is saved as an
    artifact and returned by ``job.result()``. Returns the submitit jobs, in task order.

    ``pack=N``: each job runs N tasks (:class:`PackTask`): one interpreter imports
    ``fn`` once and forks a worker per task; ``job.result()`` is the list of its tasks'
    results. Only the tasks not yet complete are packed.
    """
    sweep = sweep_of(manifest)
    indices = sweep.check_indices(range(len(sweep)) if tasks is None else tasks)
    sweep.check_unique()
    if (sweep.retry or {}).get("attempts"):
        warnings.warn(f"{sweep.path.name}: its retry: section applies to notata submit, not "
                      "to submit_sweep (submitit requeues timeouts and preemptions itself; "
                      "see the README, submitit)", stacklevel=2)
    size = None if pack is None else check_size(pack)
    todo = [i for i in indices if not is_complete(sweep, i)]
    if not todo:
        return []
    units: list[Any] = todo if size is None else [
        todo[k:k + size] for k in range(0, len(todo), size)]
    limit = _array_limit(executor) or len(units)
    task = SweepTask(fn, sweep.path) if size is None else PackTask(fn, sweep.path)
    jobs: list[Any] = []
    sub_id = submissions.new_id()
    chunks = [units[start:start + limit] for start in range(0, len(units), limit)]
    backend = f"submitit:{type(getattr(executor, '_executor', executor)).__name__}"
    code = provenance.at_submission(sweep.base_dir, provenance.subject_of_function(fn))
    with submissions.sweep_lock(sweep.base_dir):
        for part, chunk in enumerate(chunks):  # each array recorded as soon as it is queued
            submitted = executor.map_array(task, chunk)
            jobs += submitted
            extra: dict[str, Any] = {} if size is None else {
                "pack": size, "job_tasks": [compact(c) for c in chunk]}
            flat = chunk if size is None else [i for c in chunk for i in c]
            submissions.append(sweep.base_dir, submissions.entry(
                sweep, backend, sub_id, flat, part=part, parts=len(chunks),
                job_ids=[j.job_id for j in submitted], options={},
                function=getattr(fn, "__qualname__", repr(fn)), **{provenance.FIELD: code},
                **extra))
    return jobs


__all__ = ["PackTask", "SweepTask", "load_result", "save_result", "submit_sweep"]
