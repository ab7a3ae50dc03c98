"""Stage-1 partial save/load with ZeRO-3-partitioned parameters (one gloo process, DeepSpeed on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stage1_save_and_load_gather_zero3_partitions(tiny_llm_dir, tiny_tokenizer_dir, tmp_path):
    script = Path(__file__).with_name("zero3_partial_save.py")
    env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run([sys.executable, str(script), str(tiny_llm_dir), str(tiny_tokenizer_dir), str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"partitioned": True, "gathered_equal": True, "differs_before_load": True, "loaded_equal": True}
