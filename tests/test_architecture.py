"""The layers, read from the source: distillery/ (the library) imports neither tasks/ nor flows/; a stage in tasks/
imports no other stage and no flow; only flows/ (the flow, deployments, the CLI) puts stages together. Imports
inside functions count: a lazy import is still an edge."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

LAYERS = ("distillery", "tasks", "flows")


def project_imports(path: Path) -> set[str]:
    """Every project module a file imports, at any depth of the file, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n.split(".")[0] in LAYERS}
    return found


def back_edges(root: Path) -> list[str]:
    bad = []
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            me = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
            for mod in sorted(project_imports(path)):
                top = mod.split(".")[0]
                if layer == "distillery" and top in ("tasks", "flows"):
                    bad.append(f"{me} imports {mod}: the library must not reach up into stages or flows")
                elif layer == "tasks" and top == "flows":
                    bad.append(f"{me} imports {mod}: a stage must not import a flow")
                elif layer == "tasks" and top == "tasks" and mod.split(".")[1] not in (me.split(".")[1], "__init__"):
                    # `from tasks import x` names a stage too
                    bad.append(f"{me} imports {mod}: stages do not import each other; move shared code to distillery/")
    return bad


def test_no_layer_imports_upwards_and_no_stage_imports_another():
    assert back_edges(REPO) == []


def test_the_check_sees_lazy_imports_and_stage_to_stage_edges(tmp_path):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "distillery" / "lib.py").write_text("def f():\n    from tasks.train import x\n")
    (tmp_path / "tasks" / "prune.py").write_text("from tasks.train import SFTParams\nfrom tasks.prune import y\n")
    (tmp_path / "tasks" / "draft.py").write_text("import flows.distill\nfrom distillery.training import finish\n")
    (tmp_path / "flows" / "distill.py").write_text("from tasks.train import train_task\n")
    assert back_edges(tmp_path) == [
        "distillery.lib imports tasks.train: the library must not reach up into stages or flows",
        "distillery.lib imports tasks.train.x: the library must not reach up into stages or flows",
        "tasks.draft imports flows.distill: a stage must not import a flow",
        "tasks.prune imports tasks.train: stages do not import each other; move shared code to distillery/",
        "tasks.prune imports tasks.train.SFTParams: stages do not import each other; move shared code to distillery/",
    ]
