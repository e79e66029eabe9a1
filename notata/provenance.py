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
        if path:
            return os.path.abspath(path)
    return os.getcwd()


def _git(folder: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", folder, *args], capture_output=True,
                          timeout=GIT_TIMEOUT, stdin=subprocess.DEVNULL,
                          env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"})


#: Seconds a process reuses what git said of a folder (a pack of short tasks asks once).
FRESH_SEC = 10.0
_SAID: dict[str, tuple[float, tuple[dict[str, Any], bytes]]] = {}


def _git_state(folder: str, fresh: bool = False) -> tuple[dict[str, Any], bytes]:
    """(commit fields, the diff itself) of the repository holding ``folder``, asked at
    most every :data:`FRESH_SEC` seconds unless ``fresh``."""
    said = _SAID.get(folder)
    if said is not None and not fresh and time.monotonic() - said[0] < FRESH_SEC:
        return said[1]
    answer = _ask_git(folder)
    _SAID[folder] = (time.monotonic(), answer)
    return answer


def _ask_git(folder: str) -> tuple[dict[str, Any], bytes]:
    try:
        head = _git(folder, "rev-parse", "--show-toplevel", "HEAD")
        if head.returncode != 0:
            why = head.stderr.decode(errors="replace").strip().splitlines()
            return {"commit": None, "why": (why or ["not a git repository"])[-1]}, b""
        top, commit = head.stdout.decode().split()[:2]
        diff = _git(top, "diff", "HEAD", "--no-ext-diff", "--binary", "--no-color")
    except FileNotFoundError:
        return {"commit": None, "why": "git is not installed"}, b""
    except (subprocess.TimeoutExpired, OSError, ValueError) as err:
        return {"commit": None, "why": f"git did not answer: {err}"}, b""
    changes = diff.stdout if diff.returncode == 0 else b""
    return {"repo": top, "commit": commit, "dirty": bool(changes),
            "diff": _hash(changes) if changes else None}, changes


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


def state(subject: str | None = None, fresh: bool = False) -> dict[str, Any]:
    """The code state of ``subject`` (a file or folder; default: this process's script,
    else the working folder); git is asked again after :data:`FRESH_SEC` (or ``fresh``)."""
    if subject is None:
        script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c", "-m") else ""
        subject = os.path.abspath(script) if os.path.isfile(script) else os.getcwd()
    fields = {**_git_state(_where(subject), fresh)[0], "env": env_hash()}
    return {"state": _hash(json.dumps(fields, sort_keys=True).encode()), **fields}


_SUBJECT: list[str] = []


def use_subject(subject: str) -> None:
    """The code the runs this process opens from now on run (``notata exec``'s command)."""
    _SUBJECT[:] = [subject]


def for_run() -> dict[str, Any] | None:
    """The state a run opened now records (None when turned off)."""
    return state(_SUBJECT[0] if _SUBJECT else None) if enabled() else None


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
    code, task, digest = meta.get("code"), meta.get("task"), meta.get("manifest_hash")
    if not isinstance(code, Mapping) or not isinstance(task, int) or not isinstance(
            digest, str):
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
    code = state(subject, fresh=True)
    folder = _folder(base_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_state(base_dir, code)
        if code.get("diff"):
            patch = folder / f"diff-{code['diff']}.patch"
            if not patch.exists():
                _fs.atomic_write_bytes(patch, _git_state(_where(subject))[1])
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


def which_ran(base_dir: str | os.PathLike[str], manifest_hash: str, n_tasks: int
              ) -> dict[str, list[int]]:
    """State id -> the tasks whose latest recorded start ran it."""
    folder = _folder(base_dir)
    try:
        names = [n for n in os.listdir(folder)
                 if n.startswith(manifest_hash + "-") and n.endswith(".ran")]
    except OSError:
        return {}
    if len(names) == 1:
        attempts = _attempts(folder / names[0], n_tasks)
        return {names[0][len(manifest_hash) + 1:-4]: np.flatnonzero(attempts).tolist()}
    ids = [n[len(manifest_hash) + 1:-4] for n in names]
    table = np.stack([_attempts(folder / n, n_tasks) for n in names]) if names else None
    if table is None:
        return {}
    latest = table.argmax(axis=0)
    ran = table.max(axis=0) > 0
    return {ids[k]: np.flatnonzero(ran & (latest == k)).tolist() for k in range(len(ids))
            if (ran & (latest == k)).any()}


def _attempts(path: Path, n_tasks: int) -> np.ndarray:
    raw = np.zeros(n_tasks, dtype="<u4")
    with contextlib.suppress(OSError):
        data = np.fromfile(path, dtype="<u4", count=n_tasks)
        raw[:len(data)] = data
    return raw


def _tasks(tasks: Sequence[int]) -> str:
    return f"task{'s' if len(tasks) > 1 else ''} {taskspec.compact(tasks)}"


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
    submitted = [(r.get("code"), r.get("tasks") or "")
                 for r in submissions.submitted(sweep.base_dir)
                 if r.get("manifest_hash") == sweep.hash]
    return mixes(sweep.base_dir, sweep.hash, len(sweep), submitted)


def mixes(base_dir: str | os.PathLike[str], manifest_hash: str, n_tasks: int,
          submitted: Iterable[tuple[str | None, str]]) -> list[str]:
    """``notata status``'s warning lines: the sweep's runs ran more than one code state,
    or tasks ran a state other than their last submission's. ``submitted``: (state id,
    compact task spec) of each submission, oldest first."""
    ran = which_ran(base_dir, manifest_hash, n_tasks)
    out: list[str] = []
    if len(ran) > 1:
        out.append(f"warning: the sweep's runs ran {len(ran)} versions of the code:")
        out += [f"  {_tasks(tasks)}: {describe(base_dir, sid)}"
                for sid, tasks in sorted(ran.items(), key=lambda kv: kv[1][0])]
    last = np.full(n_tasks, -1, dtype=np.int64)
    states: list[str] = []
    for sid, spec in submitted:
        if sid is None:
            continue
        states.append(sid)
        if taskspec.is_spec(spec):
            last[[i for i in taskspec.expand(spec) if i < n_tasks]] = len(states) - 1
    other = {sid: [t for t in tasks if last[t] >= 0 and states[last[t]] != sid]
             for sid, tasks in ran.items()}
    other = {sid: tasks for sid, tasks in other.items() if tasks}
    for sid, tasks in other.items():
        out.append(f"warning: {_tasks(tasks)} ran {describe(base_dir, sid)}, "
                   "not the code they were submitted with (it changed while they waited)")
    if out:
        out.append(f"  (the states, diffs and package lists: "
                   f"{_folder(base_dir)}/)")
    return out
