"""Everything SLURM: its environment variables, and calls to its commands through one function.

The core never imports this module; ``notata/__init__.py`` registers
:data:`SLURM` as a scheduler provider (see :mod:`notata.scheduler`): the rest of the
package asks through that seam and never names SLURM's variables, states or fields.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import layout, runinfo, scheduler, schema, submissions
from .errors import SchedulerError
from .queue import Queue

#: SLURM environment variables recorded in a run's ``slurm`` metadata, and their field names.
ENV_FIELDS = {
    "SLURM_JOB_ID": "job_id",
    "SLURM_ARRAY_JOB_ID": "array_job_id",
    "SLURM_ARRAY_TASK_ID": "array_task_id",
    "SLURM_RESTART_COUNT": "restart_count",
    "SLURM_JOB_NODELIST": "nodelist",
    "SLURM_JOB_PARTITION": "partition",
    "SLURM_JOB_NAME": "job_name",
    "SLURM_CLUSTER_NAME": "cluster",
    "SLURM_SUBMIT_DIR": "submit_dir",
    "SLURM_JOB_END_TIME": "end_unix",
    "SLURM_JOB_START_TIME": "start_unix",
}
_INT_FIELDS = {"job_id", "array_job_id", "array_task_id", "restart_count", "end_unix",
               "start_unix"}
COMMAND_TIMEOUT = 30.0
#: slurmstepd's words when the kernel killed a step for memory (cgroup-confined jobs).
_OOM_LINE = re.compile(r"^slurmstepd: error: Detected [0-9]+ oom[-_]kill event[^\n]*",
                       re.MULTILINE)
#: Queue states of a job that is alive: its run is never stale while the queue says so.
ALIVE_STATES = frozenset({"RUNNING", "SUSPENDED", "COMPLETING", "CONFIGURING", "STOPPED",
                          "RESIZING", "SIGNALING", "STAGE_OUT"})


#: Queue states of a job that waits to start: a requeued job goes back to PENDING (with
#: Reason=BeginTime while its credential's lifetime runs out).
WAITING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})


#: SLURM_* variables that configure the commands themselves (kept when a job submits).
_INPUTS = frozenset({"SLURM_CONF", "SLURM_CLUSTERS", "SLURM_DEBUG_FLAGS", "SLURM_EXIT_ERROR",
                     "SLURM_TIME_FORMAT", "SLURM_HINT"})
#: sbatch's input variables whose names are not the option's (``SBATCH_<OPTION>``).
_SBATCH_VARS = {"time": ("SBATCH_TIMELIMIT",), "array": ("SBATCH_ARRAY_INX",),
                "mem": ("SBATCH_MEM_PER_NODE", "SBATCH_MEM_PER_CPU", "SBATCH_MEM_PER_GPU"),
                "signal": ("SBATCH_SIGNAL",)}


def submit_env(environ: Mapping[str, str], options: Iterable[str] = ()) -> dict[str, str]:
    """The environment to run sbatch in, for a script that sets ``options`` (``time``,
    ``mem``...). sbatch lets an ``SBATCH_*`` variable win over the script's ``#SBATCH``
    line: those of the options the script sets are dropped, so that what notata asked for
    (a retry's escalated ``--mem``) is what the job gets. Inside a job (a shepherd, a task
    that submits), the job's own SLURM_* variables are dropped too: sbatch would pass
    them on (``--export=ALL``) where SLURM does not set them afresh (``SLURM_MEM_PER_NODE``
    of a job that asked for no memory, ``SLURM_CPUS_PER_TASK``, ``SLURM_JOB_DEPENDENCY``)."""
    drop = {v for o in options
            for v in _SBATCH_VARS.get(o, ("SBATCH_" + o.upper().replace("-", "_"),))}
    inside = "SLURM_JOB_ID" in environ
    return {k: v for k, v in environ.items() if k not in drop
            and not (inside and k.startswith("SLURM_") and k not in _INPUTS)}


def query_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment to run squeue in: no ``SQUEUE_*`` variable of the user's (one
    that filters by state, partition or account would hide queued tasks, which would
    then be taken for gone and run twice)."""
    return {k: v for k, v in environ.items() if not k.startswith("SQUEUE_")}


