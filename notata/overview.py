"""``notata report``: a sweep at a glance, in one self-contained HTML file.

:func:`build` reads the sweep once (one scan that reads every run's metadata.json, as
``notata status --full``, plus the named JSON artifacts of each run) and gathers what a
researcher asks after a sweep: the counts and the status of every task on the sweep's
grid; the scalar results of the named artifacts over the params; runtime and peak
memory against what was asked for (:mod:`notata.efficiency`); the failures, with the end
of their stderr; which code ran (:mod:`notata.provenance`). :meth:`SweepReport.html`
makes one HTML file with every figure an inline SVG and the style inline: nothing is
loaded from the network, so it opens from a laptop after ``scp``. Its size does not grow
with the number of runs: figures draw tasks as raster images (:mod:`notata.figures`),
and the failures table shows at most :data:`MAX_FAILURES` rows.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from . import efficiency, figures, layout, logs, provenance, schema
from ._version import __version__
from .collector import scan
from .errors import UsageError
from .manifest import Sweep
from .queue import Queue
from .runstate import CORRUPT, MISSING, PENDING, SCAN_STATUSES, STALE, RunRecord

#: The failures listed (with the end of their stderr); the rest are counted.
MAX_FAILURES = 50
#: The last lines of stderr shown per failure.
TAIL = 5
BAD = (schema.FAILED, schema.TIMEOUT, schema.OOM, STALE, CORRUPT, schema.TERMINATED)


def _keep(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {"usage": efficiency.figures(meta), "code": provenance.state_of(meta)}


#: Larger results are left out of the figures (a diverged run's 1e308 would make every
#: axis unreadable, and matplotlib cannot place ticks on such a range).
LARGEST = 1e300


def _scalars(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _scalars(f"{prefix}.{k}", v, out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            return
        if math.isfinite(number) and abs(number) < LARGEST:
            out[prefix] = number


@dataclass
class SweepReport:
    """What the report shows (see the module): ``counts``; ``statuses``, one per task
    (per run of a folder); ``fields``, each artifact's scalar field as one value per task
    (NaN where a run has none); ``usage`` (:class:`~notata.efficiency.Efficiency`);
    ``failures`` (rows); ``code`` (state id -> tasks) with ``code_words`` (what each state
    is) and ``warnings``. :attr:`figures` draws them (matplotlib); :meth:`html` and
    :meth:`save` write them."""

    title: str
    target: str
    sweep: Sweep | None
    counts: dict[str, int]
    statuses: list[str]
    fields: dict[str, np.ndarray]
    usage: efficiency.Efficiency
    failures: list[dict[str, Any]]
    failed_total: int
    code: dict[str, list[int]]
    code_words: dict[str, str]
    warnings: list[str] = field(default_factory=list)
    #: What could not be shown, and why (a figure matplotlib could not draw).
    notes: list[str] = field(default_factory=list)
    made: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    @cached_property
    def figures(self) -> dict[str, Any]:
        """The figures by name: ``status``, one per artifact field, ``usage`` (matplotlib
        figures of their own: the caller's pyplot, backend and style are left alone). A
        figure that cannot be drawn is left out and said in :attr:`notes`."""
        lay = figures.layout_of(self.sweep, len(self.statuses))
        done = self.usage.complete
        limits = self.usage.asked("time_limit")
        mems = self.usage.asked("mem_bytes")
        drawers: dict[str, Any] = {"status": lambda: figures.status_map(self.statuses, lay)}
        for name, values in self.fields.items():
            drawers[name] = lambda n=name, v=values: figures.field_figure(n, v, lay)
        drawers["usage"] = lambda: figures.usage_figure(
            [u.runtime_sec for u in done if u.runtime_sec is not None],
            [u.peak_bytes for u in done if u.peak_bytes is not None],
            next((u.limit_sec for u in done if u.time_limit == limits[0]), None)
            if limits else None, mems[0] if mems else None)
        out = {}
        with figures.styled():
            for name, draw in drawers.items():
                try:
                    out[name] = draw()
                except (ValueError, OverflowError, ArithmeticError) as err:
                    self.notes.append(f"the figure {name} could not be drawn: {err}")
        return out

    def html(self) -> str:
        """The whole report as one HTML document (nothing loaded from elsewhere)."""
        e = html.escape
        counts = "".join(
            f'<tr><td><span class="sw" style="background:{figures.COLOURS.get(s, "#000")}">'
            f'</span>{e(s)}</td><td class="n">{n}</td></tr>'
            for s, n in self.counts.items() if n)
        parts = [f"<h1>{e(self.title)}</h1>",
                 f'<p class="meta">{e(self.target)} &middot; {sum(self.counts.values())} '
                 f"runs &middot; made {e(self.made)} by notata {e(__version__)}</p>",
                 '<section id="counts"><h2>Status</h2><div class="row">'
                 f'<table class="counts">{counts}</table>'
                 f'<figure id="fig-status">{self._svg("status")}</figure>'
                 "</div></section>"]
        if self.fields:
            parts.append('<section id="results"><h2>Results over the params</h2>')
            parts += [f'<figure class="field">{self._svg(n)}</figure>' for n in self.fields]
            parts.append("</section>")
        parts.append('<section id="resources"><h2>Resources: used and asked for</h2>'
                     f'<figure id="fig-usage">{self._svg("usage")}</figure>'
                     f'<pre>{e(chr(10).join(self.usage.lines()))}</pre></section>')
        parts.append(self._failures_html())
        parts.append(self._code_html())
        parts += [f'<p class="warn">{e(n)}</p>' for n in self.notes]
        return _PAGE.format(title=e(self.title), body="\n".join(parts))

    def _svg(self, name: str) -> str:
        fig = self.figures.get(name)
        return figures.svg(fig) if fig is not None else ""

    def _failures_html(self) -> str:
        e = html.escape
        if not self.failures:
            return '<section id="failures"><h2>Failures</h2><p>none</p></section>'
        rows = "".join(
            f"<tr><td>{e(str(f['task'] if f['task'] is not None else ''))}</td>"
            f"<td>{e(f['run_id'])}</td><td>{e(f['status'])}</td><td>{f['attempt']}</td>"
            f"<td>{e(f['reason'] or '')}<pre>{e(chr(10).join(f['tail']))}</pre>"
            f"<code>{e(f['more'])}</code></td></tr>" for f in self.failures)
        more = self.failed_total - len(self.failures)
        tail = f"<p>and {more} more: <code>notata status --json</code></p>" if more else ""
        return ('<section id="failures"><h2>Failures</h2><table class="fail"><tr><th>task'
                "</th><th>run</th><th>status</th><th>attempt</th><th>why, the end of its "
                f"output, and where to see more</th></tr>{rows}</table>{tail}</section>")

    def _code_html(self) -> str:
        e = html.escape
        if not self.code:
            return ('<section id="code"><h2>Code</h2><p>no run recorded its code</p>'
                    "</section>")
        from .taskspec import compact

        rows = "".join(f"<tr><td>{e(compact(t)) if self.sweep else len(t)}</td>"
                       f"<td>{e(self.code_words.get(s, s))}</td></tr>"
                       for s, t in self.code.items())
        warn = "".join(f'<p class="warn">{e(w)}</p>' for w in self.warnings)
        head = "tasks" if self.sweep else "runs"
        return (f'<section id="code"><h2>Code</h2>{warn}<table><tr><th>{head}</th>'
                f"<th>ran</th></tr>{rows}</table></section>")

    def save(self, path: str | os.PathLike[str], fmt: str = "html") -> list[Path]:
        """Write the report: ``html``, one file; ``png``, a folder of one image per figure
        (and ``summary.txt``). Returns what was written. A path that cannot be written is
        a :class:`UsageError` naming it (see :func:`check_output`)."""
        target = check_output(path, fmt)
        try:
            return self._save(target, fmt)
        except OSError as err:
            raise UsageError(f"-o {path}: cannot write there ({err.strerror})") from None

    def _save(self, target: Path, fmt: str) -> list[Path]:
        if fmt == "html":
            from . import _fs

            _fs.atomic_write_bytes(target, self.html().encode())
            return [target]
        target.mkdir(parents=True, exist_ok=True)
        from . import _fs

        written = []
        for name, fig in self.figures.items():
            out = target / f"{name.replace('/', '_')}.png"
            _fs.atomic_write_bytes(out, figures.png(fig))
            written.append(out)
        summary = target / "summary.txt"
        _fs.atomic_write_bytes(summary, self.text().encode())
        return [*written, summary]

    def text(self) -> str:
        lines = [self.title, *(f"  {s:<11} {n:>8}" for s, n in self.counts.items() if n)]
        lines += self.usage.lines() + self.warnings
        return "\n".join(lines) + "\n"


def check_output(path: str | os.PathLike[str], fmt: str) -> Path:
    """Where a report goes, checked before it is made: an HTML file in a folder that exists
    (not a folder itself), or for ``png`` a folder (made if missing, not a file)."""
    target = Path(path)
    if fmt not in ("html", "png"):
        raise UsageError(f"--format {fmt}: give html or png")
    if fmt == "html":
        if target.is_dir():
            raise UsageError(f"-o {path}: a folder; give the HTML file's name")
        if not target.parent.is_dir():
            raise UsageError(f"-o {path}: the folder {target.parent} does not exist")
    elif target.exists() and not target.is_dir():
        raise UsageError(f"-o {path}: a file; --format png writes a folder of images")
    elif not target.exists() and target.parent.exists() and not target.parent.is_dir():
        raise UsageError(f"-o {path}: {target.parent} is not a folder")
    return target


def build(target: Sweep | str | os.PathLike[str], artifacts: Sequence[str] = (),
          queue: Queue | None = None) -> SweepReport:
    """Read a sweep (or a folder of runs) once and gather its report (module docstring).
    ``artifacts`` names JSON artifacts whose scalar fields are shown over the params; one
    that no run has is a :class:`UsageError` naming those the runs have."""
    sweep = target if isinstance(target, Sweep) else None
    report = scan(target, full=True, queue=queue, keep=_keep)
    runs = [r for r in report.runs if sweep is None or r.task is not None]
    n = len(sweep) if sweep is not None else len(runs)

    def slot(r: RunRecord, k: int) -> int:  # where a run goes: its task, or its rank
        return r.task if sweep is not None and r.task is not None else k
    statuses = [MISSING] * n
    for k, r in enumerate(runs):
        statuses[slot(r, k)] = r.status
    fields: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    for k, r in enumerate(runs):
        if r.run_dir is None or r.status in (CORRUPT, MISSING, PENDING):
            continue
        for name in artifacts:
            path = r.run_dir / layout.ARTIFACTS / f"{name.removesuffix('.json')}.json"
            try:
                data = json.loads(path.read_bytes())
            except (OSError, ValueError):
                continue
            seen.add(name)
            found: dict[str, float] = {}
            _scalars(name.removesuffix(".json"), data, found)
            for key, value in found.items():
                fields.setdefault(key, np.full(n, np.nan))[slot(r, k)] = value
    missing = [a for a in artifacts if a not in seen]
    if missing and runs:
        raise UsageError(f"--artifact {', '.join(missing)}: no run has it (a JSON file under "
                         "artifacts/)")
    usages = [efficiency.Usage(r.run_id, r.task, r.status, **r.kept["usage"])
              for r in report.runs if isinstance(r.kept, dict)]
    policy, given = efficiency.policy_of(target)
    bad = [r for r in report.runs if r.status in BAD]
    code: dict[str, list[int]] = {}
    for k, r in enumerate(runs):
        if isinstance(r.kept, dict) and isinstance(r.kept.get("code"), str):
            code.setdefault(r.kept["code"], []).append(slot(r, k))
    base = sweep.base_dir if sweep is not None else Path(target)  # type: ignore[arg-type]
    return SweepReport(
        title=f"sweep {sweep.name}" if sweep else f"runs in {target}",
        target=str(sweep.path if sweep else target), sweep=sweep, counts={
            s: n for s, n in report.counts.items() if s in SCAN_STATUSES},
        statuses=statuses, fields=fields,
        usage=efficiency.Efficiency(usages, policy, given),
        failures=[_failure(r, sweep) for r in bad[:MAX_FAILURES]], failed_total=len(bad),
        code=code, code_words={s: provenance.describe(base, s) for s in code},
        warnings=provenance.warnings(sweep) if sweep is not None else (
            [f"warning: the runs ran {len(code)} versions of the code"] if len(code) > 1
            else []))


def _failure(r: RunRecord, sweep: Sweep | None) -> dict[str, Any]:
    from shlex import quote

    tail: list[str] = []
    if r.run_dir is not None and r.status != CORRUPT:
        part = logs.part(r.run_dir, layout.STDERR, r.attempt, TAIL)
        if part.missing:
            part = logs.part(r.run_dir, layout.LOG, r.attempt, TAIL)
        tail = list(part.lines)
    where = (f"{quote(str(sweep.path))} --task {r.task}" if sweep is not None
             and r.task is not None else quote(str(r.run_dir or r.run_id)))
    return {"task": r.task, "run_id": r.run_id, "status": r.status, "attempt": r.attempt,
            "reason": (r.reason or "").splitlines()[0] if r.reason else None, "tail": tail,
            "more": f"notata logs {where}"}


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: 0.2em; }} h2 {{ font-size: 1.15em;
       border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }}
.meta {{ color: #666; margin-top: 0; }}
.row {{ display: flex; gap: 1.5em; align-items: flex-start; flex-wrap: wrap; }}
figure {{ margin: 0.5em 0; }} figure svg {{ max-width: 100%; height: auto; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 0.2em 0.6em; text-align: left;
       vertical-align: top; border-bottom: 1px solid #eee; }}
td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.sw {{ display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em;
       vertical-align: -0.1em; border-radius: 2px; }}
pre {{ background: #f6f6f6; padding: 0.5em; overflow-x: auto; font-size: 12px;
       margin: 0.3em 0; }}
.warn {{ color: #a33; font-weight: 600; }}
</style></head>
<body>
{body}
</body></html>
"""
