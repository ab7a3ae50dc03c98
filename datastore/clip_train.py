"""Train a small open_clip CLIP contrastively on webdataset image-text shards (the synthetic world's corpus).

The result stands in for a web-pretrained CLIP in offline demos: a model-config JSON plus a
``.safetensors`` checkpoint, loaded everywhere through :func:`datastore.clip.load_clip`.

Recipe (docs/datastore.md, "Training a small CLIP"): the whole corpus is decoded once into a
uint8 array; each step samples a batch, applies colour augmentation (channel permutation, gains,
grayscale; no flips: mirrored stripes are another category) and a small random shift, and trains
image and text towers with the symmetric InfoNCE loss. Texts can be the raw captions or, from the
``{key}.json`` ground truth, object names ("names") or names with random attribute words
("phrases"), which makes the embedding follow object identity rather than colour and position.
Everything is a function of the seed (given the thread count); ``max_minutes`` cuts training
short, which breaks that.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.log import StageTimer
from common.schedule import warmup_cosine_lr
from datastore.clip import BUILTIN_CONFIG_DIR, ClipSpec, load_clip, register_model_config, weights_sha256

logger = logging.getLogger(__name__)

TEXT_MODES = ("caption", "names", "phrases", "object")
PHRASE_PREFIXES = ("", "", "a photo of", "an image of", "a picture of")


@dataclass
class ClipTrainConfig:
    """How to train the CLIP.

    Attributes:
        model_config: open_clip model-config JSON (path, or the stem of a bundled config in
            datastore/model_configs). Its stem names the trained architecture.
        image_size: training/inference image side; None keeps the config's. A different size writes
            the config as ``<stem>-<size>px``.
        steps: optimiser steps; batch_size: image-text pairs per step.
        lr: AdamW peak learning rate (linear warmup, then cosine decay to 0).
        weight_decay: AdamW decoupled weight decay (not on gains, biases, embeddings or the temperature).
        warmup: linear warmup steps.
        logit_scale: initial inverse temperature; learn_logit_scale: train the temperature too (clamped
            to <= 100).
        text_mode: "caption" (the shard's caption), "names" (the image's object names, "drerik and
            brudub") or "phrases" (names with random size/colour words and prefixes, re-drawn every
            step) or "object" (one of the image's names, drawn every step; every image holding that
            object is a positive); all but "caption" read each sample's ``{key}.json`` ``objects`` list:
            "names" its ``category`` fields, "object" also ``colour`` and ``size``, "phrases" also
            ``group`` (:data:`MODE_FIELDS`). Image-caption data without such JSON: "caption".
        attribute_p: in "phrases", the chance of each attribute word.
        multi_positive: pairs whose images have the same category set (or the same caption) count as
            positives of each other instead of negatives ("object": images holding the named object).
        colour_augment: random channel permutation, per-channel gains, brightness and grayscale.
        shift: random translation of up to this many pixels (edge-replicated).
        seed: everything random (init, batches, augmentation, texts).
        threads: torch intra-op threads; workers: decoding processes.
        max_minutes: stop early when training takes longer (None = run all steps).
        max_samples: use only the first N samples of the shards.
        device: where the model trains ("cpu", "cuda", "cuda:N"); batches are augmented on the CPU.
        image_key, caption_key: webdataset member extensions.
    """

    model_config: str = "tuna-quickstart-clip"
    image_size: int | None = None
    steps: int = 1000  # 600 left the quickstart world's novel purity at 79 % at one seed (docs/experiments.md, 10)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 25
    logit_scale: float = 14.3
    learn_logit_scale: bool = True
    text_mode: str = "names"
    attribute_p: float = 0.4
    multi_positive: bool = True
    colour_augment: bool = True
    shift: int = 4
    seed: int = 0
    threads: int = 2
    workers: int = 2
    max_minutes: float | None = None
    max_samples: int | None = None
    device: str = "cpu"
    image_key: str = "jpg"
    caption_key: str = "txt"

    def __post_init__(self) -> None:
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode={self.text_mode!r}: expected one of {TEXT_MODES}")
        for name in ("steps", "batch_size", "threads", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size}: contrastive training needs at least 2")
        if self.lr <= 0 or self.logit_scale <= 0:
            raise ValueError("lr and logit_scale must be > 0")
        if self.warmup < 0 or self.shift < 0 or not 0 <= self.attribute_p <= 1:
            raise ValueError("warmup and shift must be >= 0 and attribute_p in [0, 1]")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError(f"image_size={self.image_size}: must be >= 32")
        self.model_config = str(resolve_model_config(self.model_config))


@dataclass
class ClipTrainResult:
    """A trained CLIP: its spec (for load_clip), identity, loss curve and stage timings."""

    spec: ClipSpec
    identity: dict[str, Any]
    losses: list[float]
    steps: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def step_seconds(self) -> float:
        return self.seconds.get("train", 0.0) / max(1, self.steps)


def resolve_model_config(name_or_path: str) -> Path:
    """A model-config JSON path from a path or the stem of a bundled config.

    Raises:
        ValueError: neither a file nor a bundled config name.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path.resolve()
    bundled = BUILTIN_CONFIG_DIR / f"{name_or_path}.json"
    if bundled.is_file():
        return bundled
    known = ", ".join(sorted(p.stem for p in BUILTIN_CONFIG_DIR.glob("*.json")))
    raise ValueError(f"model config {name_or_path!r} is neither a JSON file nor a bundled config ({known})")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Corpus:
    """Decoded training data: uint8 images (N, S, S, 3), captions, and ground-truth objects (or None)."""

    images: np.ndarray
    keys: list[str]
    captions: list[str]
    objects: list[list[dict]] | None

    def __len__(self) -> int:
        return len(self.keys)


