"""Write a synthetic world: corpus shards, LLaVA instruction JSON, eval question/answer files, world.json."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from datastore.synth.icl_task import ICL_DIR, write_icl_task
from datastore.synth.layout import CORPUS_DIR, EVAL_DIR, IMAGES_DIR, LLAVA_DIR, WORLD_JSON, World, corpus_shard_name
from datastore.synth.questions import eval_questions, instruct_record, pretrain_record
from datastore.synth.scene import render_sample
from datastore.synth.world import COLOURS, POSITIONS, SIZES, WorldCatalogue

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
GENERATOR_VERSION = "1"


@dataclass
class SynthConfig:
    """What to generate (outputs are a pure function of everything but ``out``/``workers``/``overwrite``).

    Attributes:
        out: output directory (must be empty unless ``overwrite``).
        seed: generator seed.
        n_corpus, n_instruct, n_eval: images in the datastore corpus, instruction set and eval set.
        image_size: image side in pixels (64-128).
        n_seen, n_novel: categories per novelty group; category_offset: first catalogue entry.
        icl_support_per_category: support images per category of the in-context learning task (0: no
            task; datastore/synth/icl_task.py).
        icl_queries: query images of the in-context learning task (half seen, half novel).
        icl_distractor_share: share of ICL queries wearing their confusable partner's colour and background.
        shard_size: corpus samples per webdataset shard.
        workers: rendering processes.
        jpeg_quality: JPEG quality of every image.
        corpus_photo_size: corpus shard images upscaled to a photo's size, longer side this many pixels
            (within 12 percent) with aspect 3:4 to 4:3 and sensor-like noise, so that decoding costs what a web photo's
            does (CC3M: ~400-500 px); 0: the rendered image_size (benchmarks, e.g. 448).
        overwrite: replace a non-empty ``out``.
    """

    out: str
    seed: int = 0
    n_corpus: int = 10_000
    n_instruct: int = 2_000
    n_eval: int = 400
    image_size: int = 96
    n_seen: int = 16
    n_novel: int = 8
    category_offset: int = 0
    icl_support_per_category: int = 0
    icl_queries: int = 0
    icl_distractor_share: float = 0.5
    shard_size: int = 1_000
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    jpeg_quality: int = 90
    corpus_photo_size: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not 64 <= self.image_size <= 128:
            raise ValueError(f"image_size={self.image_size}: must be between 64 and 128")
        for name in ("n_corpus", "n_instruct", "n_eval", "shard_size", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.icl_support_per_category < 0 or self.icl_queries < 0 or not 0 <= self.icl_distractor_share <= 1:
            raise ValueError(f"icl_support_per_category={self.icl_support_per_category}, icl_queries="
                             f"{self.icl_queries}, icl_distractor_share={self.icl_distractor_share}: need counts "
                             ">= 0 and a share in [0, 1]")
        if (self.icl_support_per_category > 0) != (self.icl_queries > 0):
            raise ValueError("the in-context learning task needs both icl_support_per_category and icl_queries")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality}: must be 1..100")
        if self.corpus_photo_size and not 128 <= self.corpus_photo_size <= 2048:
            raise ValueError(f"corpus_photo_size={self.corpus_photo_size}: must be 0 (off) or 128..2048")
        WorldCatalogue(self.n_seen, self.n_novel, self.category_offset)  # validates the category range

    def world(self) -> WorldCatalogue:
        return WorldCatalogue(self.n_seen, self.n_novel, self.category_offset)

    def recipe(self) -> dict:
        """The arguments that determine the output (the ICL task's only when it is generated, so worlds
        without it keep their bytes)."""
        icl = ("icl_support_per_category", "icl_queries", "icl_distractor_share")
        return {k: v for k, v in asdict(self).items()
                if k not in ("out", "workers", "overwrite") and (self.icl_queries or k not in icl)
                and (self.corpus_photo_size or k != "corpus_photo_size")}


def jpeg_bytes(pixels, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_like(pixels: np.ndarray, side: int, seed: int, index: int) -> np.ndarray:
    """``pixels`` at a web photo's size and grain (:attr:`SynthConfig.corpus_photo_size`), deterministic per
    (seed, index): bicubic upscale to a longer side of ``side`` +-12 % and an aspect of 3:4 to 4:3, plus
    Gaussian noise (sigma 6), which keeps a quality-90 JPEG of it near a photo's size (tens of KB)."""
    rng = np.random.default_rng([seed, index, 448])
    longer, aspect = side * rng.uniform(0.88, 1.12), rng.uniform(0.75, 4 / 3)
    width, height = (longer, longer / aspect) if aspect >= 1 else (longer * aspect, longer)
    image = Image.fromarray(pixels).resize((round(width), round(height)), Image.BICUBIC)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, size=(round(height), round(width), 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "tuna", "tuna"
    tar.addfile(info, io.BytesIO(data))


def _write_shard(task: tuple[SynthConfig, int]) -> int:
    """Render corpus shard ``shard`` to ``corpus/corpus-{shard}.tar``; returns its sample count."""
    config, shard = task
    world = config.world()
    start, stop = shard * config.shard_size, min(config.n_corpus, (shard + 1) * config.shard_size)
    path = Path(config.out) / corpus_shard_name(shard)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(start, stop):
            sample = render_sample(world, config.seed, "corpus", index, config.image_size)
            meta = {"key": sample.key, "caption": sample.caption, **sample.scene.to_json()}
            image = (photo_like(sample.image, config.corpus_photo_size, config.seed, index)
                     if config.corpus_photo_size else sample.image)
            _add_member(tar, f"{sample.key}.jpg", jpeg_bytes(image, config.jpeg_quality))
            _add_member(tar, f"{sample.key}.txt", sample.caption.encode())
            _add_member(tar, f"{sample.key}.json", json.dumps(meta, sort_keys=True).encode())
    return stop - start


def _write_images(task: tuple[SynthConfig, str, int, int]) -> list[dict]:
    """Render images [start, stop) of ``stream`` as JPEG files; returns their scene records."""
    config, stream, start, stop = task
    world = config.world()
    records = []
    for index in range(start, stop):
        sample = render_sample(world, config.seed, stream, index, config.image_size)
        rel = f"{stream}/{sample.key}.jpg"
        (World(Path(config.out)).images / rel).write_bytes(jpeg_bytes(sample.image, config.jpeg_quality))
        records.append({"index": index, "key": sample.key, "image": rel, "caption": sample.caption,
                        "scene": sample.scene})
    return records


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


# Everything the generator writes under ``out``; --overwrite removes exactly these (nothing else).
OUTPUTS = (WORLD_JSON, CORPUS_DIR, f"{IMAGES_DIR}/instruct", f"{IMAGES_DIR}/eval", LLAVA_DIR, EVAL_DIR,
           f"{IMAGES_DIR}/{ICL_DIR}", ICL_DIR)


def _prepare_out(config: SynthConfig) -> Path:
    out = Path(config.out)
    if out.exists() and any(out.iterdir()):
        if not config.overwrite:
            raise ValueError(f"output directory {out} is not empty (use --overwrite to replace it)")
        for rel in OUTPUTS:
            path = out / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for sub in OUTPUTS[1:5]:  # the folders (eval/ is made as its files are written)
        (out / sub).mkdir(parents=True, exist_ok=True)
    return out


def generate_world(config: SynthConfig, progress=None) -> dict:
    """Generate every output of the world described by ``config``.

    Args:
        config: what to generate.
        progress: optional callable(n_images) called as images are rendered (e.g. a tqdm update).

    Returns:
        The world.json content plus ``seconds``: wall-clock seconds per stage (corpus, instruct,
        eval, questions), which world.json leaves out so that its bytes stay deterministic.

    Raises:
        ValueError: ``config.out`` is not empty and ``overwrite`` is false.
    """
    out, world, seconds = _prepare_out(config), config.world(), {}
    tick = progress or (lambda n: None)
    context = multiprocessing.get_context("fork")
    with context.Pool(config.workers) as pool:
        start = time.perf_counter()
        shards = range((config.n_corpus + config.shard_size - 1) // config.shard_size)
        for n in pool.imap(_write_shard, [(config, s) for s in shards]):
            tick(n)
        seconds["corpus"] = time.perf_counter() - start
        streams = {}
        for stream, n in (("instruct", config.n_instruct), ("eval", config.n_eval)):
            start = time.perf_counter()
            streams[stream] = []
            for records in pool.imap(_write_images, [(config, stream, lo, hi) for lo, hi in _chunks(n, 250)]):
                streams[stream] += records
                tick(len(records))
            seconds[stream] = time.perf_counter() - start
    start = time.perf_counter()
    counts = _write_text_outputs(out, config, world, streams)
    seconds["questions"] = time.perf_counter() - start
    if config.icl_queries:
        start = time.perf_counter()
        counts.update(write_icl_task(out, world, config.seed, config.icl_support_per_category, config.icl_queries,
                                     config.icl_distractor_share, config.image_size,
                                     lambda pixels: jpeg_bytes(pixels, config.jpeg_quality)))
        seconds["icl"] = time.perf_counter() - start
    info = {
        "format_version": FORMAT_VERSION, "generator": "tuna-synth", "generator_version": GENERATOR_VERSION,
        "args": config.recipe(), "categories": world.to_json(), "colours": list(COLOURS),
        "sizes": list(SIZES), "positions": list(POSITIONS), "counts": counts,
    }
    World(out).world_json.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    info["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return info


def _write_text_outputs(out: Path, config: SynthConfig, world: WorldCatalogue, streams: dict) -> dict:
    """LLaVA pretrain/instruct JSON and the eval files; returns the counts for world.json."""
    instruct = streams["instruct"]
    pretrain = [pretrain_record(r, config.seed) for r in instruct]
    conversations = [instruct_record(r, world, config.seed) for r in instruct]
    World(out).pretrain_json.write_text(json.dumps(pretrain, indent=1) + "\n")
    World(out).instruct_json.write_text(json.dumps(conversations, indent=1) + "\n")
    files = eval_questions(streams["eval"], world, config.seed)
    for rel, rows in files.items():
        _write_jsonl(out / EVAL_DIR / rel, rows)
    return {
        "corpus": config.n_corpus, "corpus_shards": (config.n_corpus + config.shard_size - 1) // config.shard_size,
        "pretrain": len(pretrain), "instruct": len(conversations), "eval_images": len(streams["eval"]),
        **{f"eval/{rel}": len(rows) for rel, rows in files.items() if rel.endswith("questions.jsonl")},
    }
