"""Train a TUNA model: connector pretraining, instruction tuning or LoRA, under deepspeed or torchrun.

    deepspeed train/train.py --deepspeed ds_configs/zero2.json --model_name_or_path lmsys/vicuna-7b-v1.5 \\
        --stage pretrain --template plain --data_path blip_laion_cc_sbu_558k.json --image_folder images \\
        --retrieval_cache tags.parquet --output_dir runs/stage1 --bf16 true ...

``python train/train.py --help`` lists every argument (HF TrainingArguments included). Ready-made
stage scripts are in ``scripts/`` (train_pretrain.sh, train_finetune.sh, train_lora.sh).

In-context tuning: ``--icl_pool POOL --icl_p 0.5 --icl_shots 1,2,4 [--icl_retriever siir]`` gives a share of the
LLaVA samples K retrieved demonstrations each, the loss on the sample's answer only (train/icl_tuning.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repo's `train` package, not this file, is `train`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoTokenizer, HfArgumentParser  # noqa: E402

from datastore.clip import ClipSpec  # noqa: E402
from common.log import error_line, setup_logging  # noqa: E402
from train.arguments import DataArguments, ModelArguments, TagArguments, TunaTrainingArguments  # noqa: E402
from train.data import LlavaJsonDataset, TrainCollator, WebDatasetSamples  # noqa: E402
from train.icl_tuning import ICLCountsCallback, ICLTuningDataset  # noqa: E402
from train.rename import NameRandomiser  # noqa: E402
from train.trainer import (  # noqa: E402
    CHECKPOINT_COMPLETE, CheckpointChanged, StopAfterSteps, TunaTrainer, verify_checkpoint)
from tuna.modeling_tuna import TunaForCausalLM  # noqa: E402
from tuna.processing_tuna import TunaProcessor  # noqa: E402
from tuna.tag_source import TagSource  # noqa: E402

logger = logging.getLogger("train")


def _dtype(args: TunaTrainingArguments) -> torch.dtype:
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def _random_init_device(args: TunaTrainingArguments) -> torch.device | None:
    """The GPU for a random-init LLM (fast init, no host copy), or None: CPU, or ZeRO-3 (it partitions)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return args.device if args.device.type == "cuda" and not is_deepspeed_zero3_enabled() else None


def _is_tuna_dir(path: str) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "tuna"


