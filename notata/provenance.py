"""Which code each run ran: the git commit (and uncommitted changes) of the repository that
holds it, and the Python environment.

**A code state** is ``{commit, dirty, diff, env, repo}`` (:func:`state`):

- ``commit``: ``git rev-parse HEAD`` of the repository holding the *subject* (the
  command's script: the first argument of the command that is a file, ``--python``'s
  module file; for a plain Logbook, the script Python runs; else the working folder),
  None outside git (``git`` says why in ``why``);
- ``dirty`` and ``diff``: whether ``git diff HEAD`` (tracked files; untracked files are
  not code until added) is non-empty, and its hash;
- ``env``: a hash of the Python environment running notata: the names of the installed
  distributions' ``*.dist-info`` folders (name and version), the interpreter's version.
  A command run by another Python (a ``python`` the job script puts first on PATH) is not
  seen: notata's own is.

Its id (``state``, 16 hex digits) hashes the rest. A process asks git (two calls, 6-12 ms)
at most every :data:`FRESH_SEC` seconds per folder (a pack of short tasks asks once; a
change made in the last 10 s may be missed by a run of a process that asked before), the
environment's hash once; a submission always asks afresh. ``NOTATA_PROVENANCE=0`` turns
it all off (for a repository where ``git diff`` is slow).

**At submission** (:func:`at_submission`): the state is computed in the submitting
process and saved under ``<base_dir>/.notata/code/``: ``<state>.json`` (the state),
``diff-<diff>.patch`` (the uncommitted changes themselves) and ``env-<env>.txt`` (``pip
freeze``, or ``conda env export`` in a conda environment; about a second, so done only
when no file of that environment is there yet). The submission's record carries the id.

**At each run's start** the run records the state it actually runs (a job that waited in
the queue runs whatever is there when it starts) in ``metadata.json`` (``code``), as ids
and hashes only, saves ``<state>.json`` if it is new, and, for a sweep task, marks its
attempt in ``<manifest hash>-<state>.ran``: 4 bytes at ``4 x task`` (as the sweep index,
one ``pwrite`` each), the second it started (a run deleted and started afresh is attempt
1 again; the latest start is the one that counts). So a scan learns which tasks ran which state
by reading one small file per state, not every run (:func:`which_ran`), and ``notata
status`` warns when a sweep's runs ran more than one, or other than their submission's
(:func:`mixes`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import _fs, layout, submissions, taskspec
from .manifest import Sweep

#: Seconds a ``git`` call may take before the state says it could not be had.
GIT_TIMEOUT = 10
_SYSTEM = ("/usr/", "/bin/", "/sbin/", "/lib", "/etc/")
#: The metadata field (and submission record field) that holds the code state.
FIELD = "provenance"
#: Programs that run the code rather than being it.
_INTERPRETER = re.compile(r"(python|pypy|Rscript|julia|perl|ruby|node|bash|sh|zsh|srun|env)"
                          r"[\d.]*")


def enabled() -> bool:
    return os.environ.get("NOTATA_PROVENANCE", "") not in ("0", "no", "false")


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def subject_of(command: Sequence[str], cwd: str | None = None) -> str:
    """The file whose repository is the code of ``command``: its first argument that is a
    file outside the system's folders (``python sim.py`` -> ``sim.py``; ``./run.sh``), a
    ``--python`` module's file, else the working folder."""
    cwd = cwd or os.getcwd()
    words = list(command)
    if len(words) == 2 and words[0] == "--python":  # notata._function.FLAG
        name = words[1].rpartition(":")[0]
        if name.endswith(".py") or "/" in name:
            return os.path.abspath(os.path.join(cwd, name))
        import importlib.util

        with contextlib.suppress(ImportError, ValueError, AttributeError):
            spec = importlib.util.find_spec(name.split(".")[0])
            if spec is not None and spec.origin:
                return spec.origin
        return cwd
    prefixes = tuple({os.path.join(p, "") for p in (sys.prefix, sys.base_prefix,
                                                    sys.exec_prefix, sys.base_exec_prefix)})
    for word in words:
        path = os.path.join(cwd, word)
        if "{" in word or _INTERPRETER.fullmatch(os.path.basename(word)) \
                or not os.path.isfile(path):
            continue
        real = os.path.realpath(path)
        if not real.startswith(_SYSTEM + prefixes):
            return real
    return cwd


