"""The first install: ``scripts/bootstrap.sh`` with uv (its default) against pip (``TUNA_NO_UV=1``).

The quickstart's 15-minute budget counts the first install, so its speed matters. Each run builds a new
virtualenv in a temporary folder from empty download caches (uv's and pip's) and an empty torch
extensions folder, as on a fresh machine: the ~3 GB of wheels come from the package index each time,
and DeepSpeed's CPU communication op is compiled each time (~30 s, the same in both). Prints each
run's seconds and the ratio pip / uv. Needs the network (or the index pip and uv are configured for).

    python bench/bench_bootstrap.py [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bootstrap_seconds(installer: str, work: Path) -> float:
    """Seconds of one ``scripts/bootstrap.sh`` into a new venv under ``work``, with empty caches."""
    env = {**os.environ, "TUNA_VENV": str(work / "venv"), "UV_CACHE_DIR": str(work / "uv-cache"),
           "PIP_NO_CACHE_DIR": "1", "TORCH_EXTENSIONS_DIR": str(work / "torch-ext")}
    if installer == "pip":
        env["TUNA_NO_UV"] = "1"
    else:
        env.pop("TUNA_NO_UV", None)
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "bootstrap.sh")], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"bootstrap with {installer} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    if installer == "uv" and "installing with pip" in proc.stderr:
        sys.exit("bootstrap fell back to pip: uv could not install here, so there is nothing to compare")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="runs of each installer, in alternating order")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"pip": [], "uv": []}
    for r in range(args.rounds):
        for installer in (("pip", "uv") if r % 2 == 0 else ("uv", "pip")):
            work = Path(tempfile.mkdtemp(prefix=f"tuna-bench-bootstrap-{installer}-"))
            try:
                times[installer].append(bootstrap_seconds(installer, work))
            finally:
                shutil.rmtree(work, ignore_errors=True)
            print(f"round {r + 1}: {installer} {times[installer][-1]:.1f} s", flush=True)
    pip, uv = min(times["pip"]), min(times["uv"])
    print("\n| installer | seconds (best of {}) |\n|---|---|\n| pip | {:.1f} |\n| uv | {:.1f} |".format(
        args.rounds, pip, uv))
    print(f"\nuv is {pip / uv:.2f}x faster than pip (pip / uv)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
