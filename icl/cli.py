"""``tuna-icl``: build and inspect demonstration pools, retrieve demonstrations for queries."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common.log import error_line, setup_logging
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
  tuna-icl lever-lm build-data --pool pools/vqav2-train --model runs/tuna --datastore ds --out dm/vqav2
  torchrun --nproc_per_node 8 -m icl.cli lever-lm build-data ...      (anchors split over ranks)
  tuna-icl lever-lm train --data dm/vqav2 --out lever-lm/vqav2
  tuna-eval --model runs/tuna --bench vqav2_val --shots 1,2,4,8 --demo-pool pools/vqav2-train \\
      --retriever lever-lm:lever-lm/vqav2 ...
  tuna-icl drum train --pool pools/vqav2-train --model runs/tuna --datastore ds --out drum/vqav2 --rounds 3
  accelerate launch -m icl.cli drum train ...                          (queries split over processes)
  tuna-eval ... --retriever drum:drum/vqav2                            (the latest round's embedder)
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
    _lever_lm_parsers(sub, defaults)
    _drum_parsers(sub, defaults)
    return parser


def _lever_lm_parsers(sub, defaults: dict) -> None:
    from icl.lever_lm.train import add_train_args

    lever = sub.add_parser("lever-lm", help="Lever-LM: mine demonstration sequences, train the model that "
                                            "generates them").add_subparsers(dest="lever_command", required=True)
    d = lever.add_parser(
        "build-data", **defaults, help="beam-search demonstration sequences by InfoScore (D_M)",
        description="For anchors sampled from the pool: draw M candidate demos, then beam search sequences of "
                    "length l whose InfoScore (gain in the answer's probability under the scoring model) is "
                    "highest. Resumes finished blocks; under torchrun the blocks are split over ranks.")
    d.add_argument("--pool", required=True, help="demonstration pool (anchors and candidates)")
    d.add_argument("--out", required=True, help="D_M directory")
    d.add_argument("--anchors", type=int, default=1000, help="n, anchors sampled from the pool")
    d.add_argument("--candidates", type=int, default=64, help="M, candidate demos per anchor")
    d.add_argument("--sampling", default="random", choices=["random", "siir", "sttr", "sitr", "sit"],
                   help="how the candidate set is drawn: at random, or the anchor's nearest by that retriever")
    d.add_argument("--beam", type=int, default=5, help="b, sequences kept per step")
    d.add_argument("--length", type=int, default=2, help="l, demos per sequence")
    d.add_argument("--block", type=int, default=8, help="anchors per part file (the resume unit)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true", help="delete --out first")
    add_scorer_args(d)
    t = lever.add_parser("train", **defaults, help="train Lever-LM on D_M (next-demo cross-entropy)",
                         description="Train the demonstration generator. Launch with python, accelerate launch "
                                     "(DeepSpeed through its config) or torchrun for data parallelism.")
    add_train_args(t)
    g = lever.add_parser("diagnose", **defaults, help="does InfoScore prefer demos of the anchor's label?")
    g.add_argument("data", help="D_M directory")


def _drum_parsers(sub, defaults: dict) -> None:
    from icl.drum.train import add_train_args

    drum = sub.add_parser("drum", help="DRUM: a demonstration retriever trained with the scoring model's feedback"
                          ).add_subparsers(dest="drum_command", required=True)
    t = drum.add_parser(
        "train", **defaults, help="rounds of mine -> score -> train (resumes by round)",
        description="Train a DRUM embedder: each round mines the top-n candidates of the training queries with "
                    "the current embedder, scores them with the scoring model (log P(answer | demo, query), "
                    "cached), logs the round's metrics and trains the embedder with the ranking loss. Launch "
                    "with python, accelerate launch or torchrun -m icl.cli for data parallelism over queries.")
    add_train_args(t)
    add_scorer_args(t)


def add_scorer_args(parser: argparse.ArgumentParser) -> None:
    """The scoring model: a TUNA folder (with its tag source) or a Hugging Face image-text-to-text model."""
    s = parser.add_argument_group("scoring model")
    which = s.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="TUNA model folder (train/train.py output)")
    which.add_argument("--hf-model", help="Hugging Face image-text-to-text model (folder or hub id) taking "
                                          "interleaved images")
    s.add_argument("--datastore", help="datastore for the TUNA model's retrieved tags")
    s.add_argument("--retrieval-cache", help="retrieval cache parquet for the TUNA model's tags")
    s.add_argument("--k-images", type=int, default=5, help="neighbours retrieved per image for tags")
    s.add_argument("--min-tag-support", type=float, default=0.0, help="as in tuna-eval")
    s.add_argument("--no-demo-tags", action="store_true", help="empty tag blocks for the demos' images")
    s.add_argument("--scorer-batch-size", type=int, default=16, help="candidate sets per forward pass")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (under torchrun: cuda:LOCAL_RANK)")


def scorer_from_args(args):
    """(scorer, identity) for :func:`add_scorer_args`' flags."""
    from common.distributed import resolve_device
    from icl.scoring import TunaScorer, model_identity

    device = resolve_device(args.device)
    if args.hf_model:
        from icl.hf_scorer import HFScorer

        return (HFScorer.from_pretrained(args.hf_model, device=device, batch_size=args.scorer_batch_size),
                model_identity(args.hf_model, backend="hf"))
    try:
        scorer = TunaScorer.from_pretrained(args.model, datastore=args.datastore,
                                            retrieval_cache=args.retrieval_cache, k_images=args.k_images,
                                            min_tag_support=args.min_tag_support, device=device,
                                            batch_size=args.scorer_batch_size, demo_tags=not args.no_demo_tags)
    except OSError as exc:  # transformers' message names the missing weights file, not the flag
        raise ValueError(f"--model {args.model}: not a TUNA model folder ({exc})") from exc
    tags = {"datastore": str(Path(args.datastore).resolve()) if args.datastore else None,
            "retrieval_cache": str(Path(args.retrieval_cache).resolve()) if args.retrieval_cache else None,
            "k_images": args.k_images, "min_tag_support": args.min_tag_support, "demo_tags": not args.no_demo_tags}
    return scorer, model_identity(args.model, backend="tuna", **tags)


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


