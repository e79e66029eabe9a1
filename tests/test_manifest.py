"""Manifests: every form, fixed task order, stable hash, computed lookup, and every bad case."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from pathlib import Path

import pytest
from helpers import write_sweep

from notata.errors import ManifestError
from notata.manifest import load

SEED = """
name: oscillator
run_id: "omega{omega}_dt{dt}"
grid:
  omega: [1.0, 2.0, 3.0]
  dt: [0.01, 0.001]
params:
  steps: 1000
"""


def test_grid_order_matches_the_seed_loop(tmp_path: Path) -> None:
    sweep = load(write_sweep(tmp_path, SEED), check_unique=True)
    expected = [f"omega{o}_dt{d}" for o, d in itertools.product([1.0, 2.0, 3.0], [1e-2, 1e-3])]
    assert [t.run_id for t in sweep] == expected
    assert sweep.task(3).params == {"omega": 2.0, "dt": 0.001, "steps": 1000}
    assert sweep.task(3).run_dir == tmp_path / "outputs" / "log_omega2.0_dt0.001"


def test_json_manifest_gives_the_same_sweep_and_hash(tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load(SEED)
    a = load(write_sweep(tmp_path, SEED))
    b = load(write_sweep(tmp_path, json.dumps(data), "sweep.json"))
    assert [t.params for t in a] == [t.params for t in b] and a.hash == b.hash


def test_hash_is_stable_and_changes_with_the_sweep_but_not_with_slurm(tmp_path: Path) -> None:
    a = load(write_sweep(tmp_path, SEED, "a.yaml"))
    assert load(write_sweep(tmp_path, SEED, "b.yaml")).hash == a.hash
    slurm = SEED + "slurm: {time: '1:00:00'}\n"
    assert load(write_sweep(tmp_path, slurm, "c.yaml")).hash == a.hash
    assert load(write_sweep(tmp_path, SEED.replace("3.0]", "4.0]"), "d.yaml")).hash != a.hash
    swapped = SEED.replace("  omega: [1.0, 2.0, 3.0]\n  dt: [0.01, 0.001]",
                           "  dt: [0.01, 0.001]\n  omega: [1.0, 2.0, 3.0]")
    assert load(write_sweep(tmp_path, swapped, "e.yaml")).hash != a.hash  # order changes indices


def test_runs_zip_grid_and_params_combine_in_documented_order(tmp_path: Path) -> None:
    sweep = load(write_sweep(tmp_path, """
