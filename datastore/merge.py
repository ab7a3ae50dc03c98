"""Merge: once every part is written, build one FAISS index over all parts and write the manifest."""

from __future__ import annotations

import datetime
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from datastore import __version__, layout
from datastore.index import INDEX_FILE, INFO_FILE, IndexConfig, build_index, save_index
from datastore.reader import SHARD_SKIP_REASONS
from datastore.writer import load_embeddings

logger = logging.getLogger(__name__)

STAGES = ("read", "tag", "encode", "write")
MARKER_KEYS = ("part", "shard", "n_read", "n_written", "skipped", "embeddings", "metadata", "seconds")


class MergeError(RuntimeError):
    """Parts are missing or inconsistent."""


def collect_parts(root: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Return (build record, part markers in part order); raise MergeError naming missing parts."""
    root = Path(root)
    if not layout.build_path(root).exists():
        raise MergeError(f"{root} is not a datastore build directory (no build.json)")
    try:
        record = layout.read_json_object(layout.build_path(root), ("clip", "parser", "reader", "shards"))
    except ValueError as err:
        raise MergeError(str(err)) from None
    if not isinstance(record["shards"], list):
        raise MergeError(f"{layout.build_path(root)}: 'shards' is not a list")
    parts, missing = [], []
    for i, shard in enumerate(record["shards"]):
        marker = layout.marker_path(root, i)
        if marker.exists():
            try:
                parts.append(layout.read_json_object(marker, MARKER_KEYS))
            except ValueError as err:
                raise MergeError(f"{err}; delete it and run the build again to redo the part") from None
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
    try:
        vectors = load_embeddings(root, parts)
        files = [_part_files(root, part) for part in parts]
    except layout.DamagedFileError as err:
        raise MergeError(str(err)) from None
    if len(vectors) == 0:
        raise MergeError(f"{root}: no sample was written (every sample was skipped; see parts/*.json)")
    index, info = build_index(vectors, index_config)
    save_index(index, info, layout.index_dir(root))
    seconds = _stage_seconds(parts)
    seconds["index"] = round(time.perf_counter() - start, 4)
    manifest = _manifest(record, parts, info, seconds, len(vectors))
    for entry, part_files in zip(manifest["parts"], files):
        entry["files"] = part_files
    manifest["index"]["files"] = {name: layout.file_record(layout.index_dir(root) / name)
                                  for name in (INDEX_FILE, INFO_FILE)}
    manifest["duplicate_keys"] = duplicate_keys(root, parts)
    truncated = [p["shard"] for p in parts if p.get("truncated")]
    if truncated:
        logger.warning("%d truncated shard(s), samples after the cut are missing: %s", len(truncated),
                       ", ".join(truncated))
    layout.write_json_atomic(layout.manifest_path(root), manifest)
    logger.info("datastore %s: %d images, index %s, recall@%d=%.4f", root, len(vectors),
                info["factory"], info["k"], info["recall_at_k"])
    return manifest


def duplicate_keys(root: str | Path, parts: list[dict[str, Any]], n_examples: int = 5) -> dict[str, Any]:
    """Sample keys used more than once, within a shard or across shards: {"rows": rows beyond each key's
    first, "keys": distinct keys repeated, "examples": a few of them}.

    Every row is kept (they are different images; dropping one would lose data), but lookups by key —
    ``exclude_keys`` in retrieval, the retrieval cache — treat rows that share a key as one sample.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    keys = pa.chunked_array([pq.read_table(Path(root) / p["metadata"], columns=["key"])["key"] for p in parts])
    counts = pc.value_counts(keys)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    rows = int(pc.sum(repeated.field("counts")).as_py() or 0) - len(repeated)
    examples = repeated.field("values").to_pylist()[:n_examples]
    if rows:
        logger.warning("%d row(s) share a sample key with an earlier row (%d keys, e.g. %s); all are kept, "
                       "lookups by key treat them as one sample", rows, len(repeated), ", ".join(examples))
    return {"rows": rows, "keys": len(repeated), "examples": examples}


def _part_files(root: str | Path, part: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The part's file records (size, sha256) for the manifest, checked against its marker's; a marker
    written by an older version has none: they are computed from the files as they are now."""
    recorded = part.get("files") or {}
    out = {}
    for name in ("embeddings", "metadata"):
        problem = layout.check_file(root, part[name], recorded.get(name))
        if problem:
            raise layout.DamagedFileError(f"{problem}; rebuild the part: delete "
                                          f"{layout.marker_path('', part['part'])} in {root} and run the build again")
        out[name] = recorded.get(name) or layout.file_record(Path(root) / part[name])
    return out


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
    sample_skips = sum(v for k, v in skipped.items() if k not in SHARD_SKIP_REASONS)
    if read != written + sample_skips or written != n:
        raise MergeError(f"inconsistent counts: read {read}, written {written}, skipped "
                         f"{sample_skips}, embeddings {n}")
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
        "parts": [{k: p[k] for k in ("part", "shard", "n_written", "embeddings", "metadata", "truncated")
                   if k in p} for p in parts],
        "index": {"path": "index/index.faiss", **index_info},
        "timings_s": seconds,
    }
