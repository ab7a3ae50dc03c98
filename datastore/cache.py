"""Retrieval cache: precomputed tags for every image of an instruction/eval set, keyed by image id.

Training and evaluation read tags from this parquet file instead of querying the index in their
inner loop. The image id is the LLaVA ``image`` field (path relative to the image folder) or the
webdataset ``__key__``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from datastore.clip import describe_mismatch, same_clip
from datastore.store import AGGREGATIONS, DEDUP_THRESHOLD, Datastore, RetrievedTags

logger = logging.getLogger(__name__)

CACHE_META_KEY = b"tuna_retrieval_cache"
ON_ERROR = ("error", "skip")


class CacheError(RuntimeError):
    """An input image is missing/unreadable (with on_error="error"), a cache lookup failed, or a cache does not
    match the CLIP or the datastore it is used with."""


@dataclass
class CacheConfig:
    """What to precompute.

    Attributes:
        datastore: datastore directory.
        out: output parquet file.
        llava_json: LLaVA instruction/eval files (.json list or .jsonl) whose ``image`` fields are ids.
        image_folder: folder the LLaVA ``image`` paths are relative to.
        shards: webdataset shard patterns (ids are sample keys).
        image_key: image member extension(s) in shards.
        k_images: neighbour images whose tags are pooled.
        max_tags: tags kept per image.
        aggregate: a tag's score: "sum" or "max" of the cosines of the neighbours that have it.
        exclude_self: drop each image's own datastore entry from its neighbours and take the next ones: a
            training image from the crawl the datastore was built from would otherwise read its own caption,
            which it never gets at test time. Its own entry is a neighbour whose key is the image id, the
            id's path without extension or its file stem ("images/000123.jpg" matches key "000123"), or
            whose cosine is at least dedup_threshold (a copy under another key). Harmless for images that
            are not in the datastore.
        dedup_threshold: cosine at or above which a neighbour is a copy of the image (with exclude_self;
            above 1: by key only). The default drops exact copies only (distinct images of the synthetic
            worlds reach 0.9998); a web CLIP scores re-processed copies lower: use e.g. 0.95 for real data.
        batch_size: images per encoder batch.
        num_workers: image decode worker processes.
        on_error: "error" stops at the first missing/corrupt image naming it; "skip" counts it.
        device: encoder device.
    """

    datastore: str
    out: str
    llava_json: list[str] = field(default_factory=list)
    image_folder: str | None = None
    shards: list[str] = field(default_factory=list)
    image_key: str = "jpg;jpeg;png;webp"
    k_images: int = 5
    max_tags: int | None = 32
    aggregate: str = "sum"
    exclude_self: bool = True
    dedup_threshold: float = DEDUP_THRESHOLD
    batch_size: int = 64
    num_workers: int = 2
    on_error: str = "error"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.llava_json and not self.shards:
            raise ValueError("give LLaVA json files (llava_json) or webdataset shards (shards)")
        if self.llava_json and self.image_folder is None:
            raise ValueError("image_folder is required with llava_json (LLaVA image paths are relative to it)")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"on_error={self.on_error!r}: expected one of {ON_ERROR}")
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate={self.aggregate!r}: expected one of {AGGREGATIONS}")
        if self.k_images < 1:
            raise ValueError(f"k_images={self.k_images}: must be >= 1")
        if self.dedup_threshold <= 0:
            raise ValueError(f"dedup_threshold={self.dedup_threshold}: must be > 0 (a cosine; above 1 turns it off)")


def llava_image_ids(paths: list[str]) -> list[str]:
    """Distinct ``image`` values of LLaVA .json/.jsonl files, in first-seen order (lists flattened)."""
    ids: dict[str, None] = {}
    for path in paths:
        text = Path(path).read_text()
        records = [json.loads(line) for line in text.splitlines() if line.strip()] \
            if path.endswith(".jsonl") else json.loads(text)
        for record in records:
            image = record.get("image")
            for item in image if isinstance(image, list) else [image] if image else []:
                ids[item] = None
    return list(ids)


class _FolderImages:
    """Map-style dataset: image id → (id, preprocessed pixels or None, skip reason or None)."""

    def __init__(self, ids: list[str], folder: str, preprocess) -> None:
        self.ids, self.folder, self.preprocess = ids, Path(folder), preprocess

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        path = self.folder / self.ids[i]
        if not path.is_file():
            return self.ids[i], None, "missing_file"
        from datastore.reader import (
            decode_image,  # torch: not needed to read a cache or its config
        )

        image, reason = decode_image({"img": path.read_bytes()}, "img")
        return self.ids[i], (self.preprocess(image) if image is not None else None), reason


def _collate(items):
    return items


def _iter_batches(config: CacheConfig, preprocess) -> Iterator[list[tuple[str, Any, str | None]]]:
    import torch

    from datastore.reader import decode_image, expand_shards, iter_raw_samples

    if config.llava_json:
        ids = llava_image_ids(config.llava_json)
        loader = torch.utils.data.DataLoader(_FolderImages(ids, config.image_folder, preprocess),
                                             batch_size=config.batch_size, num_workers=config.num_workers,
                                             collate_fn=_collate)
        yield from loader
    for shard in expand_shards(config.shards) if config.shards else []:
        batch = []
        for sample in iter_raw_samples(shard):
            image, reason = decode_image(sample, config.image_key)
            batch.append((sample["__key__"], preprocess(image) if image is not None else None, reason))
            if len(batch) == config.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def build_cache(config: CacheConfig, show_progress: bool = True) -> dict[str, Any]:
    """Retrieve tags for every input image and write the cache parquet; returns its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from tqdm import tqdm

    store = Datastore.open(config.datastore, device=config.device)
    rows: dict[str, list] = {"image": [], "tags": [], "scores": [], "neighbours": [], "neighbour_scores": []}
    skipped, excluded, start = Counter(), Counter(), time.perf_counter()
    for batch in tqdm(_iter_batches(config, store.clip.preprocess), desc="cache", unit="batch",
                      disable=not show_progress):
        good = [(image_id, pixels) for image_id, pixels, reason in batch if reason is None]
        for image_id, _, reason in batch:
            if reason is not None:
                if config.on_error == "error":
                    raise CacheError(f"image {image_id!r}: {reason.replace('_', ' ')} "
                                     "(use on_error='skip' / --on-error skip to skip and count such images)")
                skipped[reason] += 1
        if not good:
            continue
        emb = store.clip.encode_images(torch.stack([p for _, p in good])).cpu().numpy()
        retrieved = store.retrieve_tags(
            embeddings=emb, k_images=config.k_images, max_tags=config.max_tags, aggregate=config.aggregate,
            exclude_keys=[image_id for image_id, _ in good] if config.exclude_self else None,
            dedup_threshold=config.dedup_threshold if config.exclude_self else None)
        for (image_id, _), item in zip(good, retrieved):
            excluded.update(by_key=item.excluded_by_key, near_duplicate=item.excluded_near_dup,
                            images=item.excluded_by_key + item.excluded_near_dup > 0)
            rows["image"].append(image_id)
            for key, value in item.to_dict().items():
                rows[key].append(value)
    n = len(rows["image"])
    excluded = {k: excluded[k] for k in ("images", "by_key", "near_duplicate")}
    logger.info("cache: excluded %d neighbours of %d of %d images (%d by key, %d near-duplicates)",
                excluded["by_key"] + excluded["near_duplicate"], excluded["images"], n, excluded["by_key"],
                excluded["near_duplicate"])
    meta = _cache_meta(config, store, n, skipped, excluded, time.perf_counter() - start)
    table = pa.table(rows, schema=_schema()).replace_schema_metadata({CACHE_META_KEY: json.dumps(meta)})
    Path(config.out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, config.out)
    return meta