def subject_of_function(fn: Any) -> str:
    """The file a Python function is defined in (its code's subject), else the working
    folder."""
    import inspect

    with contextlib.suppress(TypeError, OSError):
        path = inspect.getsourcefile(fn)
        if path and os.path.isfile(path):  # not a notebook cell's (it names no real file)
            return os.path.abspath(path)
    return os.getcwd()


def _git(folder: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", folder, *args], capture_output=True,
                          timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL,
                          env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"})


#: Seconds a process reuses what git said of a folder (a pack of short tasks asks once).
FRESH_SEC = 10.0
#: At most this much of the uncommitted changes is kept to be saved (all of it is hashed).
MAX_PATCH = 16 * 2**20
_SAID: dict[tuple[str, str | None], tuple[float, tuple[dict[str, Any], bytes]]] = {}


def _git_state(folder: str, fresh: bool = False, exclude: str | None = None
               ) -> tuple[dict[str, Any], bytes]:
    """(commit fields, the diff itself, cut at :data:`MAX_PATCH`) of the repository holding
    ``folder``, the folder ``exclude`` (the runs' own) left out of the diff; asked at most
    every :data:`FRESH_SEC` seconds unless ``fresh``."""
    said = _SAID.get((folder, exclude))
    if said is not None and not fresh and time.monotonic() - said[0] < FRESH_SEC:
        return said[1]
    answer = _ask_git(folder, exclude)
    _SAID[(folder, exclude)] = (time.monotonic(), answer)
    return answer


def _why(stderr: bytes, default: str) -> str:
    """git's reason: its ``fatal:`` line (a hint may follow it), else its first line."""
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    fatal = [ln for ln in lines if ln.startswith("fatal:")]
    return (fatal or lines or [default])[0]


def _ask_git(folder: str, exclude: str | None) -> tuple[dict[str, Any], bytes]:
    try:
        head = _git(folder, "rev-parse", "--show-toplevel", "HEAD")
    except FileNotFoundError:
        return {"commit": None, "why": "git is not installed"}, b""
    except (subprocess.TimeoutExpired, OSError) as err:
        return {"commit": None, "why": f"git did not answer: {err}"}, b""
    words = head.stdout.decode(errors="replace").split()
    if head.returncode != 0 or len(words) < 2:
        return {"commit": None, "why": _why(head.stderr, "not a git repository")}, b""
    top, commit = words[:2]
    fields: dict[str, Any] = {"repo": top, "commit": commit}
    spec = ["--", "."]
    if exclude is not None:
        inside = os.path.relpath(os.path.realpath(exclude), os.path.realpath(top))
        if inside != "." and not inside.startswith(".."):
            spec.append(f":(exclude){inside}")
    try:
        digest, kept = _diff(top, spec)
    except (subprocess.SubprocessError, OSError) as err:
        return {**fields, "dirty": None, "diff": None,
                "why": f"git diff did not answer: {err}"}, b""
    return {**fields, "dirty": digest is not None, "diff": digest}, kept


def _diff(top: str, spec: list[str]) -> tuple[str | None, bytes]:
    """The hash of ``git diff HEAD`` (None when empty), read as it streams, and its first
    :data:`MAX_PATCH` bytes."""
    proc = subprocess.Popen(["git", "-C", top, "diff", "HEAD", "--no-ext-diff", "--binary",
                             "--no-color", *spec], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"})
    assert proc.stdout is not None
    sha, kept, total = hashlib.sha256(), bytearray(), 0
    deadline = time.monotonic() + GIT_TIMEOUT
    try:
        while chunk := proc.stdout.read(1 << 16):
            sha.update(chunk)
            total += len(chunk)
            if len(kept) < MAX_PATCH:
                kept += chunk[:MAX_PATCH - len(kept)]
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(proc.args, GIT_TIMEOUT)
        if proc.wait(GIT_TIMEOUT) != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    if total > len(kept):
        kept += f"\n[notata: cut at {MAX_PATCH} of {total} bytes]\n".encode()
    return (sha.hexdigest()[:16] if total else None), bytes(kept)


@functools.lru_cache(maxsize=1)
def env_hash() -> str:
    """The Python environment's hash: the distributions in its site folders
    (``*.dist-info`` and ``*.egg-info`` names: name and version) and the interpreter's
    version."""
    names: set[str] = set()
    # site folders only: the script's folder and the working folder, also on sys.path,
    # differ between a submitting process and its tasks' and are not the environment
    for folder in (p for p in sys.path if os.path.basename(p.rstrip("/")) in
                   ("site-packages", "dist-packages")):
        with contextlib.suppress(OSError):
            names.update(n for n in os.listdir(folder or ".")
                         if n.endswith((".dist-info", ".egg-info")))
    text = sys.version + "\n" + "\n".join(sorted(names))
    return _hash(text.encode())


def _where(subject: str) -> str:
    """The folder git is asked in, for a file or a folder."""
    return subject if os.path.isdir(subject) else os.path.dirname(subject) or "."


def state(subject: str | None = None, fresh: bool = False, exclude: str | None = None
          ) -> dict[str, Any]:
    """The code state of ``subject`` (a file or folder; default: this process's script,
    else the working folder), the folder ``exclude`` (the sweep's runs) left out of the
    diff; git is asked again after :data:`FRESH_SEC` (or ``fresh``)."""
    fields = {**_git_state(_where(_subject(subject)), fresh, exclude)[0], "env": env_hash()}
    return {"state": _hash(json.dumps(fields, sort_keys=True).encode()), **fields}


def _subject(subject: str | None) -> str:
    if subject is not None:
        return subject
    script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
    return os.path.abspath(script) if os.path.isfile(script) else os.getcwd()


_SUBJECT: list[str] = []


def use_subject(subject: str) -> None:
    """The code the runs this process opens from now on run (``notata exec``'s command)."""
    _SUBJECT[:] = [subject]


def for_run(base_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state a run opened now in ``base_dir`` records (None when turned off)."""
    if not enabled():
        return None
    return state(_SUBJECT[0] if _SUBJECT else None, exclude=os.fspath(base_dir))


def state_of(meta: Mapping[str, Any]) -> str | None:
    """The code state id a run's metadata records, else None."""
    code = meta.get(FIELD)
    sid = code.get("state") if isinstance(code, Mapping) else None
    return sid if isinstance(sid, str) else None


def _folder(base_dir: str | os.PathLike[str]) -> Path:
    return layout.SweepPaths(base_dir).code


def save_state(base_dir: str | os.PathLike[str], code: Mapping[str, Any]) -> None:
    """Save ``<state>.json`` unless it is there (best effort: a scan only loses words)."""
    target = _folder(base_dir) / f"{code['state']}.json"
    if not target.exists():
        with contextlib.suppress(OSError):
            target.parent.mkdir(parents=True, exist_ok=True)
            _fs.atomic_write_json(target, dict(code))


def mark_run(base_dir: str | os.PathLike[str], meta: Mapping[str, Any]) -> None:
    """Record that a sweep task's attempt ran its code state (see the module)."""
    code, task, digest = meta.get(FIELD), meta.get("task"), meta.get("manifest_hash")
    if not isinstance(code, Mapping) or state_of(meta) is None or not isinstance(task, int) \
            or isinstance(task, bool) or task < 0 or not isinstance(digest, str):
        return
    save_state(base_dir, code)
    path = _folder(base_dir) / f"{digest}-{code['state']}.ran"
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            started = int(meta.get("start_unix") or time.time())
            os.pwrite(fd, max(started, 1).to_bytes(4, "little"), 4 * task)
        finally:
            os.close(fd)


def at_submission(base_dir: str | os.PathLike[str], subject: str) -> str | None:
    """Compute and save the state of the code ``subject`` names (:func:`subject_of`) as
    the submitting process sees it, with its diff and its environment's package list;
    its id, for the submission's record (None when turned off)."""
    if not enabled():
        return None
    code = state(subject, fresh=True, exclude=os.fspath(base_dir))
    folder = _folder(base_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_state(base_dir, code)
        if code.get("diff"):
            patch = folder / f"diff-{code['diff']}.patch"
            if not patch.exists():
                _fs.atomic_write_bytes(patch, _git_state(_where(subject), False,
                                                         os.fspath(base_dir))[1])
        packages = folder / f"env-{code['env']}.txt"
        if not packages.exists():
            _fs.atomic_write_bytes(packages, _packages().encode())
    except OSError:
        pass  # what ran is still recorded by each run
    return str(code["state"])


def _packages() -> str:
    """``conda env export`` in a conda environment, else ``pip freeze`` (else the
    distributions Python knows, as ``name==version``)."""
    conda = os.environ.get("CONDA_EXE")
    if conda and os.environ.get("CONDA_PREFIX") == sys.prefix:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([conda, "env", "export"], capture_output=True, text=True,
                                 timeout=120)
            if out.returncode == 0:
                return out.stdout
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True,
                             text=True, timeout=120)
        if out.returncode == 0:
            return out.stdout
    from importlib import metadata

    return "".join(sorted(f"{d.metadata['Name']}=={d.version}\n"
                          for d in metadata.distributions()))


def _latest(base_dir: str | os.PathLike[str], manifest_hash: str, n_tasks: int
            ) -> tuple[list[str], np.ndarray]:
    """The state ids with a ``.ran`` file for this manifest, and per task the position in
    that list of the state its latest recorded start ran (-1: none recorded). One file at a
    time: two arrays of the sweep's size, whatever the number of states."""
    folder = _folder(base_dir)
    try:
        names = sorted(n for n in os.listdir(folder)
                       if n.startswith(manifest_hash + "-") and n.endswith(".ran"))
    except OSError:
        names = []
    latest = np.full(n_tasks, -1, dtype=np.int32)
    best = np.zeros(n_tasks, dtype="<u4")
    for k, name in enumerate(names):
        started = _attempts(folder / name, n_tasks)
        newer = started > best
        latest[newer], best[newer] = k, started[newer]
    return [n[len(manifest_hash) + 1:-len(".ran")] for n in names], latest


def which_ran(base_dir: str | os.PathLike[str], manifest_hash: str, n_tasks: int
              ) -> dict[str, list[int]]:
    """State id -> the tasks whose latest recorded start ran it."""
    ids, latest = _latest(base_dir, manifest_hash, n_tasks)
    return {ids[k]: np.flatnonzero(latest == k).tolist()
            for k in np.unique(latest[latest >= 0]).tolist()}


def _attempts(path: Path, n_tasks: int) -> np.ndarray:
    raw = np.zeros(n_tasks, dtype="<u4")
    with contextlib.suppress(OSError):
        data = np.fromfile(path, dtype="<u4", count=n_tasks)
        raw[:len(data)] = data
    return raw


def _tasks(tasks: Sequence[int] | np.ndarray) -> str:
    listed = tasks.tolist() if isinstance(tasks, np.ndarray) else list(tasks)
    return f"task{'s' if len(listed) > 1 else ''} {taskspec.compact(listed)}"


def describe(base_dir: str | os.PathLike[str], state_id: str) -> str:
    """``commit 1a2b3c4 (uncommitted changes d1e2f3), environment 9f8e...`` for a state."""
    try:
        code = json.loads((_folder(base_dir) / f"{state_id}.json").read_text())
    except (OSError, ValueError):
        return f"code state {state_id}"
    commit = code.get("commit")
    words = f"commit {commit[:10]}" if isinstance(commit, str) else "no git commit"
    if code.get("dirty"):
        words += f" with uncommitted changes (diff {code.get('diff')})"
    return f"{words}, environment {code.get('env')}"


def warnings(sweep: Sweep) -> list[str]:
    """:func:`mixes` of a sweep, its submissions read from its record."""
    submitted = [(r.get(FIELD) if isinstance(r.get(FIELD), str) else None,
                  str(r.get("tasks") or ""))
                 for r in submissions.submitted(sweep.base_dir)
                 if r.get("manifest_hash") == sweep.hash]
    return mixes(sweep.base_dir, sweep.hash, len(sweep), submitted)


def _commit(base_dir: str | os.PathLike[str], state_id: str) -> str | None:
    try:
        code = json.loads((_folder(base_dir) / f"{state_id}.json").read_text())
    except (OSError, ValueError):
        return None
    commit = code.get("commit") if isinstance(code, dict) else None
    return commit if isinstance(commit, str) else None


def mixes(base_dir: str | os.PathLike[str], manifest_hash: str, n_tasks: int,
          submitted: Iterable[tuple[str | None, str]]) -> list[str]:
    """``notata status``'s warning lines: the sweep's runs ran more than one code state,
    or tasks ran a state other than their last submission's (only where both have a git
    commit: code outside git, or a submission from a notebook, says nothing to compare).
    ``submitted``: (state id, compact task spec) of each submission, oldest first. Array
    work only: nothing per task in Python, so it costs little at 10^6 tasks."""
    ids, latest = _latest(base_dir, manifest_hash, n_tasks)
    out: list[str] = []
    used = np.unique(latest[latest >= 0]).tolist()
    if len(used) > 1:
        out.append(f"warning: the sweep's runs ran {len(used)} versions of the code:")
        tasks = {k: np.flatnonzero(latest == k) for k in used}
        out += [f"  {_tasks(tasks[k])}: {describe(base_dir, ids[k])}"
                for k in sorted(used, key=lambda k: int(tasks[k][0]))]
    position = {sid: k for k, sid in enumerate(ids)}
    commits: dict[str, str | None] = {}
    sub = np.full(n_tasks, -1, dtype=np.int32)  # the position of each task's submitted state
    for sid, spec in submitted:
        if not taskspec.is_spec(spec):
            continue
        if sid is not None and sid not in commits:
            commits[sid] = _commit(base_dir, sid)
        # -1: nothing to compare with (no state, or one without a commit); -2: a state no
        # run ran
        k = position.get(sid, -2) if sid is not None and commits[sid] else -1
        for part in filter(None, spec.split(",")):
            lo, _, hi = part.partition("-")
            sub[int(lo):min(int(hi or lo) + 1, n_tasks)] = k
    differ = (latest >= 0) & (sub != -1) & (sub != latest)
    if differ.any():
        committed = [k for k in range(len(ids)) if _commit(base_dir, ids[k]) is not None]
        differ &= np.isin(latest, committed)
        by_state = {k: np.flatnonzero(differ & (latest == k)) for k in used}
        for k in sorted((k for k in by_state if len(by_state[k])),
                        key=lambda k: int(by_state[k][0])):
            out.append(f"warning: {_tasks(by_state[k])} ran {describe(base_dir, ids[k])}, "
                       "not the code they were submitted with (it changed while they waited)")
    if out:
        out.append(f"  (the states, diffs and package lists: {_folder(base_dir)}/)")
    return out
