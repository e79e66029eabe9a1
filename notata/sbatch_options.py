"""What sbatch is given: the options notata knows by name (a manifest's ``slurm:``
section and the command line's flags), the extra ``#SBATCH`` lines a user may add (and
the ones notata sets, which they may not), and SLURM's time and memory notations
(``--time 1-02:00:00``, ``--mem 4G``) read and written. :mod:`notata.sbatch` renders
and submits the scripts."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Mapping
from typing import Any

from .errors import ManifestError, UsageError
from .pack import check_size

#: sbatch options notata knows by name: manifest ``slurm:`` key or CLI flag -> sbatch option.
OPTIONS = {
    "partition": "--partition", "time": "--time", "mem": "--mem",
    "cpus_per_task": "--cpus-per-task", "gpus": "--gpus", "account": "--account",
    "qos": "--qos", "job_name": "--job-name", "output": "--output", "error": "--error",
}
#: The short forms of :data:`OPTIONS` (``-t 10`` is ``--time``).
_SHORT = {"partition": "-p", "time": "-t", "cpus_per_task": "-c", "gpus": "-G",
          "account": "-A", "qos": "-q", "job_name": "-J", "output": "-o", "error": "-e"}


#: sbatch's short options that take no value (``-Qt 7`` is ``-Q -t 7``).
_NO_VALUE = frozenset("HOQsvVWhu")


def _options_of(line: str) -> list[str]:
    """The options an ``#SBATCH`` line sets: long ones as written before ``=`` (``--outp``),
    short ones one letter each, bundles unbundled (``-Qt7``: ``-Q``, ``-t``)."""
    text = re.sub(r"^\s*#SBATCH", "", line)  # sbatch reads "#SBATCH--x" too
    try:
        words = shlex.split(text)  # a quoted value is one word: --comment="a -t b"
    except ValueError:
        words = text.split()
    out: list[str] = []
    for word in words:
        if word.startswith("--"):
            out.append(word.split("=", 1)[0])
        elif word.startswith("-") and len(word) > 1:
            for letter in word[1:]:
                out.append("-" + letter)
                if letter not in _NO_VALUE:
                    break  # the rest of the word is this option's value
    return out


def _sets(option: str, long: str, short: str | None = None) -> bool:
    """Whether ``option`` (from :func:`_options_of`) is ``long``, an abbreviation of it
    sbatch would take (``--outp``), or ``short``."""
    if option.startswith("--"):
        return len(option) >= 4 and long.startswith(option)
    return option == short


def _named(line: str) -> str | None:
    """The key of an option that :data:`OPTIONS` names, if ``line`` sets one."""
    for option in _options_of(line):
        for key, long in OPTIONS.items():
            if _sets(option, long, _SHORT.get(key)):
                return key
    return None


#: Other keys a manifest's ``slurm:`` section may hold.
SECTION_KEYS = {"extra", "throttle", "warn_before"}
DEFAULT_WARN_BEFORE = 120


def options_for(section: Mapping[str, Any], flags: Mapping[str, Any], where: str,
                ) -> tuple[dict[str, str], list[str], dict[str, Any]]:
    """sbatch options from a manifest's ``slurm:`` section and CLI flags (flags win).

    Returns ``(options, extra #SBATCH lines, other settings)``; a bad key or a value
    that cannot sit on an ``#SBATCH`` line raises :class:`ManifestError` naming it.
    """
    options: dict[str, str] = {}
    settings: dict[str, Any] = {}
    extra: list[str] = []
    for raw_key, value in section.items():
        key = raw_key.replace("-", "_")
        if key in OPTIONS:
            if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
                raise ManifestError(where, f"slurm.{raw_key}: {value!r} is not an sbatch value "
                                           "(YAML reads no/yes/on/off as booleans: quote it)")
            options[key] = str(value)
        elif key == "extra":
            if not isinstance(value, list):
                raise ManifestError(where, "slurm.extra must be a list of #SBATCH lines")
            extra = [str(v) for v in value]
        elif key in SECTION_KEYS:
            settings[key] = value
        else:
            known = ", ".join(sorted({*OPTIONS, *SECTION_KEYS}))
            raise ManifestError(where, f"unknown slurm option {raw_key!r}; known: {known}")
    for key, value in flags.items():
        if value is None:
            continue
        if key == "extra":
            extra += list(value)
        elif key in OPTIONS:
            options[key] = str(value)
        else:
            settings[key] = value
    for key, value in options.items():
        if unsafe(value):
            raise ManifestError(where, f"slurm {key} {value!r}: quotes, backslashes and "
                                       "newlines cannot be passed to sbatch safely")
    for line in extra:
        if "\n" in line or "\r" in line:
            raise ManifestError(where, f"slurm extra line {line!r} contains a newline")
        if any(_sets(o, "--array", "-a") for o in _options_of(line)):
            raise ManifestError(where, f"slurm extra line {line!r}: notata sets the job "
                                       "array itself (use --tasks and --throttle)")
        named = _named(line)
        if named is not None:  # a later #SBATCH line would win over notata's (a retry's)
            raise ManifestError(where, f"slurm extra line {line!r}: {OPTIONS[named]} has a "
                                       f"name of its own: give it as {OPTIONS[named]} (or "
                                       f"{named}: in the manifest's slurm: section)")
    if "mem" in options:  # sbatch refuses --mem next to --mem-per-cpu/--mem-per-gpu
        kept = [line for line in extra if not any(
            o.startswith("--mem-per-") or _sets(o, "--mem-per-cpu") or _sets(o, "--mem-per-gpu")
            for o in _options_of(line))]
        if len(kept) < len(extra):
            print(f"notata: --mem {options['mem']} replaces "
                  f"{'; '.join(sorted(set(extra) - set(kept)))}", file=sys.stderr)
        extra = kept
    if settings.get("pack") is not None:
        check_size(settings["pack"])
    side = settings.get("pack_parallel")
    if side is not None:
        cpus = options.get("cpus_per_task", "1")
        if isinstance(side, bool) or not isinstance(side, int) or side < 1:
            raise UsageError(f"--pack-parallel {side!r}: give a number of tasks at a time, "
                             "at least 1")
        if side > 1 and (settings.get("pack") or 1) < 2:
            raise UsageError("--pack-parallel goes with --pack (or --pack-time)")
        if not cpus.isdigit() or side > int(cpus):
            raise UsageError(f"--pack-parallel {side} is more than the array task's CPUs "
                             f"(--cpus-per-task {cpus}): give --cpus-per-task {side} or more")
    for key, least in (("throttle", 1), ("warn_before", 0)):
        value = settings.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < least):
            raise ManifestError(where, f"slurm {key} {value!r}: give a whole number, at least "
                                       f"{least}")
    return options, extra, settings


#: SLURM may send the ``--signal`` warning up to this much earlier than asked.
SIGNAL_SLACK = 60
#: Time a task needs to start (Python, imports) before it can take the warning.
START_MARGIN = 30


def time_limit_sec(value: str | None) -> int | None:
    """Seconds of a ``--time`` value (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``,
    ``D-H:M:S``); None when unlimited, absent or not understood."""
    if not value:
        return None
    days, _, rest = value.strip().rpartition("-")
    try:
        parts = [int(x) for x in rest.split(":")]
        d = int(days) if days else 0
    except ValueError:
        return None
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, sec = 0, parts[0], parts[1]
    else:
        h, m, sec = parts[:3]
    return ((d * 24 + h) * 60 + m) * 60 + sec


def time_text(seconds: int) -> str:
    """Seconds as a ``--time`` value: ``D-HH:MM:SS`` (or ``HH:MM:SS`` under a day)."""
    days, rest = divmod(max(int(seconds), 0), 86400)
    h, rest = divmod(rest, 3600)
    clock = f"{h:02d}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def mem_bytes(value: str | int | None) -> int | None:
    """Bytes of a ``--mem`` value (``4G``, ``200M``, ``512``: MiB, SLURM's default unit);
    None when absent or not understood."""
    if value is None:
        return None
    m = _MEM.match(str(value))
    if not m:
        return None
    unit = m.group(2).upper() or "M"
    return int(float(m.group(1)) * 1024 ** "KMGT".index(unit) * 1024)


def mem_text(n: int) -> str:
    """Bytes as a ``--mem`` value, in whole MiB (``400M``), or GiB when exact (``4G``)."""
    mib = -(-int(n) // 2**20)  # rounded up: never ask for less than computed
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def fit_warning(warn_before: int, time_option: str | None) -> int:
    """The warning lead time that fits the time limit (0: no warning).

    SLURM may send the signal up to :data:`SIGNAL_SLACK` s earlier than asked; if that
    lands before the task has started (:data:`START_MARGIN`), the batch shell dies of
    SIGUSR1 before notata can record anything. So the warning is moved to at most
    ``limit - 90`` s before the end, and dropped when that leaves under 10 s.
    """
    limit = time_limit_sec(time_option)
    if not warn_before or limit is None or warn_before <= limit - SIGNAL_SLACK - START_MARGIN:
        return warn_before
    fitted = limit - SIGNAL_SLACK - START_MARGIN
    return fitted if fitted >= 10 else 0


def unsafe(text: object) -> bool:
    """Whether ``text`` would end an ``#SBATCH ...="..."`` value or a line of a job script."""
    return any(c in str(text) for c in '"\\\n\r')
