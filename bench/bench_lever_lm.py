"""Lever-LM's two costs: mining D_M (scoring-model forward passes per anchor) and picking demos at inference
(ms per query against SIIR, measured in the same run on the same pool and queries).

D_M: per anchor, a beam search of length l over M candidates scores 1 + M + b (M - 1) + ... demo sets with
the large model. Measured with a tiny TUNA (the ICL scoring benchmark's) at scorer batch 1 (the baseline)
and batched. Inference: Lever-LM generates K ids greedily (K forward passes of a 2-layer model, the pool's
embedding table as its head); SIIR is one FAISS search.

    python bench/bench_lever_lm.py                                  # pool 10,000, K 8, Lever-LM d 512 x 2 layers
    python bench/bench_lever_lm.py --pool-size 100000 --clip-dim 768 --device cuda
    python bench/bench_lever_lm.py --skip-dm                        # inference only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def synthetic_pool(n: int, dim: int, root: Path):
    """A pool in memory: random unit vectors, flat indexes; ids and images distinct."""
    import faiss

    from icl.formats import Example
    from icl.pool import Pool, sit_vectors

    rng = np.random.default_rng(0)
    vectors = {}
    for kind in ("image", "question", "answer"):
        v = rng.standard_normal((n, dim)).astype(np.float32)
        vectors[kind] = v / np.linalg.norm(v, axis=1, keepdims=True)
    vectors["sit"] = sit_vectors(vectors["image"], vectors["question"])
    indexes = {}
    for kind, v in vectors.items():
        indexes[kind] = faiss.IndexFlatIP(v.shape[1])
        indexes[kind].add(v)
    examples = [Example(f"e{i}", f"/pool/{i}.jpg", "q?", ("a",), "vqa", None) for i in range(n)]
    return Pool(root, {"n": n}, examples, vectors, indexes, clip=None)


def queries_like(pool, m: int):
    from icl.formats import Example
    from icl.pool import sit_vectors

    rng = np.random.default_rng(1)
    vectors = {}
    for kind in ("image", "question", "answer"):
        v = rng.standard_normal((m, pool.vectors[kind].shape[1])).astype(np.float32)
        vectors[kind] = v / np.linalg.norm(v, axis=1, keepdims=True)
    vectors["sit"] = sit_vectors(vectors["image"], vectors["question"])
    return [Example(f"q{i}", f"/query/{i}.jpg", "q?", ("a",), "vqa", None) for i in range(m)], vectors


def bench_inference(args) -> None:
    from icl.lever_lm.model import LeverLM
    from icl.retrievers import make_retriever

    with tempfile.TemporaryDirectory() as tmp:
        pool = synthetic_pool(args.pool_size, args.clip_dim, Path(tmp))
        torch.manual_seed(0)
        LeverLM.for_pool(pool, hidden_size=args.hidden, num_layers=args.layers).save_pretrained(Path(tmp) / "lm")
        queries, vectors = queries_like(pool, args.queries)
        siir = make_retriever("siir", pool, dedup_threshold=None)
        lever = make_retriever(f"lever-lm:{Path(tmp) / 'lm'}", pool, dedup_threshold=None, device=args.device,
                               batch_size=args.batch_size)

        def timed(retriever) -> tuple[float, list]:
            retriever.retrieve(queries[:8], args.k, {k: v[:8] for k, v in vectors.items()})  # warm-up
            start = time.perf_counter()
            ranked = retriever.retrieve(queries, args.k, vectors)
            return 1000 * (time.perf_counter() - start) / len(queries), ranked

        base_ms, _ = timed(siir)
        lever_ms, ranked = timed(lever)
        assert all(len(r) == args.k and len({d for d, _ in r}) == args.k for r in ranked)
        print(f"pool {args.pool_size} x {args.clip_dim}, {args.queries} queries, K={args.k}, Lever-LM d {args.hidden} x "
              f"{args.layers} layers, batch {args.batch_size}, {args.device}, {torch.get_num_threads()} threads")
        print("| retriever | ms / query | vs SIIR |\n|---|---|---|")
        print(f"| siir (FAISS flat) | {base_ms:.3f} | 1.00x |")
        print(f"| lever-lm | {lever_ms:.3f} | {lever_ms / base_ms:.1f}x |")


def bench_dm(args) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_icl_scoring import setup

    from icl.lever_lm.beam import beam_search
    from icl.scoring import TunaScorer

    with tempfile.TemporaryDirectory() as tmp:
        model, processor, examples = setup(Path(tmp), hidden=256, layers=4)
        anchors, pool = examples[:args.anchors], examples[args.anchors:]
        rng = np.random.default_rng(0)
        candidate_sets = [[pool[i] for i in rng.choice(len(pool), args.candidates, replace=False)] for _ in anchors]
        print(f"\nD_M: {len(anchors)} anchors, M={args.candidates}, b={args.beam}, l={args.length}, tiny TUNA "
              f"(LLM 256 x 4), {torch.get_num_threads()} threads")
        print("| scorer batch | sets / anchor | forward passes / anchor | s / anchor | vs batch 1 |\n|---|---|---|---|---|")
        base = None
        for batch in (1, args.scorer_batch):
            scorer = TunaScorer(model, processor, batch_size=batch)
            beam_search(scorer, anchors[0], candidate_sets[0][:3], 1, 1)  # warm-up
            start, sets, passes = time.perf_counter(), 0, 0
            for anchor, candidates in zip(anchors, candidate_sets):
                result = beam_search(scorer, anchor, candidates, args.beam, args.length)
                sets += result.sets_scored
                passes += 1 + sum(-(-n // batch) for n in result.steps)
            seconds = (time.perf_counter() - start) / len(anchors)
            base = base or seconds
            print(f"| {batch} | {sets / len(anchors):.0f} | {passes / len(anchors):.0f} | {seconds:.2f} | "
                  f"{base / seconds:.2f}x faster |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-size", type=int, default=10_000)
    parser.add_argument("--clip-dim", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=512, help="Lever-LM width")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--queries", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256, help="queries per Lever-LM generation")
    parser.add_argument("-k", type=int, default=8, help="demos per query")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--anchors", type=int, default=3, help="D_M: anchors timed")
    parser.add_argument("--candidates", type=int, default=16, help="D_M: M")
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--length", type=int, default=2)
    parser.add_argument("--scorer-batch", type=int, default=16)
    parser.add_argument("--skip-dm", action="store_true", help="inference only")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_inference(args)
    if not args.skip_dm:
        bench_dm(args)


if __name__ == "__main__":
    main()
