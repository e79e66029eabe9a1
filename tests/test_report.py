"""notata report (notata.overview, notata.figures): the example oscillator sweep with an
injected failure, rendered in a real headless browser; the figures' layout; a large sweep
stays small."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT

import notata
from notata.cli import main
from notata.figures import cells, layout_of
from notata.manifest import load

pytest.importorskip("matplotlib", reason="the report extra (pip install 'notata[report]')")

UNSTABLE = """
    if p["omega"] >= 3.0 and p["dt"] >= 0.01:
        raise ValueError(f"dt {p['dt']} too large for omega {p['omega']}: unstable")
"""


@pytest.fixture(scope="module")
def oscillator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's example sweep, run locally, with one task that fails (the unstable
    corner: omega 3.0, dt 0.01)."""
    work = tmp_path_factory.mktemp("osc")
    for f in (ROOT / "examples" / "oscillator").iterdir():
        shutil.copy(f, work)
    sim = work / "simulate.py"
    sim.write_text(sim.read_text().replace("    p = log.task.params\n",
                                           "    p = log.task.params\n" + UNSTABLE))
    proc = subprocess.run([sys.executable, "-m", "notata", "submit", "sweep.yaml",
                           "--backend", "local", "-j", "2", "--", sys.executable,
                           "simulate.py", "sweep.yaml"], cwd=work, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "failed tasks: 4" in proc.stderr, proc.stderr
    return work / "sweep.yaml"


def test_the_failure_lands_on_its_cell_of_the_grid(oscillator: Path) -> None:
    """The map's cell (x, y) is the task whose params are x's and y's values."""
    sweep = load(oscillator)
    lay = layout_of(sweep, len(sweep))
    grid, titles = cells(np.arange(len(sweep)), lay)
    assert grid.shape == (1, 2, 3) and titles == [""]  # dt (y) x omega (x), one panel
    assert lay.names[lay.x or 0] == "omega" and lay.names[lay.y or 0] == "dt"
    for y, dt in enumerate(lay.values[lay.y or 0]):
        for x, omega in enumerate(lay.values[lay.x or 0]):
            params = sweep.params(int(grid[0, y, x]))
            assert (params["omega"], params["dt"]) == (omega, dt)
    built = notata.report(oscillator, ["final_metrics"])
    failed = [i for i, s in enumerate(built.statuses) if s == "failed"]
    assert failed == [4] and sweep.params(4) == {"omega": 3.0, "dt": 0.01, "steps": 1000}
    energy = built.fields["final_metrics.E"]
    assert np.isnan(energy[4]) and np.all(np.isfinite(np.delete(energy, 4)))
    assert built.failures[0]["task"] == 4 and "unstable" in built.failures[0]["reason"]
    assert any("too large" in line for line in built.failures[0]["tail"])


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium here (scripts/test.sh installs it as root)")
    return found


def test_the_report_renders_in_a_headless_browser(oscillator: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """One self-contained file, opened in a real browser: no request leaves the page, no
    console error, the figures are drawn, and its counts are notata status's."""
    page = tmp_path / "report.html"
    assert main(["report", str(oscillator), "--artifact", "final_metrics", "-o", str(page)]) == 0
    text = page.read_text()
    # nothing is loaded from elsewhere (an SVG's xmlns names a namespace, loads nothing)
    assert not re.search(r"<(script|link|img|iframe)\b", text)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "url(http" not in text
    shot = tmp_path / "shot.png"
    browser = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'profile'}"]
    run = subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1150,2600",
                          page.as_uri()], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line
               or "Failed to load resource" in line or "net::ERR" in line]
    assert console == []
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120).stdout
    assert dom.count("<svg") >= 3 and "final_metrics.E" in dom
    shown = dict(re.findall(r'</span>(\w+)</td><td class="n">(\d+)</td>', dom))
    capsys.readouterr()
    assert main(["status", str(oscillator), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert shown == {s: str(n) for s, n in counts.items() if n} == {"complete": "5",
                                                                    "failed": "1"}
    # the screenshot shows the map's colours: complete (green) and failed (red) cells
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)
    colours = {tuple(p) for p in pixels.reshape(-1, 3)[::7]}
    assert (0x2E, 0x9E, 0x4F) in colours and (0xD6, 0x27, 0x28) in colours
    assert len(colours) > 50  # drawn, not blank


def test_png_format_writes_each_figure(oscillator: Path, tmp_path: Path) -> None:
    out = tmp_path / "figs"
    assert main(["report", str(oscillator), "--artifact", "final_metrics", "--format", "png",
                 "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["final_metrics.E.png", "status.png", "summary.txt", "usage.png"]
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names
               if n.endswith(".png"))
    assert "complete" in (out / "summary.txt").read_text()


def test_a_large_sweep_makes_a_small_report(tmp_path: Path, oscillator: Path) -> None:
    """10^5 tasks over four axes (more panels than shown: one panel of shares) give a file
    no bigger than a 6-task sweep's, give or take: no element per run."""
    manifest = tmp_path / "big.yaml"
    grid = {k: list(range(n)) for k, n in (("a", 50), ("b", 40), ("c", 10), ("d", 5))}
    manifest.write_text("name: big\ngrid: " + json.dumps(grid) + "\n")
    big = notata.report(manifest)
    small = notata.report(oscillator)
    assert len(big.statuses) == 100_000 and big.counts["missing"] == 100_000
    assert len(big.html()) < 3 * len(small.html()) and len(big.html()) < 400_000


def test_an_artifact_no_run_has_is_named(oscillator: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(oscillator), "--artifact", "nosuch", "-o", "/dev/null"]) == 2
    assert "--artifact nosuch: no run has it" in capsys.readouterr().err


@pytest.mark.parametrize("where, fmt", [("a-folder", "html"), ("no/such/r.html", "html"),
                                        ("a-file/r.html", "html"), ("a-file", "png")])
def test_an_output_that_cannot_be_written_is_one_line(
        oscillator: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str,
        fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    capsys.readouterr()
    assert main(["report", str(oscillator), "--format", fmt, "-o", where]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"notata report: -o {where}:") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]


def test_odd_results_and_labels_do_not_stop_the_report(tmp_path: Path) -> None:
    """A diverged run's 1e308, an integer too large for a float, a ``$`` in a grid value
    or a field name (no formula), and a metadata figure too large for a float."""
    import matplotlib

    manifest = tmp_path / "odd.yaml"
    manifest.write_text("name: odd\ngrid: {model: ['plain', 'cost $^$ x'], seed: [1, 2]}\n")
    from notata import task

    for i, value in enumerate([1.0, 1.7976931348623157e308, 10**400, 2.0]):
        with task(manifest, i) as log:
            log.save_json("m", {"E": value, "a_$^$": i})
    meta = tmp_path / "outputs" / "log_modelplain_seed1" / "metadata.json"
    data = json.loads(meta.read_text())
    data["heartbeat"]["peak_rss_bytes"] = 10**400
    data["provenance"] = {"state": ["not", "a", "string"]}
    meta.write_text(json.dumps(data))
    import matplotlib.pyplot as plt

    backend, open_before = matplotlib.get_backend(), plt.get_fignums()
    built = notata.report(manifest, ["m"])
    html = built.html()
    assert built.notes == [] and html.count("<svg") == 4
    assert {s: n for s, n in built.counts.items() if n} == {"complete": 4}
    assert "cost $^$ x" in html
    assert matplotlib.get_backend() == backend  # the caller's backend is left alone
    assert plt.get_fignums() == open_before  # no figure left open in pyplot