def _center_square(image, size: int):
    """open_clip's inference resize: shortest side to ``size`` (bicubic), then a centre crop."""
    from PIL import Image

    if image.size == (size, size):
        return image
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


# the ground-truth object fields each text mode reads from a sample's {key}.json ("objects": [...])
MODE_FIELDS = {"caption": (), "names": ("category",), "object": ("category", "colour", "size"),
               "phrases": ("category", "colour", "size", "group")}


def _sample_objects(sample: dict, fields: tuple[str, ...]) -> tuple[list[dict] | None, str | None]:
    """The sample's objects with ``fields``, or (None, why not)."""
    if "json" not in sample:
        return None, "no .json member"
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        return None, "unreadable .json"
    objects = meta.get("objects") if isinstance(meta, dict) else None
    if not isinstance(objects, list) or not objects:
        return None, "no 'objects' list in .json"
    for field in fields:
        if not all(isinstance(o, dict) and field in o for o in objects):
            return None, f"an object without '{field}'"
    return [{k: o[k] for k in fields} for o in objects], None


def _read_shard(task: tuple[str, int, str, str, tuple[str, ...]]) -> tuple[np.ndarray, list, list, list, dict]:
    """Decode one shard: (uint8 images (n, S, S, 3), keys, captions, objects, {skip reason: [keys]})."""
    from PIL import Image

    from datastore.reader import iter_raw_samples

    url, size, image_key, caption_key, fields = task
    images, keys, captions, objects = [], [], [], []
    skipped: dict[str, list[str]] = {}
    for sample in iter_raw_samples(url):
        raw_image, raw_text = sample.get(image_key), sample.get(caption_key)
        why, objs = None, None
        if raw_image is None:
            why = f"no .{image_key} member"
        elif raw_text is None:
            why = f"no .{caption_key} member"
        if why is None:
            try:
                image = Image.open(io.BytesIO(raw_image)).convert("RGB")
            except Exception:  # any decoder error: counted, like the datastore reader does
                why = "unreadable image"
        if why is None:
            try:
                caption = " ".join(raw_text.decode("utf-8").split())
            except UnicodeDecodeError:
                why = "caption not UTF-8"
            else:
                why = None if caption else "empty caption"
        if why is None and fields:
            objs, why = _sample_objects(sample, fields)
        if why is not None:
            skipped.setdefault(why, []).append(str(sample.get("__key__")))
            continue
        images.append(np.asarray(_center_square(image, size), dtype=np.uint8))
        keys.append(sample["__key__"])
        captions.append(caption)
        objects.append(objs)
    pixels = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return pixels, keys, captions, objects, skipped


