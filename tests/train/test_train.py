"""train/train.py end to end: 2-process DeepSpeed (gloo, CPU) runs of ZeRO-2 / ZeRO-3 / ZeRO-3 offload; the trainer."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.conftest import common_args, launch, log_history, step_losses
from tuna.modeling_tuna import TRAINABLE_FILE, TunaForCausalLM


def check(run) -> None:
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])


@pytest.fixture(scope="module")
def zero2_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "out"
    check(launch(common_args(world, out)))
    return out


def generate_one(model_dir, world) -> torch.Tensor:
    from transformers import AutoTokenizer

    from datastore.cache import RetrievalCache
    from tuna.processing_tuna import TunaProcessor
    from tuna.tag_source import TagSource

    model = TunaForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    record = json.loads(open(world["instruct"]).read())[0]
    proc = TunaProcessor.from_model(model, tokenizer, tag_source=TagSource(cache=RetrievalCache(world["cache"])))
    batch = proc(["What objects are in the image?"], images=[[world["images"] / record["image"]]],
                 image_ids=[[record["image"]]])
    assert batch["tags"][0], "the retrieval cache should give tags"
    return model.generate(**batch, max_new_tokens=4)


def test_zero2_finetune_loss_decreases_checkpoints_and_export(zero2_run, world):
    losses = step_losses(zero2_run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.5
    logs = [e for e in log_history(zero2_run) if "loss" in e]
    assert all(e["tokens_per_second"] > 0 and e["samples_per_second"] > 0 and e["skipped_samples"] == 0 for e in logs)
    assert (zero2_run / "checkpoint-3").is_dir() and (zero2_run / "checkpoint-6").is_dir()
    assert (zero2_run / "model.safetensors").is_file()
    tokens = generate_one(zero2_run, world)
    assert tokens.shape[0] == 1 and 1 <= tokens.shape[1] <= 4


def test_resume_matches_the_uninterrupted_run(zero2_run, world, tmp_path):
    out = tmp_path / "out"
    check(launch(common_args(world, out, stop_after_steps=3)))
    assert (out / "checkpoint-3").is_dir() and not (out / "model.safetensors").exists()
    check(launch(common_args(world, out, resume=True)))
    resumed, uninterrupted = step_losses(out), step_losses(zero2_run)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert resumed[step] == pytest.approx(uninterrupted[step], abs=1e-4), step


def test_stage1_zero2_then_stage2_zero3_hand_off(world, tmp_path):
    stage1 = tmp_path / "stage1"
    check(launch(common_args(world, stage1, stage="pretrain", template="plain", data_path=world["pretrain"],
                             max_steps=3)))
    assert (stage1 / TRAINABLE_FILE).is_file() and not (stage1 / "model.safetensors").exists()
    assert all(torch.isfinite(torch.tensor(v)) for v in step_losses(stage1).values())
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, set_seed

    from datastore.clip import ClipSpec

    trained = load_file(str(stage1 / TRAINABLE_FILE))
    assert {k.split(".")[0] for k in trained} == {"connector", "tag_encoder"}
    set_seed(0)  # the same initialisation as train.py's: training must have moved every tensor
    initial = TunaForCausalLM.from_components(str(world["llm"]), ClipSpec(model="tuna-tiny-clip"),
                                              AutoTokenizer.from_pretrained(world["llm"]), tag_hidden_dim=32,
                                              tag_num_heads=2, max_tags=5).trainable_state_dict()
    assert set(initial) == set(trained)
    assert not torch.equal(initial["connector.0.weight"], trained["connector.0.weight"])
    assert not torch.equal(initial["tag_encoder.text_proj.weight"], trained["tag_encoder.text_proj.weight"])
    stage2 = tmp_path / "stage2"  # lr 0: the exported connector must be exactly the stage-1 one
    check(launch(common_args(world, stage2, stage1_checkpoint=stage1, max_steps=2, save_steps=2,
                             learning_rate=0.0), deepspeed_config="zero3.json"))
    exported = TunaForCausalLM.from_pretrained(stage2)
    state = exported.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_lora_run_with_zero3_offload(world, tmp_path):
    out = tmp_path / "lora"
    check(launch(common_args(world, out, stage="lora", lora_r=4, lora_alpha=8, max_steps=3, save_steps=3),
                 deepspeed_config="zero3_offload.json"))
    losses = step_losses(out)
    assert losses[3] < losses[1]
    model = TunaForCausalLM.from_pretrained(out)
    assert model.config.lora["r"] == 4
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in model.state_dict().items())
    assert generate_one(out, world).shape[0] == 1


def test_torchrun_ddp_without_deepspeed(world, tmp_path):
    # plain DDP (gloo): every trainable module is used in every step, so DDP's reducer stays in step
    out = tmp_path / "ddp"
    # (with --freeze_llm_embeddings: the LLM trains, its input embeddings and LM head stay as loaded;
    # with --tag_score_prior the batches carry the cache's tag scores into the weights; --rename_p
    # permutes the seen names on the LLM side, train/rename.py)
    names, categories = tmp_path / "seen.txt", json.loads((world["data_root"] / "world.json").read_text())["categories"]
    seen = [c["name"] for c in categories if c["novelty"] == "seen"]
    names.write_text("\n".join(seen))
    run = launch(common_args(world, out, max_steps=2, save_steps=2, ddp_find_unused_parameters="false",
                             freeze_llm_embeddings="true", tag_score_prior=0.5, rename_p=0.5, rename_names=names,
                             rename_pool=names), deepspeed_config=None, launcher="torchrun")
    check(run)
    assert f"renaming {len(seen)} names to {len(seen)} pool names in 50% of the samples" in run.stdout + run.stderr
    assert sorted(step_losses(out)) == [1, 2]
    from transformers import AutoModelForCausalLM

    model, llm = TunaForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(world["llm"])
    assert model.config.model_type == "tuna" and model.config.tag_score_prior == 0.5
    assert torch.equal(model.get_input_embeddings().weight, llm.get_input_embeddings().weight)
    assert torch.equal(model.get_output_embeddings().weight, llm.get_output_embeddings().weight)
    assert not torch.equal(model.language_model.model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)


def test_mm_projector_lr_and_no_shm_buffers_left(world, tmp_path):
    # --learning_rate 0 with --mm_projector_lr: only the multimodal modules may move
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from datastore.clip import ClipSpec
    from tests.train.conftest import free_port

    out, port = tmp_path / "mmlr", free_port()
    check(launch(common_args(world, out, max_steps=2, save_steps=2, learning_rate=0.0, mm_projector_lr=3e-3),
                 master_port=port))
    model, llm = TunaForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(world["llm"])
    assert torch.equal(model.language_model.model.layers[0].mlp.up_proj.weight, llm.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.get_input_embeddings().weight, llm.get_input_embeddings().weight)
    set_seed(0)
    initial = TunaForCausalLM.from_components(str(world["llm"]), ClipSpec(model="tuna-tiny-clip"),
                                              AutoTokenizer.from_pretrained(world["llm"]), tag_hidden_dim=32,
                                              tag_num_heads=2, max_tags=5).trainable_state_dict()
    trained = model.trainable_state_dict()
    assert not torch.equal(initial["connector.0.weight"], trained["connector.0.weight"])
    assert not torch.equal(initial["tag_encoder.text_proj.weight"], trained["tag_encoder.text_proj.weight"])
    # DeepSpeed's CPU allreduce buffers of this run (named by its port) are gone from /dev/shm
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def test_trainer_asks_for_the_loss_only_when_it_returns_no_outputs(tmp_path):
    from types import SimpleNamespace

    from train.arguments import TunaTrainingArguments
    from train.trainer import TunaTrainer

    class Spy(torch.nn.Module):
        config = SimpleNamespace(num_image_tokens=1, ablation="no_tags")

        def __init__(self) -> None:
            super().__init__()
            self.w, self.calls = torch.nn.Parameter(torch.ones(())), []

        def forward(self, input_ids, attention_mask, labels, loss_only=False, **kwargs):
            self.calls.append(loss_only)
            return {"loss": self.w * 2.0, "logits": None if loss_only else torch.zeros(1, 2, 5)}

    model = Spy()
    trainer = TunaTrainer(model=model, args=TunaTrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                                                                  report_to="none"))
    batch = {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "labels": torch.ones(1, 2, dtype=torch.long)}
    assert trainer.compute_loss(model, dict(batch)).item() == 2.0
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    assert model.calls == [True, False] and outputs["logits"].shape == (1, 2, 5)


def test_a_killed_run_leaves_no_shm_allreduce_buffer(world, tmp_path):
    """Issue 27 item 8: every rank unlinks its /dev/shm allreduce buffer's name right after init, so even
    ``kill -9`` of the whole run mid-training (no cleanup code runs) leaves none of its buffers."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tests.train.conftest import REPO, free_port

    out, port = tmp_path / "killed", free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           str(REPO / "train" / "train.py"), "--deepspeed", str(REPO / "ds_configs" / "zero2.json"),
           *common_args(world, out, max_steps=50, save_steps=1)]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 540
        while not (out / "checkpoint-1").is_dir():  # training is under way: init long over
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or never saved"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
