"""Helpers for training tests: launch train/train.py (deepspeed / torchrun / python) and read its logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def common_args(world: dict, out: Path, **overrides) -> list[str]:
    """train.py arguments for a few tiny CPU steps (override or add with keyword arguments)."""
    args = {
        "model_name_or_path": world["llm"], "clip_model": "tuna-tiny-clip", "clip_pretrained": "none",
        "data_path": world["instruct"], "image_folder": world["images"], "retrieval_cache": world["cache"],
        "output_dir": out, "per_device_train_batch_size": 2, "max_steps": 6, "learning_rate": 3e-3,
        "logging_steps": 1, "save_steps": 3, "save_strategy": "steps", "report_to": "none", "use_cpu": "true",
        "tag_hidden_dim": 32, "tag_num_heads": 2, "max_tags": 5, "seed": 0, "dataloader_num_workers": 0,
        "lr_scheduler_type": "constant", "template": "vicuna_v1", "disable_tqdm": "true",
    }
    args.update(overrides)
    argv = []
    for key, value in args.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if value is not True:
            argv.append(str(value))
    return argv


def launch(argv: list[str], deepspeed_config: str | None = "zero2.json", nproc: int = 2,
           timeout: int = 600, launcher: str = "deepspeed", master_port: int | None = None
           ) -> subprocess.CompletedProcess:
    """Run train/train.py under the deepspeed launcher or torchrun (``nproc`` CPU processes), or plain python.

    ``deepspeed_config=None`` with the deepspeed launcher means plain python (one process).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    script = str(REPO / "train" / "train.py")
    ds_args = [] if deepspeed_config is None else ["--deepspeed", str(REPO / "ds_configs" / deepspeed_config)]
    bindir = Path(sys.executable).parent
    port = str(master_port or free_port())
    if launcher == "torchrun":
        cmd = [str(bindir / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", port,
               script, *ds_args, *argv]
    elif deepspeed_config is None:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, script, *argv]
    else:
        cmd = [str(bindir / "deepspeed"), "--num_gpus", str(nproc), "--master_port", port, script,
               *ds_args, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))


def log_history(out: Path) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def step_losses(out: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in log_history(out) if "loss" in e}


def tiny_processor(world, max_length: int):
    """A tiny TUNA model's processor reading the world's retrieval cache."""
    from transformers import AutoTokenizer

    from datastore.cache import RetrievalCache
    from datastore.clip import ClipSpec
    from tuna.modeling_tuna import TunaForCausalLM
    from tuna.processing_tuna import TunaProcessor
    from tuna.tag_source import TagSource

    tokenizer = AutoTokenizer.from_pretrained(world["llm"])
    model = TunaForCausalLM.from_components(str(world["llm"]), ClipSpec(model="tuna-tiny-clip"), tokenizer,
                                            tag_hidden_dim=32, tag_num_heads=2, max_tags=5)
    return TunaProcessor.from_model(model, tokenizer, tag_source=TagSource(cache=RetrievalCache(world["cache"])),
                                    max_length=max_length)
