"""Sweep manifests: a parameter grid mapped onto task indices 0..N-1, computed, never listed.

A manifest is a YAML or JSON file::

    name: oscillator
    base_dir: outputs              # relative to the manifest's folder (default "outputs")
    run_id: "omega{omega}_dt{dt}"  # optional str.format template over the params
    grid:                          # cartesian product, in the order written
      omega: [1.0, 2.0, 3.0]
      dt: [0.01, 0.001]
    zip:                           # lists of equal length, taken together
      seed: [1, 2]
      label: [a, b]
    runs:                          # explicit param dicts
      - {solver: verlet}
      - {solver: euler}
    params: {steps: 1000}          # the same in every task
    slurm: {time: "01:00:00"}      # submission options; not part of the sweep's identity

Combination: every ``runs`` entry x every ``zip`` row x every ``grid`` point, each
merged with ``params``; an absent part counts as one empty entry. A param may be
defined by only one part (a clash is an error).

Task order (fixed: index i means the same task forever for the same manifest):
the grid varies fastest, its last key fastest of all (like ``itertools.product``
over the keys in file order); then the zip row; then the runs entry, slowest.

Identity: :attr:`Sweep.hash` is a SHA-256 over the manifest's canonical content
(everything except ``slurm``), recorded in every run's metadata, so a changed
manifest is detected instead of silently remapping indices.

Run ids: the template, or by default the params that vary, in order, as
``<key><value>`` joined by ``_`` (``omega1.0_dt0.01``) with characters outside
``[A-Za-z0-9.+=-]`` replaced by ``-``; ``task<i>`` when nothing varies.
Duplicate run ids are an error naming both tasks; whole-sweep commands check
them (:meth:`Sweep.check_unique`); looking up one task does not.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import string
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import _fs, layout
from ._convert import to_plain
from ._version import __version__
from .errors import ManifestError, TaskIndexError
from .taskspec import compact, parse_indices

__all__ = ["MAX_TASKS", "Sweep", "Task", "compact", "load", "parse_indices"]

KEYS = ("name", "base_dir", "run_id", "grid", "zip", "runs", "params", "slurm", "retry")
_UNSAFE = re.compile(r"[^A-Za-z0-9.+=-]")


@dataclass(frozen=True)
class Task:
    """One task of a sweep: its index, run id, params and run directory."""

    index: int
    run_id: str
    params: dict[str, Any]
    run_dir: Path

    def as_json(self) -> dict[str, Any]:
        return {"task": self.index, "run_id": self.run_id, "params": self.params,
                "run_dir": str(self.run_dir)}


class Sweep:
    """A loaded manifest. ``len(sweep)`` tasks; ``sweep.task(i)`` computes task ``i``."""

    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        self.path = path
        self.name: str = data["name"]
        self.base_dir: Path = (path.parent / data.get("base_dir", "outputs")).resolve()
        self.template: str | None = data.get("run_id")
        self.grid: list[tuple[str, list[Any]]] = list(data.get("grid", {}).items())
        zipped = data.get("zip", {})
        self.zip: list[tuple[str, list[Any]]] = list(zipped.items())
        self.runs: list[dict[str, Any]] = list(data.get("runs", [{}])) or [{}]
        self.constants: dict[str, Any] = dict(data.get("params", {}))
        self.slurm: dict[str, Any] = dict(data.get("slurm", {}))
        #: The ``retry:`` section, as written (read by :func:`notata.retry.policy`).
        self.retry: dict[str, Any] = dict(data.get("retry", {}))
        self._zip_len = len(self.zip[0][1]) if self.zip else 1
        self._grid_size = math.prod(len(v) for _, v in self.grid)
        # How a sweep is run (its scheduler options, its retry policy) is not what it is.
        identity = {k: data[k] for k in KEYS if k in data and k not in ("slurm", "retry")}
        identity["grid"] = [[k, v] for k, v in self.grid]  # order matters: keep it
        identity["zip"] = [[k, v] for k, v in self.zip]
        canon = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        self.hash = hashlib.sha256(canon.encode()).hexdigest()[:16]
        self._varying = [k for k, _ in self.grid] + [k for k, _ in self.zip] + sorted(
            {k for run in self.runs for k in run})

    def __len__(self) -> int:
        return len(self.runs) * self._zip_len * self._grid_size

    def __iter__(self) -> Iterator[Task]:
        return (self.task(i) for i in range(len(self)))

    def params(self, index: int) -> dict[str, Any]:
        """The params of task ``index`` (O(number of keys), no list of tasks is built)."""
        n = len(self)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"task index must be an integer, not {type(index).__name__}")
        if not 0 <= index < n:
            raise IndexError(f"task {index} is outside sweep {self.name!r} (tasks 0..{n - 1})")
        rest, g = divmod(int(index), self._grid_size)
        r, z = divmod(rest, self._zip_len)
        out = dict(self.constants)
        out.update(self.runs[r])
        for key, values in self.zip:
            out[key] = values[z]
        point = {}
        for key, values in reversed(self.grid):
            g, k = divmod(g, len(values))
            point[key] = values[k]
        out.update((k, point[k]) for k, _ in self.grid)
        return out

    def run_id(self, index: int, params: Mapping[str, Any] | None = None, *,
               check: bool = True) -> str:
        """The run id of task ``index`` (``check=False``: not validated, for lookups only)."""
        p = self.params(index) if params is None else params
        if self.template is not None:
            try:
                rid = self.template.format_map(p)
            except (KeyError, IndexError, AttributeError, ValueError, TypeError) as err:
                raise ManifestError(str(self.path), f"task {index}: run_id template "
                                    f"{self.template!r} fails: {err!r}") from None
        else:
            parts = [f"{k}{_UNSAFE.sub('-', _in_run_id(p[k]))}" for k in self._varying if k in p]
            rid = "_".join(parts) or f"task{index}"
        if not check:
            return rid
        try:
            return layout.check_run_id(rid)
        except ValueError as err:
            raise ManifestError(str(self.path), f"task {index}: {err}") from None

    def check_indices(self, indices: Iterable[int]) -> list[int]:
        """``indices`` sorted, each once; :class:`TaskIndexError` (an IndexError and a
        ValueError) for one outside the sweep, before anything runs."""
        if isinstance(indices, range) and indices.step == 1 and indices.start >= 0 \
                and indices.stop <= len(self):
            return list(indices)
        n = len(self)
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
                raise TaskIndexError(f"task index must be an integer, not {type(i).__name__}")
            if not 0 <= i < n:
                raise TaskIndexError(f"task {i} is outside sweep {self.name!r} "
                                     f"(tasks 0..{n - 1})")
        return sorted({int(i) for i in indices})

    def task(self, index: int) -> Task:
        """Task ``index``: run id, params and run directory."""
        p = self.params(index)
        rid = self.run_id(index, p)
        return Task(int(index), rid, p, self.base_dir / f"{layout.RUN_PREFIX}{rid}")

    def check_unique(self, remember: bool = True) -> None:
        """Raise :class:`ManifestError` naming two tasks that share a run id.

        Keeps 8 bytes per task (hashes in a numpy array), so 10^7 tasks need ~80 MB, and
        takes about 3 s at 10^6 tasks. The answer depends only on the manifest's hash
        (and notata's version), so a sweep that passed once is remembered in
        ``<base_dir>/.notata/index/<hash>.unique`` (written where ``.notata/`` exists and
        ``remember``; a dry run writes nothing).
        """

        marker = layout.SweepPaths(self.base_dir).unique(self.hash)
        try:
            if marker.read_text(encoding="utf-8").strip() == __version__:
                return
        except (OSError, UnicodeDecodeError):
            pass
        self._check_unique()
        if remember and marker.parent.parent.is_dir():
            with contextlib.suppress(OSError):
                marker.parent.mkdir(exist_ok=True)
                _fs.atomic_write_bytes(marker, f"{__version__}\n".encode())

    def _check_unique(self) -> None:
        n = len(self)
        digests = np.empty(n, dtype=np.uint64)
        for i in range(n):
            digests[i] = int.from_bytes(
                hashlib.blake2b(self.run_id(i).encode(), digest_size=8).digest(), "little")
        order = np.argsort(digests, kind="stable")
        same = np.flatnonzero(digests[order][1:] == digests[order][:-1])
        for k in same:
            a, b = sorted((int(order[k]), int(order[k + 1])))
            if self.run_id(a) == self.run_id(b):
                raise ManifestError(str(self.path),
                                    f"tasks {a} and {b} have the same run id {self.run_id(a)!r}")


def _in_run_id(value: Any) -> str:
    """A value as a run id spells it: Python's ``str`` (``True``), lists and dicts as
    compact JSON. Unlike a command's placeholders (:func:`notata.runner.as_argument`,
    ``true``), because run ids already on disk were spelled this way."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True) if isinstance(
        value, (dict, list)) else str(value)


