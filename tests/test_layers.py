"""Layers point one way: cli → workflows → core → infrastructure.

Every import in ``cl_tool/`` (top level and inside functions) is read with ``ast``; the test fails if a
module outside ``cli/`` imports ``cl_tool.cli``, a workflow imports another workflow, a core module imports
a workflow, or an infrastructure module imports anything but infrastructure.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cl_tool"
INFRASTRUCTURE = {
    "cl_tool.errors",
    "cl_tool.atomic",
    "cl_tool.output",
    "cl_tool.params",
    "cl_tool.runtime",
    "cl_tool.distributed",
    "cl_tool.safetensors_io",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every cl_tool module ``path`` imports (``from cl_tool.x import y`` counts as cl_tool.x and cl_tool.x.y)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == "cl_tool" or name.startswith("cl_tool.")}


_RAW = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__main__.py"}
MODULES = {
    m: {name for name in names if name in _RAW} for m, names in _RAW.items()
}  # names imported from a module are not modules


def _layer(name: str) -> str:
    if name.startswith("cl_tool.cli"):
        return "cli"
    if name.startswith("cl_tool.workflows"):
        return "workflows"
    return "infrastructure" if name in INFRASTRUCTURE else "core"


def test_the_walk_sees_the_package():
    assert {"cl_tool.cli", "cl_tool.workflows.train_next", "cl_tool.training", "cl_tool.atomic"} <= set(MODULES)
    assert "cl_tool.workflows.train_next" in MODULES["cl_tool.cli.train_next"]  # an import inside the cli is found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    layer = _layer(module)
    for imported in MODULES[module]:
        target = _layer(imported)
        if layer != "cli":
            assert target != "cli", f"{module} imports {imported}: nothing below cl_tool/cli may import the CLI"
        if layer == "workflows" and target == "workflows":
            assert imported == "cl_tool.workflows", (
                f"{module} imports the workflow {imported}; shared steps belong in core modules"
            )
        if layer in ("core", "infrastructure"):
            assert target not in ("workflows", "cli"), f"{module} ({layer}) imports {imported}"
        if layer == "infrastructure":
            assert target == "infrastructure" or imported == "cl_tool", (
                f"{module} (infrastructure) imports the core module {imported}"
            )
