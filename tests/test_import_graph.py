"""The import graph of the library: no cycle, and no module importing another module's private names.

Read from the source with `ast` (every import, including the ones inside functions, which is where
cycles hide), so the test does not depend on import order or on what a run happened to import.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxchunk", "pallas_kernels", "experiments")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]):
    """(imported module, imported names) for every import of ours in the file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES:
            names = [a.name for a in node.names]
            submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in modules]
            yield from ((m, ()) for m in submodules)
            rest = tuple(n for n in names if f"{node.module}.{n}" not in modules)
            if rest or not submodules:
                yield node.module, rest


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _ in _imports(path, modules):
            if target != name and target in modules:
                graph[name].add(target)
    return graph


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    assert {"jaxchunk.steps", "jaxchunk.prefill", "jaxchunk.memory_budget"} <= graph.keys()
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")
    # Data flows one way: the steps come before the loops that use them, the loops before the API.
    assert order.index("jaxchunk.steps") < order.index("jaxchunk.memory_budget") < order.index("jaxchunk.prefill")
    assert order.index("jaxchunk.prefill") < order.index("jaxchunk.generate") < order.index("jaxchunk.api")


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    """The checker itself: a cycle made by an import inside a function is found."""
    source = "def f():\n    from jaxchunk.prefill import prefill\n"
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert ("jaxchunk.prefill", ("prefill",)) in list(_imports(path, _modules()))


@pytest.mark.parametrize("directory", [*PACKAGES, "tests"])
def test_no_module_imports_private_names_of_another(directory):
    offenders = []
    modules = _modules()
    for path in sorted((ROOT / directory).rglob("*.py")):
        for target, names in _imports(path, modules):
            private = [n for n in names if n.startswith("_")]
            hidden = [part for part in target.split(".") if part.startswith("_") and part != "__init__"]
            if private or hidden:
                offenders.append(f"{path.relative_to(ROOT)}: {target} {private or ''}")
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)
