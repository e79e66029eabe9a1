"""The report's figures (matplotlib, imported only here and only when a report is made).

Every figure draws the sweep's tasks as images (``imshow``), histograms or lines, never
one element per run, so a figure of 10^6 tasks is as small as one of 10: an SVG embeds a
map as one raster image. Text stays text (``svg.fonttype: none``), so an SVG is a few
tens of kilobytes.

Where the tasks go on a map (:func:`layout_of`): a sweep whose grid has two or more keys
is drawn over the two keys with the most values (x: the first in the manifest, y: the
second); its other keys, its ``zip`` rows and its ``runs`` entries make small multiples,
one panel each, up to :data:`MAX_PANELS` (beyond that, one panel of the share of tasks in
each cell that did not complete). A grid of one key is a strip along it, a sweep
without a grid a strip of tasks, wrapped in rows of :data:`ROW` tasks.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ExtraMissingError
from .manifest import Sweep

MAX_PANELS = 12
ROW = 100
#: The colour of each status on the maps.
COLOURS = {
    "complete": "#2e9e4f", "running": "#3b7dd8", "initialized": "#8fb5ea",
    "pending": "#c9daf3", "missing": "#e4e4e4", "failed": "#d62728", "timeout": "#ff7f0e",
    "oom": "#9467bd", "cancelled": "#7f7f7f", "preempted": "#e6c229",
    "terminated": "#b5651d", "stale": "#8c564b", "corrupt": "#111111",
    "mismatch": "#e377c2",
}


#: The report's style, applied while a figure is drawn and saved (never to the user's
#: own settings: a notebook's backend and style stay as they were). Text is text in the
#: SVG, and a ``$`` in a label is a dollar sign, not the start of a formula.
STYLE: dict[str, Any] = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
         "axes.spines.right": False, "text.parse_math": False}


def new_figure(**kw: Any) -> Any:
    """A figure of its own (not pyplot's: nothing global is touched, nothing is kept
    open); an error naming the extra when matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ExtraMissingError("notata report", "report") from err
    return Figure(**kw)


def styled() -> Any:
    import matplotlib

    return matplotlib.rc_context(STYLE)  # type: ignore[arg-type,unused-ignore]


@dataclass(frozen=True)
class Layout:
    """How a sweep's task indices fall on a map: ``shape`` reshapes the task axis
    (runs, zip rows, grid keys...), ``x``/``y`` name the mapped axes (their positions in
    ``shape``, labels and values), the rest are panels."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    values: tuple[Sequence[Any], ...]
    x: int | None
    y: int | None


def layout_of(sweep: Sweep | None, n: int) -> Layout:
    """Where each task of a sweep (or of ``n`` runs of a folder) goes (module docstring)."""
    if sweep is None or not sweep.grid:
        rows = max(1, math.ceil(n / ROW)) if n > ROW else 1
        width = ROW if n > ROW else max(n, 1)
        return Layout((rows, width), ("row", "task"), (range(0, rows * width, width),
                                                       range(width)), 1, 0 if rows > 1 else None)
    zip_len = len(sweep.zip[0][1]) if sweep.zip else 1
    shape = (len(sweep.runs), zip_len, *(len(v) for _, v in sweep.grid))
    names = ("runs", "zip", *(k for k, _ in sweep.grid))
    values = (range(len(sweep.runs)), range(zip_len), *(v for _, v in sweep.grid))
    order = sorted(range(2, len(shape)), key=lambda i: -shape[i])[:2]
    order.sort()
    x = order[0]
    y = order[1] if len(order) > 1 else None
    return Layout(shape, names, values, x, y)


def cells(values: np.ndarray, lay: Layout) -> tuple[np.ndarray, list[str]]:
    """Per-task ``values`` (floats) placed on the layout: an array (panel, y, x), NaN where
    no task falls (the end of a wrapped strip), and each panel's title."""
    size = math.prod(lay.shape)
    values = np.asarray(values, dtype=float)
    if len(values) < size:
        values = np.concatenate([values, np.full(size - len(values), np.nan)])
    cube = values[:size].reshape(lay.shape)
    keep = [a for a in (lay.y, lay.x) if a is not None]
    rest = [a for a in range(len(lay.shape)) if a not in keep]
    moved = np.moveaxis(cube, rest + keep, range(len(lay.shape)))
    flat = moved.reshape(-1, *(lay.shape[a] for a in keep))
    if flat.ndim == 2:
        flat = flat[:, np.newaxis, :]
    titles = []
    for idx in np.ndindex(*(lay.shape[a] for a in rest)):
        words = [f"{lay.names[a]}={lay.values[a][i]}" for a, i in zip(rest, idx, strict=True)
                 if lay.shape[a] > 1 and lay.names[a] != "row"]
        titles.append(", ".join(words))
    return flat, titles