name: combo
runs: [{solver: verlet}, {solver: euler}]
zip: {seed: [1, 2], label: [a, b]}
grid: {n: [10, 20]}
params: {steps: 5}
"""), check_unique=True)
    assert len(sweep) == 2 * 2 * 2
    got = [(t.params["solver"], t.params["seed"], t.params["label"], t.params["n"]) for t in sweep]
    assert got == [(s, z, lab, n) for s in ("verlet", "euler") for z, lab in ((1, "a"), (2, "b"))
                   for n in (10, 20)]
    assert all(t.params["steps"] == 5 for t in sweep)
    assert sweep.task(0).run_id == "n10_seed1_labela_solververlet"


def test_default_run_ids_are_file_safe(tmp_path: Path) -> None:
    sweep = load(write_sweep(tmp_path, "name: s\ngrid: {path: ['a/b', 'c d'], x: [0.5]}\n"))
    assert [t.run_id for t in sweep] == ["patha-b_x0.5", "pathc-d_x0.5"]
    only = load(write_sweep(tmp_path, "name: s\nparams: {a: 1}\n", "one.yaml"))
    assert len(only) == 1 and only.task(0).run_id == "task0"


def test_ten_million_tasks_are_computed_not_listed(tmp_path: Path) -> None:
    values = ", ".join(map(str, range(100)))
    path = write_sweep(tmp_path, f"name: big\ngrid: {{a: [{values}], b: [{values}], c: [{values}, "
                       f"{values.replace(', ', ', 1')}], d: [0, 1, 2, 3, 4]}}\n")
    tracemalloc.start()
    sweep = load(path)
    n = len(sweep)
    assert n == 100 * 100 * 200 * 5 == 10_000_000
    t = sweep.task(n - 1)
    assert t.params == {"a": 99, "b": 99, "c": 199, "d": 4}
    assert sweep.task(12_345).params == {"a": 0, "b": 12, "c": 69, "d": 0}
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5_000_000  # nothing proportional to the ten million tasks


@pytest.mark.parametrize("index", [-1, 6, 10**9])
def test_index_outside_the_sweep_is_a_clear_error(tmp_path: Path, index: int) -> None:
    sweep = load(write_sweep(tmp_path, SEED))
    with pytest.raises(IndexError, match=r"outside sweep 'oscillator' \(tasks 0..5\)"):
        sweep.task(index)


BAD = {
    "missing file": (None, "cannot read"),
    "invalid yaml": ("name: x\ngrid: {a: [1, 2}\n", "invalid YAML"),
    "not a mapping": ("- 1\n- 2\n", "expected a mapping"),
    "unknown key": ("name: x\ngrid: {a: [1]}\ngird: {}\n", "unknown key(s) 'gird'"),
    "no name": ("grid: {a: [1]}\n", "'name'"),
    "bad name": ("name: ../x\ngrid: {a: [1]}\n", "'name'"),
    "nothing to run": ("name: x\n", "nothing to run"),
    "template names missing param": ("name: x\ngrid: {a: [1]}\nrun_id: 'r{b}'\n", "{b}"),
    "bad template": ("name: x\ngrid: {a: [1]}\nrun_id: 'r{a'\n", "run_id template"),
    "empty grid": ("name: x\ngrid: {a: []}\n", "empty"),
    "grid value not a list": ("name: x\ngrid: {a: 1}\n", "grid.a must be a list"),
    "zip lengths": ("name: x\nzip: {a: [1, 2], b: [1]}\n", "equal lengths"),
    "param twice": ("name: x\ngrid: {a: [1]}\nparams: {a: 2}\n", "defined in both"),
    "runs not dicts": ("name: x\nruns: [1, 2]\n", "'runs' must be"),
    "duplicate ids": ("name: x\ngrid: {a: [1, 2]}\nrun_id: same\n", "tasks 0 and 1"),
    "unsafe id": ("name: x\ngrid: {a: ['../../etc']}\nrun_id: '{a}'\n", "invalid run id"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifests_are_one_clear_error(tmp_path: Path, case: str) -> None:
    text, message = BAD[case]
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ManifestError) as info:
        load(path, check_unique=True)
    assert message in str(info.value) and str(info.value).startswith(str(tmp_path))
    assert "\n" not in str(info.value)
    assert sorted(tmp_path.iterdir()) == before


def test_invalid_json_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="invalid JSON"):
        load(write_sweep(tmp_path, '{"name": "x", ', "s.json"))


def test_numbers_follow_yaml_1_2(tmp_path: Path) -> None:
    """YAML 1.1 read ``30:00`` as 1800 (sbatch got --time=1800: 30 hours) and ``1e-3`` as
    a string beside ``1.0e-4`` as a float."""
    p = write_sweep(tmp_path, "name: y\ngrid:\n"
                    "  lr: [1e-3, 1.0e-4, .5, 2, -3, +4.5e1, 010, 0x1f, 0o17]\n"
                    "  tag: [30:00, 1_000, '1e-3']\nslurm: {time: 30:00, mem: 60}\n", "s.yaml")
    sweep = load(p)
    lr = dict(sweep.grid)["lr"]
    assert lr == [0.001, 0.0001, 0.5, 2, -3, 45.0, 10, 31, 15]
    assert [type(v) for v in lr[:3]] == [float, float, float]
    assert dict(sweep.grid)["tag"] == ["30:00", "1_000", "1e-3"]
    assert sweep.slurm == {"time": "30:00", "mem": 60}
    from notata import sbatch_options

    options, _, _ = sbatch_options.options_for(sweep.slurm, {}, str(p))
    assert options == {"time": "30:00", "mem": "60"}  # as written: 30 minutes, 60 MB
