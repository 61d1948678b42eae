"""The command is assembled from public registration functions: ``main`` calls no other
module's private names, and no module exports a private one (the project's rule: no module calls
another's private names)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import edgewise.runtime.cli as cli_package

CLI = Path(cli_package.__file__).parent


def test_main_uses_no_private_name_of_another_module() -> None:
    tree = ast.parse((CLI / "main.py").read_text())
    modules = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgewise")
        for alias in node.names
    }
    private = [
        f"from {node.module} import {alias.name}"
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgewise")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    private += [
        f"{node.value.id}.{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in modules
        and node.attr.startswith("_")
    ]
    assert private == []


@pytest.mark.parametrize(
    "path", sorted(p for p in CLI.glob("*.py") if p.stem != "__main__"), ids=lambda p: p.stem
)
def test_cli_modules_export_no_private_name(path: Path) -> None:
    module = importlib.import_module(f"edgewise.runtime.cli.{path.stem}")
    assert [n for n in getattr(module, "__all__", []) if n.startswith("_")] == []
