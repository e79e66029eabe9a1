"""Submitting a sweep to SLURM as job arrays: array plans, job scripts, sbatch (the
options it is given: :mod:`notata.sbatch_options`).

The job script is a template (``slurm/array.sbatch.in``, installed as
``notata.templates``) filled with shell-quoted values; a sweep larger than SLURM's
``MaxArraySize`` is split into several arrays, each with its ``NOTATA_TASK_OFFSET`` (or,
for tasks scattered over it, its ``NOTATA_TASK_MAP``: see :class:`ArrayPlan`). Every
call to a SLURM command goes through :func:`notata.slurm.run`.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import _fs, layout, runinfo, submissions
from .array import RUN_VARIABLES
from .errors import ManifestError, SchedulerError
from .manifest import Sweep, compact, parse_indices
from .sbatch_options import (
    DEFAULT_WARN_BEFORE,
    OPTIONS,
    SIGNAL_SLACK,
    fit_warning,
    options_for,
    unsafe,
)
from .slurm import run, submit_env

#: Arrays are also split so that an --array spec stays short enough for sbatch.
MAX_SPEC_CHARS = 4000
#: An array's task list (``NOTATA_TASK_MAP``) stays about this short.
MAX_MAP_CHARS = 30000
TEMPLATE = "array.sbatch.in"


@dataclass(frozen=True)
class ArrayPlan:
    """One job array. By offset, array task id ``k`` runs sweep index ``offset + k``;
    ``listed``, it runs ``indices[k]`` (the job script's ``NOTATA_TASK_MAP``): tasks
    scattered over a large sweep, which by offset would need one array per
    ``MaxArraySize`` span of the sweep, fit in one array per ``MaxArraySize`` tasks.
    Packed (``pack`` N > 1, always listed), array task ``k`` runs ``indices[k*N:(k+1)*N]``
    one after another (``NOTATA_PACK``)."""

    offset: int
    indices: tuple[int, ...]
    listed: bool = False
    pack: int = 1

    @property
    def spec(self) -> str:
        if self.listed:
            return compact(range(-(-len(self.indices) // self.pack)))
        return compact(i - self.offset for i in self.indices)

    @property
    def task_map(self) -> str:
        """The sweep indices in array task order, as a task list (``""`` by offset)."""
        return compact(self.indices) if self.listed else ""


def plan_arrays(indices: Sequence[int], max_array_size: int, pack: int = 1
                ) -> list[ArrayPlan]:
    """Split sorted sweep indices into arrays whose task ids stay below ``max_array_size``.

    By offset, each array starts at its first index, so a contiguous sweep or a compact
    subset becomes a few short specs; a new array starts when an id would reach the
    limit or the spec would grow past :data:`MAX_SPEC_CHARS`. When that makes more arrays
    than listing the tasks would (failures scattered over a sweep larger than the
    limit), the arrays list their tasks instead (:attr:`ArrayPlan.listed`), up to
    ``max_array_size`` each. Packed (``pack`` > 1), every array lists its tasks, up to
    ``max_array_size * pack`` each.
    """
    ordered = sorted(set(indices))
    if pack > 1:
        return [ArrayPlan(0, tuple(chunk), listed=True, pack=pack)
                for chunk in _chunks(ordered, max_array_size * pack)]
    plans: list[ArrayPlan] = []
    current: list[int] = []
    spec_len = 0
    for i in ordered:
        if current and (i - current[0] >= max_array_size or spec_len > MAX_SPEC_CHARS):
            plans.append(ArrayPlan(current[0], tuple(current)))
            current, spec_len = [], 0
        current.append(i)
        spec_len += len(str(i - current[0])) + 1
    if current:
        plans.append(ArrayPlan(current[0], tuple(current)))
    chunks = _chunks(ordered, max_array_size)
    if len(chunks) < len(plans):
        return [ArrayPlan(0, tuple(chunk), listed=True) for chunk in chunks]
    return plans


def _chunks(ordered: list[int], most: int) -> list[list[int]]:
    """``ordered`` in runs of at most ``most`` tasks whose task list stays about
    :data:`MAX_MAP_CHARS` long (far below the kernel's 128 KiB per variable)."""
    chunks: list[list[int]] = []
    chars = 0  # the task list's length so far (compact: a range is written "a-b")
    start = -1  # where the range the last task is in began
    for i in ordered:
        if not chunks or len(chunks[-1]) >= most or chars > MAX_MAP_CHARS:
            chunks.append([])
            chars = 0
        chunk = chunks[-1]
        if chunk and i == chunk[-1] + 1:  # "a" becomes "a-i"; "a-b" becomes "a-i"
            chars += len(str(i)) + (1 if chunk[-1] == start else -len(str(chunk[-1])))
        else:
            start = i
            chars += len(str(i)) + 1
        chunk.append(i)
    return chunks


def max_array_size() -> int:
    """The cluster's MaxArraySize (``scontrol show config``); 1001, SLURM's default, if unknown."""
    try:
        text = run(["scontrol", "show", "config"])
    except SchedulerError:
        return 1001
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", text, re.MULTILINE)
    return int(m.group(1)) if m else 1001


def _check_paths(sweep: Sweep, *paths: tuple[str, object]) -> None:
    """Refuse a path that cannot sit on a line of a job script."""
    for what, path in paths:
        if unsafe(path):
            raise ManifestError(str(sweep.path), f"{what} {str(path)!r} holds a newline, a "
                                "quote or a backslash, which cannot sit in a job script")


def _pattern(sweep: Sweep, name: str) -> str:
    """``--output`` for a file of the sweep's own folder: sbatch fills ``%A``, ``%a``,
    ``%j`` in ``name``; a ``%`` of the folder's path is doubled so that it stays itself."""
    return str(layout.SweepPaths(sweep.base_dir).folder).replace("%", "%%") + "/" + name


def _word(purpose: str) -> str:
    """The first word of a job's purpose, as its name and script name take it."""
    return re.sub(r"[^A-Za-z0-9_-]", "", (purpose.split() or ["job"])[0]) or "job"


def _sbatch_line(sweep: Sweep, key: str, value: str) -> str:
    """``#SBATCH --option="value"``, refusing a value that would end the quotes or the line
    (a sweep name, an option: nothing may smuggle another option in)."""
    if unsafe(value):
        raise ManifestError(str(sweep.path), f"slurm {key} {value!r}: quotes, backslashes "
                                             "and newlines cannot be passed to sbatch safely")
    return f'#SBATCH {OPTIONS[key]}="{value}"'


def render(sweep: Sweep, plan: ArrayPlan, argv: Sequence[str], options: Mapping[str, str],
           extra: Sequence[str], *, throttle: int | None, warn_before: int, script: Path,
           python: str = sys.executable, tag: str = "", parallel: int = 1) -> str:
    """The job script of one array. Every value that reaches the shell is quoted; a path
    that cannot sit on a line of the script (a newline, a quote) is refused.

    ``tag`` goes into the job's comment (``notata:<tag>``): a collector finds the array
    in the queue by it even when its job id was never recorded (sbatch did not answer in
    time, the submitter was killed, the disk filled before the record)."""
    _check_paths(sweep, ("base_dir", sweep.base_dir), ("the job script", script),
                 ("the interpreter", python))
    lines = [f"#SBATCH --array={plan.spec}" + (f"%{throttle}" if throttle else "")]
    if tag:  # a comment of the user's own (accounting, say) is kept after the tag
        theirs = [m for m in map(_COMMENT.match, extra) if m]
        extra = [line for line in extra if not _COMMENT.match(line)]
        mine = f"{submissions.TAG_PREFIX}{tag}"
        if theirs:
            mine += " " + theirs[-1].group(1).strip().strip("\"'")
        lines.append(f'#SBATCH --comment="{mine}"')
    defaults = {"job_name": sweep.name,
                "output": _pattern(sweep, "slurm-%A_%a.out")}
    lines += [_sbatch_line(sweep, key, value) for key, value in {**defaults, **options}.items()]
    if warn_before:
        lines.append(f"#SBATCH --signal=B:USR1@{int(warn_before)}")
    lines += [line if line.lstrip().startswith("#SBATCH") else f"#SBATCH {line}"
              for line in extra]
    command = [python, "-m", "notata", "exec", str(sweep.path), "--", *argv]
    text = template(TEMPLATE)
    values = {
        "SWEEP": sweep.name, "HASH": sweep.hash, "TIME": runinfo.now_iso(),
        "TASKS": compact(plan.indices), "SCRIPT": shlex.quote(str(script)),
        "RUNVARS": " ".join(sorted(RUN_VARIABLES)),
        "SBATCH": "\n".join(lines), "OFFSET": str(plan.offset),
        "MAP": shlex.quote(plan.task_map), "PACK": str(plan.pack) if plan.pack > 1 else "",
        "PARALLEL": str(parallel) if plan.pack > 1 and parallel > 1 else "",
        "COMMAND": shlex.join(command).replace("\n", "'$'\\n''"),
    }
    # One pass, so that a value holding "@NAME@" is never substituted again.
    return re.sub(r"@([A-Z]+)@", lambda m: values[m.group(1)], text)


def render_job(sweep: Sweep, argv: Sequence[str], options: Mapping[str, str], *,
               script: Path, purpose: str, after: Sequence[str] = (),
               extra: Sequence[str] = (), begin: str | None = None) -> str:
    """The script of one plain (not array) job of the sweep that runs ``argv`` (no shell),
    started only once every job of ``after`` has ended, however it ended
    (``--dependency=afterany``), and not before ``begin`` (``now+60``): the retry
    shepherd and the sweep's final job. ``extra``: more ``#SBATCH`` lines, as
    :func:`options_for` checked them."""
    _check_paths(sweep, ("base_dir", sweep.base_dir), ("the job script", script))
    if not argv:
        raise ValueError("render_job: no command to run")
    if isinstance(after, str) or not all(re.fullmatch(r"[0-9]+(_[0-9]+)?", str(job))
                                         for job in after):
        raise ValueError(f"job ids {after!r}: not a list of SLURM job ids")
    defaults = {"job_name": f"{sweep.name}-{_word(purpose)}",
                "output": _pattern(sweep, "job-%j.out")}
    lines = [_sbatch_line(sweep, key, value) for key, value in {**defaults, **options}.items()]
    if after:
        lines.append(f"#SBATCH --dependency=afterany:{':'.join(map(str, after))}")
    if begin is not None:
        if not re.fullmatch(r"now\+[0-9]+|[0-9T:-]+", begin):
            raise ValueError(f"begin {begin!r}: not a time sbatch --begin takes")
        lines.append(f"#SBATCH --begin={begin}")
    lines += [line if line.lstrip().startswith("#SBATCH") else f"#SBATCH {line}"
              for line in extra]
    values = {"SWEEP": sweep.name, "HASH": sweep.hash, "TIME": runinfo.now_iso(),
              "PURPOSE": purpose.replace("\n", " "), "SCRIPT": shlex.quote(str(script)),
              "SBATCH": "\n".join(lines), "RUNVARS": " ".join(sorted(RUN_VARIABLES)),
              "COMMAND": shlex.join(argv).replace("\n", "'$'\\n''")}
    return re.sub(r"@([A-Z]+)@", lambda m: values[m.group(1)], template("job.sbatch.in"))


def submit_job(sweep: Sweep, argv: Sequence[str], options: Mapping[str, str], *,
               purpose: str, after: Sequence[str] = (), extra: Sequence[str] = (),
               begin: str | None = None) -> str:
    """Write :func:`render_job`'s script under ``.notata/jobs/`` and submit it; its job id.
    The script of a job sbatch refused is removed."""
    paths = layout.SweepPaths(sweep.base_dir)
    paths.jobs.mkdir(parents=True, exist_ok=True)
    script = paths.jobs / f"{sweep.name}-{_word(purpose)}-{time.strftime('%Y%m%dT%H%M%S')}-" \
        f"{secrets.token_hex(3)}.sbatch"  # two in one second never share a file
    _fs.atomic_write_bytes(script, render_job(
        sweep, argv, options, script=script, purpose=purpose, after=after, extra=extra,
        begin=begin).encode())
    try:
        return submit_script(script)
    except SchedulerError as err:
        if err.returncode is not None and err.returncode > 0:  # refused: nothing queued
            script.unlink(missing_ok=True)
        raise


_COMMENT = re.compile(r"^\s*(?:#SBATCH\s+)?--comment(?:=|\s+)(.*)$")


def template(name: str) -> str:
    """A template from ``slurm/``: the checkout's copy, or the one installed as
    ``notata.templates`` by ``pip install .`` (setuptools maps the folder there)."""
    checkout = Path(__file__).resolve().parent.parent / "slurm" / name
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    return resources.files("notata.templates").joinpath(name).read_text(encoding="utf-8")


#: sbatch on a busy controller can take minutes; giving up early risks an array that is
#: queued but not recorded (the tag still finds it).
SBATCH_TIMEOUT = 300.0


def submit_script(script: Path) -> str:
    """Submit ``script``; return its job id. sbatch's own message reaches the user on failure."""
    try:
        options = re.findall(r"^#SBATCH\s+--([a-z-]+)", script.read_text(errors="replace"),
                             re.MULTILINE)
    except OSError:
        options = []
    out = run(["sbatch", "--parsable", str(script)], timeout=SBATCH_TIMEOUT,
              env=submit_env(os.environ, options))
    return out.strip().split(";")[0]


def submit(sweep: Sweep, indices: Sequence[int], argv: Sequence[str], *,
           flags: Mapping[str, Any], dry_run: bool = False, name: str = "",
           array_limit: int | None = None,
           intended: Callable[[dict[str, Any], int, int], None] | None = None,
           submitted: Callable[[dict[str, Any], int, int], None] | None = None,
           ) -> list[dict[str, Any]]:
    """Write one script per array under ``<base_dir>/.notata/jobs/`` and sbatch each.

    Returns one ``{"job_id", "spec", "offset", "script", "tasks", "tag"}`` per array (and
    ``map``, ``pack`` for an array that lists or packs its tasks)
    (job_id None in a dry run, which writes and submits nothing and prints the scripts).
    ``intended(entry, k, n)`` is called just before array k of n is handed to sbatch, and
    ``submitted(entry, k, n)`` the moment it is queued (so each can be recorded before
    the next step). Scripts are named ``<sweep>-<name>-<k>.sbatch`` (``name``: the
    submission id, ``<name>-<k>`` the array's tag) and created exclusively; the script
    of an array sbatch refused is removed.
    """
    options, extra, settings = options_for(sweep.slurm, flags, str(sweep.path))
    throttle = settings.get("throttle")
    asked = int(settings.get("warn_before", DEFAULT_WARN_BEFORE) or 0)
    warn = fit_warning(asked, options.get("time"))
    if warn != asked:
        print(f"notata submit: a {asked} s time-limit warning does not fit --time "
              f"{options['time']} (SLURM may send it up to {SIGNAL_SLACK} s early, before the "
              "task starts); " + (f"warning {warn} s before the end" if warn
                                  else "not asking for one"), file=sys.stderr)
    pack = int(settings.get("pack") or 1)
    plans = plan_arrays(indices, array_limit or max_array_size(), pack)
    paths = layout.SweepPaths(sweep.base_dir)
    name = name or time.strftime("%Y%m%dT%H%M%S")
    arrays = []
    for k, plan in enumerate(plans):
        script = paths.job_script(sweep.name, name, k)
        tag = f"{name}-{k}"
        text = render(sweep, plan, argv, options, extra, throttle=throttle, warn_before=warn,
                      script=script, tag=tag, parallel=int(settings.get("pack_parallel") or 1))
        entry: dict[str, Any] = {"job_id": None, "spec": plan.spec, "offset": plan.offset,
                                 "script": str(script), "tasks": compact(plan.indices),
                                 "tag": tag}
        if plan.listed:
            entry["map"] = plan.task_map
        if plan.pack > 1:
            entry["pack"] = plan.pack
        if dry_run:
            print(f"# sbatch --parsable {shlex.quote(str(script))}\n{text}")
            arrays.append(entry)
            continue
        paths.jobs.mkdir(parents=True, exist_ok=True)
        _fs.create_exclusive(script, text.encode())
        script.chmod(0o777 & ~_umask())
        if intended is not None:
            intended(entry, k, len(plans))
        try:
            entry["job_id"] = submit_script(script)
        except SchedulerError as err:
            if err.returncode is not None and err.returncode > 0:  # refused: nothing queued
                script.unlink(missing_ok=True)
            raise
        if submitted is not None:
            submitted(entry, k, len(plans))
        arrays.append(entry)
    return arrays


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def say_what_was_submitted(sweep: Sweep, todo: list[int], done: list[dict[str, Any]],
                            trying: list[dict[str, Any]], err: BaseException) -> None:
    """After a failure halfway: which arrays are queued, which may be, which are not."""
    refused = isinstance(err, SchedulerError) and (err.returncode or 0) > 0
    sent = {i for a in done for i in parse_indices(a["tasks"], len(sweep))}
    parts = []
    if done:
        parts.append("submitted: " + ", ".join(
            f"job {a['job_id']} (tasks {a['tasks']})" for a in done))
    for a in trying:
        if a.get("job_id") is not None:  # queued, but its record could not be written
            parts.append(f"job {a['job_id']} (tasks {a['tasks']}) was queued but could not be "
                         f"recorded; its comment notata:{a['tag']} lets status and resubmit "
                         "find it")
        elif not refused:
            parts.append(f"tasks {a['tasks']} may have been queued (sbatch did not answer); "
                         f"if so, their comment notata:{a['tag']} lets status and resubmit "
                         "find them")
        else:
            continue
        sent |= set(parse_indices(a["tasks"], len(sweep)))
    rest = sorted(set(todo) - sent)
    if parts:
        if rest:
            parts.append(f"not submitted: tasks {compact(rest)}")
        print("notata submit: " + "; ".join(parts), file=sys.stderr)