def _schema():
    import pyarrow as pa

    return pa.schema([("image", pa.string()), ("tags", pa.list_(pa.string())), ("scores", pa.list_(pa.float32())),
                      ("neighbours", pa.list_(pa.string())), ("neighbour_scores", pa.list_(pa.float32()))])


def _cache_meta(config: CacheConfig, store: Datastore, n: int, skipped: Counter, excluded: dict,
                seconds: float) -> dict:
    settings = {k: v for k, v in asdict(config).items()
                if k in ("k_images", "max_tags", "aggregate", "exclude_self", "dedup_threshold")}
    return {
        "datastore": str(Path(config.datastore).resolve()),
        "datastore_created": store.manifest["created"],
        "datastore_rows": store.manifest["counts"].get("written"),
        "clip": store.manifest["clip"],
        "index": store.manifest["index"]["factory"],
        **settings,
        "counts": {"written": n, "skipped": dict(skipped), "excluded": excluded},
        "seconds": round(seconds, 3),
    }


class RetrievalCache:
    """Read side of a cache file: ``cache[image_id]`` → RetrievedTags."""

    def __init__(self, path: str | Path) -> None:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(CACHE_META_KEY)
        if raw is None:
            raise CacheError(f"{path} is not a tuna retrieval cache (no {CACHE_META_KEY.decode()} metadata)")
        self.path, self.meta = Path(path), json.loads(raw)
        columns = table.to_pydict()
        self._rows = {image: i for i, image in enumerate(columns["image"])}
        self._columns = columns

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def clip(self) -> dict[str, Any] | None:
        """Identity of the CLIP the cache's datastore was built with (None: not recorded)."""
        clip = self.meta.get("clip")
        return clip if isinstance(clip, dict) and "model" in clip and "weights_sha256" in clip else None

    def identity(self) -> dict[str, Any]:
        """What results should record about this cache: file, row count, CLIP, source datastore and settings."""
        clip = self.clip or {}
        return {"path": str(self.path.resolve()), "rows": len(self),
                "clip": {k: clip.get(k) for k in ("model", "pretrained", "weights_sha256")} if clip else None,
                "datastore": self.meta.get("datastore"), "datastore_created": self.meta.get("datastore_created"),
                "datastore_rows": self.meta.get("datastore_rows"),
                **{k: self.meta.get(k) for k in ("k_images", "max_tags", "aggregate", "exclude_self")}}

    def check_clip(self, expected: dict[str, Any] | None, what: str = "the model") -> None:
        """Raise CacheError unless the cache was built with the CLIP of identity ``expected`` (None/empty:
        nothing to compare with). A cache that records no CLIP is refused when there is one to compare."""
        if not expected:
            return
        if self.clip is None:
            raise CacheError(f"retrieval cache {self.path} records no CLIP identity, so it cannot be checked "
                             f"against {what}'s CLIP; rebuild it with `tuna-datastore cache`")
        if not same_clip(expected, self.clip):
            raise CacheError(f"retrieval cache {self.path} was built with a different CLIP than {what}: "
                             f"{describe_mismatch(expected, self.clip)}; rebuild it with `tuna-datastore cache` "
                             "from a datastore built with that CLIP")

    def check_datastore(self, store: Datastore) -> None:
        """Raise CacheError unless the cache fits ``store``: the same CLIP and, where the cache records it, the
        same number of images. Not the build stamp: re-running a finished build rewrites it, contents unchanged
        (the path may differ too, e.g. a copied datastore)."""
        self.check_clip(store.manifest.get("clip"), what=f"datastore {store.root}")
        rows, now = self.meta.get("datastore_rows"), store.manifest.get("counts", {}).get("written")
        if rows is not None and now is not None and rows != now:
            raise CacheError(f"retrieval cache {self.path} was built from another datastore than {store.root}: "
                             f"from {self.meta.get('datastore')} with {rows} images, this one has {now}; give the "
                             "datastore the cache was built from, or rebuild the cache from this one")

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._rows

    def __getitem__(self, image_id: str) -> RetrievedTags:
        row = self._rows.get(image_id)
        if row is None:
            raise CacheError(f"image {image_id!r} is not in retrieval cache {self.path}")
        c = self._columns
        return RetrievedTags(tags=c["tags"][row], scores=[float(s) for s in c["scores"][row]],
                             neighbours=c["neighbours"][row], neighbour_scores=list(c["neighbour_scores"][row]))
