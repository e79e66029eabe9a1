"""The package's code map (notata/__init__.py's docstring), enforced: layers, no cycles,
SLURM named only by the scheduler layer."""

from __future__ import annotations

import ast
import re

from helpers import ROOT

PACKAGE = ROOT / "notata"
# The layers of the code map, bottom first (keep in step with notata/__init__.py).
LAYERS = [
    {"_version", "schema", "errors", "scheduler", "runinfo", "_convert", "heartbeat",
     "taskspec", "resources"},
    {"_fs", "layout", "lock", "index", "reader", "manifest", "submissions", "_signals",
     "_attach", "provenance"},
    {"_attempt", "_run", "_outputs", "logbook", "experiment"},
    {"array", "_command", "_function", "runner", "pack", "local"},
    {"runstate", "queue", "collector", "tabulate", "logs"},
    {"slurm", "sbatch", "sbatch_options", "submitit", "chain"},
    {"submission", "retry", "shepherd", "settle", "efficiency"},
    {"cli", "parser", "views", "overview", "figures", "__main__", "__init__"},
]
SCHEDULER_LAYER = 5


def imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in it (in functions and under
    TYPE_CHECKING too)."""
    out: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module] if node.module else [a.name for a in node.names]
                found.update(n.split(".")[0] for n in names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("notata"):
                parts = (node.module or "").split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names
                             if a.name.startswith("notata."))
        out[path.stem] = found - {path.stem}
    return out


def layer(module: str) -> int:
    return next(i for i, members in enumerate(LAYERS) if module in members)


def test_every_module_has_a_place_on_the_map() -> None:
    placed = set().union(*LAYERS)
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - placed == set(), "add these modules to the code map and to LAYERS"
    assert placed - modules == set(), "these modules of the map are gone"


def test_no_module_imports_a_higher_layer() -> None:
    wrong = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
             for m, deps in imports().items() for d in sorted(deps)
             if d in set().union(*LAYERS) and layer(d) > layer(m)]
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path, module]))
        if module in done:
            return
        for dep in sorted(graph.get(module, ())):
            visit(dep, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_only_the_scheduler_layer_names_slurm() -> None:
    """SLURM's environment variables, job states and metadata fields appear as values in
    code only in the scheduler layer (docstrings and help texts may name them)."""
    slurm_words = re.compile(r"SLURM_[A-Z_]+|array_job_id|array_task_id|restart_count|"
                             r"RUNNING|PENDING|COMPLETING|SUSPENDED|PREEMPTED")
    found = []
    for path in PACKAGE.glob("*.py"):
        if layer(path.stem) == SCHEDULER_LAYER:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}
        helps = {id(k.value) for n in ast.walk(tree) if isinstance(n, ast.Call)
                 for k in n.keywords if k.arg == "help"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings | helps \
                    and slurm_words.fullmatch(node.value.strip()):
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert found == []


def test_the_version_is_the_one_pyproject_says() -> None:
    from notata import __version__

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    declared = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    assert declared and declared.group(1) == __version__
