"""Every exception notata raises for something a user can cause.

Each one derives from :class:`NotataError` and from the builtin that callers
would catch without knowing notata (``ValueError``, ``FileExistsError``...),
and survives pickling (submitit ships exceptions between processes).
"""

from __future__ import annotations

from typing import Any

from . import scheduler


class NotataError(Exception):
    """Base class of notata's errors."""


class _AboutPath(NotataError):
    """An error about one file or folder: ``path`` and what is wrong with it (``problem``);
    each subclass words it with :attr:`_message`."""

    _message = "{path}: {problem}"

    def __init__(self, path: str, problem: str = "") -> None:
        super().__init__(*((path, problem) if problem else (path,)))  # as pickled before
        self.path = self.run_dir = path
        self.problem = problem

    def __str__(self) -> str:
        return self._message.format(path=self.path, problem=self.problem)


class CorruptMetadataError(_AboutPath, ValueError):
    """A run's metadata.json cannot be read; the file is named, never reset."""

    _message = "{path}: corrupt metadata ({problem}); fix or move the file away"


class ChainRecordError(_AboutPath, ValueError):
    """A retry chain's record (``.notata/shepherd-<sweep>.json``) cannot be read."""

    _message = "{path}: not a retry chain record notata can read ({problem}); move it " \
        "away to start a new chain"


class RunLockedError(NotataError, BlockingIOError):
    """Another live process holds the run's lock.

    ``holder`` is what the holder recorded about itself (host, pid, SLURM job),
    as far as it could be read.
    """

    def __init__(self, run_dir: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(run_dir, holder)
        self.run_dir = run_dir
        self.holder = dict(holder or {})

    def __str__(self) -> str:
        if self.holder.get("in_process"):
            return (f"{self.run_dir} is open in this process ({self.holder['in_process']}); "
                    "close that Logbook first")
        h = self.holder
        who = f"host {h.get('host', '?')}, pid {h.get('pid', '?')}"
        job = scheduler.describe(h)
        if job is not None:
            who += f", {job}"
        return f"{self.run_dir} is in use by another process ({who}); it must finish first"


class RunDirError(_AboutPath, ValueError):
    """A run directory that notata will not write through: a symlink, or not a folder."""

    _message = "{path}: {problem}; nothing was written (move it away to use this run id)"


class RunFileError(_AboutPath, ValueError):
    """A file of a run directory that notata will not write through (where a command's
    output goes, something other than a regular file: a FIFO would hang the task)."""

    _message = "{path}: {problem}; move it away and run the task again"


class RunSupersededError(_AboutPath, RuntimeError):
    """A Logbook that a newer open of the same run in this process replaced; it writes nothing."""

    _message = ("this Logbook of {path} was superseded by a newer Logbook of the same run "
                "opened in this process (overwrite=True or resume=True); write through that one")


class RunLostError(_AboutPath, RuntimeError):
    """The run directory was moved, deleted and made again, replaced, or its lock broken
    while this process had it open: the run is no longer this process's to write.
    ``taken_over``: its lock was broken by another attempt (a pack stops there: the rest
    is that attempt's to run), not the directory moved or deleted by hand."""

    _message = ("{path} was moved, replaced or its lock broken while this process had it "
                "open; this process writes nothing more there")

    def __init__(self, path: str, problem: str = "", *, taken_over: bool = False) -> None:
        super().__init__(path, problem)
        self.taken_over = taken_over


class RunCompleteError(_AboutPath, FileExistsError):
    """``resume=True`` found the run already complete: it is not run again."""

    _message = ("{path} is already complete, so it is not run again (overwrite=True starts "
                "it afresh)")


class SchedulerError(NotataError, RuntimeError):
    """A scheduler command failed; carries its argv, return code and stderr."""

    def __init__(self, argv: list[str], returncode: int | None, stderr: str) -> None:
        super().__init__(argv, returncode, stderr)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        last = (self.stderr or "").strip().splitlines()
        detail = last[-1] if last else f"exit status {self.returncode}"
        return f"{self.argv[0]} failed: {detail}"


class ManifestError(_AboutPath, ValueError):
    """A sweep manifest cannot be used; names the file and the problem."""


class UsageError(NotataError, ValueError):
    """A value a user gave that cannot be used (a bad ``--tasks``, an unknown option, two
    options that exclude each other); the command line exits 2 for it."""


class TaskIndexError(UsageError, IndexError):
    """A task index outside the sweep (or not an integer)."""


class RunIdError(UsageError):
    """A run id that cannot name a folder (empty, ``..``, a ``/``, too long...)."""


class PathNameError(UsageError):
    """A name or path inside a run that would leave it, or goes through a symlink."""


class RunExistsError(NotataError, FileExistsError):
    """The run directory exists and neither ``overwrite`` nor ``resume`` was asked for."""


class ForkedHandleError(NotataError, RuntimeError):
    """A forked process tried to change the metadata or status of its parent's run."""


class TasksFailedError(NotataError, RuntimeError):
    """Tasks of a pack did not complete (``job.result()`` of a packed submitit job): their
    indices and each one's status and reason; the rest of the pack's results are saved."""

    def __init__(self, failures: dict[int, str]) -> None:
        super().__init__(failures)
        self.failures = dict(failures)

    def __str__(self) -> str:
        shown = [f"task {i}: {why}" for i, why in list(self.failures.items())[:5]]
        more = len(self.failures) - len(shown)
        return (f"{len(self.failures)} task(s) of this pack did not complete; "
                + "; ".join(shown) + (f"; and {more} more" if more else ""))


class ExtraMissingError(NotataError, ImportError):
    """A feature needs an optional extra that is not installed (``notata report``:
    ``report``, for matplotlib)."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(feature, extra)
        self.feature, self.extra = feature, extra

    def __str__(self) -> str:
        return f"{self.feature} needs the {self.extra!r} extra: pip install 'notata[{self.extra}]'"
