"""Structure rules of the code base, checked on its source."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pallas_kernels

KERNELS_DIR = Path(pallas_kernels.__file__).resolve().parent


def _imported_modules(path: Path) -> list[str]:
    """Every module an `import` / `from ... import` in the file names (relative ones resolved
    against the package), at any depth (function-level imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append((node.module or "") if node.level == 0 else f"pallas_kernels.{node.module or ''}")
    return names


def test_pallas_kernels_imports_nothing_from_jaxchunk():
    """pallas_kernels is self-contained (jaxchunk may import it, never the other way): in the
    source, and in what importing it loads."""
    sources = sorted(KERNELS_DIR.glob("*.py"))
    assert len(sources) > 5
    offenders = {f"{path.name}: {name}" for path in sources for name in _imported_modules(path)
                 if name == "jaxchunk" or name.startswith("jaxchunk.")}
    assert not offenders

    modules = [f"pallas_kernels.{path.stem}" for path in sources if path.stem != "__init__"]
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m == 'jaxchunk' or m.startswith('jaxchunk.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=KERNELS_DIR.parent)
    assert out.stdout.strip() == "[]"


def test_nothing_imports_private_names_of_pallas_kernels():
    """What one pallas_kernels module needs from another is public (no `_name`, no `_module`), for
    the package itself and for everything that uses it (jaxchunk, experiments, tests)."""
    root = KERNELS_DIR.parent
    offenders = []
    for folder in ("pallas_kernels", "jaxchunk", "experiments", "tests"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pallas_kernels"):
                    parts = node.module.split(".") + [alias.name for alias in node.names]
                elif isinstance(node, ast.Import):
                    parts = [p for alias in node.names if alias.name.startswith("pallas_kernels")
                             for p in alias.name.split(".")]
                else:
                    continue
                if any(p.startswith("_") for p in parts):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders
