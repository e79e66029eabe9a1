"""Reading runs back: :class:`LogReader` for one run, :class:`ExperimentReader` for an Experiment.

Readers never unpickle: arrays load with ``allow_pickle=False``, YAML with the
safe loader, and temporary files (``.NAME.*.tmp``) are never listed.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from . import _fs, layout


def _visible_files(root: Path) -> Iterator[Path]:
    """Files under ``root``, skipping hidden and temporary names and not following symlinks."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(folder, name)


def read_params(run_dir: Path, only: str | None = None) -> dict[str, Any]:
    """A run's saved params: params.yaml, then params.json over it (or ``only`` one file)."""
    out: dict[str, Any] = {}
    for name in (layout.PARAMS_YAML, layout.PARAMS_JSON):
        if only not in (None, name):
            continue
        try:
            text = (run_dir / name).read_text(encoding="utf-8")
        except FileNotFoundError:
            continue
        data = yaml.safe_load(text) if name == layout.PARAMS_YAML else json.loads(text)
        out.update(data or {})
    return out



class LogReader:
    """Read one run directory: params, metadata, arrays, artifacts, plots.

    Raises FileNotFoundError if ``path`` does not exist, ValueError if it holds
    no metadata.json.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"No such path: {self.path}")
        if not (self.path / layout.METADATA).exists():
            raise ValueError(f"{self.path} is not a valid Logbook run (no {layout.METADATA})")

    @property
    def run_id(self) -> str:
        """The run id (the folder name without ``log_``)."""
        return self.path.name.removeprefix(layout.RUN_PREFIX)

    @property
    def meta(self) -> dict[str, Any]:
        """metadata.json; a corrupt file raises :class:`~notata.CorruptMetadataError`."""
        return _fs.read_json_object(self.path / layout.METADATA)

    @property
    def params(self) -> dict[str, Any]:
        """params.yaml (safe loader) and params.json together (JSON wins a shared key)."""
        return read_params(self.path)

    @property
    def arrays(self) -> list[str]:
        """``name`` for each data/NAME.npy and ``bundle:key`` for each key of data/BUNDLE.npz."""
        keys = []
        data = self.path / layout.DATA
        for f in _visible_files(data):
            stem = f.relative_to(data).with_suffix("").as_posix()
            if f.suffix == ".npy":
                keys.append(stem)
            elif f.suffix == ".npz":
                try:
                    with np.load(f, allow_pickle=False) as bundle:
                        keys.extend(f"{stem}:{k}" for k in bundle.files)
                except (OSError, ValueError):
                    continue
        return sorted(keys)

    @property
    def artifacts(self) -> list[str]:
        """Files under artifacts/, relative to it, extensions kept."""
        root = self.path / layout.ARTIFACTS
        return sorted(f.relative_to(root).as_posix() for f in _visible_files(root))

    @property
    def plots(self) -> list[str]:
        """File names under plots/."""
        root = self.path / layout.PLOTS
        return sorted(f.relative_to(root).as_posix() for f in _visible_files(root))

    def load_array(self, name: str) -> Any:
        """``"x"`` loads data/x.npy; ``"bundle:key"`` loads ``key`` from data/bundle.npz.

        Raises FileNotFoundError or KeyError when missing; never unpickles.
        """
        bundle, sep, key = name.partition(":")
        if sep:
            path = self.path / layout.DATA / layout.check_relative(f"{bundle}.npz", "array")
            if not path.exists():
                raise FileNotFoundError(f"No such bundle: {bundle}.npz")
            with np.load(path, allow_pickle=False) as data:
                if key not in data:
                    raise KeyError(f"No key '{key}' in bundle '{bundle}.npz'")
                return data[key]
        path = self.path / layout.DATA / layout.check_relative(f"{name}.npy", "array")
        if not path.exists():
            raise FileNotFoundError(f"No such array: {name}.npy")
        return np.load(path, allow_pickle=False)

    def load_json(self, name: str) -> Any:
        """artifacts/NAME.json (the ``.json`` suffix is optional); ``{}`` if missing."""
        rel = layout.check_relative(f"{name.removesuffix('.json')}.json", "artifact")
        path = self.path / layout.ARTIFACTS / rel
        if not path.exists():
            return {}
        return json.loads(path.read_text(encoding="utf-8"))

    def load_pickle_unsafe(self, name: str) -> Any:
        """Unpickle artifacts/NAME.pkl. Unpickling runs code: only for files you trust."""
        import pickle

        rel = layout.check_relative(f"{name.removesuffix('.pkl')}.pkl", "artifact")
        with open(self.path / layout.ARTIFACTS / rel, "rb") as f:
            return pickle.load(f)

    def __repr__(self) -> str:
        return f"LogReader({str(self.path)!r})"

    def __str__(self) -> str:
        params = self.params
        lines = [f"<LogReader '{self.run_id}'>"]
        lines.append("  params: " + (", ".join(f"{k}={v}" for k, v in params.items())
                                     if params else "(missing)"))
        try:
            meta = self.meta
            lines.append(f"  meta: status={meta.get('status', 'unknown')}, "
                         f"attempt={meta.get('attempt', 1)}")
        except ValueError as err:
            lines.append(f"  meta: {err}")
        for label, items in (("arrays", self.arrays), ("artifacts", self.artifacts),
                             ("plots", self.plots)):
            if items:
                lines.append(f"  {label}:")
                lines.extend(f"    - {i}" for i in items)
        return "\n".join(lines)


class ExperimentReader:
    """Read an :class:`~notata.Experiment` folder: iterate runs, index by id or position."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"No such path: {self.path}")
        self.index_path = self.path / layout.EXPERIMENT_INDEX
        self.runs_path = self.path / layout.EXPERIMENT_RUNS
        if not self.runs_path.is_dir():  # as notata 0.3: an Experiment folder has runs/
            raise FileNotFoundError(f"No runs/ folder in {self.path}: not an Experiment folder")
        self.runs = sorted(
            d for d in self.runs_path.iterdir()
            if d.is_dir() and not d.is_symlink() and (d / layout.METADATA).exists()
        )

    def __iter__(self) -> Iterator[LogReader]:
        return (LogReader(d) for d in self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, key: str | int) -> LogReader:
        """A run by position (IndexError) or by run id (KeyError)."""
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError("Run ID must be an integer or string")
        if isinstance(key, int):
            if not 0 <= key < len(self.runs):
                raise IndexError(f"Run index {key} out of range")
            return LogReader(self.runs[key])
        for d in self.runs:
            if d.name == f"{layout.RUN_PREFIX}{key}":
                return LogReader(d)
        raise KeyError(f"No run found with ID '{key}'")

    def index(self) -> Iterator[dict[str, str]]:
        """The rows of index.csv."""
        if not self.index_path.exists():
            return
        with self.index_path.open(newline="") as f:
            yield from csv.DictReader(f)

    @property
    def params(self) -> dict[str, dict[str, Any]]:
        return {run.run_id: run.params for run in self}

    @property
    def meta(self) -> dict[str, dict[str, Any]]:
        return {run.run_id: run.meta for run in self}

    def __str__(self) -> str:
        lines = [f"<ExperimentReader '{self.path.name}'>"]
        rows = list(self.index())
        fields = list(rows[0].keys()) if rows else []
        lines.append(f"Index file: {self.index_path.name} with {len(rows)} entries")
        lines.append(f"Fields: {', '.join(fields) if fields else '(missing)'}")
        lines.append(f"Runs directory: {self.runs_path.name} with {len(self)} runs")
        for run in self:
            lines.append(f"- {run.run_id}: {run.meta.get('status', 'unknown')}")
        return "\n".join(lines)