def random_init_llm(margs: ModelArguments, dtype: torch.dtype, device: torch.device | None = None):
    """The LLM of ``margs.model_name_or_path``'s config with random weights, built on ``device`` (None: CPU).

    Under ZeRO-3 transformers builds it inside ``deepspeed.zero.Init`` (partitioned as it is built), so a 7B
    shape never exists whole on one device; pass no device then.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(margs.model_name_or_path)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=margs.attn_implementation)


def build_model(margs: ModelArguments, targs: TagArguments, tokenizer, dtype: torch.dtype,
                device: torch.device | None = None) -> TunaForCausalLM:
    """A saved TUNA model (continued) or a new one around the LLM; stage settings applied.

    ``device``: where a random-init LLM (``--llm_random_init``) is built (None: CPU)."""
    tag_settings = {"max_tags": targs.max_tags, "tag_temperature": targs.tag_temperature,
                    "tag_score_prior": targs.tag_score_prior, "ablation": targs.ablation}
    if margs.connector_type == "mhub" and targs.ablation != "no_tags" and not _is_tuna_dir(margs.model_name_or_path):
        raise ValueError("--connector_type mhub reads no tags: add --ablation no_tags")
    if _is_tuna_dir(margs.model_name_or_path):
        model = TunaForCausalLM.from_pretrained(margs.model_name_or_path, dtype=dtype)
        for key, value in tag_settings.items():
            setattr(model.config, key, value)
    else:
        clip = ClipSpec(model=None if margs.clip_model_config else margs.clip_model, pretrained=margs.clip_pretrained,
                        model_config=margs.clip_model_config, precision=margs.clip_precision)
        llm = random_init_llm(margs, dtype, device) if margs.llm_random_init else margs.model_name_or_path
        model = TunaForCausalLM.from_components(
            llm, clip, tokenizer, dtype=dtype, attn_implementation=margs.attn_implementation,
            vision_feature_layer=margs.vision_feature_layer, connector_type=margs.connector_type,
            template=margs.template, tag_hidden_dim=margs.tag_hidden_dim, tag_num_heads=margs.tag_num_heads,
            tag_num_layers=margs.tag_num_layers, tag_queries=margs.tag_queries,
            tag_patch_positions=margs.tag_patch_positions, image_patch_positions=margs.image_patch_positions,
            weight_mode=margs.weight_mode, weight_scaling=margs.weight_scaling, mhub=margs.mhub_config(),
            **tag_settings)
        if margs.mhub_qformer:
            from tuna.mhub import load_blip2_qformer

            load_blip2_qformer(model.connector, margs.mhub_qformer)
    if margs.stage1_checkpoint:
        model.load_trainable(margs.stage1_checkpoint)
    model.set_llm_trainable(margs.stage == "finetune" and not margs.freeze_llm)
    if margs.freeze_llm_embeddings:
        model.get_input_embeddings().requires_grad_(False)
        model.get_output_embeddings().requires_grad_(False)
    if margs.stage == "lora":
        targets = margs.lora_target_modules
        model.enable_lora(r=margs.lora_r, alpha=margs.lora_alpha, dropout=margs.lora_dropout,
                          target_modules=targets if targets == "all-linear" else targets.split(","))
    return model


def build_dataset(dargs: DataArguments, processor: TunaProcessor, targs: TagArguments | None = None, seed: int = 0):
    datasets = []
    renamer = None
    if targs is not None and targs.rename_p > 0:
        if dargs.wds_shards:
            raise ValueError("--rename_p works on --data_path (LLaVA JSON) samples only")
        renamer = NameRandomiser.from_files(targs.rename_names, targs.rename_pool, targs.rename_p, seed)
        logger.info("renaming %d names to %d pool names in %.0f%% of the samples", len(renamer.names),
                    len(renamer.pool), 100 * renamer.p)
    icl = dargs.icl_settings(seed)
    if icl is not None and dargs.wds_shards:
        raise ValueError("--icl_pool works on --data_path (LLaVA JSON) samples only, not --wds_shards")
    if dargs.data_path and icl is not None:  # in-context tuning: a share of the samples get demos
        datasets.append(ICLTuningDataset(dargs.data_path, dargs.image_folder, processor, icl,
                                         dargs.on_bad_sample, renamer=renamer))
    elif dargs.data_path:
        datasets.append(LlavaJsonDataset(dargs.data_path, dargs.image_folder, processor, dargs.on_bad_sample,
                                         renamer=renamer))
    if dargs.wds_shards:
        datasets.append(WebDatasetSamples(dargs.wds_shards, processor, dargs.on_bad_sample))
    if len(datasets) > 1:
        raise ValueError("give either --data_path or --wds_shards, not both (run them as separate stages)")
    return datasets[0]


def build_tag_source(targs: TagArguments, model: TunaForCausalLM) -> TagSource:
    source = TagSource.for_model(model, ablation=targs.ablation, retrieval_cache=targs.retrieval_cache,
                                 datastore=targs.datastore, k_images=targs.k_images,
                                 min_support=targs.min_tag_support, seed=targs.random_tags_seed,
                                 exclude_self=targs.exclude_self, dedup_threshold=targs.dedup_threshold,
                                 random_vocabulary=targs.random_tags_vocab)
    if source is None:
        raise ValueError("tags need --retrieval_cache and/or --datastore (or --ablation no_tags)")
    return source


_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def last_complete_checkpoint(output_dir: str | Path) -> tuple[str | None, list[str]]:
    """The newest complete ``checkpoint-N`` in ``output_dir`` and the incomplete ones newer than it (newest first).

    Complete: it holds :data:`train.trainer.CHECKPOINT_COMPLETE`, written after every rank finished the save.
    In a folder where no checkpoint has the marker (saved before it existed), a checkpoint with
    ``trainer_state.json`` (the Trainer writes it last) counts as complete. A kill during a save leaves a
    newer, incomplete checkpoint: it is passed over (and named) instead of failing the resume.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None, []
    steps = sorted(((int(m.group(1)), p) for p in folder.iterdir()
                    if (m := _CHECKPOINT_DIR.match(p.name)) and p.is_dir()), reverse=True)
    marked = any((p / CHECKPOINT_COMPLETE).is_file() for _, p in steps)
    incomplete = []
    for _, path in steps:
        if (path / (CHECKPOINT_COMPLETE if marked else "trainer_state.json")).is_file():
            return str(path), incomplete
        incomplete.append(str(path))
    return None, incomplete


def resume_checkpoint(args: TunaTrainingArguments) -> str | None:
    """The checkpoint ``--resume`` continues from (None: start fresh), its files verified unless told not to.

    The newest complete checkpoint (:func:`last_complete_checkpoint`); with ``--verify_checkpoint`` (default) the
    main process checks its files against the sha256 recorded at save time
    (:func:`train.trainer.verify_checkpoint`) before anything is loaded, and every rank stops with the same
    one-line error when one changed or is missing. Checkpoint ``.pt`` files are pickles: DeepSpeed loads them
    with ``weights_only=False``, so a replaced file would run code. The check covers files replaced after the
    save, not a folder crafted together with a matching marker.
    """
    resume, incomplete = last_complete_checkpoint(args.output_dir)
    if incomplete:
        logger.warning("skipped incomplete checkpoint(s) %s (a save was interrupted; they are overwritten "
                       "when training reaches their step)", ", ".join(incomplete))
    if resume is not None and args.verify_checkpoint:
        error, verified = None, False
        if args.process_index == 0:
            try:
                verified = verify_checkpoint(resume)
            except (CheckpointChanged, OSError) as exc:
                error = str(exc)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            shared = [error, verified]
            torch.distributed.broadcast_object_list(shared, src=0)
            error, verified = shared
        if error is not None:
            raise CheckpointChanged(error)
        if verified:
            logger.info("checkpoint %s: every file matches the sha256 recorded when it was saved", resume)
        else:
            logger.warning("checkpoint %s records no file hashes (saved before tuna recorded them, or with "
                           "--verify_checkpoint false): resuming unverified", resume)
    logger.info("resuming from %s", resume or f"nothing (no complete checkpoint in {args.output_dir}): "
                "starting fresh")
    return resume


