"""Demonstration pools: labelled examples with CLIP embeddings and one FAISS index per key kind.

```
POOL/manifest.json             format version, source, CLIP identity, counts, skipped samples, index infos, seconds
POOL/examples.parquet          id, image, question, answers, task, label (row i = faiss id i of every index)
POOL/embeddings/KIND.npy       (n, d) float16, L2-normalised; KIND in image, question, answer
POOL/index/KIND/               index.faiss + index_infos.json (the datastore's automatic index choice)
```

``sit`` (DRUM's starting point) searches the concatenation [image; question] / sqrt(2), so its inner
product is the mean of the two cosines; it has an index of its own.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datastore import layout
from datastore.clip import ClipSpec, LoadedClip, load_clip, same_clip, spec_from_dict
from datastore.index import IndexConfig, build_index, load_index, save_index
from icl.formats import Example, Skipped, read_examples

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("image", "question", "answer", "sit")
MANIFEST = "manifest.json"
EXAMPLES = "examples.parquet"


class PoolError(RuntimeError):
    """A pool that is missing, unfinished, or built with other settings."""


@dataclass
class PoolConfig:
    """How to build a pool.

    Attributes:
        format: input layout (icl.formats.FORMATS).
        inputs: files/folders/shard patterns of that layout.
        out: pool directory.
        clip: the CLIP that embeds images and texts (queries must use the same one).
        image_root: image folder of the llava / vqav2 / coco-karpathy layouts.
        batch_size: images/texts per CLIP call.
        limit: keep only the first N examples (0: all).
        index: FAISS index settings (automatic choice by default).
        overwrite: delete ``out`` first instead of resuming.
    """

    format: str
    inputs: list[str]
    out: str
    clip: ClipSpec = field(default_factory=lambda: ClipSpec(model="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    image_root: str | None = None
    batch_size: int = 64
    limit: int = 0
    index: IndexConfig = field(default_factory=lambda: IndexConfig(n_eval_queries=200))
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: give at least one file, folder or shard pattern")
        if self.batch_size < 1 or self.limit < 0:
            raise ValueError(f"batch_size={self.batch_size}, limit={self.limit}: need batch_size >= 1, limit >= 0")


def _text_key(texts: Sequence[str]) -> dict[str, int]:
    return {t: i for i, t in enumerate(dict.fromkeys(texts))}


def encode_images(clip: LoadedClip, paths: Sequence[str], batch_size: int, progress: bool = False
                  ) -> tuple[np.ndarray, list[int]]:
    """CLIP embeddings of the images at ``paths`` (each distinct path once) -> ((n, d) float32 in path
    order, indices of the paths whose image could not be read; their rows are zero)."""
    import torch
    from PIL import Image
    from tqdm import tqdm

    unique = list(dict.fromkeys(paths))
    vectors = np.zeros((len(unique), clip.embed_dim), np.float32)
    bad_unique: set[int] = set()
    for start in tqdm(range(0, len(unique), batch_size), desc="images", unit="batch", disable=not progress):
        pixels, rows = [], []
        for row in range(start, min(start + batch_size, len(unique))):
            try:
                with Image.open(unique[row]) as image:
                    pixels.append(clip.preprocess(image.convert("RGB")))
                rows.append(row)
            except (OSError, ValueError):  # unreadable or truncated file: the caller skips and counts it
                bad_unique.add(row)
        if pixels:
            vectors[rows] = clip.encode_images(torch.stack(pixels)).cpu().numpy()
    position = {p: i for i, p in enumerate(unique)}
    return vectors[[position[p] for p in paths]], [i for i, p in enumerate(paths) if position[p] in bad_unique]


def encode_texts(clip: LoadedClip, texts: Sequence[str], batch_size: int, progress: bool = False) -> np.ndarray:
    """CLIP text embeddings (each distinct text once) -> (n, d) float32 in ``texts`` order."""
    from tqdm import tqdm

    unique = list(_text_key(texts))
    out = [clip.encode_texts(unique[s:s + batch_size]).cpu().numpy()
           for s in tqdm(range(0, len(unique), batch_size), desc="texts", unit="batch", disable=not progress)]
    table = np.concatenate(out) if out else np.zeros((0, clip.embed_dim), np.float32)
    position = _text_key(texts)
    return table[[position[t] for t in texts]]


def sit_vectors(image: np.ndarray, question: np.ndarray) -> np.ndarray:
    """[image; question] / sqrt(2): unit rows whose inner product is the mean of the two cosines."""
    return (np.concatenate([image, question], axis=1) / np.sqrt(2.0)).astype(np.float32)


def build_pool(config: PoolConfig, progress: bool = True) -> dict[str, Any]:
    """Read, embed and index ``config.inputs`` into ``config.out``; returns the manifest.

    Resumes: a finished pool with the same source and CLIP is returned as is; other settings raise
    :class:`PoolError` (use ``overwrite``).
    """
    out = Path(config.out)
    clip = load_clip(config.clip)
    record = {"format": config.format, "inputs": [str(Path(i).resolve()) if Path(i).exists() else i
                                                   for i in config.inputs],
              "image_root": config.image_root, "limit": config.limit, "clip": clip.identity}
    if config.overwrite and out.exists():
        shutil.rmtree(out)
    if (out / MANIFEST).is_file():
        manifest = layout.read_json(out / MANIFEST)
        if manifest.get("build") == record:
            logger.info("pool %s: already built (%d examples)", out, manifest["n"])
            return manifest
        raise PoolError(f"{out} holds a pool built with other settings; use another --out or --overwrite")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    skipped = Skipped()
    examples = list(read_examples(config.format, config.inputs, image_root=config.image_root,
                                  extract_dir=str(out / "images"), skipped=skipped))
    if config.limit:
        examples = examples[:config.limit]
    seconds["read"] = time.perf_counter() - start
    start = time.perf_counter()
    image_vectors, bad = encode_images(clip, [e.image for e in examples], config.batch_size, progress)
    for i in bad:
        skipped.add("bad image", examples[i].id)
    keep = np.setdiff1d(np.arange(len(examples)), bad)
    examples, image_vectors = [examples[i] for i in keep], image_vectors[keep]
    if len(examples) < 2:  # the index's recall check leaves one row out
        raise PoolError(f"{len(examples)} usable examples in {config.inputs} ({config.format}): a pool needs 2 or "
                        f"more; skipped: {skipped.counts}")
    seconds["encode_images"] = time.perf_counter() - start
    start = time.perf_counter()
    vectors = {"image": image_vectors,
               "question": encode_texts(clip, [e.question for e in examples], config.batch_size, progress),
               "answer": encode_texts(clip, [e.answers[0] for e in examples], config.batch_size, progress)}
    vectors["sit"] = sit_vectors(vectors["image"], vectors["question"])
    seconds["encode_texts"] = time.perf_counter() - start
    start = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "embeddings").mkdir(parents=True)
    infos = {}
    for kind in KINDS:
        np.save(tmp / "embeddings" / f"{kind}.npy", vectors[kind].astype(np.float16))
        index_config = IndexConfig(**{**asdict(config.index), "k": min(config.index.k, len(examples) - 1),
                                      "n_eval_queries": min(config.index.n_eval_queries, max(1, len(examples) // 2))})
        index, infos[kind] = build_index(vectors[kind], index_config)
        save_index(index, infos[kind], tmp / "index" / kind)
    seconds["index"] = time.perf_counter() - start
    _write_examples(examples, tmp / EXAMPLES)
    manifest = {"format_version": FORMAT_VERSION, "build": record, "n": len(examples), "dim": clip.embed_dim,
                "clip": {**config.clip.to_dict(), **clip.identity}, "tasks": _counts(e.task for e in examples),
                "skipped": {"total": skipped.total, "counts": skipped.counts, "examples": skipped.examples},
                "index": {k: {"factory": v["factory"], "recall_at_k": v["recall_at_k"]} for k, v in infos.items()},
                "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    layout.write_json_atomic(tmp / MANIFEST, manifest)
    if out.exists():  # images extracted from webdataset shards live there already
        for child in out.iterdir():
            shutil.move(str(child), tmp / child.name)
        out.rmdir()
    tmp.rename(out)
    if skipped.total:
        logger.warning("pool %s: skipped %d samples: %s", out, skipped.total, skipped.counts)
    logger.info("pool %s: %d examples, %s", out, len(examples),
                ", ".join(f"{k} {v:.1f}s" for k, v in manifest["seconds"].items()))
    return manifest


def _counts(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def _write_examples(examples: list[Example], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {name: [getattr(e, name) for e in examples] for name in ("id", "image", "question", "task", "label")}
    columns["answers"] = [list(e.answers) for e in examples]
    pq.write_table(pa.table(columns), path)


class Pool:
    """A built pool opened for retrieval. Use :meth:`open`."""

    def __init__(self, root: Path, manifest: dict[str, Any], examples: list[Example], vectors: dict[str, np.ndarray],
                 indexes: dict[str, Any], clip: LoadedClip | None) -> None:
        self.root, self.manifest, self.examples = root, manifest, examples
        self.vectors, self.indexes, self._clip = vectors, indexes, clip
        self.position = {e.id: i for i, e in enumerate(examples)}

    @classmethod
    def open(cls, root: str | Path, clip: LoadedClip | None = None) -> Pool:
        """Open ``root``; ``clip`` (optional) must be the pool's encoder, otherwise it loads on first use."""
        import pyarrow.parquet as pq

        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise PoolError(f"{root} has no {MANIFEST}: not a demonstration pool, or its build has not finished")
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise PoolError(f"{root}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
        if clip is not None and not same_clip(manifest["build"]["clip"], clip.identity):
            raise PoolError(f"{root} was embedded with another CLIP than the one given")
        table = pq.read_table(root / EXAMPLES).to_pylist()
        examples = [Example(id=r["id"], image=r["image"], question=r["question"], answers=tuple(r["answers"]),
                            task=r["task"], label=r["label"]) for r in table]
        vectors = {k: np.load(root / "embeddings" / f"{k}.npy").astype(np.float32) for k in KINDS}
        indexes = {k: load_index(root / "index" / k)[0] for k in KINDS}
        if any(len(v) != len(examples) for v in vectors.values()):
            raise PoolError(f"{root}: embeddings and {EXAMPLES} disagree on the number of examples")
        return cls(root, manifest, examples, vectors, indexes, clip)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def fingerprint(self) -> str:
        """sha256 of the example ids in row order and of their image embeddings: what a model whose vocabulary
        is this pool checks (ids alone repeat across pools of different data, e.g. synthetic worlds)."""
        import hashlib

        if not hasattr(self, "_fingerprint"):
            digest = hashlib.sha256("\n".join(e.id for e in self.examples).encode())
            digest.update(np.ascontiguousarray(self.vectors["image"], dtype=np.float16).tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def clip(self) -> LoadedClip:
        if self._clip is None:
            self._clip = load_clip(spec_from_dict(self.manifest["clip"]))
        return self._clip

    def query_vectors(self, queries: Sequence[Example], batch_size: int = 64) -> dict[str, np.ndarray]:
        """The retrieval keys of ``queries``: stored rows for the pool's own examples, CLIP for others."""
        own = [self.position.get(q.id) for q in queries]
        out = {kind: np.zeros((len(queries), self.vectors[kind].shape[1]), np.float32) for kind in KINDS}
        new = [i for i, p in enumerate(own) if p is None or self.examples[p] != queries[i]]
        rows = [i for i in range(len(queries)) if i not in set(new)]
        for kind in KINDS:
            out[kind][rows] = self.vectors[kind][[own[i] for i in rows]]
        if new:
            fresh = [queries[i] for i in new]
            images, bad = encode_images(self.clip, [q.image for q in fresh], batch_size)
            if bad:
                raise ValueError(f"query {fresh[bad[0]].id!r}: cannot read image {fresh[bad[0]].image}")
            out["image"][new] = images
            out["question"][new] = encode_texts(self.clip, [q.question for q in fresh], batch_size)
            out["answer"][new] = encode_texts(self.clip, [q.answers[0] for q in fresh], batch_size)
            out["sit"][new] = sit_vectors(out["image"][new], out["question"][new])
        return out


def pool_info(root: str | Path) -> str:
    """A human-readable summary of the pool at ``root``."""
    if not (Path(root) / MANIFEST).is_file():
        raise PoolError(f"{root} has no {MANIFEST}: not a demonstration pool, or its build has not finished")
    manifest = json.loads((Path(root) / MANIFEST).read_text())
    lines = [f"pool {root}: {manifest['n']} examples, CLIP {manifest['clip'].get('model')} (dim {manifest['dim']})",
             f"  source: {manifest['build']['format']} {' '.join(manifest['build']['inputs'])}",
             "  tasks: " + ", ".join(f"{k} {v}" for k, v in manifest["tasks"].items()),
             f"  skipped: {manifest['skipped']['total']} " + json.dumps(manifest["skipped"]["counts"]),
             "  indexes: " + ", ".join(f"{k} {v['factory']} (recall@k {v['recall_at_k']})"
                                      for k, v in manifest["index"].items()),
             "  seconds: " + ", ".join(f"{k} {v}" for k, v in manifest["seconds"].items())]
    return "\n".join(lines)
