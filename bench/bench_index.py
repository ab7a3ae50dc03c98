"""Benchmark: exact Flat vs the automatically chosen FAISS index on clustered CLIP-like vectors."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.log import setup_logging
from datastore.index import IndexConfig, build_index, index_memory_bytes, recall_at_k

logger = logging.getLogger("bench_index")


@dataclass
class World:
    """A clustered distribution on the unit sphere (see :func:`make_world`)."""

    centres: np.ndarray  # (C, d) unit vectors
    spreads: np.ndarray  # (C,) noise scale per cluster
    weights: np.ndarray  # (C,) cluster probabilities
    basis: np.ndarray  # (d, d) noise directions (rows), scaled by a decaying spectrum


def make_world(dim: int, clusters: int, seed: int, decay: float = 0.5) -> World:
    """Random clusters of varying spread and size with anisotropic, low-intrinsic-dimension noise.

    Noise variance along a random orthonormal basis falls off as i**(-2*decay) (i = 1..dim), so the
    within-cluster noise has an effective dimension of ~28 at dim=512, decay=0.5 (real CLIP
    neighbourhoods are similarly low-dimensional; isotropic noise would make every neighbour
    nearly equidistant). Spreads are log-uniform in [0.3, 1.0] (cos to centre ~0.96..0.71) and
    cluster sizes log-normal.
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spectrum = np.arange(1, dim + 1, dtype=np.float64) ** -decay
    spectrum /= np.linalg.norm(spectrum)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    weights = rng.lognormal(0.0, 1.0, clusters)
    return World(
        centres=centres,
        spreads=np.exp(rng.uniform(np.log(0.3), np.log(1.0), clusters)).astype(np.float32),
        weights=weights / weights.sum(),
        basis=(spectrum[:, None] * rotation.T).astype(np.float32),
    )