def cmd_lever_build_data(args) -> None:
    import os
    import shutil

    from icl.lever_lm.data import BuildDataConfig, build_data
    from icl.pool import pool_info

    config = BuildDataConfig(pool=args.pool, out=args.out, anchors=args.anchors, candidates=args.candidates,
                             sampling=args.sampling, beam=args.beam, length=args.length, seed=args.seed,
                             block=args.block)
    if args.overwrite and Path(args.out).exists() and os.environ.get("RANK", "0") == "0":
        shutil.rmtree(args.out)
    pool_info(args.pool)  # a missing pool fails before the scoring model loads
    scorer, identity = scorer_from_args(args)
    manifest = build_data(config, scorer, identity)
    if manifest:
        print(f"D_M {args.out}: {manifest['anchors']} anchors, {manifest['sequences']} sequences, "
              f"{manifest['sets_scored']} sets scored in {manifest['forward_passes']} forward passes, "
              f"{manifest['seconds_per_anchor']} s per anchor ({manifest['sets_per_second']} sets/s)")


def cmd_drum_train(args) -> None:
    from icl.drum.train import config_from_args, train_drum
    from icl.pool import pool_info

    config = config_from_args(args)
    pool_info(args.pool)  # a missing pool fails before the scoring model loads
    scorer, identity = scorer_from_args(args)
    history = train_drum(config, scorer, identity)
    if history:
        last = history[-1]
        print(f"drum {args.out}: {len(history)} rounds evaluated; round {last['round']}: "
              + ", ".join(f"{k} {v}" for k, v in last.items() if k.startswith(("dev_", "train_top1"))))


def cmd_lever_train(args) -> None:
    from icl.lever_lm.train import config_from_args, train_lever_lm

    train_lever_lm(config_from_args(args))


def cmd_lever_diagnose(args) -> None:
    from icl.lever_lm.data import diagnostics, read_dm
    from icl.pool import Pool

    manifest, _, _ = read_dm(args.data)
    print(json.dumps(diagnostics(args.data, Pool.open(manifest["pool"])), indent=1))


COMMANDS = {("pool", "build"): cmd_pool_build, ("pool", "info"): cmd_pool_info, ("retrieve", None): cmd_retrieve,
            ("lever-lm", "build-data"): cmd_lever_build_data, ("lever-lm", "train"): cmd_lever_train,
            ("lever-lm", "diagnose"): cmd_lever_diagnose, ("drum", "train"): cmd_drum_train}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    start = time.perf_counter()
    sub = next((getattr(args, a) for a in ("pool_command", "lever_command", "drum_command") if hasattr(args, a)), None)
    name = " ".join(filter(None, (args.command, sub)))
    try:
        COMMANDS[(args.command, sub)](args)
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        logger.debug("traceback", exc_info=True)
        print(f"tuna-icl {name}: error: {error_line(exc)}", file=sys.stderr)
        return 1
    logger.info("%s finished in %.1fs", name, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
