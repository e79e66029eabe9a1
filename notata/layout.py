"""The only place run file names are spelled, and the checks that keep paths inside a run."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import RunDirError

RUN_PREFIX = "log_"
METADATA = "metadata.json"
LOG = "log.txt"
PARAMS_YAML = "params.yaml"
PARAMS_JSON = "params.json"
LOCK = ".lock"
ATTACHED = ".attached.json"
STDOUT = "stdout.txt"
STDERR = "stderr.txt"
DATA = "data"
PLOTS = "plots"
ARTIFACTS = "artifacts"

#: A sweep's own records, under its base folder: submissions.jsonl and the job scripts.
SWEEP_DIR = ".notata"
SUBMISSIONS = "submissions.jsonl"
RESUBMIT_LOCK = "resubmit.lock"
JOBS = "jobs"
INDEX = "index"

#: A file name may have 255 bytes (ext4, XFS, Lustre, NFS); ``log_`` takes four.
MAX_RUN_ID_BYTES = 255 - len(RUN_PREFIX)


def run_dir(base_dir: str | os.PathLike[str], run_id: str) -> Path:
    """``<base_dir>/log_<run_id>`` for a validated run id."""
    return Path(base_dir) / f"{RUN_PREFIX}{check_run_id(run_id)}"


def check_run_id(run_id: object) -> str:
    """Return ``run_id`` as a string, or raise ValueError saying what is wrong with it."""
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
        raise ValueError(f"invalid run id {rid[:60]!r}: {problem}")
    return rid


def check_relative(relative: str | os.PathLike[str], what: str = "path") -> Path:
    """A relative path that stays inside a run: no absolute paths, no ``..``, no NUL."""
    text = os.fspath(relative)
    p = Path(text)
    if not text or "\0" in text:
        raise ValueError(f"invalid {what} {text!r}: empty or contains NUL")
    if p.is_absolute() or any(part == ".." for part in p.parts):
        raise ValueError(f"invalid {what} {text!r}: it would leave the run directory")
    if p == Path("."):
        raise ValueError(f"invalid {what} {text!r}: it names the run directory itself")
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
            raise ValueError(f"invalid {what} {os.fspath(relative)!r}: {current} is a symlink")
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
