"""The only place file names are spelled (a run's, a sweep's ``.notata/`` folder's, an
Experiment's), and the checks that keep paths inside a run."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import PathNameError, RunDirError, RunIdError

RUN_PREFIX = "log_"
METADATA = "metadata.json"
LOG = "log.txt"
PARAMS_YAML = "params.yaml"
PARAMS_JSON = "params.json"
LOCK = ".lock"
#: The soft lock (where flock is not supported) and a broken lock set aside.
SOFT_LOCK = ".lock.soft"
BROKEN_LOCK = ".lock.broken-{when}"
ATTACHED = ".attached.json"
STDOUT = "stdout.txt"
STDERR = "stderr.txt"
DATA = "data"
PLOTS = "plots"
ARTIFACTS = "artifacts"

#: notata 0.3's Experiment: ``<base_dir>/<name>/runs/`` and its ``index.csv``.
EXPERIMENT_RUNS = "runs"
EXPERIMENT_INDEX = "index.csv"

#: A file name may have 255 bytes (ext4, XFS, Lustre, NFS); ``log_`` takes four.
MAX_RUN_ID_BYTES = 255 - len(RUN_PREFIX)


class SweepPaths:
    """Every file of a sweep's own folder, ``<base_dir>/.notata/`` (submitit's ``JobPaths``)."""

    def __init__(self, base_dir: str | os.PathLike[str]) -> None:
        self.folder = Path(base_dir) / ".notata"
        #: The record of every submission (:mod:`notata.submissions`).
        self.submissions = self.folder / "submissions.jsonl"
        #: The sweep's lock: submit and resubmit hold it while they choose and record.
        self.resubmit_lock = self.folder / "resubmit.lock"
        #: The job scripts notata wrote (``<sweep>-<submission>-<k>.sbatch``).
        self.jobs = self.folder / "jobs"
        #: One line per decision of the retry shepherds of the sweeps here.
        self.shepherd_log = self.folder / "shepherd.log"
        #: The code states runs and submissions ran (:mod:`notata.provenance`).
        self.code = self.folder / "code"

    def shepherd(self, sweep: str) -> Path:
        """The retry shepherd's record of one sweep (:mod:`notata.chain`)."""
        return self.folder / f"shepherd-{sweep}.json"

    def shepherd_lock(self, sweep: str) -> Path:
        """Held by the shepherd that acts for a sweep: a second one exits."""
        return self.folder / f"shepherd-{sweep}.lock"

    def job_output(self, array_job: object, array_task: object) -> Path:
        """An array task's output file (``job_output("%A", "%a")``: the pattern sbatch
        fills)."""
        return self.folder / f"slurm-{array_job}_{array_task}.out"

    def job_script(self, sweep: str, submission: str, k: int) -> Path:
        return self.jobs / f"{sweep}-{submission}-{k}.sbatch"

    def index(self, manifest_hash: str) -> Path:
        """The sweep index of one manifest version (:mod:`notata.index`)."""
        return self.folder / "index" / f"{manifest_hash}.bin"

    def unique(self, manifest_hash: str) -> Path:
        """The mark that a manifest version's run ids were found unique."""
        return self.folder / "index" / f"{manifest_hash}.unique"


def run_dir(base_dir: str | os.PathLike[str], run_id: str) -> Path:
    """``<base_dir>/log_<run_id>`` for a validated run id."""
    return Path(base_dir) / f"{RUN_PREFIX}{check_run_id(run_id)}"


def check_run_id(run_id: object) -> str:
    """Return ``run_id`` as a string, or raise :class:`RunIdError` (a ValueError) saying
    what is wrong with it."""
    rid = str(run_id)
    problem = None
    if not rid:
        problem = "it is empty"
    elif rid in (".", ".."):
        problem = "it is a relative folder name"
    elif rid[0] in ".-":
        problem = f"it starts with {rid[0]!r}"
    elif "/" in rid or "\\" in rid:
        problem = "it contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in rid):
        problem = "it contains a NUL or control character"
    elif len(rid.encode("utf-8", "surrogatepass")) > MAX_RUN_ID_BYTES:
        problem = f"it is longer than {MAX_RUN_ID_BYTES} bytes"
    if problem:
        raise RunIdError(f"invalid run id {rid[:60]!r}: {problem}")
    return rid


def check_relative(relative: str | os.PathLike[str], what: str = "path") -> Path:
    """A relative path that stays inside a run: no absolute paths, no ``..``, no NUL."""
    text = os.fspath(relative)
    p = Path(text)
    if not text or "\0" in text:
        raise PathNameError(f"invalid {what} {text!r}: empty or contains NUL")
    if p.is_absolute() or any(part == ".." for part in p.parts):
        raise PathNameError(f"invalid {what} {text!r}: it would leave the run directory")
    if p == Path("."):
        raise PathNameError(f"invalid {what} {text!r}: it names the run directory itself")
    return p


def inside(root: Path, relative: str | os.PathLike[str], what: str = "path") -> Path:
    """``root / relative`` with its parent folders made, refusing any way out of ``root``.

    No component under ``root`` may be a symlink: one planted inside a run could
    point anywhere, so it is refused before anything is made through it.
    """
    rel = check_relative(relative, what)
    current = root
    for i, part in enumerate(rel.parts):
        current = current / part
        if current.is_symlink():
            raise PathNameError(f"invalid {what} {os.fspath(relative)!r}: {current} is a symlink")
        if i < len(rel.parts) - 1:
            current.mkdir(exist_ok=True)
    return current


def check_run_dir(path: Path) -> None:
    """Refuse a run directory that is a symlink or not a folder (looked at with lstat)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise RunDirError(str(path), "the run directory is a symlink, which notata never "
                                     "follows (it would write outside the base folder)")
    if not stat.S_ISDIR(st.st_mode):
        raise RunDirError(str(path), "the run directory is not a folder")
