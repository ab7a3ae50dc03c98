"""Dependency direction: common <- datastore <- tuna <- icl <- train, eval <- pipeline; never the other way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("common", "datastore", "tuna", "icl", ("train", "eval"), "pipeline")  # bottom to top
PACKAGES = [p for layer in LAYERS for p in ((layer,) if isinstance(layer, str) else layer)]


def forbidden(package: str) -> set[str]:
    """The packages above ``package`` (and, for train and eval, each other: they are side by side)."""
    level = next(i for i, layer in enumerate(LAYERS) if package in ((layer,) if isinstance(layer, str) else layer))
    above = {p for layer in LAYERS[level + 1:] for p in ((layer,) if isinstance(layer, str) else layer)}
    return above | ({"train", "eval"} - {package} if package in ("train", "eval") else set())


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", [p for p in PACKAGES if (REPO / p).is_dir()])
def test_no_upward_imports(package):
    files = list((REPO / package).rglob("*.py"))
    assert files, f"package {package} has no modules"
    bad = {str(f.relative_to(REPO)): imported_packages(f) & forbidden(package) for f in files}
    assert {f: sorted(b) for f, b in bad.items() if b} == {}


def test_layers_know_every_package():
    """A new top-level package must be placed in LAYERS (else nothing checks its imports)."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench", "experiments"}
    assert packages <= set(PACKAGES), sorted(packages - set(PACKAGES))


def test_forbidden_sets():
    assert forbidden("common") == {"datastore", "tuna", "icl", "train", "eval", "pipeline"}
    assert forbidden("tuna") == {"icl", "train", "eval", "pipeline"}
    assert forbidden("eval") == {"train", "pipeline"}
    assert forbidden("pipeline") == set()


def test_no_star_imports():
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            assert "import *" not in path.read_text(), path
