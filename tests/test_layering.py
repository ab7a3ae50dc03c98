"""Dependency direction: datastore <- tuna <- train, eval; never the other way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"datastore": {"tuna", "train", "eval"}, "tuna": {"train", "eval"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    files = list((REPO / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    bad = {str(f.relative_to(REPO)): imported_packages(f) & FORBIDDEN[package] for f in files}
    assert {f: sorted(b) for f, b in bad.items() if b} == {}


def test_no_star_imports():
    for package in ("datastore", "tuna", "train", "eval"):
        for path in (REPO / package).rglob("*.py"):
            assert "import *" not in path.read_text(), path
