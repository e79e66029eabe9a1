"""Saving a run's outputs: the seed's ``save_*`` names and notata 0.3's short names.

Both spellings call the same writers. Every file is written atomically
(:func:`notata._fs.atomic_write`) and every name is checked to stay inside the run.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import pickle
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from . import _fs, layout, runinfo
from ._convert import json_default, to_plain
from .errors import UsageError
from .reader import read_params

_Bytes = bytes  # the class below has a method named bytes (notata 0.3's name)


class Outputs(ABC):
    """The writers of a :class:`~notata.Logbook`, under both spellings.

    As filelock's base class owns the locking logic and each platform implements two
    methods, this class owns the names and the layout of outputs inside ``path``; the
    Logbook implements :meth:`_guard` (refuse writes through a handle that no longer owns
    its run) and :meth:`_store` (write, remember for the final fsync, log a line).
    """

    def __init__(self, path: Path) -> None:
        #: The run directory every output lands in.
        self.path = path

    @abstractmethod
    def _guard(self) -> None:
        """Raise when nothing may be written through this handle any more."""

    @abstractmethod
    def _store(self, target: Path, write: Callable[[IO[bytes]], Any], message: str) -> None:
        """Write ``target`` atomically with ``write(file)`` and log ``message``."""

    # -- the one writer ------------------------------------------------------------------------

    def _output(
        self, folder: str, category: str | None, name: str, ext: str,
        write: Callable[[IO[bytes]], Any], what: str,
    ) -> Path:
        self._guard()
        layout.check_relative(name, "name")
        base = layout.check_relative(category, "category") if category is not None else Path(folder)
        rel = base / f"{name}{ext}"
        target = layout.inside(self.path, rel, "name")
        self._store(target, write, f"Saved {what} {name} in {rel.as_posix()}")
        return target

    # -- seed names ----------------------------------------------------------------------------

    def save_numpy(
        self, name: str, array: Any, category: str | None = None, *, compressed: bool = True,
    ) -> Path:
        """Save one array as ``data/NAME.npy`` (or ``CATEGORY/NAME.npy``).

        ``compressed`` is accepted for notata 0.1 code and ignored: a single array
        is written as ``.npy``, which ``np.load`` reads directly.
        """
        arr = np.asanyarray(array)
        return self._output(layout.DATA, category, name, ".npy",
                            lambda f: np.save(f, arr, allow_pickle=False), "array")

    def save_arrays(
        self, name: str, compressed: bool = True, category: str | None = None, **arrays: Any,
    ) -> Path:
        """Save several arrays in one ``data/NAME.npz`` bundle (compressed by default)."""
        saver = np.savez_compressed if compressed else np.savez
        return self._output(layout.DATA, category, name, ".npz",
                            lambda f: saver(f, **arrays), "arrays")

    def save_json(self, name: str, data: Any, category: str | None = None) -> Path:
        """Save ``data`` as ``artifacts/NAME.json`` (numpy values are converted)."""
        text = json.dumps(data, indent=2, sort_keys=True, default=json_default) + "\n"
        return self._output(layout.ARTIFACTS, category, name, ".json",
                            lambda f: f.write(text.encode()), "JSON")

    def save_text(self, name: str, text: str, category: str | None = None) -> Path:
        """Save ``text`` as ``artifacts/NAME.txt``."""
        return self._output(layout.ARTIFACTS, category, name, ".txt",
                            lambda f: f.write(text.encode()), "text")

    def save_pickle(
        self, name: str, obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL,
        category: str | None = None,
    ) -> Path:
        """Pickle ``obj`` to ``artifacts/NAME.pkl``. notata never loads pickles by itself."""
        return self._output(layout.ARTIFACTS, category, name, ".pkl",
                            lambda f: pickle.dump(obj, f, protocol=protocol), "pickle")

    def save_bytes(self, name: str, data: bytes, category: str | None = None) -> Path:
        """Save raw bytes as ``artifacts/NAME`` (the name keeps its own extension)."""
        return self._output(layout.ARTIFACTS, category, name, "",
                            lambda f: f.write(bytes(data)), "bytes")

    def save_plot(
        self, name: str, fig: Any = None, dpi: int = 200, formats: Iterable[str] = ("png",),
        category: str | None = None,
    ) -> list[Path]:
        """Save a matplotlib figure (default: the current one) as ``plots/NAME.EXT`` per format.

        Raises RuntimeError when matplotlib is not installed.
        """
        if fig is None:
            try:
                import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
            except ImportError as err:
                raise RuntimeError(
                    "save_plot() needs matplotlib: pip install matplotlib (or notata[plot])"
                ) from err
            fig = plt.gcf()
        paths = []
        for ext in formats:
            def write(f: IO[bytes], ext: str = ext) -> None:
                fig.savefig(f, format=ext, dpi=dpi, bbox_inches="tight")

            paths.append(self._output(layout.PLOTS, category, name, f".{ext}", write, "plot"))
        return paths

    # -- notata 0.3 names: the same writers ----------------------------------------------------

    def array(self, name: str, array: Any) -> Path:
        """notata 0.3 name of :meth:`save_numpy`."""
        return self.save_numpy(name, array)

    def arrays(self, name: str, compressed: bool = True, **arrays: Any) -> Path:
        """notata 0.3 name of :meth:`save_arrays`."""
        return self.save_arrays(name, compressed=compressed, **arrays)

    def json(self, name: str, data: Any) -> Path:
        """notata 0.3 name of :meth:`save_json`."""
        return self.save_json(name, data)

    def text(self, name: str, content: str) -> Path:
        """notata 0.3 name of :meth:`save_text`."""
        return self.save_text(name, content)

    def pickle(self, name: str, obj: Any, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
        """notata 0.3 name of :meth:`save_pickle`."""
        return self.save_pickle(name, obj, protocol=protocol)

    def bytes(self, name: str, data: bytes) -> Path:
        """notata 0.3 name of :meth:`save_bytes`."""
        return self.save_bytes(name, data)

    def plot(
        self, name: str, fig: Any = None, dpi: int = 200, formats: Iterable[str] = ("png",),
    ) -> list[Path]:
        """notata 0.3 name of :meth:`save_plot`."""
        return self.save_plot(name, fig=fig, dpi=dpi, formats=formats)

    # -- params --------------------------------------------------------------------------------

    def save_params(self, params: Mapping[str, Any], preferred: str = "yaml") -> None:
        """Write ``params`` as params.yaml or params.json, replacing the saved params (the
        other file, if any, is removed)."""
        self._write_params(to_plain(dict(params), "params"), preferred, merge=False)
        other = layout.PARAMS_JSON if preferred == "yaml" else layout.PARAMS_YAML
        with contextlib.suppress(FileNotFoundError):
            (self.path / other).unlink()

    def params(self, ext: str = "yaml", **kwargs: Any) -> None:
        """notata 0.3: merge ``kwargs`` into ``params.<ext>`` (read from that same file)."""
        self._write_params(to_plain(kwargs, "params"), ext, merge=True)

    def load_params(self) -> dict[str, Any]:
        """The saved params: params.yaml and params.json together (JSON wins a shared key)."""
        return read_params(self.path)

    def _write_params(self, values: dict[str, Any], ext: str, merge: bool) -> None:
        self._guard()
        name = {"yaml": layout.PARAMS_YAML, "json": layout.PARAMS_JSON}.get(ext)
        if name is None:
            raise UsageError(f"params format must be 'yaml' or 'json', not {ext!r}")
        if merge:
            values = {**read_params(self.path, only=name), **values}
        self._save_params_file(name, render_params(values, ext))

    def _save_params_file(self, name: str, data: _Bytes) -> None:
        self._store(self.path / name, lambda f: f.write(data),
                    f"Saved params ({name.rpartition('.')[2]}) in {name}")

    # -- paths for files the user writes ---------------------------------------------------------

    def _target_dir(self, category: str | None, fallback: Path) -> Path:
        """notata 0.3's helper (its tests call it): ``fallback``, or ``CATEGORY/`` made."""
        if category is None:
            return fallback
        target = layout.inside(self.path, layout.check_relative(category, "category"),
                               "category")
        target.mkdir(exist_ok=True)
        return target

    def artifact_path(self, *parts: str, create: bool = True) -> Path:
        """A path inside the run directory (parents made unless ``create=False``).

        Files written through it are the caller's; they are not made atomic.
        """
        self._guard()
        rel = Path(*parts) if parts else Path("")
        if create:
            return layout.inside(self.path, rel, "path")
        return self.path / layout.check_relative(rel, "path")

    def __getitem__(self, relative: str) -> Path:
        """notata 0.3: ``log["artifacts/x.dat"]`` is a path inside the run, parents made."""
        self._guard()
        return layout.inside(self.path, relative, "path")

    def exists(self, relative: str) -> bool:
        """Whether ``relative`` exists inside the run directory."""
        return (self.path / layout.check_relative(relative, "path")).exists()


