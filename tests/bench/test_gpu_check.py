"""scripts/gpu_check.sh in its CPU dry mode: stages run, a failing stage is recorded and the next one still runs,
and summary.json / summary.md carry every section."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_records_every_stage_and_writes_the_summary(tmp_path):
    # a python that fails the PIL-decode build run at once: the failure must be recorded and the next stage run
    shim = tmp_path / "python"
    shim.write_text(f'#!/usr/bin/env bash\n'
                    f'if [[ "$*" == *bench_build.py* && "$*" != *--decode-device* ]]; then\n'
                    f'  echo "planted failure" >&2; exit 3\nfi\nexec {sys.executable} "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DEVICE": "cpu", "PYTHON": str(shim),
           "GPU_CHECK_STAGES": "probe,build_workers,build_gpu_decode"}
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"device", "mode", "commit", "started", "total_s", "stages", "build", "train", "quickstart",
            "goals"} <= set(summary)
    stages = summary["stages"]
    assert list(stages) == ["probe", "build_workers", "build_gpu_decode", "train_pretrain", "quickstart",
                            "train_finetune"]
    assert stages["probe"]["status"] == "ok" and summary["device"] == "cpu" and summary["mode"] == "cpu"
    assert stages["build_workers"]["status"] == "failed" and stages["build_workers"]["rc"] == 3
    assert stages["build_workers"]["reason"] == "planted failure"
    assert stages["build_gpu_decode"]["status"] == "ok"
    assert all(stages[s]["status"] == "skipped" for s in ("train_pretrain", "quickstart", "train_finetune"))
    build = summary["build"]["build_gpu_decode"]
    assert build["decode_device"] == "cpu" and build["images"] == 128 and build["photo_size"] == 160
    assert build["build_img_s"] > 0 and build["encoder_img_s"] > 0 and build["ratio"] > 0
    assert {"read", "tag", "decode", "encode", "write"} <= set(build["stages_s"])
    assert summary["build"]["build_workers"] is None and summary["train"] == {"train_pretrain": None,
                                                                              "train_finetune": None}
    assert summary["goals"]["build_ratio"] == build["ratio"] and summary["goals"]["mfu"] is None
    assert summary["goals"]["quickstart_completed"] is None
    md = (out / "summary.md").read_text()
    assert "| build_workers | failed |" in md and "| build_gpu_decode | tuna-tiny-clip |" in md
    assert (out / "build_workers.log").read_text().strip().endswith("planted failure")
    assert seconds < 120, f"the dry run took {seconds:.0f} s"
