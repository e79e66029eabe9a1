"""The sweep index: one fixed-size record per task, so a scan need not open every run.

``<base_dir>/.notata/index/<manifest hash>.bin`` holds, at byte ``32 * task``, the
record of that task, written by the task itself (its run: :class:`notata._run.OwnedRun`)
at each status change::

    offset  size  field
    0       4     tag      (random, the same at offset 28: a torn record shows two tags)
    4       2     magic    0x4E54 ("NT")
    6       1     status   1 + its position in notata.schema.STATUSES
    7       1     version  1
    8       4     attempt
    12      4     array job  the SLURM array job id it ran in (0: not a SLURM array task)
    16      8     unix     the task's clock when it wrote the record
    24      4     array task  its SLURM array task id + 1 (0: none)
    28      4     tag

The array fields let a scan that opens no complete run still map a queued array task
(of a user's own ``sbatch --array``, which no submission record names) to its sweep
index. Never-written records read as zeros (the file is sparse). Each record is one ``pwrite``
of 32 bytes at a 32-byte boundary, so it never straddles a disk sector; a reader that
catches one half-written sees the tags differ.

metadata.json stays the truth: a scan takes *only* ``complete`` from the index and
reads the files of every other task. That is sound because the index never says
complete unless metadata.json does: a task writes ``complete`` into the index after
its metadata.json (fsynced), and leaves complete only by ``overwrite=True``, which
clears the record first (fsynced). What the index cannot see is a run directory
deleted or edited by hand, or one overwritten while its metadata.json was unreadable
(the old record cannot be found then; the new run's first write replaces it when the
new run is the same sweep task); ``notata status --full`` (``scan(..., full=True)``) reads
every file and ignores the index.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import struct
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import layout, scheduler, schema

RECORD = struct.Struct("<IHBBIIdII")
SIZE = RECORD.size
MAGIC = 0x4E54
VERSION = 1
DTYPE = np.dtype([("tag", "<u4"), ("magic", "<u2"), ("status", "u1"), ("version", "u1"),
                  ("attempt", "<u4"), ("array_job", "<u4"), ("unix", "<f8"),
                  ("array_task", "<u4"), ("tag2", "<u4")])
assert DTYPE.itemsize == SIZE == 32
#: What :func:`complete_tasks` returns for each complete task: its index, attempt, and
#: the SLURM array job and array task id it ran as (0 and -1 when not an array task).
DONE = np.dtype([("task", "<i8"), ("attempt", "<u4"), ("array_job", "<u4"),
                 ("array_task", "<i8")])


def path_for(base_dir: str | os.PathLike[str], manifest_hash: str) -> Path:
    return layout.SweepPaths(base_dir).index(manifest_hash)


def _slot(meta: Mapping[str, Any]) -> tuple[str, int] | None:
    """(manifest hash, task) of a sweep task's metadata, else None."""
    h, task = meta.get("manifest_hash"), meta.get("task")
    if isinstance(h, str) and h.isalnum() and isinstance(task, int) and task >= 0:
        return h, task
    return None


def _pwrite(path: Path, task: int, record: bytes, durable: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:  # the first record of the sweep: its folder is made
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o666)
    try:
        os.pwrite(fd, record, task * SIZE)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def record(base_dir: Path, meta: Mapping[str, Any]) -> None:
    """Write a sweep task's record from its metadata (nothing for a run outside a sweep).

    Best effort: a record that cannot be written only costs the next scan an open.
    """
    slot = _slot(meta)
    status = meta.get("status")
    if slot is None or status not in schema.STATUSES:
        return
    tag = int.from_bytes(secrets.token_bytes(4), "little") | 1
    array = scheduler.array_of(meta)
    if meta.get("task_from", "array") != "array":  # its own --task: says nothing of the array
        array = None
    array_job, array_task = array if array is not None else (0, -1)
    if not (0 < array_job < 2**32 and 0 <= array_task < 2**32 - 1):
        array_job, array_task = 0, -1
    data = RECORD.pack(tag, MAGIC, schema.STATUSES.index(status) + 1, VERSION,
                       int(meta.get("attempt", 1)), array_job, time.time(), array_task + 1, tag)
    with contextlib.suppress(OSError):
        _pwrite(path_for(base_dir, slot[0]), slot[1], data, durable=False)


def forget(base_dir: Path, meta: Mapping[str, Any]) -> None:
    """Clear a task's record, durably, before its run is overwritten. Raises OSError."""
    slot = _slot(meta)
    p = path_for(base_dir, slot[0]) if slot else None
    if slot is not None and p is not None and p.exists():
        _pwrite(p, slot[1], bytes(SIZE), durable=True)


def complete_tasks(base_dir: str | os.PathLike[str], manifest_hash: str,
                   n_tasks: int) -> np.ndarray | None:
    """The tasks (below ``n_tasks``) the index records as complete: a structured array
    of :data:`DONE` (task, attempt, array job, array task); None when there is no index.
    """
    try:
        raw = np.fromfile(path_for(base_dir, manifest_hash), dtype=np.uint8)
    except FileNotFoundError:
        return None
    recs = raw[: len(raw) - len(raw) % SIZE].view(DTYPE)[:n_tasks]
    ok = ((recs["magic"] == MAGIC) & (recs["version"] == VERSION) & (recs["tag"] != 0)
          & (recs["tag"] == recs["tag2"])
          & (recs["status"] == schema.STATUSES.index(schema.COMPLETE) + 1))
    tasks = np.flatnonzero(ok)
    out = np.empty(len(tasks), dtype=DONE)
    out["task"] = tasks
    out["attempt"] = recs["attempt"][tasks]
    out["array_job"] = recs["array_job"][tasks]
    out["array_task"] = recs["array_task"][tasks].astype(np.int64) - 1
    return out
