"""The core's shape: what may import what, and what a sync user never pays for."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import execbox

PACKAGE = Path(execbox.__file__).parent


def _modules() -> dict[str, set[str]]:
    """module name -> every module it imports (relative imports resolved)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                imported.add(module)
                imported.update(f"{module}.{alias.name}" for alias in node.names)
        found[name] = imported
    return found


def _internal(imports: set[str]) -> set[str]:
    return {m for m in imports if m.startswith("execbox.")}


def test_the_core_imports_no_adapter_and_no_grpc() -> None:
    modules = _modules()
    assert len(modules) > 30  # the walk really saw the package
    for name, imports in modules.items():
        if name.startswith("execbox.adapters") or name == "execbox.__main__":
            continue  # __main__ (like bin/execbox) dispatches to the adapters
        bad = {m for m in imports if m.startswith(("execbox.adapters", "grpc", "google"))}
        assert not bad, f"{name} imports {bad}"


def test_child_side_code_imports_only_the_syscall_layer_and_the_model() -> None:
    allowed = ("execbox.linux", "execbox.model", "execbox.child")
    modules = _modules()
    child = [n for n in modules if n == "execbox.child" or n.startswith("execbox.child.")]
    assert "execbox.child.process" in child and "execbox.child.mounts" in child
    for name in child:
        bad = {m for m in _internal(modules[name]) if not m.startswith(allowed)}
        assert not bad, f"{name} (runs between fork and exec) imports {bad}"


def test_the_model_imports_nothing_but_itself() -> None:
    modules = _modules()
    for name in (n for n in modules if n.startswith("execbox.model")):
        bad = {m for m in _internal(modules[name]) if not m.startswith("execbox.model")}
        assert not bad, f"{name} imports {bad}"


def test_a_sync_run_does_not_import_asyncio() -> None:
    code = ("import sys, execbox; r = execbox.run(['/bin/true']); "
            "assert r.exit_code == 0, r; print('asyncio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_the_cli_imports_neither_dataclasses_nor_asyncio() -> None:
    """`execbox run` start-up time: what it imports is what it pays for."""
    code = ("import sys; from execbox.cli.main import main; rc = main(['run', '--', 'true']); "
            "print(sorted(m for m in ('asyncio', 'dataclasses', 'typing', 'json') "
            "if m in sys.modules)); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": str(PACKAGE.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_design_map_names_every_module() -> None:
    """docs/design.md's module table matches the tree: a reader can trust the map."""
    design = (PACKAGE.parent.parent / "docs" / "design.md").read_text()
    listed = set()
    for row in design.splitlines():
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if row.startswith("| ") and len(cells) == 3 and cells[0].endswith("/"):
            listed.update(f"{cells[0]}{m.strip()}" for m in cells[1].split(","))
    actual = {str(p.relative_to(PACKAGE).with_suffix("")) for p in PACKAGE.rglob("*.py")
              if p.name != "__init__.py" and p.parent != PACKAGE}
    assert listed == actual
