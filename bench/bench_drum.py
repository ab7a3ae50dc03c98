"""DRUM's cost per round: seconds by stage (embed the pool, mine, score, evaluate, train) and scored
(query, candidate) pairs per second, with a tiny TUNA as the scoring model.

Rows, all in the same run on the same pool and queries:
- scorer batch 1 vs the default 16 (the baseline is batch 1): scoring dominates a round;
- the training scopes: ``head`` (linear heads on stored CLIP embeddings; the baseline) against ``projection``,
  ``lora`` and ``full``, which re-encode images and texts with CLIP at every step. Their scores come from the
  shared cache, so only the embedding and training stages differ.

    python bench/bench_drum.py                              # tiny TUNA (LLM 256 x 4), n = 16, 1 round
    python bench/bench_drum.py --queries 64 --candidates 32 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def run_round(pool_dir: Path, out: Path, feedback: Path, scorer, args, scope: str) -> tuple[dict, float]:
    from icl.drum.train import DrumConfig, train_drum

    config = DrumConfig(pool=str(pool_dir), out=str(out), scope=scope, rounds=1, candidates=args.candidates,
                        queries=args.queries, dev_queries=args.dev_queries, epochs=args.epochs,
                        batch_size=16, feedback=str(feedback), device=args.device)
    start = time.perf_counter()
    history = train_drum(config, scorer, {"model": "bench-tiny-tuna"}, progress=False)
    return history[0], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=24, help="training queries")
    parser.add_argument("--dev-queries", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=16, help="n per query")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--scorer-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_icl_scoring import setup

    from datastore.clip import ClipSpec
    from datastore.index import IndexConfig
    from icl.pool import PoolConfig, build_pool
    from icl.scoring import TunaScorer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, processor, _ = setup(tmp, hidden=256, layers=4)
        model = model.to(args.device)
        pool_dir = tmp / "pool"
        build_pool(PoolConfig(format="synth", inputs=[str(tmp / "w")], out=str(pool_dir),
                              clip=ClipSpec(model="tuna-tiny-clip"), index=IndexConfig(n_eval_queries=10)),
                   progress=False)
        print(f"tiny TUNA (LLM 256 x 4), {args.queries} queries x n={args.candidates}, {args.dev_queries} dev queries, "
              f"{args.epochs} epochs, {args.device}, {torch.get_num_threads()} threads")
        print("\n| scorer batch | pairs scored | score s | pairs / s | vs batch 1 |\n|---|---|---|---|---|")
        base = None
        for batch in (1, args.scorer_batch):
            scorer = TunaScorer(model, processor, batch_size=batch)
            first = _first(pool_dir)
            scorer.loglik(first, [[first]])  # warm-up
            metrics, _ = run_round(pool_dir, tmp / f"b{batch}", tmp / f"feedback-b{batch}", scorer, args, "head")
            rate = metrics["pairs_per_second"]
            base = base or rate
            print(f"| {batch} | {metrics['scored']} | {metrics['seconds']['score']} | {rate:.1f} | {rate / base:.2f}x |")
        print("\n| scope | embed pool s | train s | round s (scores cached) | train vs head |\n|---|---|---|---|---|")
        shared = tmp / f"feedback-b{args.scorer_batch}"  # round 0's lists are the same: all scores cached
        head_train = None
        for scope in ("head", "projection", "lora", "full"):
            metrics, seconds = run_round(pool_dir, tmp / scope, shared, scorer, args, scope)
            train = metrics["seconds"]["train"]
            head_train = head_train or train
            print(f"| {scope} | {metrics['seconds']['embed_pool']} | {train} | {seconds:.1f} | {train / head_train:.1f}x |")


def _first(pool_dir: Path):
    from icl.pool import Pool

    return Pool.open(pool_dir).examples[0]


if __name__ == "__main__":
    main()
