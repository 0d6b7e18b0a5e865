"""TextSegLib's layers, read from the source: every import (at module level, inside functions, under
``TYPE_CHECKING``) of every module, checked for cycles and for arrows that point up the layers.

The layers, lowest first (README, "Architecture"): core, io, text, models, engine, evaluation, service, app. A module
may import its own layer and the layers below it. 3D Slicer's module (``TextSeg/``) may only import what runs
without torch; ``Training/`` and ``Benchmarks/`` only the modules the README's "Library API" lists.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest
from testkit import REPO

LAYERS = ("core", "io", "text", "models", "engine", "evaluation", "service", "app")
PACKAGE = "TextSegLib"
# What 3D Slicer's process may import: nothing here loads torch (checked below in a fresh interpreter).
TORCH_FREE = ("TextSegLib.core", "TextSegLib.io", "TextSegLib.service.protocol", "TextSegLib.service.client",
              "TextSegLib.service.local", "TextSegLib.app.mrml")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The TextSeg modules that the module ``name`` (source ``source``) imports anywhere in its body: for
    ``from X import a`` the module ``X.a`` when it is one, else ``X``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {module for module in found if module == PACKAGE or module.startswith(PACKAGE + ".")}


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the package's modules it imports, for every ``.py`` file under ``root / package``."""
    files = {module_name(path, root): path for path in sorted((root / package).rglob("*.py"))}
    known = set(files)
    return {name: imported_modules(path.read_text(encoding="utf-8"), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def layer_of(module: str) -> int | None:
    """Index of the module's layer in :data:`LAYERS`; None for the package's own ``__init__`` and ``__main__``."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for source, targets in graph.items():
        for target in sorted(targets):
            low, high = layer_of(source), layer_of(target)
            if source == f"{PACKAGE}.__main__":
                continue  # the program's entry point sits above every layer
            if low is None and target != PACKAGE:
                problems.append(f"{source} (the package itself) imports {target}")
            elif low is not None and high is not None and high > low:
                problems.append(f"{source} ({LAYERS[low]}) imports {target} ({LAYERS[high]}), a higher layer")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (strongly connected components of more than one module, or a module that
    imports itself), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def external_imports(paths: Iterable[Path]) -> dict[str, set[str]]:
    """For scripts outside the package: file -> the TextSeg modules it imports."""
    known = set(import_graph(REPO))
    return {str(path.relative_to(REPO)): imported_modules(path.read_text(encoding="utf-8"), "script", False, known)
            for path in paths}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO)


def test_the_reader_sees_every_module_and_the_imports_inside_functions(graph):
    assert len(graph) >= 50 and all(layer_of(name) is not None for name in graph
                                     if name not in (PACKAGE, f"{PACKAGE}.__main__"))
    # segment imports the engine only inside its command; the reader must see those imports too.
    assert "TextSegLib.engine.run" in graph["TextSegLib.app.segmenting"]


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_every_arrow_points_down_the_layers(graph):
    assert upward_arrows(graph) == []


def test_the_checks_find_a_planted_cycle_and_an_upward_arrow(tmp_path):
    """The same checks on a small package written here: they are not vacuous."""
    package = tmp_path / PACKAGE
    for layer in ("core", "app"):
        (package / layer).mkdir(parents=True)
        (package / layer / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "base.py").write_text("def f():\n    from TextSegLib.app import ui\n")
    (package / "app" / "ui.py").write_text("from ..core.base import f\n")
    planted = import_graph(tmp_path)
    assert cycles(planted) == [["TextSegLib.app.ui", "TextSegLib.core.base"]]
    assert upward_arrows(planted) == ["TextSegLib.core.base (core) imports TextSegLib.app.ui (app), a higher layer"]


def test_slicer_s_module_imports_only_what_runs_without_torch():
    """``TextSeg/`` runs in 3D Slicer's GUI process: models are listed and imported through the worker, so it
    imports only modules that do not load torch, and none of those loads torch, SimpleITK aside."""
    scripts = [REPO / "TextSeg" / "TextSeg.py", REPO / "TextSeg" / "Scripts" / "TextSegBatch.py"]
    used = external_imports(scripts)
    # A headless run: the whole command, and core's messages for the dependency check's refusals.
    allowed = {"TextSeg/Scripts/TextSegBatch.py": ("TextSegLib.app.cli", "TextSegLib.core")}
    for script, modules in used.items():
        for module in modules:
            assert module.startswith(allowed.get(script, TORCH_FREE)), f"{script} imports {module}"
    assert used["TextSeg/TextSeg.py"], "the reader found no TextSegLib import in TextSeg.py"
    torch_free = sorted(name for name in import_graph(REPO) if name.startswith(TORCH_FREE))
    code = (f"import importlib, sys\nfor name in {torch_free!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'open_clip', 'fastapi') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_training_and_benchmarks_import_only_the_documented_library_api():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Library API", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(TextSegLib(?:\.[a-z_]+)+)`", section))
    assert documented, "the README's Library API section lists no module"
    scripts = sorted([*(REPO / "Training").rglob("*.py"), *(REPO / "Benchmarks").rglob("*.py")])
    for script, modules in external_imports(scripts).items():
        assert modules <= documented | {PACKAGE}, f"{script} imports {sorted(modules - documented - {PACKAGE})}"
