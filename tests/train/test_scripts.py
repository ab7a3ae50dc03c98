"""scripts/train_pretrain.sh -> scripts/train_finetune.sh on the tiny world (2 CPU processes, tensorboard)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.train.conftest import REPO, free_port, step_losses
from tuna.modeling_tuna import TRAINABLE_FILE, TunaForCausalLM

# CPU-sized overrides of the scripts' GPU defaults (later arguments win)
CPU_ARGS = ["--use_cpu", "true", "--bf16", "false", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--dataloader_num_workers", "0", "--tag_hidden_dim", "32", "--tag_num_heads", "2", "--save_steps", "2",
            "--disable_tqdm", "true"]


def run_script(name: str, world: dict, out, extra: list[str] = (), **env) -> None:
    env = {**os.environ, "NGPUS": "2", "MASTER_PORT": str(free_port()), "LLM": str(world["llm"]),
           "CLIP": "tuna-tiny-clip", "CLIP_PRETRAINED": "none", "IMAGES": str(world["images"]),
           "CACHE": str(world["cache"]), "OUT": str(out), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env}
    run = subprocess.run(["bash", str(REPO / "scripts" / name), *CPU_ARGS, *extra], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]


def test_stage_scripts_hand_off_with_gradient_checkpointing_and_tensorboard(world, tmp_path):
    stage1 = tmp_path / "stage1"
    run_script("train_pretrain.sh", world, stage1, DATA=world["pretrain"])
    assert (stage1 / TRAINABLE_FILE).is_file()
    assert list(stage1.rglob("events.out.tfevents.*")), "tensorboard event files expected"
    final = tmp_path / "final"
    run_script("train_finetune.sh", world, final, DATA=world["instruct"], STAGE1=str(stage1))
    assert sorted(step_losses(final)) == [1, 2]
    model = TunaForCausalLM.from_pretrained(final)
    assert model.config.template == "vicuna_v1" and model.config.lora is None
