"""What an attempt asked for and what it used, and the rule that calls a death "oom".

Each attempt under a scheduler records ``resources`` in its metadata (and, with the
attempt, in ``attempts``)::

    "resources": {"asked": {"time_limit": "00:10:00", "mem_bytes": 4294967296,
                            "cpus": 2, "gpus": 0},
                  "used":  {"runtime_sec": 312.5, "peak_rss_bytes": 3900000000,
                            "cpu_time_sec": 610.2}}

``asked`` comes from the scheduler (:meth:`notata.scheduler.SchedulerProvider.requested`);
``used.peak_rss_bytes`` is *the peak*: the largest resident set any one process of the
attempt's command reached, as the kernel reports it for every child the process reaped
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the true high-water mark, also of a child
SIGKILLed between two heartbeats, whose ``/proc`` entry is gone; the ``notata exec``
wrapper's own memory is not in it). The kernel keeps one figure per process life, so a
run with no command (a plain Logbook) records its process's figure when the attempt
raised it, else the largest resident set its heartbeat sampled (:class:`Peak`).

The OOM rule (:func:`killed_for_memory`): a command that died of SIGKILL after its peak
reached :data:`OOM_FRACTION` (90 %) of the memory the scheduler granted was killed for
memory. Limits: a kill by someone else near the limit reads ``oom`` too; a job whose
memory is not confined per process (cgroup limits count the sum of the tree, page cache
included) may be killed below 90 % of any one process and reads ``failed``; without a
granted amount (no ``--mem``, no scheduler) nothing reads ``oom``.
"""

from __future__ import annotations

import resource
import signal
import sys

#: The share of the granted memory at which a SIGKILLed command counts as killed for memory.
OOM_FRACTION = 0.9


def children_peak() -> int:
    """The largest resident set, in bytes, of any child this process has reaped (in its
    whole life: compare with the figure at an attempt's start)."""
    return _maxrss(resource.RUSAGE_CHILDREN)


def own_peak() -> int:
    """This process's own largest resident set, in bytes, in its whole life."""
    return _maxrss(resource.RUSAGE_SELF)


def _maxrss(who: int) -> int:
    kib = resource.getrusage(who).ru_maxrss
    return int(kib) if sys.platform == "darwin" else int(kib) * 1024  # Linux counts KiB


class Peak:
    """The peak of one attempt, from the kernel's figures at its start and end (it keeps
    one figure per process life): the largest of its children's, if one passed the earlier
    ones (the command, under ``notata exec``), this process's own, if the attempt raised
    it, and the largest resident set the heartbeat sampled."""

    def __init__(self) -> None:
        self.children, self.own = children_peak(), own_peak()
        #: The peak of a process that worked for the attempt but that another process
        #: reaped (a function task's worker, reaped by its fork server).
        self.elsewhere = 0

    def at_end(self, sampled: int | None) -> int | None:
        """The largest of: the children's figure and the process's own, each only if this
        attempt raised it, the one reaped elsewhere, and the sampled one."""
        children, own = children_peak(), own_peak()
        raised = [children if children > self.children else 0, own if own > self.own else 0]
        return max(*raised, self.elsewhere, sampled or 0) or sampled


def killed_for_memory(returncode: int, peak: int, granted: int | None) -> bool:
    """Whether a command that ended with ``returncode`` (negative: the signal, as Popen
    says; 137: a shell, ``srun`` or a container reporting its child's SIGKILL) after a
    ``peak`` of resident memory was killed for memory (see the module)."""
    return (returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) and granted is not None
            and granted > 0 and peak >= OOM_FRACTION * granted)


def size_text(n: float) -> str:
    """``4294967296`` -> ``"4.0G"`` (binary units, as SLURM reads ``--mem``)."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"
