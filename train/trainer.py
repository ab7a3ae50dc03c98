"""TunaTrainer: HF Trainer with stage-1 partial saves, modality grouping, skip counting and tokens/s logging."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from common.files import sha256_file
from train.data import ModalityLengthGroupedSampler, count_tokens
from tuna.modeling_tuna import TRAINABLE_FILE, TRAINABLE_PREFIXES

logger = logging.getLogger(__name__)

# Written into ``checkpoint-N`` last, once every rank has finished its part of the save: a checkpoint without it
# was interrupted while being written (train/train.py's --resume then takes the newest one that has it).
CHECKPOINT_COMPLETE = "tuna_checkpoint_complete.json"


class TunaTrainer(Trainer):
    """Trainer for TunaForCausalLM.

    Args:
        stage: "pretrain" saves only the connector and tag encoder (``tuna_trainable.safetensors``
            plus config); other stages save a full ``from_pretrained`` directory.
        group_by_modality_length: use :class:`train.data.ModalityLengthGroupedSampler`.
    """

    def __init__(self, *args: Any, stage: str = "finetune", group_by_modality_length: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stage, self.group_by_modality_length = stage, group_by_modality_length
        self._tokens = self._samples = self._skipped = 0
        self._last_log: float | None = None  # set at the first step: setup time is not throughput
        self._config = self.model.config
        self.add_callback(CheckpointCompleteMarker())

    def create_optimizer(self):
        """The Trainer's optimizer; with ``mm_projector_lr`` the multimodal modules get their own rate."""
        if self.optimizer is not None or self.args.mm_projector_lr is None:
            return super().create_optimizer()
        decay = set(self.get_decay_parameter_names(self.model))
        groups: dict[tuple[bool, bool], list] = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                groups.setdefault((name.startswith(TRAINABLE_PREFIXES), name in decay), []).append(param)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        self.optimizer = optimizer_cls(
            [{"params": params, "weight_decay": self.args.weight_decay if decayed else 0.0,
              **({"lr": self.args.mm_projector_lr} if multimodal else {})}
             for (multimodal, decayed), params in sorted(groups.items())], **kwargs)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.group_by_modality_length and hasattr(dataset, "lengths"):
            return ModalityLengthGroupedSampler(
                dataset.lengths(), self.args.train_batch_size * self.args.gradient_accumulation_steps,
                self.args.world_size, seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._last_log is None:
            self._last_log = time.perf_counter()
        skipped = inputs.pop("skipped", [])
        if skipped:
            self._record_skipped(skipped)
        self._tokens += count_tokens(inputs, self._config)
        self._samples += int(inputs["input_ids"].shape[0])
        inputs["loss_only"] = not return_outputs  # LM head at the answer tokens only: no (B, L, V) logits
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def _record_skipped(self, skipped: list[dict]) -> None:
        self._skipped += len(skipped)
        path = Path(self.args.output_dir) / f"skipped_samples.rank{self.args.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for item in skipped:
                f.write(json.dumps(item) + "\n")
        logger.warning("skipped %d bad sample(s), e.g. %s", len(skipped), skipped[0]["reason"])

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # per-step training logs: every rank is here at the same step
            # NCCL reduces device tensors only; gloo (CPU runs) host tensors
            on_gpu = torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl"
            device = self.args.device if on_gpu else "cpu"
            counts = torch.tensor([self._tokens, self._samples, self._skipped], dtype=torch.float64, device=device)
            peak = torch.tensor([_peak_memory_mb()], dtype=torch.float64, device=device)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)
                torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
            logs["peak_memory_mb"] = round(float(peak[0]), 1)  # the largest rank's
            now = time.perf_counter()
            seconds = max(now - (self._last_log or now), 1e-9)
            logs["tokens_per_second"] = round(float(counts[0]) / seconds, 2)
            logs["samples_per_second"] = round(float(counts[1]) / seconds, 3)
            logs["skipped_samples"] = int(counts[2])
            self._tokens = self._samples = 0
            self._last_log = now
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.stage != "pretrain":
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if not self.args.should_save:
            return
        # Under ZeRO-3 every rank calls this with save_model's consolidated state dict, which only rank 0
        # holds; gathering partitions here would be a collective on rank 0 alone (a hang).
        if not state_dict:
            if any(hasattr(p, "ds_id") for p in model.parameters()):
                raise RuntimeError("stage pretrain under ZeRO-3 saves consolidated weights: set "
                                   "stage3_gather_16bit_weights_on_model_save to true in the DeepSpeed config")
            state_dict = model.trainable_state_dict()
        from safetensors.torch import save_file

        os.makedirs(output_dir, exist_ok=True)
        trainable = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k.startswith(TRAINABLE_PREFIXES)}
        save_file(trainable, os.path.join(output_dir, TRAINABLE_FILE),
                  metadata={"connector_type": model.config.connector_type, "weights_of": "connector+tag_encoder"})
        model.config.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        logger.info("stage-1 checkpoint (connector + tag encoder) written to %s", output_dir)


