"""Training-step time of the loss-only forward (LM head at the answer tokens only) against the full one.

``TunaTrainer`` calls the model with ``loss_only=True``: the LM head and the cross-entropy run at the
labelled positions only, not over the (B, L, V) logits of every position. The loss and the gradients
are the same (tests/tuna/test_modeling_tuna.py). This measures what that saves on the quickstart's own
TUNA stage-2 model and instruction batches (``--quickstart``, a finished ``tuna quickstart --out``
directory): the model and data are built by ``train/train.py``'s own functions from the quickstart's
stage-2 command, without DeepSpeed, in one process. Each round times one forward + backward of each
variant on the same batch (order alternating), so drift and other load hit both alike; the optimizer
step is excluded. CPU time of this process with one torch thread by default.

    python bench/bench_loss_only.py --quickstart runs/qs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def quickstart_parts(root: Path):
    """The quickstart's TUNA stage-2 model (train mode) and its training collator and dataset."""
    from transformers import AutoTokenizer, HfArgumentParser

    from pipeline.quickstart import Paths, recorded_config, train_command
    from train.arguments import DataArguments, ModelArguments, TagArguments, TunaTrainingArguments
    from train.data import TrainCollator
    from train.train import build_dataset, build_model, build_tag_source
    from tuna.processing_tuna import TunaProcessor

    cmd = train_command(recorded_config(root), Paths(root), "tuna", 2)
    argv = cmd[cmd.index("train.train") + 1:]
    drop = argv.index("--deepspeed")
    argv = argv[:drop] + argv[drop + 2:] + ["--output_dir", "/tmp/unused"]
    parser = HfArgumentParser((ModelArguments, DataArguments, TagArguments, TunaTrainingArguments))
    margs, dargs, targs, _ = parser.parse_args_into_dataclasses(args=argv)
    tokenizer = AutoTokenizer.from_pretrained(margs.tokenizer_name_or_path or margs.model_name_or_path)
    model = build_model(margs, targs, tokenizer, torch.float32).train()
    processor = TunaProcessor.from_model(model, tokenizer, tag_source=build_tag_source(targs, model),
                                         max_length=dargs.max_length)
    return model, TrainCollator(processor), build_dataset(dargs, processor, targs)


def step_seconds(model, batch: dict, loss_only: bool, clock) -> tuple[float, float]:
    """Seconds of one forward + backward, and the loss."""
    model.zero_grad(set_to_none=True)
    start = clock()
    loss = model(**batch, loss_only=loss_only).loss
    loss.backward()
    return clock() - start, loss.item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", type=Path, required=True, help="a finished `tuna quickstart --out` directory")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per step (the quickstart's: 8)")
    parser.add_argument("--batches", type=int, default=20, help="distinct batches, each timed once per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="process CPU time or wall time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, collate, dataset = quickstart_parts(args.quickstart.resolve())
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {False: [], True: []}
    labelled, positions = [], []
    for i in range(args.batches + 1):  # the first batch warms up
        batch = collate([dataset[j] for j in range(i * args.batch_size, (i + 1) * args.batch_size)])
        batch.pop("skipped", None)
        losses = {}
        for loss_only in ((False, True) if i % 2 else (True, False)):
            seconds, losses[loss_only] = step_seconds(model, batch, loss_only, clock)
            if i:
                times[loss_only].append(seconds)
        if abs(losses[True] - losses[False]) > 1e-4 * max(1.0, abs(losses[False])):
            raise RuntimeError(f"batch {i}: loss-only loss {losses[True]} != full loss {losses[False]}")
        with torch.no_grad():
            prepared = model.prepare_inputs(**batch, padding_side="right")
        labelled.append(int((prepared.labels[:, 1:] != -100).sum()))
        positions.append(int(prepared.labels[:, 1:].numel()))
    full, only = statistics.median(times[False]), statistics.median(times[True])
    vocab = model.config.text_config.vocab_size
    print(f"{args.quickstart}: TUNA stage 2, vocab {vocab}, hidden {model.config.text_config.hidden_size}, "
          f"batch {args.batch_size}: {statistics.mean(positions):.0f} positions per batch, "
          f"{statistics.mean(labelled):.0f} labelled; {args.threads} thread(s), {args.clock} clock, "
          f"{args.batches} batches")
    print("| forward | step ms median | step ms min | ratio (median) | logits MB per batch |")
    print("|---|---|---|---|---|")
    for name, key, rows in (("full logits", False, statistics.mean(positions)),
                            ("loss only", True, statistics.mean(labelled))):
        t = statistics.median(times[key])
        print(f"| {name} | {t * 1e3:.0f} | {min(times[key]) * 1e3:.0f} | {t / full:.3f} | {rows * vocab * 4 / 2**20:.1f} |")
    print(f"loss-only / full step time (median): {only / full:.3f}; speed-up {full / only:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
