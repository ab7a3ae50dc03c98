"""The installed console scripts run this checkout's code (a stale editable install made CI's quickstart
run an older ``tuna-eval`` after an hour; this catches it in a second)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("package", ["datastore", "tuna", "icl", "train", "eval", "pipeline", "common"])
def test_installed_packages_resolve_to_this_checkout(package):
    if not (REPO / package / "__init__.py").exists():
        pytest.fail(f"{package}/ missing from the checkout")
    # from / , as a console script sees it: no checkout folder on sys.path
    found = subprocess.run([sys.executable, "-c", f"import {package}; print({package}.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).resolve() == (REPO / package / "__init__.py").resolve(), (
        f"{package} is imported from {found}, not this checkout: run scripts/bootstrap.sh")