#: The largest sweep notata takes: its whole-sweep checks keep 8 bytes per task.
MAX_TASKS = 10**8


def load(path: str | os.PathLike[str], *, check_unique: bool = False) -> Sweep:
    """Read and validate a manifest; every problem is a :class:`ManifestError` naming the file."""
    p = Path(path)
    where = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(where, f"cannot read: {getattr(err, 'strerror', None) or err}") \
            from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if p.suffix == ".json" else "YAML"
        raise ManifestError(where, f"invalid {kind}: {' '.join(str(err).split())}") from None
    sweep = Sweep(p.resolve(), _validate(where, data))
    if len(sweep) == 0:
        raise ManifestError(where, "the sweep is empty (a grid or zip list has no values)")
    if len(sweep) > MAX_TASKS:
        raise ManifestError(where, f"the sweep has {len(sweep):.3g} tasks; notata takes at most "
                                   f"{MAX_TASKS:.0e} (split it into several manifests)")
    if sweep.template is not None:
        try:
            sweep.run_id(0)
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            raise ManifestError(where, f"run_id template {sweep.template!r}: {err}") from None
    if check_unique:
        sweep.check_unique()
    return sweep


# libyaml's safe loader when PyYAML has it: a 10^5-value grid parses 10x faster.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[misc]
    """PyYAML's safe loader with YAML 1.2's rules for numbers.

    YAML 1.1 (PyYAML's default) reads ``30:00`` as the sexagesimal integer 1800, which
    reached sbatch as ``--time=1800`` (30 hours), and ``1e-3`` as a string beside
    ``1.0e-4`` as a float. YAML 1.2's core schema: integers are decimal, ``0o`` octal or
    ``0x`` hex; floats have a dot or an exponent; ``30:00`` stays the string "30:00".
    Booleans and null keep PyYAML's rules.
    """


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(  # integers first: "12" also matches the float pattern
    _INT, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def _construct_int(loader: Any, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 16) if text.startswith("0x") else int(text, 10)  # "010" is ten


_Loader.add_constructor(_INT, _construct_int)


def _construct_mapping(loader: Any, node: yaml.MappingNode) -> dict[Any, Any]:
    """A mapping whose keys are unique: ``grid:`` written twice is an error, not the last
    one silently winning. A plain key that YAML 1.1 reads as a boolean (``on:``, ``yes:``,
    as in ``retry: {on: [...]}``) stays the word written: keys must be strings anyway."""
    keys = [k.value if isinstance(k, yaml.ScalarNode) and k.tag == _BOOL and not k.style
            else loader.construct_object(k, deep=True) for k, _ in node.value]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise yaml.constructor.ConstructorError(
            None, None, f"key {dup!r} appears twice in one mapping", node.start_mark)
    return {k: loader.construct_object(v, deep=True) for k, (_, v) in zip(keys, node.value,
                                                                        strict=True)}


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _find_nul(value: Any, where: str) -> str | None:
    """The dotted path of the first string (key or value) holding a NUL, if any."""
    if isinstance(value, str):
        return where or "a value" if "\0" in value else None
    items = (value.items() if isinstance(value, dict)
             else enumerate(value) if isinstance(value, list) else ())
    for k, v in items:
        here = f"{where}.{k}" if where else str(k)
        if isinstance(k, str) and "\0" in k:
            return here.replace("\0", "\\0")
        found = _find_nul(v, here)
        if found is not None:
            return found
    return None


def _validate(where: str, data: Any) -> dict[str, Any]:
    """Check the manifest's shape; return it with values made plain."""

    def fail(problem: str) -> ManifestError:
        return ManifestError(where, problem)

    if not isinstance(data, dict):
        raise fail("expected a mapping with at least 'name' and one of grid/zip/runs/params")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(KEYS)}")
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise fail("'name' must be a non-empty string")
    try:
        layout.check_run_id(data["name"])
    except ValueError as err:
        raise fail(f"'name': {err}") from None
    if not any(k in data for k in ("grid", "zip", "runs", "params")):
        raise fail("nothing to run: give at least one of grid, zip, runs, params")
    for key in ("base_dir", "run_id"):
        if key in data and not isinstance(data[key], str):
            raise fail(f"'{key}' must be a string")
    for key in ("grid", "zip", "params", "slurm", "retry"):
        if key in data and not isinstance(data[key], dict):
            raise fail(f"'{key}' must be a mapping")
    try:
        data = to_plain(data, "manifest")
    except TypeError as err:
        raise fail(str(err)) from None
    nul = _find_nul(data, "")
    if nul is not None:  # no argv, environment or file name can carry one
        raise fail(f"{nul} contains a NUL character, which no command line can carry")
    for key in ("grid", "zip"):
        for name, values in data.get(key, {}).items():
            if not isinstance(values, list):
                raise fail(f"{key}.{name} must be a list of values")
    lengths = {name: len(v) for name, v in data.get("zip", {}).items()}
    if len(set(lengths.values())) > 1:
        raise fail(f"zip lists must have equal lengths, got {lengths}")
    runs = data.get("runs", [])
    if "runs" in data and (not isinstance(runs, list) or not runs
                           or not all(isinstance(r, dict) for r in runs)):
        raise fail("'runs' must be a non-empty list of mappings")
    owners: dict[str, str] = {}
    parts = [("params", data.get("params", {})), ("grid", data.get("grid", {})),
             ("zip", data.get("zip", {}))] + [(f"runs[{i}]", r) for i, r in enumerate(runs)]
    for part, mapping in parts:
        for name in mapping:
            other = owners.get(name)
            if other and not (other.startswith("runs[") and part.startswith("runs[")):
                raise fail(f"param {name!r} is defined in both {other} and {part}")
            owners[name] = part
    if "run_id" in data:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(data["run_id"]) if f}
        except ValueError as err:
            raise fail(f"run_id template {data['run_id']!r}: {err}") from None
        for f in fields:
            root = re.split(r"[.\[]", f, maxsplit=1)[0]
            if root not in owners:
                raise fail(f"run_id template names {{{root}}}, which is not a param")
            if any(root not in r for r in runs) and owners[root].startswith("runs["):
                raise fail(f"run_id template names {{{root}}}, which some runs entries lack")
    return dict(data)