def render_params(values: dict[str, Any], ext: str) -> bytes:
    if ext == "json":
        return _fs.dumps_json(values)
    try:
        return yaml.safe_dump(values, sort_keys=True, allow_unicode=True).encode()
    except yaml.YAMLError as err:  # to_plain lets nothing through that YAML refuses
        raise TypeError(f"params: cannot be written as YAML: {err}") from err


_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARNING": logging.WARNING,
           "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}


#: Open LogFiles per logger name (a run id's): its logger is forgotten after the last.
_USERS: collections.Counter[str] = collections.Counter()


class LogFile:
    """A run's log.txt: lines appended through one descriptor, from its first line on.

    ``logger`` is notata 0.3's (``notata.logbook.<run_id>``, not propagated): handlers
    added to it receive every line written.
    """

    def __init__(self, path: Path, run_id: str, level: str) -> None:
        self.path = path
        self.level = _LEVELS[level.upper()]
        self.logger = logging.getLogger(f"notata.logbook.{run_id}")
        self.logger.propagate = False
        self.logger.setLevel(self.level)
        self._fd: int | None = None
        _USERS[self.logger.name] += 1
        self._using = True

    def write(self, message: str, level: int | str) -> bool:
        """Append ``[YYYY-MM-DDTHH:MM:SS] LEVEL message``; whether this opened the file."""
        num = _LEVELS[level.upper()] if isinstance(level, str) else int(level)
        if num < self.level:
            return False
        if self.logger.handlers:  # notata 0.3 wrote through this logger: its handlers see it
            self.logger.log(num, message)
        line = f"[{runinfo.now_iso()}] {logging.getLevelName(num)} {message}\n"
        opened = self._fd is None
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o666)
        os.write(self._fd, line.encode("utf-8", "backslashreplace"))
        return opened

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        # logging keeps every logger ever named, and each setLevel walks them all: a pack
        # of 50,000 runs in one process spent 1.7 ms per run there, and growing. A closed
        # run's logger that nobody gave a handler, and that no other open handle of the
        # same run id uses, is forgotten (a new one is made if the run is opened again;
        # whoever holds this one keeps it).
        if not self._using:
            return
        self._using = False
        _USERS[self.logger.name] -= 1
        if _USERS[self.logger.name] <= 0 and not self.logger.handlers:
            del _USERS[self.logger.name]
            manager = logging.Logger.manager
            with contextlib.suppress(AttributeError, TypeError):
                if manager.loggerDict.get(self.logger.name) is self.logger:
                    del manager.loggerDict[self.logger.name]