def _peak_memory_mb() -> float:
    """Peak device memory (CUDA: max allocated) or, on CPU, the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class CheckpointCompleteMarker(TrainerCallback):
    """Mark ``checkpoint-N`` complete (:data:`CHECKPOINT_COMPLETE`) after the Trainer has written all of it.

    ``on_save`` runs after the Trainer's checkpoint save (model, optimizer / DeepSpeed states, RNG states,
    trainer_state.json) on every rank; a barrier waits for the other ranks' files, then the main process
    writes the marker (atomically: a temporary file renamed). The marker records the sha256 of every file in
    the checkpoint (:func:`checkpoint_hashes`); ``--resume`` checks them before anything is loaded
    (:func:`verify_checkpoint`), because the checkpoint's ``.pt`` files are pickles that DeepSpeed loads with
    ``weights_only=False``.

    Only the main process hashes, and it records the files it sees: ZeRO's per-rank files of a single-machine
    run all sit in the same folder, and so do a multi-node run's on a shared file system; on per-node disks the
    other nodes' files are absent here and go unrecorded. Cost: one read of the checkpoint (a 7B finetune
    checkpoint with its optimizer states is ~100 GB: a minute or two on fast disks, files hashed in parallel)
    while the other ranks wait at their next collective; ``--verify_checkpoint false`` skips hashing here and
    the check on resume.
    """

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            marker = {"global_step": state.global_step, "time": time.time()}
            if getattr(args, "verify_checkpoint", True):
                marker["sha256"] = checkpoint_hashes(folder)
            tmp = folder / (CHECKPOINT_COMPLETE + ".tmp")
            tmp.write_text(json.dumps(marker, indent=1) + "\n")
            os.replace(tmp, folder / CHECKPOINT_COMPLETE)
        return control


def _checkpoint_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative POSIX paths, sorted), the completion marker excluded."""
    skip = {CHECKPOINT_COMPLETE, CHECKPOINT_COMPLETE + ".tmp"}
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(folder).as_posix() not in skip)


def checkpoint_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (keys: paths relative to it), the completion marker excluded."""
    folder = Path(folder)
    return _hash_files(folder, _checkpoint_files(folder))


def _hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(names)))) as pool:
        # 16 MiB chunks: hashlib releases the GIL on large chunks, so the threads hash in parallel
        return dict(zip(names, pool.map(lambda name: sha256_file(str(folder / name), chunk=1 << 24), names)))


class CheckpointChanged(ValueError):
    """A checkpoint's files differ from the hashes its completion marker recorded at save time."""


def verify_checkpoint(folder: str | Path) -> bool:
    """Check ``folder``'s files against the sha256 its :data:`CHECKPOINT_COMPLETE` marker recorded at save time.

    Raises :class:`CheckpointChanged` (a one-line message) naming the first file (sorted) that is missing,
    changed, or was not there at save time. Returns False, checking nothing, when the marker is absent or
    records no hashes (saved before tuna recorded them, or with ``--verify_checkpoint false``), True when
    every file matches. Reads the whole checkpoint (see :class:`CheckpointCompleteMarker` for the cost).
    This guards against files replaced after the save; a folder crafted with a matching marker passes.
    """
    folder = Path(folder)
    marker = folder / CHECKPOINT_COMPLETE
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text()).get("sha256")
    except (ValueError, AttributeError) as exc:
        raise CheckpointChanged(f"checkpoint {folder}: unreadable {CHECKPOINT_COMPLETE} ({exc})") from None
    if recorded is None:
        return False
    if not isinstance(recorded, dict):
        raise CheckpointChanged(f"checkpoint {folder}: {CHECKPOINT_COMPLETE} has no valid sha256 table")
    present = set(_checkpoint_files(folder))
    hashes = _hash_files(folder, sorted(present & set(recorded)))
    for name in sorted(set(recorded) | present):
        path = folder / name
        if name not in present:
            problem = "is missing"
        elif name not in recorded:
            problem = "was not there when the checkpoint was saved"
        elif hashes[name] != recorded[name]:
            problem = "changed since the checkpoint was saved (sha256 differs)"
        else:
            continue
        raise CheckpointChanged(f"checkpoint {folder}: {path} {problem}; refusing to resume (its .pt files are "
                                "pickles that run code when loaded; --verify_checkpoint false skips this check)")
    return True


class StopAfterSteps(TrainerCallback):
    """Stop training after ``steps`` optimizer steps (simulates an interruption in tests)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if self.steps and state.global_step >= self.steps:
            control.should_training_stop = True
        return control