def load_corpus(shards: list[str], image_size: int, text_mode: str, workers: int = 2,
                image_key: str = "jpg", caption_key: str = "txt", max_samples: int | None = None,
                progress: bool = False) -> Corpus:
    """Decode all samples of ``shards`` (in shard order) into memory; samples lacking what ``text_mode``
    reads (:data:`MODE_FIELDS`) are skipped and counted by reason.

    Raises:
        ValueError: no usable sample (the message gives the skip reasons with a sample key each).
    """
    from tqdm import tqdm

    fields = MODE_FIELDS[text_mode]
    tasks = [(url, image_size, image_key, caption_key, fields) for url in shards]
    parts = []
    bar = tqdm(total=len(tasks), unit="shard", desc="read", disable=not progress)
    if workers > 1 and len(tasks) > 1:
        with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
            for part in pool.imap(_read_shard, tasks):
                parts.append(part)
                bar.update()
    else:
        for task in tasks:
            parts.append(_read_shard(task))
            bar.update()
    bar.close()
    reasons: dict[str, list[str]] = {}
    for part in parts:
        for why, keys in part[4].items():
            reasons.setdefault(why, []).extend(keys)
    summary = "; ".join(f"{why}: {len(keys)} (e.g. {keys[0]})" for why, keys in
                        sorted(reasons.items(), key=lambda kv: -len(kv[1])))
    stop = min(max_samples or sum(len(p[1]) for p in parts), sum(len(p[1]) for p in parts))
    if not stop:
        hint = (f"; --text-mode {text_mode} reads objects[].{{{','.join(fields)}}} from each sample's .json, "
                "use --text-mode caption for image-caption data") if fields else ""
        raise ValueError(f"no usable samples in {len(shards)} shard(s): {summary or 'the shards are empty'}{hint}")
    if reasons:
        logger.warning("skipped %d samples: %s", sum(map(len, reasons.values())), summary)
    return Corpus(images=np.concatenate([p[0] for p in parts])[:stop], keys=[k for p in parts for k in p[1]][:stop],
                  captions=[c for p in parts for c in p[2]][:stop],
                  objects=[o for p in parts for o in p[3]][:stop] if fields else None)


def _names(objects: list[dict]) -> list[str]:
    return list(dict.fromkeys(o["category"] for o in objects))


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def names_text(objects: list[dict]) -> str:
    """The image's category names, left to right: "drerik and brudub"."""
    return _join(_names(objects))


def object_text(obj: dict, rng: np.random.Generator, attribute_p: float) -> str:
    """``[size] [colour] name`` of one object, each attribute word with probability ``attribute_p``."""
    words = ([obj["size"]] if rng.random() < attribute_p else []) + \
            ([obj["colour"]] if rng.random() < attribute_p else [])
    return " ".join(words + [obj["category"]])


def phrase_text(objects: list[dict], rng: np.random.Generator, attribute_p: float) -> str:
    """Groups in random order, each ``[size] [colour] name`` with random attribute words and prefix."""
    groups: dict[int, dict] = {}
    for o in objects:
        groups.setdefault(o["group"], o)
    phrases = [object_text(list(groups.values())[i], rng, attribute_p) for i in rng.permutation(len(groups))]
    prefix = PHRASE_PREFIXES[int(rng.integers(len(PHRASE_PREFIXES)))]
    body = _join(phrases)
    return f"{prefix} {body}" if prefix else body


