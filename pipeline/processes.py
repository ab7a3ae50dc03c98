"""Running tuna's real command-line tools (``deepspeed``, ``tuna-eval``) in subprocesses, as a user would:
their environment, console scripts, free ports, and a log file per run with a one-line error on failure."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


class StageError(RuntimeError):
    """A pipeline stage failed; the message names the stage and where its log is."""


def threads_per_process(threads: int, nproc: int) -> int:
    """``threads`` torch threads, or (0) each of ``nproc`` processes' share of the cores."""
    return threads or max(1, (os.cpu_count() or 1) // nproc)


def subprocess_env(threads: int) -> dict[str, str]:
    """This environment, offline, with ``threads`` OpenMP threads, unbuffered Python output, and this
    environment's scripts first on PATH, as in an activated venv. The last matters for DeepSpeed: it
    compiles its CPU op with the first ``ninja`` on PATH, and a ninja other than the one
    ``scripts/bootstrap.sh`` compiled it with (the venv's) reads the build log as stale and compiles
    again: 27 s at the first training of a run."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "PATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def console_script(name: str) -> str:
    """A console script of this environment (deepspeed, tuna-eval)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise StageError(f"{name!r} not found next to {sys.executable} or on PATH")
    return found


def run_logged(cmd: list[str], log_file: Path, env: dict[str, str], what: str,
               echo: Callable[[str], str | None] | None = None) -> None:
    """Run ``cmd`` from the repository root writing its output to ``log_file``; print what ``echo`` makes
    of a line (when not None); on failure raise :class:`StageError` with the log's last line."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(REPO), bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            shown = echo(line) if echo is not None else None
            if shown:
                print("      " + shown, flush=True)
        code = proc.wait()
    if code != 0:
        tail = [ln for ln in log_file.read_text().splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise StageError(f"{what} failed (exit {code}); log: {log_file}; last line: {tail[0][-200:]}")
