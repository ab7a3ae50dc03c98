"""Tag retrieval latency: ``Datastore.retrieve_tags`` per query at batch 1 and batched.

Builds a datastore of clustered CLIP-like vectors (bench_index's generator; each cluster is one
made-up object with a few colours) through the real writer + merge (automatic index), then times
search-only and full tag retrieval (search + key/tag lookup + aggregation) from query embeddings.

    python bench/bench_retrieval.py                 # 200k entries, d=512
    python bench/bench_retrieval.py --n 1000000
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_index import make_world, sample  # noqa: E402  (bench/ is on sys.path when run as a script)

from common.log import setup_logging
from datastore import layout
from datastore.index import IndexConfig
from datastore.merge import merge
from datastore.reader import Batch
from datastore.store import Datastore
from datastore.writer import PartWriter

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"]


def write_datastore(root: Path, vectors: np.ndarray, labels: np.ndarray, part_size: int) -> None:
    """Write ``vectors`` as datastore parts with tags "<colour> obj<label>", "obj<label>"."""
    n_parts = (len(vectors) + part_size - 1) // part_size
    shards = [f"synthetic-{i:06d}" for i in range(n_parts)]
    layout.write_json_atomic(layout.build_path(root), {
        "format_version": layout.FORMAT_VERSION, "shards": shards, "reader": {},
        "parser": {"name": "bench", "version": "0"},
        "clip": {"model": "none", "pretrained": None, "weights_sha256": "0" * 64, "embed_dim": vectors.shape[1]}})
    writer = PartWriter(root, vectors.shape[1])
    for part, shard in enumerate(shards):
        rows = range(part * part_size, min(len(vectors), (part + 1) * part_size))
        batch = Batch(part=part, shard=shard, keys=[f"k{i:09d}" for i in rows], last=True, n_read=len(rows))
        batch.captions = [""] * len(rows)
        batch.tags = [[f"{COLOURS[i % len(COLOURS)]} obj{labels[i]}", f"obj{labels[i]}"] for i in rows]
        writer.add(batch, vectors[rows.start:rows.stop], 0.0)


def nearest_centre(vectors: np.ndarray, centres: np.ndarray, chunk: int = 50_000) -> np.ndarray:
    return np.concatenate([np.argmax(vectors[i:i + chunk] @ centres.T, axis=1)
                           for i in range(0, len(vectors), chunk)])


def timed(fn, queries: np.ndarray, batch: int, min_seconds: float = 2.0) -> float:
    """Mean seconds per query over repeated passes of ``fn`` on batches of ``batch`` queries."""
    fn(queries[:batch])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        for lo in range(0, len(queries), batch):
            fn(queries[lo:lo + batch])
            done += len(queries[lo:lo + batch])
    return (time.perf_counter() - start) / done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--k-images", type=int, default=5)
    parser.add_argument("--max-tags", type=int, default=20)
    parser.add_argument("--max-index-memory", default="4G")
    args = parser.parse_args()
    setup_logging(logging.WARNING)
    world = make_world(args.dim, args.clusters, seed=0)
    vectors = sample(world, args.n, seed=1)
    queries = sample(world, 1000, seed=2)
    root = Path(tempfile.mkdtemp(prefix="bench_retrieval_"))
    try:
        write_datastore(root, vectors, nearest_centre(vectors, world.centres), part_size=50_000)
        manifest = merge(root, IndexConfig(max_index_memory=args.max_index_memory))
        store = Datastore.open(root)
        search = lambda q: store.search(q, args.k_images)  # noqa: E731
        full = lambda q: store.retrieve_tags(embeddings=q, k_images=args.k_images,  # noqa: E731
                                             max_tags=args.max_tags)
        print(f"datastore: {args.n} entries, d={args.dim}, index {manifest['index']['factory']} "
              f"{manifest['index']['search_params']}, recall@10 {manifest['index']['recall_at_k']:.3f}, "
              f"k_images={args.k_images}")
        print(f"{'batch':>6} {'search ms/query':>16} {'retrieve_tags ms/query':>23} {'queries/s':>10}")
        for batch in (1, 32, 256):
            s, f = timed(search, queries, batch), timed(full, queries, batch)
            print(f"{batch:>6} {s * 1e3:>16.3f} {f * 1e3:>23.3f} {1 / f:>10.0f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