class _Tokens:
    """open_clip tokenizer with a cache (the same short texts recur many times)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, texts: list[str]):
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.tokenizer(missing)))
        return torch.stack([self.cache[t] for t in texts])


class _BatchTexts:
    """Texts of a batch and its positives: ``pos[i, j]`` is True when text j describes image i."""

    def __init__(self, corpus: Corpus, config: ClipTrainConfig) -> None:
        import torch

        self.corpus, self.config = corpus, config
        self.rng = np.random.default_rng(config.seed)
        if corpus.objects is None:  # captions: identical texts are positives of each other
            keys = corpus.captions
            self.names = None
        else:
            self.names = [_names(objs) for objs in corpus.objects]
            keys = ["|".join(sorted(names)) for names in self.names]
            vocab = {n: i for i, n in enumerate(sorted({n for names in self.names for n in names}))}
            self.vocab = vocab
            self.members = torch.zeros(len(corpus), len(vocab), dtype=torch.bool)  # image has category c
            for i, names in enumerate(self.names):
                self.members[i, [vocab[n] for n in names]] = True
        index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        self.group = torch.tensor([index[k] for k in keys])
        self.fixed = corpus.captions if config.text_mode == "caption" else (
            [_join(names) for names in self.names] if config.text_mode == "names" else None)

    def __call__(self, idx) -> tuple[list[str], object]:
        import torch

        rows = idx.tolist()
        mode = self.config.text_mode
        if mode == "object":  # one of the image's objects; positives: every image that has its category
            picked = [self.corpus.objects[i][int(self.rng.integers(len(self.corpus.objects[i])))] for i in rows]
            texts = [object_text(o, self.rng, self.config.attribute_p) for o in picked]
            pos = self.members[idx][:, [self.vocab[o["category"]] for o in picked]]
        else:
            if mode == "phrases":
                texts = [phrase_text(self.corpus.objects[i], self.rng, self.config.attribute_p) for i in rows]
            else:
                texts = [self.fixed[i] for i in rows]
            group = self.group[idx]
            pos = group[:, None] == group[None, :]
        if not self.config.multi_positive:
            pos = torch.eye(len(rows), dtype=torch.bool)
        return texts, pos


# ---------------------------------------------------------------------------------------------- training
def _augment(batch, config: ClipTrainConfig, gen):
    """uint8 (B, S, S, 3) -> float (B, 3, S, S) in [0, 1], colour-augmented and shifted."""
    import torch

    x = batch.permute(0, 3, 1, 2).float().div_(255)
    b = x.shape[0]
    if config.colour_augment:
        perms = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
        order = perms[torch.randint(0, 6, (b,), generator=gen)]
        x = torch.gather(x, 1, order[:, :, None, None].expand_as(x))
        gains = 1 + 0.25 * (2 * torch.rand(b, 3, 1, 1, generator=gen) - 1)
        offset = 0.1 * (2 * torch.rand(b, 1, 1, 1, generator=gen) - 1)
        x = x * gains + offset
        gray = torch.rand(b, generator=gen) < 0.2
        x[gray] = x[gray].mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        x = x.clamp_(0, 1)
    if config.shift:
        s, size = config.shift, x.shape[-1]
        padded = torch.nn.functional.pad(x, (s, s, s, s), mode="replicate")
        dx, dy = torch.randint(0, 2 * s + 1, (2, b), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + size, dx[i]:dx[i] + size] for i in range(b)])
    return x


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        flat = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(".bias")
        (no_decay if flat else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _contrastive_loss(img, txt, scale, pos=None):
    """Symmetric InfoNCE; ``pos[i, j]`` marks text j as a positive of image i (soft targets spread over them)."""
    import torch
    import torch.nn.functional as F

    logits = scale * img @ txt.T
    if pos is None:
        labels = torch.arange(len(img), device=img.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    pos = pos.float()
    image_to_text = -(pos / pos.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    text_to_image = -(pos.T / pos.T.sum(1, keepdim=True) * F.log_softmax(logits.T, 1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def _out_config(config: ClipTrainConfig, out_dir: Path) -> Path:
    """Write the architecture's config JSON into ``out_dir`` (renamed when image_size changes it)."""
    source = Path(config.model_config)
    data = json.loads(source.read_text())
    stem = source.stem
    if config.image_size is not None and config.image_size != data["vision_cfg"]["image_size"]:
        data["vision_cfg"]["image_size"] = config.image_size
        stem = f"{stem}-{config.image_size}px"
    target = out_dir / f"{stem}.json"
    target.write_text(json.dumps(data, indent=4) + "\n")
    return target


