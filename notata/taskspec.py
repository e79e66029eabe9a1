"""Task lists as text: ``"3,7,10-12"``, SLURM's array syntax, as ``--tasks`` takes them and
submissions.jsonl records them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from .errors import UsageError

_SPEC = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def parse_indices(spec: str, count: int) -> list[int]:
    """``"3,7,10-12"`` -> ``[3, 7, 10, 11, 12]``; every index must be in ``0..count-1``."""
    out: set[int] = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise UsageError(f"--tasks {spec!r}: {part!r} is not an index or a range a-b") \
                from None
        if a > b or a < 0 or b >= count:
            raise UsageError(f"--tasks {spec!r}: {part!r} is outside the sweep's tasks "
                             f"0..{count - 1}")
        out.update(range(a, b + 1))
    return sorted(out)


def compact(indices: Iterable[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` -> ``"1-3,7,9-10"`` (SLURM's array syntax)."""
    parts: list[str] = []
    run: list[int] = []
    for i in sorted(set(indices)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def is_spec(text: str) -> bool:
    """Whether ``text`` is a well-formed task list (as a record must hold)."""
    return _SPEC.fullmatch(text) is not None


def expand(spec: str) -> Iterator[int]:
    """The indices of a well-formed task list, in its order (no bounds checked)."""
    for part in filter(None, spec.split(",")):
        lo, _, hi = part.partition("-")
        yield from range(int(lo), int(hi or lo) + 1)