def run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT,
        env: Mapping[str, str] | None = None) -> str:
    """Run one SLURM command and return its stdout; failures raise :class:`SchedulerError`."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False, env=None if env is None else dict(env))
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SchedulerError(list(argv), None, str(err)) from err
    if proc.returncode != 0:
        raise SchedulerError(list(argv), proc.returncode, proc.stderr)
    return proc.stdout


def parse_record(text: str) -> dict[str, str]:
    """``scontrol -o show job`` output (``Key=Value`` pairs) as a dict."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:  # the first occurrence wins: later fields (paths) may hold spaces and "="
            fields.setdefault(key, value)
    return fields


class SlurmProvider:
    """SLURM as seen from inside a job: environment variables and ``scontrol show job``."""

    name = "slurm"
    title = "SLURM"

    def context(self, environ: Mapping[str, str]) -> dict[str, Any] | None:
        """The job's fields from the environment."""
        if "SLURM_JOB_ID" not in environ:
            return None
        ctx: dict[str, Any] = {"restart_count": 0}
        for var, field in ENV_FIELDS.items():
            if var in environ:
                value = environ[var]
                ctx[field] = int(value) if field in _INT_FIELDS and value.isdigit() else value
        return ctx

    def job_id(self, context: Mapping[str, Any]) -> object:
        """``SLURM_JOB_ID`` as recorded (an int): an array task's own job id."""
        return context.get("job_id")

    def array_of(self, context: Mapping[str, Any]) -> tuple[int, int] | None:
        job, task = context.get("array_job_id"), context.get("array_task_id")
        if isinstance(job, int) and isinstance(task, int) and not isinstance(job, bool):
            return job, task
        return None

    def split_key(self, key: str) -> tuple[str, int | None]:
        """``"123_4"`` -> ("123", 4); ``"123"`` (or a het job ``"123+0"``) -> (..., None)."""
        job, _, task = key.partition("_")
        return job, int(task) if task.isdigit() else None

    def output_file(self, context: Mapping[str, Any], base_dir: Path) -> Path | None:
        """``.notata/slurm-%A_%a.out`` of an array task (as notata's job scripts set
        ``--output``); a user's own ``--output`` is not known here."""
        array = self.array_of(context)
        return layout.SweepPaths(base_dir).job_output(*array) if array is not None else None

    def out_of_memory(self, context: Mapping[str, Any], base_dir: Path) -> str | None:
        """slurmstepd's line in the array task's output file (``--output`` as notata's job
        scripts set it: ``.notata/slurm-%A_%a.out``), e.g. "Detected 1 oom_kill event in
        StepId=123.batch" (SLURM 21.08 on; older: "Detected 1 oom-kill event(s) in step
        123.batch cgroup"). It appears only where cgroups confine the job's memory."""
        array, job = self.array_of(context), context.get("job_id")
        out = self.output_file(context, base_dir)
        if array is None or job is None or out is None:
            return None
        try:  # never block on a FIFO, never read more than the end of a regular file
            fd = os.open(out, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            text = os.pread(fd, 65536, max(0, st.st_size - 65536)).decode("utf-8", "replace")
        except OSError:
            return None
        finally:
            os.close(fd)
        for found in _OOM_LINE.finditer(text):  # about this very job, not another's
            if re.search(rf"\b(StepId=|step )({job}|{array[0]}_{array[1]})\.",
                         found.group(0)):
                return found.group(0).strip()
        return None

    def requested(self, context: Mapping[str, Any], environ: Mapping[str, str]
                  ) -> dict[str, Any]:
        """From the job's environment (``SLURM_MEM_PER_NODE``, or ``SLURM_MEM_PER_CPU`` x
        CPUs, in MiB; ``SLURM_CPUS_PER_TASK`` or ``SLURM_CPUS_ON_NODE``; the GPUs of
        ``SLURM_JOB_GPUS``) and the time limit ``scontrol`` gave."""
        def number(name: str) -> int | None:
            raw = environ.get(name, "")
            return int(raw) if raw.isdigit() else None

        cpus = number("SLURM_CPUS_PER_TASK") or number("SLURM_CPUS_ON_NODE")
        mem_mib = number("SLURM_MEM_PER_NODE")
        if mem_mib is None and number("SLURM_MEM_PER_CPU") is not None:
            mem_mib = (number("SLURM_MEM_PER_CPU") or 0) * (cpus or 1)
        gpus = [g for g in environ.get("SLURM_JOB_GPUS", "").split(",") if g]
        asked = {"time_limit": context.get("time_limit"), "cpus": cpus,
                 "mem_bytes": mem_mib * 2**20 if mem_mib else None, "gpus": len(gpus)}
        return {k: v for k, v in asked.items() if v is not None}

    def is_alive(self, state: str) -> bool:
        return state in ALIVE_STATES

    def is_running(self, state: str) -> bool:
        return state == "RUNNING"

    def is_waiting(self, state: str) -> bool:
        return state in WAITING_STATES

    def nodes_of(self, context: Mapping[str, Any]) -> list[str]:
        """The nodes of ``SLURM_JOB_NODELIST`` (``n[1-2],gpu07``), expanded; none when
        it is missing or is not a host list."""
        listed = context.get("nodelist")
        return hostnames(listed) if isinstance(listed, str) else []

    def node_trouble(self, state: str) -> str | None:
        """From ``sinfo``'s ``%T``: ``down`` is down; a trailing ``*`` is not responding
        (``allocated*``: its jobs may be lost already); ``fail``/``failing`` (an admin's
        word: its jobs may still run) is failing."""
        base = state.lower().rstrip("*~#!%$@^-")
        if base.startswith("down"):
            return "is down"
        if state.endswith("*"):
            return "is not responding"
        return "is failing" if base.startswith("fail") else None

    def node_lost(self, context: Mapping[str, Any]) -> str | None:
        names = self.nodes_of(context)
        if not names:
            return None
        try:
            return scheduler.trouble_among(self, names, nodes(names))
        except SchedulerError:
            return None

    def job_key(self, context: Mapping[str, Any]) -> str | None:
        """``"<array job>_<task>"`` for an array task (as ``squeue -r`` names it), else the
        job id."""
        if "array_job_id" in context and "array_task_id" in context:
            return f"{context['array_job_id']}_{context['array_task_id']}"
        job = context.get("job_id")
        return None if job is None else str(job)

    def details(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """The job's time limit, from ``scontrol show job`` (up to 5 s on a busy controller);
        array fields that the job's record does not have are dropped: a plain job
        submitted from inside an array task inherits them (sbatch exports the submitter's
        environment), and would be taken for that array task."""
        ctx = dict(context)
        try:
            record = _job_record(ctx["job_id"])
        except SchedulerError:
            return ctx  # the controller is busy or gone: the environment still says a lot
        if "TimeLimit" in record:
            ctx["time_limit"] = record["TimeLimit"]
        if "ArrayTaskId" not in record:
            ctx.pop("array_job_id", None)
            ctx.pop("array_task_id", None)
        return ctx

    def array_task(self, environ: Mapping[str, str]) -> int | None:
        raw = environ.get("SLURM_ARRAY_TASK_ID")
        try:
            return int(raw) if raw is not None else None
        except ValueError:
            raise SchedulerError(["SLURM_ARRAY_TASK_ID"], None,
                                 f"SLURM_ARRAY_TASK_ID={raw!r} is not an integer") from None

    def is_array_task(self, environ: Mapping[str, str]) -> bool:
        job = environ.get("SLURM_JOB_ID")
        if not job:
            return True
        try:
            return "ArrayTaskId" in show_job(job)
        except SchedulerError:
            return True  # cannot ask: trust the environment

    def requeued(self, context: Mapping[str, Any]) -> bool:
        return self.restarts(context) > 0

    def restarts(self, context: Mapping[str, Any]) -> int:
        """``SLURM_RESTART_COUNT`` as recorded (0 when absent or not a number)."""
        value = context.get("restart_count")
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    def termination_status(self, context: Mapping[str, Any], now: float) -> str | None:
        """Why SLURM is ending this job, from ``scontrol show job`` at SIGTERM time.

        Seen on SLURM 22.05: the job shows ``JobState=COMPLETING`` whatever the
        cause, so the cause is read from the rest of the record: ``Reason=TimeLimit``
        is a timeout; ``JobState=CANCELLED`` is the user's scancel (also of a job SLURM
        had requeued meanwhile); ``Restarts`` above the job's own ``SLURM_RESTART_COUNT``
        is a requeue (``scontrol requeue``, preemption with requeue, a node failure),
        recorded as ``preempted`` since the job will run again; a ``Preempt*`` reason or
        state is ``preempted``, and so is a job SLURM ends for a node failure
        (``NODE_FAIL``: a task of a multi-node job outlives the node it lost, or a
        partitioned node comes back); anything else ending a job early is ``cancelled``
        (scancel). Preemption in CANCEL mode may therefore read as ``cancelled``.
        """
        end = context.get("end_unix")
        if isinstance(end, int) and now >= end - 1:
            return schema.TIMEOUT
        record = show_job(context["job_id"])
        state, reason = record.get("JobState", ""), record.get("Reason", "")
        restarts = int(record.get("Restarts", "0") or 0)
        if reason == "TimeLimit" or state in ("TIMEOUT", "DEADLINE"):
            return schema.TIMEOUT
        if state == "CANCELLED":  # the user's scancel, even of a job requeued meanwhile
            return schema.CANCELLED
        if restarts > int(context.get("restart_count", 0)) or state.startswith("REQUEUE"):
            return schema.PREEMPTED
        if reason.startswith("Preempt") or state == "PREEMPTED":
            return schema.PREEMPTED
        if state == "NODE_FAIL" or reason in ("NodeDown", "NodeFail"):
            return schema.PREEMPTED  # ended by SLURM for a node failure: not the run's doing
        if state == "COMPLETING":
            return schema.CANCELLED
        return None

    def ended_with_node(self, context: Mapping[str, Any]) -> str | None:
        """``"its job 240 ended NODE_FAIL"`` when SLURM (which remembers an ended job for
        ``MinJobAge``) says the job ended for a node failure; else None."""
        job = context.get("job_id")
        if job is None:
            return None
        try:
            state = show_job(job).get("JobState", "")
        except SchedulerError:
            return None
        return f"its job {job} ended {state}" if state == "NODE_FAIL" else None


#: Seconds a job's record is reused for the next run the same job opens: a pack opens
#: thousands of runs, and the controller need not be asked each time.
RECORD_REUSE = 300.0
_records: dict[str, tuple[float, dict[str, str]]] = {}


def _job_record(job_id: object) -> dict[str, str]:
    """:func:`show_job`, reused for :data:`RECORD_REUSE` seconds within this process."""
    now = time.monotonic()
    kept = _records.get(str(job_id))
    if kept is None or now - kept[0] > RECORD_REUSE:
        kept = (now, show_job(job_id))
        _records.clear()  # one job at a time
        _records[str(job_id)] = kept
    return dict(kept[1])


def show_job(job_id: object) -> dict[str, str]:
    """``scontrol -o show job ID`` as a dict; a short timeout, since signals wait on it."""
    return parse_record(run(["scontrol", "-o", "show", "job", str(job_id)], timeout=5))


SLURM = SlurmProvider()


def available() -> bool:
    """Whether an ``sbatch`` is on PATH."""
    return shutil.which("sbatch") is not None


def queue(users: Sequence[str] = (), jobs: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """Queued jobs, one ``squeue -r`` call: ``(key, state, comment)`` rows, the key
    ``"123"`` or ``"123_4"``. ``users`` (default: this user), or the array ``jobs`` named
    (whoever submitted them).

    Only the sweep's users: a shared cluster's whole queue can be 10^5 lines, and a
    sweep's jobs are its submitters'. Raises :class:`SchedulerError` when squeue cannot
    answer.
    """
    who = ["-j", ",".join(jobs)] if jobs else ["-u", ",".join(users)] if users else ["--me"]
    try:
        out = run(["squeue", *who, "-h", "-r", "-o", "%i|%T|%k"], env=query_env(os.environ))
    except SchedulerError as err:
        if jobs and "Invalid job id" in err.stderr:  # every one of them has left the queue
            return []
        raise
    rows = []
    for line in out.splitlines():
        key, _, rest = line.strip().partition("|")
        state, _, comment = rest.partition("|")
        if key:
            rows.append((key, state, comment))
    return rows


#: A host list longer than this is not expanded (no job of a sweep task spans more).
MAX_HOSTS = 4096
_HOST_RANGE = re.compile(r"([^\[\],]*)\[([0-9,\-]+)\]")


def hostnames(listed: str) -> list[str]:
    """SLURM's host list syntax expanded, as ``scontrol show hostnames`` does it without
    asking the controller: ``n[1-3,7],gpu[01-02]`` -> n1 n2 n3 n7 gpu01 gpu02 (zero
    padding kept; several bracket groups in one name multiply). [] when ``listed`` is not
    a host list, or names more than :data:`MAX_HOSTS`."""
    out: list[str] = []
    items = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", listed)
    if ",".join(items) != listed:  # an unclosed bracket, an empty name
        return []
    for item in items:
        names = [""]
        rest = item
        while rest:
            m = _HOST_RANGE.match(rest)
            if m is None:  # no bracket group left: the plain end of the name
                if "[" in rest or "]" in rest:
                    return []
                names = [n + rest for n in names]
                break
            expanded: list[str] = []
            for part in m.group(2).split(","):
                lo, _, hi = part.partition("-")
                if not lo.isdigit() or hi and not hi.isdigit() or max(len(lo), len(hi)) > 9:
                    return []
                top = int(hi) if hi else int(lo)
                if len(expanded) + top - int(lo) > MAX_HOSTS:
                    return []
                expanded += [f"{i:0{len(lo)}d}" for i in range(int(lo), top + 1)]
            if len(out) + len(names) * len(expanded) > MAX_HOSTS:  # before it is built
                return []
            names = [n + m.group(1) + x for n in names for x in expanded]
            rest = rest[m.end():]
        out += [n for n in names if n]
        if len(out) > MAX_HOSTS:
            return []
    return out


def nodes(names: Sequence[str] = ()) -> dict[str, str]:
    """Node -> state as ``sinfo -N -o %T`` says it (``idle``, ``allocated*``, ``down*``):
    every node, or those named; one call. Raises :class:`SchedulerError`."""
    who = ["-n", ",".join(names)] if names else []
    out = run(["sinfo", "-h", "-N", *who, "-o", "%N|%T"], env=query_env(os.environ))
    found: dict[str, str] = {}
    for line in out.splitlines():
        node, _, state = line.strip().partition("|")
        if node and state:
            found[node] = state
    return found


def collector_queue(base_dir: Path | None, command: str, *,
                    required: bool = False) -> Queue | None:
    """SLURM's queue for a scan of the runs under ``base_dir``: the jobs of this user and
    of every user that recorded a submission there (a group-shared sweep), then of each
    user a run names and each array a run ran in (see :class:`~notata.queue.Queue`).
    None when SLURM is not here. When it cannot answer: None, said once on stderr, or,
    if ``required`` (resubmit: it must not take a task that is still queued), a
    :class:`SchedulerError`."""
    if not available():
        return None
    users = {runinfo.user()}
    if base_dir is not None:
        users |= {str(r["user"]) for r in submissions.read(base_dir)
                  if isinstance(r.get("user"), str)}
    try:
        return Queue(fetch=queue, users=users, provider=SLURM, nodes=nodes)
    except SchedulerError as err:
        if required:
            raise SchedulerError(err.argv, err.returncode,
                                 f"{err}: SLURM's queue cannot be read, so the tasks it still "
                                 "holds cannot be told apart; nothing was submitted, try "
                                 "again") from err
        print(f"notata {command}: SLURM cannot be asked ({err}); classifying from files alone",
              file=sys.stderr)
        return None
