"""Where and how a run is running: host, process, user, versions, local time.

What a batch scheduler says of the process is asked through :mod:`notata.scheduler`.
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import socket
import sys
import time
from datetime import datetime
from typing import Any

from ._version import __version__


def now_iso(t: float | None = None) -> str:
    """Local time as ISO-8601 to the second, as notata 0.3 wrote it."""
    return datetime.fromtimestamp(time.time() if t is None else t).isoformat(timespec="seconds")


def user() -> str:
    """The user name of this process (its uid when there is no passwd entry)."""
    names = ("LOGNAME", "USER", "LNAME", "USERNAME")  # what getpass looks at first
    return _user(os.getuid(), tuple(os.environ.get(n) for n in names))


@functools.lru_cache(maxsize=8)
def _user(uid: int, environ: tuple[str | None, ...]) -> str:
    """Looked up once per process (and uid, and variables): a pack opens thousands of runs,
    and each lookup reads the passwd file."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(uid)


def process_fields() -> dict[str, Any]:
    """Host, pid, user, versions and command line of this process."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "user": user(),
        "cwd": os.getcwd(),
        "argv": list(sys.argv),
        "python": platform.python_version(),
        "notata": __version__,
    }