def sample(world: World, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """(n, d) float32 L2-normalised draws from ``world``, generated chunk by chunk."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, world.centres.shape[1]), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        labels = rng.choice(len(world.weights), size=rows, p=world.weights)
        noise = rng.standard_normal((rows, out.shape[1]), dtype=np.float32) @ world.basis
        block = world.centres[labels] + world.spreads[labels, None] * noise
        out[start:start + rows] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def throughput(index, queries: np.ndarray, k: int, batch: int, min_seconds: float = 1.0) -> float:
    """Queries per second searching ``queries`` in batches of ``batch`` (repeated >= min_seconds)."""
    index.search(queries[:batch], k)  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        for lo in range(0, len(queries), batch):
            index.search(queries[lo:lo + batch], k)
            done += len(queries[lo:lo + batch])
            if batch == 1 and time.perf_counter() - start > min_seconds:
                return done / (time.perf_counter() - start)
        if time.perf_counter() - start > min_seconds:
            return done / (time.perf_counter() - start)


def interleaved_throughput(indexes: dict, queries: np.ndarray, k: int, batch: int,
                           rounds: int = 3) -> dict[str, tuple[float, float]]:
    """Median (q/s at ``batch``, q/s at batch 1) per index over ``rounds`` alternating runs, so that
    load changes on a shared machine hit every index alike."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in indexes}
    for _ in range(rounds):
        for name, index in indexes.items():
            runs[name].append((throughput(index, queries, k, batch), throughput(index, queries, k, 1)))
    return {name: tuple(float(np.median(col)) for col in zip(*vals)) for name, vals in runs.items()}


def _row(name: str, factory: str, recall: float, qps_batch: float, qps_one: float, memory: int,
         build: float) -> str:
    return (f"| {name} | `{factory}` | {recall:.4f} | {qps_batch:,.0f} | {qps_one:,.1f} "
            f"| {memory / 2**20:,.1f} | {build:.1f} |")


def run(args: argparse.Namespace) -> dict:
    import faiss

    threads = len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    world = make_world(args.dim, args.clusters, args.seed)
    data = sample(world, args.n, args.seed + 1)
    queries = sample(world, args.queries, args.seed + 2)
    logger.info("generated %d x %d vectors + %d queries in %.1fs", args.n, args.dim, args.queries,
                time.perf_counter() - start)

    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(data)
    flat_build = time.perf_counter() - t0
    truth = flat.search(queries, args.k)[1]

    budget = int(index_memory_bytes(flat) * args.budget_fraction)
    config = IndexConfig(factory=args.factory, max_index_memory=budget, k=args.k, seed=args.seed)
    t0 = time.perf_counter()
    index, info = build_index(data, config)
    auto_build = time.perf_counter() - t0
    recall = recall_at_k(index.search(queries, args.k)[1], truth)
    qps = interleaved_throughput({"flat": flat, "auto": index}, queries, args.k, args.batch)
    logger.info("q/s (batch %d, batch 1): %s", args.batch, qps)
    return {
        "args": vars(args), "threads": threads, "faiss_version": faiss.__version__,
        "flat": {"memory_bytes": index_memory_bytes(flat), "qps_batch": qps["flat"][0],
                 "qps_1": qps["flat"][1], "build_s": flat_build},
        "auto": {"memory_bytes": info["memory_bytes"], "qps_batch": qps["auto"][0], "qps_1": qps["auto"][1],
                 "build_s": auto_build, "recall_at_k": recall, "budget_bytes": budget, "info": info},
    }


def report(res: dict) -> str:
    """Markdown table + ratios + goal check."""
    args, flat, auto = res["args"], res["flat"], res["auto"]
    info = auto["info"]
    k, batch = args["k"], args["batch"]
    lines = [
        f"n={args['n']:,} d={args['dim']} clusters={args['clusters']} held-out queries={args['queries']} "
        f"k={k} threads={res['threads']} faiss {res['faiss_version']}",
        "",
        f"| index | factory | recall@{k} vs exact | q/s (batch {batch}) | q/s (batch 1) | memory MiB | build s |",
        "|---|---|---|---|---|---|---|",
        _row("exact", "Flat", 1.0, flat["qps_batch"], flat["qps_1"], flat["memory_bytes"], flat["build_s"]),
        _row("auto" if info["auto_chosen"] else "forced", info["factory"], auto["recall_at_k"],
             auto["qps_batch"], auto["qps_1"], auto["memory_bytes"], auto["build_s"]),
        "",
        f"search params {info['search_params']} (tuned for recall@{k} >= {info['target_recall']} on "
        f"{info['n_tune_queries']} leave-one-out rows; build recall on {info['n_eval_queries']} other rows "
        f"{info['recall_at_k']:.4f}); stages {info['seconds']}",
        "q/s: median of 3 alternating flat/auto rounds after both indexes were built",
        f"memory: budget {auto['budget_bytes']:,} B, estimated {info['estimated_memory_bytes']:,} B, "
        f"actual {auto['memory_bytes']:,} B",
    ]
    speed, speed1 = auto["qps_batch"] / flat["qps_batch"], auto["qps_1"] / flat["qps_1"]
    mem = auto["memory_bytes"] / flat["memory_bytes"]
    lines.append(f"ratios vs flat: q/s x{speed:.1f} (batch {batch}), x{speed1:.1f} (batch 1); "
                 f"memory x{mem:.3f}")
    met = auto["recall_at_k"] >= 0.95 and min(speed, speed1) >= 10 and mem <= 0.25
    lines.append(f"goal (recall@{k} >= 0.95, >= 10x q/s, <= 1/4 memory): {'MET' if met else 'NOT MET'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000, help="database vectors")
    parser.add_argument("--dim", type=int, default=512, help="dimension (CLIP ViT-B/32: 512)")
    parser.add_argument("--clusters", type=int, default=4000, help="number of clusters")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries")
    parser.add_argument("--batch", type=int, default=1000, help="query batch size for throughput")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-fraction", type=float, default=0.25, help="memory budget / flat memory")
    parser.add_argument("--factory", default=None, help="force an index_factory string")
    parser.add_argument("--json", default=None, help="also write raw results here")
    args = parser.parse_args(argv)
    setup_logging()
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print(report(res))


if __name__ == "__main__":
    main()