def train_clip(shards: list[str] | str, out_dir: str | os.PathLike, config: ClipTrainConfig | None = None,
               progress: bool = True) -> ClipTrainResult:
    """Train a CLIP on webdataset shards and save it as an open_clip model config + checkpoint.

    Args:
        shards: shard patterns (brace expansion, globs), as for ``tuna-datastore build``.
        out_dir: output folder; receives ``<arch>.json``, ``<arch>.safetensors`` and ``train.json``
            (config, loss curve, timings, identity).
        config: the recipe (defaults: ClipTrainConfig()).
        progress: show progress bars.

    Returns:
        The result; ``result.spec`` loads the model with :func:`datastore.clip.load_clip`.

    Raises:
        ValueError: bad config, unreadable/empty shards, or texts that need missing ground truth.
    """
    import open_clip
    import torch
    from tqdm import tqdm

    from datastore.reader import expand_shards

    config = config or ClipTrainConfig()
    timer = StageTimer()
    urls = expand_shards(shards)  # fail on missing inputs before writing anything
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = _out_config(config, out)
    name = register_model_config(config_path)
    image_size = json.loads(config_path.read_text())["vision_cfg"]["image_size"]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with timer("read"):
            corpus = load_corpus(urls, image_size, config.text_mode,
                                 config.workers, config.image_key, config.caption_key, config.max_samples,
                                 progress)
        with timer("setup"):
            torch.manual_seed(config.seed)
            device = torch.device(config.device)
            model = open_clip.create_model(name, pretrained=None).to(device)
            model.visual.to(memory_format=torch.channels_last)  # faster CPU convolutions
            with torch.no_grad():
                model.logit_scale.fill_(math.log(config.logit_scale))
            model.logit_scale.requires_grad_(config.learn_logit_scale)
            mean = torch.tensor(model.visual.preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)
            std = torch.tensor(model.visual.preprocess_cfg["std"], device=device).view(1, 3, 1, 1)
            tokens = _Tokens(open_clip.get_tokenizer(name))
            images = torch.from_numpy(corpus.images)
            batch_texts = _BatchTexts(corpus, config)
            gen = torch.Generator().manual_seed(config.seed)
            optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr,
                                          betas=(0.9, 0.98), eps=1e-6, fused=True)
        model.train()
        losses: list[float] = []
        order, cursor = torch.randperm(len(corpus), generator=gen), 0
        deadline = None if config.max_minutes is None else time.perf_counter() + 60 * config.max_minutes
        bar = tqdm(total=config.steps, unit="step", desc="train-clip", disable=not progress)
        start = time.perf_counter()
        for step in range(config.steps):
            if cursor + config.batch_size > len(order):
                order, cursor = torch.randperm(len(corpus), generator=gen), 0
            idx = order[cursor:cursor + config.batch_size]
            cursor += config.batch_size
            pixels = _augment(images[idx], config, gen).to(device, non_blocking=True)
            pixels = ((pixels - mean) / std).contiguous(memory_format=torch.channels_last)
            texts, pos = batch_texts(idx)
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(step, config.steps, config.warmup, config.lr)
            img = model.encode_image(pixels, normalize=True)
            txt = model.encode_text(tokens(texts).to(device), normalize=True)
            loss = _contrastive_loss(img, txt, model.logit_scale.exp(), pos.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
            if deadline is not None and time.perf_counter() > deadline:
                logger.warning("train-clip: max_minutes=%s reached after %d of %d steps",
                               config.max_minutes, step + 1, config.steps)
                break
        bar.close()
        timer.add("train", time.perf_counter() - start)
        with timer("save"):
            model.eval()
            checkpoint = out / f"{name}.safetensors"
            from safetensors.torch import save_file

            model.cpu()
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
            trained_sha = weights_sha256(model)
            spec = ClipSpec(model_config=str(config_path), pretrained=str(checkpoint))
            identity = load_clip(spec).identity
            if identity["weights_sha256"] != trained_sha:
                raise RuntimeError(f"checkpoint {checkpoint} does not load back to the trained weights")
    finally:
        torch.set_num_threads(previous_threads)
    seconds = {k: round(v, 3) for k, v in timer.seconds.items()}
    record = {"config": asdict(config), "architecture": name, "samples": len(corpus), "steps": len(losses),
              "losses": [round(v, 5) for v in losses], "seconds": seconds,
              "step_seconds": round(seconds["train"] / max(1, len(losses)), 4), "identity": identity}
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("trained %s on %d samples: %d steps, loss %.3f -> %.3f (%s)", name, len(corpus), len(losses),
                losses[0], losses[-1], timer.summary())
    return ClipTrainResult(spec=spec, identity=identity, losses=losses, steps=len(losses), seconds=seconds)


def trained_clip_files(out_dir: str | os.PathLike) -> tuple[str, str]:
    """(model-config JSON, checkpoint) of a CLIP written by :func:`train_clip` into ``out_dir``.

    Raises:
        ValueError: ``out_dir`` holds no finished training (``train.json`` and its two files).
    """
    out = Path(out_dir)
    record = out / "train.json"
    if not record.is_file():
        raise ValueError(f"{record} not found: {out} is not a train-clip output folder")
    name = json.loads(record.read_text())["architecture"]
    config, checkpoint = out / f"{name}.json", out / f"{name}.safetensors"
    for path in (config, checkpoint):
        if not path.is_file():
            raise ValueError(f"{path} not found (train-clip output in {out} is incomplete)")
    return str(config), str(checkpoint)


def encode_corpus_images(clip, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """L2-normalised embeddings (N, D) of uint8 images (N, S, S, 3) already at the model's size."""
    import torch

    cfg = clip.model.visual.preprocess_cfg
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    out = []
    for lo in range(0, len(images), batch_size):
        x = torch.from_numpy(images[lo:lo + batch_size]).permute(0, 3, 1, 2).float().div(255)
        out.append(clip.encode_images((x - mean) / std).numpy())
    return np.concatenate(out)


__all__ = ["ClipTrainConfig", "ClipTrainResult", "Corpus", "encode_corpus_images", "load_corpus",
           "names_text", "object_text", "phrase_text", "resolve_model_config", "train_clip", "trained_clip_files"]
