"""Experiment: notata 0.3's sweep helper, a folder of runs and an ``index.csv``.

``Experiment(name, base_dir)`` keeps its runs in ``<base_dir>/<name>/runs/``;
each completed or failed run appends a row (run_id, params, status, and the
fields of ``artifacts/metrics.json``) to ``<base_dir>/<name>/index.csv``.

Differences from 0.3, on purpose: the ``status`` column is the run's own
status (0.3 overwrote it with ``missing`` when metrics.json was absent, which
hid failures); rows are appended under a lock, so parallel workers do not
interleave; a row with new columns rewrites the file atomically with the
union of columns instead of misaligning them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from . import _fs, layout, lock
from .logbook import Logbook

METRICS = "artifacts/metrics.json"


class Experiment:
    """A named group of runs under ``<base_dir>/<name>/``."""

    def __init__(self, name: str, base_dir: str | os.PathLike[str] = "outputs") -> None:
        self.name = layout.check_run_id(name)
        self.base_dir = Path(base_dir)
        self.exp_dir = self.base_dir / self.name
        self.runs_dir = self.exp_dir / layout.EXPERIMENT_RUNS
        self.index_file = self.exp_dir / layout.EXPERIMENT_INDEX
        self.runs_dir.mkdir(parents=True, exist_ok=True)

    def add(self, skip_existing: bool = False, **params: Any) -> Logbook | None:
        """Open the run for ``params`` (its id is built from them); ``None`` if it exists
        and ``skip_existing`` is set."""
        run_id = self._run_id(params)
        if skip_existing and (self.runs_dir / f"{layout.RUN_PREFIX}{run_id}").exists():
            return None
        return Logbook(run_id, base_dir=self.runs_dir, params=params, preallocate=True,
                       callback=self.record)

    def record(self, log: Logbook, metrics_file: str = METRICS) -> None:
        """Append ``log``'s row to index.csv."""
        row: dict[str, Any] = {"run_id": log.run_id, **log.load_params(), "status": log.status}
        metrics = log.path / metrics_file
        if metrics.exists():
            try:
                data = json.loads(metrics.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    row.update({k: v for k, v in data.items() if k not in ("run_id", "status")})
            except ValueError as err:
                row["error_reason"] = f"{metrics_file}: {err}"
        self._append(row)

    def _run_id(self, params: dict[str, Any]) -> str:
        def text(v: Any) -> str:
            if isinstance(v, float):
                return f"{v:.5g}"
            return str(v).replace("/", "_").replace(" ", "_")

        return f"{self.name}_" + "_".join(f"{k}_{text(v)}" for k, v in sorted(params.items()))

    def _append(self, row: dict[str, Any]) -> None:
        with lock.exclusive(self.exp_dir / f".{layout.EXPERIMENT_INDEX}.lock"):
            rows = []
            fields: list[str] = []
            if self.index_file.exists():
                with self.index_file.open(newline="", encoding="utf-8") as f:
                    reader = csv.DictReader(f)
                    fields = list(reader.fieldnames or [])
                    rows = list(reader)
            fields += [k for k in row if k not in fields]
            out = io.StringIO()
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows([*rows, row])
            _fs.atomic_write_bytes(self.index_file, out.getvalue().encode())

    def to_dataframe(self) -> Any:
        """index.csv as a pandas DataFrame (pandas required)."""
        try:
            import pandas as pd  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError as err:
            raise ImportError("pandas is required to convert experiment data to a DataFrame.") \
                from err
        if not self.index_file.exists():
            return pd.DataFrame()
        return pd.read_csv(self.index_file)

    def select(self, **filters: Any) -> Any:
        """The rows of :meth:`to_dataframe` whose columns equal ``filters``."""
        df = self.to_dataframe()
        for key, val in filters.items():
            df = df[df[key] == val]
        return df
