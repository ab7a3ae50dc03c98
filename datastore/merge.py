"""Merge: once every part is written, build one FAISS index over all parts and write the manifest."""

from __future__ import annotations

import datetime
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from datastore import __version__, layout
from datastore.index import IndexConfig, build_index, save_index
from datastore.writer import load_embeddings

logger = logging.getLogger(__name__)

STAGES = ("read", "tag", "encode", "write")


class MergeError(RuntimeError):
    """Parts are missing or inconsistent."""


def collect_parts(root: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return (build record, part markers in part order); raise MergeError naming missing parts."""
    root = Path(root)
    if not layout.build_path(root).exists():
        raise MergeError(f"{root} is not a datastore build directory (no build.json)")
    record = layout.read_json(layout.build_path(root))
    parts, missing = [], []
    for i, shard in enumerate(record["shards"]):
        marker = layout.marker_path(root, i)
        if marker.exists():
            parts.append(layout.read_json(marker))
        else:
            missing.append(f"{i} ({shard})")
    if missing:
        raise MergeError(f"{len(missing)} of {len(record['shards'])} parts are not built yet: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; run the build again")
    return record, parts


def merge(root: str | Path, index_config: IndexConfig | None = None) -> dict[str, Any]:
    """Build the index over all parts and write ``manifest.json``; returns the manifest.

    Raises:
        MergeError: some part has not been built, or the datastore is empty.
    """
    index_config = index_config or IndexConfig()
    record, parts = collect_parts(root)
    start = time.perf_counter()
    vectors = load_embeddings(root, parts)
    if len(vectors) == 0:
        raise MergeError(f"{root}: no sample was written (every sample was skipped; see parts/*.json)")
    index, info = build_index(vectors, index_config)
    save_index(index, info, layout.index_dir(root))
    seconds = _stage_seconds(parts)
    seconds["index"] = round(time.perf_counter() - start, 4)
    manifest = _manifest(record, parts, info, seconds, len(vectors))
    layout.write_json_atomic(layout.manifest_path(root), manifest)
    logger.info("datastore %s: %d images, index %s, recall@%d=%.4f", root, len(vectors),
                info["factory"], info["k"], info["recall_at_k"])
    return manifest


def _stage_seconds(parts: list[dict[str, Any]]) -> dict[str, float]:
    total = Counter()
    for part in parts:
        total.update(part["seconds"])
    return {stage: round(total.get(stage, 0.0), 4) for stage in STAGES}


def _manifest(record: dict, parts: list[dict], index_info: dict, seconds: dict, n: int) -> dict[str, Any]:
    skipped = Counter()
    for part in parts:
        skipped.update(part["skipped"])
    read = sum(p["n_read"] for p in parts)
    written = sum(p["n_written"] for p in parts)
    if read != written + sum(skipped.values()) or written != n:
        raise MergeError(f"inconsistent counts: read {read}, written {written}, skipped "
                         f"{sum(skipped.values())}, embeddings {n}")
    return {
        "format_version": layout.FORMAT_VERSION,
        "tuna_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "clip": record["clip"],
        "dim": int(record["clip"]["embed_dim"]),
        "normalized": True,
        "embedding_dtype": "float16",
        "metric": "inner_product",
        "parser": record["parser"],
        "reader": record["reader"],
        "counts": {"read": read, "written": written, "skipped": dict(sorted(skipped.items()))},
        "parts": [{k: p[k] for k in ("part", "shard", "n_written", "embeddings", "metadata")} for p in parts],
        "index": {"path": "index/index.faiss", **index_info},
        "timings_s": seconds,
    }
