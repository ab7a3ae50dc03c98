"""Train Lever-LM on D_M (next-demo cross-entropy), in one process or data parallel through accelerate.

    python -m icl.lever_lm.train --data dm/vqav2 --out lever-lm/vqav2
    accelerate launch [--config_file deepspeed.yaml] -m icl.lever_lm.train --data dm/a dm/b --out lever-lm/ab
    torchrun --nproc_per_node 8 -m icl.lever_lm.train --data dm/vqav2 --out lever-lm/vqav2

Every kept beam sequence of every anchor is a sample. The anchor is the query, seen through its pool image
and question features only (a real query has no answer). Validation holds out whole anchors, so its
accuracy measures generalisation to new queries rather than memorised sequences.

``OUT`` holds the model (``save_pretrained``) and ``training.json``: config, the D_M settings and scorers,
per-epoch train loss / val loss / val next-demo top-1 accuracy, seconds, sample counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

MANIFEST, SEQUENCES = "manifest.json", "sequences.parquet"


@dataclass
class LeverLMTrainConfig:
    """How to train Lever-LM.

    Attributes:
        data: D_M directories (``build-data`` outputs), all mined on the same pool.
        out: output directory (model + training.json).
        hidden_size, num_layers, num_heads, max_positions, adapter, dropout: the model (:class:`LeverLMConfig`).
        epochs, batch_size, lr, weight_decay, warmup_ratio, max_grad_norm: AdamW with a cosine schedule after a
            linear warm-up over ``warmup_ratio`` of the steps; batch_size is per process; max_grad_norm 0: no
            clipping.
        val_share: share of anchors held out for validation (0: none).
        seed: model init, data order, dropout and the validation split.
        pool: the pool directory; default: the one named in the first D_M's manifest.
    """

    data: list[str]
    out: str
    hidden_size: int = 512
    num_layers: int = 2
    num_heads: int = 8
    max_positions: int = 64
    adapter: bool = False
    dropout: float = 0.1
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    val_share: float = 0.1
    seed: int = 0
    pool: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if not self.data:
            raise ValueError("data: give at least one D_M directory")
        if not self.out:
            raise ValueError("out: give an output directory")
        if self.hidden_size < 1 or self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size}, num_heads={self.num_heads}: hidden_size must be a "
                             "positive multiple of num_heads")
        if self.num_layers < 1 or self.max_positions < 3:
            raise ValueError(f"num_layers={self.num_layers}, max_positions={self.max_positions}: need >= 1 and >= 3")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs={self.epochs}, batch_size={self.batch_size}: both must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(f"lr={self.lr}, weight_decay={self.weight_decay}, max_grad_norm={self.max_grad_norm}: "
                             "need lr > 0, weight_decay >= 0, max_grad_norm >= 0")
        for name in ("dropout", "warmup_ratio", "val_share"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1)")


@dataclass
class TrainingData:
    """Samples of one or more D_M directories over one pool: (anchor row, demo rows in prompt order)."""

    pool: Any
    train: list[tuple[int, list[int]]]
    val: list[tuple[int, list[int]]]
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_training_data(config: LeverLMTrainConfig) -> TrainingData:
    """Open the pool, check each D_M was mined on it, and split the sequences by anchor (seeded).

    Raises:
        ValueError: a D_M without manifest or sequences, mined on another pool, naming an id the pool lacks,
            or with a sequence longer than the model's positions.
    """
    import pyarrow.parquet as pq

    from icl.pool import Pool

    manifests = {}
    for d in config.data:
        if not (Path(d) / MANIFEST).is_file() or not (Path(d) / SEQUENCES).is_file():
            raise ValueError(f"D_M {d}: no {MANIFEST} or {SEQUENCES} (not a finished build-data directory)")
        manifests[d] = json.loads((Path(d) / MANIFEST).read_text())
    pool_path = config.pool or manifests[config.data[0]].get("pool")
    if not pool_path:
        raise ValueError(f"D_M {config.data[0]}: its manifest names no pool; give one (--pool)")
    pool = Pool.open(pool_path)
    fingerprint = pool.fingerprint
    for d, manifest in manifests.items():
        if manifest.get("pool_fingerprint") != fingerprint:
            raise ValueError(f"D_M {d} was mined on another pool than {pool.root} (pool fingerprints differ)")
    samples: dict[int, list[list[int]]] = {}  # anchor row -> its sequences
    for d in config.data:
        table = pq.read_table(Path(d) / SEQUENCES, columns=["anchor_id", "demo_ids"]).to_pydict()
        for anchor, demos in zip(table["anchor_id"], table["demo_ids"]):
            rows = []
            for i in (anchor, *demos):
                if i not in pool.position:
                    raise ValueError(f"D_M {d}: id {i!r} is not in pool {pool.root}")
                rows.append(pool.position[i])
            if len(demos) + 2 > config.max_positions:
                raise ValueError(f"D_M {d}: anchor {anchor!r} has a sequence of {len(demos)} demos; max_positions="
                                 f"{config.max_positions} allows {config.max_positions - 2}")
            samples.setdefault(rows[0], []).append(rows[1:])
    if not samples:
        raise ValueError(f"D_M {', '.join(config.data)}: no sequences")
    anchors = sorted(samples)
    n_val = round(config.val_share * len(anchors))
    if config.val_share > 0 and len(anchors) >= 2:
        n_val = min(max(n_val, 1), len(anchors) - 1)
    held = set(np.random.default_rng(config.seed).permutation(anchors)[:n_val].tolist()) if n_val else set()
    split = {True: [], False: []}
    for a in anchors:
        split[a in held] += [(a, s) for s in samples[a]]
    return TrainingData(pool=pool, train=split[False], val=split[True], manifests=manifests)


class Collator:
    """Batches of samples -> model inputs: the anchors' image and question features, right-padded demo ids."""

    def __init__(self, image: np.ndarray, question: np.ndarray) -> None:
        self.image, self.question = image, question

    def __call__(self, batch: list[tuple[int, list[int]]]) -> dict[str, Any]:
        import torch

        from icl.lever_lm.model import IGNORE

        anchors = [a for a, _ in batch]
        demo_ids = torch.full((len(batch), max(len(d) for _, d in batch)), IGNORE, dtype=torch.long)
        for row, (_, demos) in enumerate(batch):
            demo_ids[row, :len(demos)] = torch.tensor(demos, dtype=torch.long)
        return {"query_image": torch.from_numpy(self.image[anchors]),
                "query_question": torch.from_numpy(self.question[anchors]), "demo_ids": demo_ids}


