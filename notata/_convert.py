"""Turning user values into what YAML and JSON can hold, or saying which key cannot be."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

#: Arrays up to this many elements are written into params as lists; larger ones are refused.
MAX_PARAM_ARRAY = 1000


def to_plain(value: Any, where: str = "value") -> Any:
    """A copy of ``value`` made of dict/list/str/int/float/bool/None.

    numpy scalars become Python numbers, small arrays lists, tuples lists, paths
    strings. Anything else raises TypeError naming ``where`` (e.g. ``params['x']``).
    """
    if isinstance(value, np.generic):  # np.float64 subclasses float, but YAML refuses it
        return to_plain(value.item(), where)
    if value is None or type(value) in (bool, int, float, str):
        return value
    for plain in (int, float, str):  # subclasses (IntEnum, np.str_...) as their plain value
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, np.ndarray):
        if value.size > MAX_PARAM_ARRAY:
            raise TypeError(
                f"{where}: an array of {value.size} elements is too large for a text file; "
                "save it with save_numpy() instead"
            )
        return to_plain(value.tolist(), where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            out[k] = to_plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where}: cannot write a {type(value).__name__} as YAML/JSON; "
        "convert it to a number, string, list or dict"
    )


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` hook: numpy values and paths, like :func:`to_plain`."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.generic, PurePath, tuple)):
        return to_plain(value, "JSON value")
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")

