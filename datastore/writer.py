"""Writer: buffers encoded batches per part and writes each finished part atomically."""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datastore import layout
from datastore.reader import Batch

logger = logging.getLogger(__name__)


@dataclass
class _PartBuffer:
    shard: str
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    n_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)
    shard_stat: dict[str, Any] | None = None
    truncated: str | None = None


class PartWriter:
    """Collects batches (which may interleave across parts) and writes a part when its last batch arrives.

    A part's files are written under temporary names and renamed; its marker JSON is written last,
    so a part counts as done exactly when its marker exists (a killed build redoes unmarked parts).
    """

    def __init__(self, root: str | Path, dim: int) -> None:
        self.root, self.dim = Path(root), dim
        self.buffers: dict[int, _PartBuffer] = {}
        for sub in ("img_emb", "metadata", "parts"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def add(self, batch: Batch, embeddings: np.ndarray | None, encode_seconds: float) -> dict[str, Any] | None:
        """Buffer a batch; returns the part record when the batch completed its part."""
        buf = self.buffers.setdefault(batch.part, _PartBuffer(batch.shard))
        buf.keys += batch.keys
        buf.captions += batch.captions
        buf.tags += batch.tags
        if embeddings is not None:
            buf.embeddings.append(embeddings.astype(np.float16))
        buf.n_read += batch.n_read
        buf.skipped.update(batch.skipped)
        buf.seconds.update({**batch.seconds, "encode": encode_seconds})
        if batch.last:
            buf.shard_stat, buf.truncated = batch.shard_stat, batch.truncated
        return self._write(batch.part, self.buffers.pop(batch.part)) if batch.last else None

    def _write(self, part: int, buf: _PartBuffer) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        start = time.perf_counter()
        emb = np.concatenate(buf.embeddings) if buf.embeddings else np.zeros((0, self.dim), np.float16)
        if len(emb) != len(buf.keys):
            raise RuntimeError(f"part {part} ({buf.shard}): {len(emb)} embeddings for {len(buf.keys)} keys")
        emb_file, meta_file = layout.emb_path(self.root, part), layout.metadata_path(self.root, part)
        tmp = layout.tmp_sibling(emb_file)
        with open(tmp, "wb") as handle:
            np.save(handle, emb, allow_pickle=False)
        os.replace(tmp, emb_file)
        table = pa.table({
            "key": pa.array(buf.keys, pa.string()),
            "caption": pa.array(buf.captions, pa.string()),
            "tags": pa.array(buf.tags, pa.list_(pa.string())),
            "shard": pa.array([buf.shard] * len(buf.keys), pa.string()),
        })
        tmp = layout.tmp_sibling(meta_file)
        pq.write_table(table, tmp)
        os.replace(tmp, meta_file)
        buf.seconds["write"] += time.perf_counter() - start
        record = {
            "part": part,
            "shard": buf.shard,
            "n_read": buf.n_read,
            "n_written": len(buf.keys),
            "skipped": dict(sorted(buf.skipped.items())),
            "embeddings": str(emb_file.relative_to(self.root)),
            "metadata": str(meta_file.relative_to(self.root)),
            "files": {"embeddings": layout.file_record(emb_file), "metadata": layout.file_record(meta_file)},
            "shard_stat": buf.shard_stat,
            "seconds": {k: round(v, 4) for k, v in buf.seconds.items()},
        }
        if buf.truncated:
            record["truncated"] = buf.truncated
            logger.warning("part %d: shard %s is truncated (%s): its %d samples before the cut are kept, "
                           "the rest are missing; counted as truncated_shard", part, buf.shard, buf.truncated,
                           buf.n_read)
        layout.write_json_atomic(layout.marker_path(self.root, part), record)
        logger.debug("part %d done: %d written, %d skipped", part, len(buf.keys), sum(buf.skipped.values()))
        return record


def load_embeddings(root: str | Path, parts: list[dict[str, Any]], dtype=np.float16) -> np.ndarray:
    """Concatenate the parts' embeddings in part order (row i of the result = index id i).

    Raises:
        layout.DamagedFileError: naming a file that is missing, of another size than its part marker
            recorded, unreadable, or of another shape than the part's count.
    """
    arrays = []
    for p in parts:
        path = Path(root) / p["embeddings"]
        problem = layout.check_file(root, p["embeddings"], (p.get("files") or {}).get("embeddings"))
        if problem is None:
            try:
                array = np.load(path, allow_pickle=False)
            except Exception as exc:  # ValueError, EOFError, OSError ... for a damaged .npy
                problem = f"{path}: cannot read embeddings ({type(exc).__name__}: {exc})"
            else:
                if array.ndim != 2 or len(array) != p["n_written"]:
                    problem = f"{path}: shape {array.shape}, expected {p['n_written']} rows"
        if problem:
            raise layout.DamagedFileError(f"{problem}; rebuild the part: delete {layout.marker_path('', p['part'])} "
                                          f"in {root} and run the build again")
        arrays.append(array)
    return np.concatenate(arrays).astype(dtype, copy=False)