def train_lever_lm(config: LeverLMTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Train on ``config.data``, save to ``config.out``; returns the ``training.json`` record."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from tqdm import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from common.distributed import dist_env
    from icl.lever_lm.model import IGNORE, LeverLM

    start = time.perf_counter()
    # accelerate joins a torchrun group on CPU only when told so; otherwise each rank would train alone
    accelerator = Accelerator(cpu=True) if dist_env()[1] > 1 and not torch.cuda.is_available() else Accelerator()
    data = load_training_data(config)
    set_seed(config.seed)
    model = LeverLM.for_pool(data.pool, hidden_size=config.hidden_size, num_layers=config.num_layers,
                             num_heads=config.num_heads, max_positions=config.max_positions,
                             dropout=config.dropout, adapter=config.adapter)
    # no decay on biases, norms and the single special vectors, as usual for transformers
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=config.lr)
    collate = Collator(data.pool.vectors["image"], data.pool.vectors["question"])
    train_loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, collate_fn=collate,
                              generator=torch.Generator().manual_seed(config.seed))
    val_loader = DataLoader(data.val, batch_size=config.batch_size, collate_fn=collate) if data.val else None
    # counted before prepare (global batches): accelerate steps a prepared scheduler once per process
    steps = config.epochs * len(train_loader)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(config.warmup_ratio * steps), steps)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)
    log: list[dict[str, Any]] = []
    bar = tqdm(total=config.epochs * len(train_loader), desc="lever-lm", unit="step",
               disable=not (progress and accelerator.is_main_process))
    for epoch in range(1, config.epochs + 1):
        model.train()
        totals = torch.zeros(2, device=accelerator.device)  # summed token loss, tokens
        for batch in train_loader:
            out = model(**batch, labels=True)
            accelerator.backward(out.loss)
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            tokens = (out.targets != IGNORE).sum()
            totals += torch.stack([out.loss.detach().float() * tokens, tokens.float()])
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{out.loss.item():.3f}")
        totals = accelerator.reduce(totals, "sum")
        entry = {"epoch": epoch, "train_loss": round(float(totals[0] / totals[1].clamp_min(1)), 5),
                 **_evaluate(model, val_loader, accelerator, data.pool.vectors["image"].shape[0])}
        log.append(entry)
        logger.info("epoch %d/%d: %s", epoch, config.epochs,
                    ", ".join(f"{k} {v}" for k, v in entry.items() if k != "epoch"))
    bar.close()
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)  # on every process: ZeRO-3 gathers the shards
    record = {"config": asdict(config), "pool": str(data.pool.root), "pool_fingerprint": data.pool.fingerprint,
              "data": [{"dir": str(Path(d).resolve()), "settings": m.get("settings"), "scorer": m.get("scorer"),
                        "anchors": m.get("anchors")} for d, m in data.manifests.items()],
              "samples": {"train": len(data.train), "val": len(data.val)},
              "anchors": {"train": len({a for a, _ in data.train}), "val": len({a for a, _ in data.val})},
              "processes": accelerator.num_processes, "log": log,
              "seconds": round(time.perf_counter() - start, 2)}
    if accelerator.is_main_process:
        out_dir = Path(config.out)
        accelerator.unwrap_model(model).save_pretrained(out_dir, state_dict=state)
        (out_dir / "training.json").write_text(json.dumps(record, indent=1))
        logger.info("lever-lm: saved %s (%d train / %d val samples, %.1fs)", out_dir, len(data.train),
                    len(data.val), record["seconds"])
    accelerator.wait_for_everyone()
    return record