def _axes(ax: Any, lay: Layout) -> None:
    for axis, pos in (("x", lay.x), ("y", lay.y)):
        if pos is None:
            getattr(ax, f"set_{axis}ticks")([])
            continue
        vals = list(lay.values[pos])
        step = max(1, len(vals) // 12)
        getattr(ax, f"set_{axis}ticks")(range(0, len(vals), step))
        getattr(ax, f"set_{axis}ticklabels")([str(v) for v in vals[::step]],
                                              rotation=90 if axis == "x" and len(vals) > 6
                                              else 0)
        getattr(ax, f"set_{axis}label")(lay.names[pos])


def status_map(statuses: Sequence[str], lay: Layout) -> Any:
    """The status of every task on the sweep's layout, one colour per status."""
    fig_ = new_figure()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    names = list(COLOURS)
    codes = np.array([names.index(s) if s in COLOURS else names.index("corrupt")
                      for s in statuses], dtype=float)
    flat, titles = cells(codes, lay)
    shared = ""
    if len(flat) > MAX_PANELS:  # too many panels: the share not complete, per cell
        done = float(names.index("complete"))
        flat = np.nanmean(np.where(np.isnan(flat), np.nan, flat != done), axis=0)[None]
        titles, shared = ["share of tasks not complete, over the other axes"], "share"
    cols = min(len(flat), 3)
    rows = math.ceil(len(flat) / cols)
    fig = fig_
    fig.set_size_inches(3.6 * cols + 1.6, 2.6 * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(flat):
            ax.set_visible(False)
            continue
        if shared:
            im = ax.imshow(flat[k], cmap="Reds", vmin=0, vmax=1, aspect="auto",
                           interpolation="nearest", origin="lower")
            fig.colorbar(im, ax=ax)
        else:
            ax.imshow(flat[k], cmap=ListedColormap([COLOURS[n] for n in names]), vmin=0,
                      vmax=len(names) - 1, aspect="auto", interpolation="nearest",
                      origin="lower")
        ax.set_title(titles[k], fontsize=8)
        _axes(ax, lay)
    if not shared:
        seen = [n for n in names if n in set(statuses)]
        fig.legend(handles=[Patch(color=COLOURS[n], label=n) for n in seen],
                   loc="center right", fontsize=8, frameon=False)
        fig.subplots_adjust(right=0.8)
    fig.suptitle("status of every task")
    return fig


def field_figure(name: str, values: np.ndarray, lay: Layout) -> Any:
    """A scalar result over the params: a map over the two main axes (the mean over any
    other), and lines along x, one per y value (up to 8)."""
    flat, _ = cells(values, lay)
    with np.errstate(all="ignore"):
        mean = np.nanmean(flat, axis=0) if len(flat) > 1 else flat[0]
    lines = lay.y is None or lay.shape[lay.y] <= 8
    fig = new_figure(figsize=(9.5 if lines else 5.2, 3.4))
    axes = fig.subplots(1, 2 if lines and lay.x is not None else 1, squeeze=False)
    ax = axes[0][0]
    im = ax.imshow(mean, aspect="auto", interpolation="nearest", origin="lower",
                   cmap="viridis")
    fig.colorbar(im, ax=ax, label=name)
    _axes(ax, lay)
    ax.set_title(name + (" (mean over the other axes)" if len(flat) > 1 else ""), fontsize=9)
    if lines and lay.x is not None:
        ax2 = axes[0][1]
        xs = list(lay.values[lay.x])
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in xs)
        order = np.argsort(xs) if numeric else np.arange(len(xs))  # a line goes left to right
        pos = [xs[i] for i in order] if numeric else list(range(len(xs)))
        for r in range(mean.shape[0]):  # markers apart: equal results stay visible
            label = f"{lay.names[lay.y]}={lay.values[lay.y][r]}" if lay.y is not None else None
            ax2.plot(pos, mean[r][order], marker="osD^v<>p"[r % 8], markersize=7 - r * 0.6,
                     alpha=0.85, label=label)
        if not numeric:
            ax2.set_xticks(pos)
            ax2.set_xticklabels([str(v) for v in xs], rotation=90 if len(xs) > 6 else 0)
        ax2.set_xlabel(lay.names[lay.x])
        ax2.set_ylabel(name)
        if lay.y is not None:
            ax2.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def usage_figure(runtimes: Sequence[float], peaks: Sequence[float],
                 limit_sec: float | None, mem_bytes: float | None) -> Any:
    """The distribution of runtimes and peak memory over the complete runs, with what
    was asked for (dashed) when known."""
    fig = new_figure(figsize=(9.5, 3.0))
    axes = fig.subplots(1, 2)
    for ax, data, asked, label, unit, scale in (
            (axes[0], runtimes, limit_sec, "runtime", "s", 1.0),
            (axes[1], peaks, mem_bytes, "peak memory (largest process)", "MiB", 2**20)):
        scaled = np.asarray(data, dtype=float) / scale
        if len(scaled):
            ax.hist(scaled, bins=min(40, max(5, int(math.sqrt(len(scaled))))),
                    color="#3b7dd8")
        if asked:
            ax.axvline(asked / scale, color="#d62728", linestyle="--",
                       label=f"asked: {asked / scale:.0f} {unit}")
            ax.legend(fontsize=7, frameon=False)
        ax.set_xlabel(f"{label} ({unit})")
        ax.set_ylabel("runs")
    fig.tight_layout()
    return fig


def svg(fig: Any) -> str:
    """The figure as an inline ``<svg>`` element (no XML header)."""
    buf = io.StringIO()
    with styled():
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def png(fig: Any) -> bytes:
    buf = io.BytesIO()
    with styled():
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