def run(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser((ModelArguments, DataArguments, TagArguments, TunaTrainingArguments))
    margs, dargs, targs, args = parser.parse_args_into_dataclasses(args=argv)
    setup_logging()
    transformers.utils.logging.set_verbosity_warning()
    timings, start = {}, time.perf_counter()
    _ = args.device  # sets up the process group now: ZeRO-3 partitions the LLM while it loads
    if args.deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=args.ddp_backend or ("gloo" if args.use_cpu else "nccl"))
        unlink_shm_allreduce_buffer_after_init()
    resume = resume_checkpoint(args) if args.resume else None  # checked before anything is loaded
    transformers.set_seed(args.seed)  # the new connector / tag encoder weights are seeded too
    tokenizer = AutoTokenizer.from_pretrained(margs.tokenizer_name_or_path or margs.model_name_or_path)
    model = build_model(margs, targs, tokenizer, _dtype(args), _random_init_device(args))
    processor = TunaProcessor.from_model(model, tokenizer, tag_source=build_tag_source(targs, model),
                                         max_length=dargs.max_length)
    dataset = build_dataset(dargs, processor, targs, args.seed)
    timings["setup_s"] = time.perf_counter() - start
    args.remove_unused_columns = False  # the batch carries tags and skip records the model consumes
    callbacks = [StopAfterSteps(args.stop_after_steps)] if args.stop_after_steps else []
    if isinstance(dataset, ICLTuningDataset):
        callbacks.append(ICLCountsCallback(dataset))
    trainer = TunaTrainer(model=model, args=args, train_dataset=dataset, data_collator=TrainCollator(processor),
                          processing_class=tokenizer, stage=margs.stage,
                          group_by_modality_length=dargs.group_by_modality_length, callbacks=callbacks or None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("stage %s: %d trainable parameters; %s samples", margs.stage, trainable,
                len(dataset) if hasattr(dataset, "__len__") else "streamed")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    timings["train_s"] = time.perf_counter() - start
    if args.stop_after_steps and trainer.state.global_step >= args.stop_after_steps:
        logger.info("stopped after %d steps (--stop_after_steps); no final export", trainer.state.global_step)
        return 0
    start = time.perf_counter()
    trainer.save_state()
    trainer.save_model(args.output_dir)
    timings["export_s"] = time.perf_counter() - start
    if args.should_save:
        logger.info("final model in %s; timings %s", args.output_dir,
                    " ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    return 0


def _shm_allreduce_buffer() -> Path:
    """This rank's DeepSpeed CPU shared-memory allreduce buffer (``/dev/shm``, ~65 MB; it may not exist)."""
    name = "_".join(["deepspeed_allreduce_buffer", str(os.getuid()), os.environ.get("MASTER_ADDR", ""),
                     os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "0")])
    return Path("/dev/shm") / name


def remove_shm_allreduce_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory allreduce buffer (``/dev/shm``, ~65 MB), if still there.

    DeepSpeed's CPU backend creates ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` when all ranks
    share a machine (the launcher's ``LOCAL_SIZE`` equals the world size) and never removes it, so every CPU run
    would leave its buffers in RAM. The mappings stay valid until exit once the name is gone.
    """
    _shm_allreduce_buffer().unlink(missing_ok=True)


def unlink_shm_allreduce_buffer_after_init() -> None:
    """Unlink this rank's shm allreduce buffer right after ``deepspeed.init_distributed``: no exit path leaves it.

    DeepSpeed's ``shm_initialize`` (ops/csrc/cpu/comm/shm.cpp) creates this rank's buffer and then maps every
    peer's by name, once, inside ``init_distributed``; a barrier after it means every rank has mapped every
    buffer, so the names can go while the memory stays shared until the processes exit. Exceptions, Ctrl-C,
    the launcher's SIGTERM of the surviving ranks after one failed and ``kill -9`` then free it with the
    process. Only a kill between init and this barrier leaves the files
    (``rm /dev/shm/deepspeed_allreduce_buffer_*``).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    remove_shm_allreduce_buffer()


def main(argv: list[str] | None = None) -> int:
    try:
        code = run(argv)
    except (ValueError, OSError, RuntimeError, KeyError) as exc:
        # one write: print's separate newline write lets another rank's line land in between (unbuffered stderr)
        sys.stderr.write(f"train: error: {error_line(exc)}\n")
        sys.stderr.flush()
        code = 1
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        remove_shm_allreduce_buffer()
        # Rarely a rank aborts in interpreter teardown after finishing (C++ destructors of DeepSpeed /
        # gloo threads: "terminate called ..."); everything is written and closed by now, so skip it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
