"""Does the synthetic ICL task make the choice of demonstrations matter?

Generates the in-context learning task of a quickstart's world (same seed and categories), builds a pool
of its support set with the quickstart's CLIP, and measures per retriever the share of retrieved demos
whose label is the query's (label precision@k), on clean and distractor queries, seen and novel.

    .venv/bin/python experiments/icl_retrieval.py --run runs/quickstart --out /tmp/icl_retrieval
    .venv/bin/python experiments/icl_retrieval.py --run runs/quickstart --seeds 0,1 --k 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

RETRIEVERS = ("random", "siir", "sttr", "sitr", "sit", "oracle")


def build(run: Path, out: Path, seed: int, per_category: int, queries: int, share: float) -> Path:
    from datastore.clip import ClipSpec
    from icl.pool import PoolConfig, build_pool

    world = out / f"world-{seed}"
    if not (world / "icl" / "questions.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "datastore.synth.cli", "--out", str(world), "--seed", str(seed),
                        "--n-corpus", "1", "--n-instruct", "1", "--n-eval", "2", "--overwrite",
                        "--icl-support-per-category", str(per_category), "--icl-queries", str(queries),
                        "--icl-distractor-share", str(share)], check=True, stdout=subprocess.DEVNULL)
    clip = ClipSpec(model_config=str(run / "clip" / "tuna-quickstart-clip.json"),
                    pretrained=str(run / "clip" / "tuna-quickstart-clip.safetensors"))
    pool = out / f"pool-{seed}"
    build_pool(PoolConfig(format="llava", inputs=[str(world / "icl" / "support.json")], out=str(pool), clip=clip,
                          image_root=str(world / "images")), progress=False)
    return world


def measure(world: Path, pool_dir: Path, k: int) -> dict[str, dict[str, float | None]]:
    from icl.formats import read_examples
    from icl.pool import Pool
    from icl.retrievers import label_precision, make_retriever

    pool = Pool.open(pool_dir)
    queries = list(read_examples("synth-icl", [str(world)]))
    meta = {json.loads(line)["question_id"]: json.loads(line)
            for line in (world / "icl" / "questions.jsonl").read_text().splitlines()}
    vectors = pool.query_vectors(queries)
    groups = {"all": lambda m: True, "clean": lambda m: not m["distractor"], "distractor": lambda m: m["distractor"],
              "seen": lambda m: m["novelty"] == "seen", "novel": lambda m: m["novelty"] == "novel"}
    table = {}
    for name in RETRIEVERS:
        ranked = make_retriever(name, pool).retrieve(queries, k, vectors)
        table[name] = {g: label_precision(pool, *zip(*[(q, r) for q, r in zip(queries, ranked) if keep(meta[q.id])]))
                       for g, keep in groups.items()}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished tuna quickstart --out (its CLIP is used)")
    parser.add_argument("--out", default="/tmp/icl_retrieval")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--per-category", type=int, default=20)
    parser.add_argument("--queries", type=int, default=400)
    parser.add_argument("--distractor-share", type=float, default=0.5)
    args = parser.parse_args()
    out = Path(args.out)
    for seed in map(int, args.seeds.split(",")):
        world = build(Path(args.run), out, seed, args.per_category, args.queries, args.distractor_share)
        table = measure(world, out / f"pool-{seed}", args.k)
        print(f"\nworld seed {seed}: label precision@{args.k} (% of retrieved demos with the query's label)")
        print("| retriever | all | clean | distractor | seen | novel |\n|---|---|---|---|---|---|")
        for name, row in table.items():
            print(f"| {name} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
