"""The environment the pipeline's training and evaluation subprocesses get."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pipeline.processes import subprocess_env


def test_subprocess_env_puts_this_environments_scripts_first_on_path(monkeypatch):
    """DeepSpeed compiles its CPU op with the first ninja on PATH; the venv's is the one bootstrap used."""
    monkeypatch.setenv("PATH", "/usr/local/bin:/usr/bin")
    env = subprocess_env(3)
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin"]
    assert env["OMP_NUM_THREADS"] == "3" and env["HF_HUB_OFFLINE"] == "1"
