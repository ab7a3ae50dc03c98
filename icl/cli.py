"""``tuna-icl``: build and inspect demonstration pools, retrieve demonstrations for queries."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common.log import setup_logging
from datastore.cli import add_clip_args, clip_spec_from_args

logger = logging.getLogger("icl.cli")

EPILOG = """examples:
  tuna-icl pool build --format vqav2 --input v2_OpenEnded_mscoco_train2014_questions.json \\
      v2_mscoco_train2014_annotations.json --image-root coco/train2014 --out pools/vqav2-train \\
      --model ViT-B-32 --pretrained laion2b_s34b_b79k
  tuna-icl pool build --format llava --input llava_v1_5_mix665k.json --image-root data --out pools/llava
  tuna-icl pool build --format image-folder --input imagenet/train --out pools/imagenet --model ...
  tuna-icl pool info pools/vqav2-train
  tuna-icl retrieve --pool pools/vqav2-train --retriever siir -k 4 --out demos.jsonl   (leave-one-out)
  tuna-icl retrieve --pool pools/vqav2-train --retriever sit -k 4 --format vqav2 \\
      --input val_questions.json val_annotations.json --image-root coco/val2014 --out demos.jsonl
"""


def _parser() -> argparse.ArgumentParser:
    from icl.formats import FORMATS
    from icl.retrievers import RETRIEVERS

    parser = argparse.ArgumentParser(
        prog="tuna-icl", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="In-context learning: demonstration pools (labelled examples with CLIP embeddings and "
                    "FAISS indexes) and the retrievers that pick demonstrations for a query.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    pool = sub.add_parser("pool", help="build or describe a demonstration pool").add_subparsers(
        dest="pool_command", required=True)
    b = pool.add_parser("build", **defaults, help="read, embed and index labelled examples",
                        description="Build a demonstration pool. Bad samples (missing image, no answer, "
                                    "unreadable image) are skipped and counted in the manifest. Re-running "
                                    "with the same settings returns the finished pool.")
    b.add_argument("--format", required=True, choices=FORMATS, help="input layout (docs/icl.md, 'Pool inputs')")
    b.add_argument("--input", nargs="+", required=True, help="files, folders or shard patterns of the layout")
    b.add_argument("--image-root", help="image folder of the llava, vqav2 and coco-karpathy layouts")
    b.add_argument("--out", required=True, help="pool directory")
    b.add_argument("--batch-size", type=int, default=64, help="images/texts per CLIP call")
    b.add_argument("--limit", type=int, default=0, help="keep the first N examples (0: all)")
    b.add_argument("--overwrite", action="store_true", help="delete --out first")
    add_clip_args(b)
    i = pool.add_parser("info", **defaults, help="summarise a pool")
    i.add_argument("pool")

    r = sub.add_parser("retrieve", **defaults, help="rank demonstrations for queries (a JSONL line per query)",
                       description="Rank pool demonstrations for each query. Without --format the queries are "
                                   "the pool's own examples (leave-one-out: the query and other questions on "
                                   "its image are excluded).")
    r.add_argument("--pool", required=True)
    r.add_argument("--retriever", default="siir",
                   help=f"{', '.join(RETRIEVERS)}, or PREFIX:PATH for a learned retriever")
    r.add_argument("-k", type=int, default=4, help="demonstrations per query")
    r.add_argument("--format", choices=FORMATS, help="layout of the queries (default: the pool itself)")
    r.add_argument("--input", nargs="+", help="query files of that layout")
    r.add_argument("--image-root")
    r.add_argument("--limit", type=int, default=0, help="first N queries (0: all)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dedup-threshold", type=float, default=None,
                   help="image cosine from which a demo counts as a copy of the query (default: exact copies)")
    r.add_argument("--out", required=True, help="JSONL: query id, demo ids and scores, most similar first")
    return parser


def cmd_pool_build(args) -> None:
    from icl.pool import PoolConfig, build_pool, pool_info

    config = PoolConfig(format=args.format, inputs=args.input, out=args.out, clip=clip_spec_from_args(args),
                        image_root=args.image_root, batch_size=args.batch_size, limit=args.limit,
                        overwrite=args.overwrite)
    build_pool(config)
    print(pool_info(args.out))


def cmd_pool_info(args) -> None:
    from icl.pool import pool_info

    print(pool_info(args.pool))


def cmd_retrieve(args) -> None:
    from tqdm import tqdm

    from datastore.store import DEDUP_THRESHOLD
    from icl.formats import Skipped, read_examples
    from icl.pool import Pool
    from icl.retrievers import label_precision, make_retriever

    pool = Pool.open(args.pool)
    if args.format:
        if not args.input:
            raise ValueError("--format needs --input")
        skipped = Skipped()
        queries = list(read_examples(args.format, args.input, image_root=args.image_root,
                                     extract_dir=str(Path(args.out).with_suffix("")) + "-images", skipped=skipped))
        if skipped.total:
            logger.warning("skipped %d queries: %s", skipped.total, skipped.counts)
    else:
        queries = pool.examples
    queries = queries[:args.limit] if args.limit else queries
    threshold = DEDUP_THRESHOLD if args.dedup_threshold is None else args.dedup_threshold
    retriever = make_retriever(args.retriever, pool, seed=args.seed, dedup_threshold=threshold)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    ranked = []
    for start in tqdm(range(0, len(queries), 256), desc="retrieve", unit="batch"):
        ranked += retriever.retrieve(queries[start:start + 256], args.k)
    with open(args.out, "w") as f:
        f.writelines(json.dumps({"id": q.id, "demos": [d for d, _ in r], "scores": [round(s, 6) for _, s in r]}) + "\n"
                     for q, r in zip(queries, ranked))
    precision = label_precision(pool, queries, ranked)
    print(f"{len(queries)} queries, {args.retriever} k={args.k}: {args.out}; excluded {retriever.excluded.to_dict()}"
          + ("" if precision is None else f"; demos with the query's label: {precision:.1f} %"))


COMMANDS = {("pool", "build"): cmd_pool_build, ("pool", "info"): cmd_pool_info, ("retrieve", None): cmd_retrieve}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    start = time.perf_counter()
    name = " ".join(filter(None, (args.command, getattr(args, "pool_command", None))))
    try:
        COMMANDS[(args.command, getattr(args, "pool_command", None))](args)
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        logger.debug("traceback", exc_info=True)
        print(f"tuna-icl {name}: error: {exc}", file=sys.stderr)
        return 1
    logger.info("%s finished in %.1fs", name, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