def _evaluate(model: Any, loader: Any, accelerator: Any, n_pool: int) -> dict[str, float | None]:
    """Validation loss (mean over targets, EOS included) and next-demo top-1 accuracy (demo targets only,
    argmax over pool ids)."""
    import torch
    import torch.nn.functional as F

    from icl.lever_lm.model import IGNORE

    if loader is None:
        return {"val_loss": None, "val_top1": None}
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            out = model(**batch)
            logits, targets = out.logits.float(), out.targets
            loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
            demo = (targets != IGNORE) & (targets < n_pool)
            correct = (logits[..., :n_pool].argmax(-1) == targets) & demo
            per_sample = torch.stack([loss.sum(1), (targets != IGNORE).sum(1), correct.sum(1), demo.sum(1)], dim=1)
            # gather_for_metrics drops the samples duplicated to even out the last batch across processes
            sums += accelerator.gather_for_metrics(per_sample.double()).sum(0)
    return {"val_loss": round(float(sums[0] / sums[1].clamp_min(1)), 5),
            "val_top1": round(float(sums[2] / sums[3].clamp_min(1)), 5)}


# --------------------------------------------------------------------------------------------------- CLI
HELP = {
    "data": "D_M directories (build-data outputs), all mined on the same pool",
    "out": "output directory: the model (save_pretrained) and training.json",
    "pool": "pool directory; none: the one named in the first D_M's manifest",
    "hidden_size": "transformer width",
    "num_layers": "transformer layers (the paper: 2)",
    "num_heads": "attention heads (must divide --hidden-size)",
    "max_positions": "longest sequence incl. [BOS, query]: the model generates at most this minus 2 demos",
    "adapter": "train a residual MLP on the frozen CLIP features (starts as the identity)",
    "dropout": "embedding, attention and residual dropout",
    "epochs": "passes over the training sequences",
    "batch_size": "sequences per step and process",
    "lr": "AdamW peak learning rate",
    "weight_decay": "AdamW weight decay (matrices only)",
    "warmup_ratio": "share of the steps with a linear warm-up, then cosine decay to 0",
    "max_grad_norm": "gradient norm clipping (0: off)",
    "val_share": "share of anchors held out for validation (0: none)",
    "seed": "seed of the init, data order, dropout and validation split",
}


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Mount the training flags (one per :class:`LeverLMTrainConfig` field, same defaults) on ``parser``
    (use ``argparse.ArgumentDefaultsHelpFormatter`` to show the defaults)."""
    defaults = {f.name: f.default for f in fields(LeverLMTrainConfig)}
    parser.add_argument("--data", nargs="+", required=True, metavar="DIR", help=HELP["data"])
    parser.add_argument("--out", required=True, help=HELP["out"])
    parser.add_argument("--pool", default=None, help=HELP["pool"])
    g = parser.add_argument_group("model")
    for name in ("hidden_size", "num_layers", "num_heads", "max_positions"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=defaults[name], help=HELP[name])
    g.add_argument("--adapter", action="store_true", help=HELP["adapter"])
    g.add_argument("--dropout", type=float, default=defaults["dropout"], help=HELP["dropout"])
    t = parser.add_argument_group("training")
    for name, kind in (("epochs", int), ("batch_size", int), ("lr", float), ("weight_decay", float),
                       ("warmup_ratio", float), ("max_grad_norm", float), ("val_share", float), ("seed", int)):
        t.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name], help=HELP[name])
    return parser


def config_from_args(args: argparse.Namespace) -> LeverLMTrainConfig:
    """The config of parsed :func:`add_train_args` flags (other attributes of ``args`` are ignored)."""
    return LeverLMTrainConfig(**{f.name: getattr(args, f.name) for f in fields(LeverLMTrainConfig)})


def main(argv: list[str] | None = None) -> int:
    from common.distributed import dist_env
    from common.log import setup_logging

    parser = add_train_args(argparse.ArgumentParser(
        prog="python -m icl.lever_lm.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="launch: python (one process), accelerate launch -m icl.lever_lm.train (DDP or DeepSpeed through "
               "its config), or torchrun -m icl.lever_lm.train"))
    args = parser.parse_args(argv)
    setup_logging()
    try:
        record = train_lever_lm(config_from_args(args))
    except ValueError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    last = record["log"][-1]
    if dist_env()[0] == 0:
        print(f"lever-lm {args.out}: {record['samples']['train']} train / {record['samples']['val']} val sequences, "
              f"last epoch {last}, {record['seconds']}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
