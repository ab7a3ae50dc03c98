"""``tuna-datastore``: build, merge, query and cache an image→tags datastore (thin layer over the library)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from common.cli import add_config_flags, config_from_args, field_docs
from common.distributed import resolve_device
from common.log import error_line, setup_logging

logger = logging.getLogger("datastore.cli")

EPILOG = """examples:
  tuna-datastore build --input 'corpus/corpus-{000000..000099}.tar' --out ds \\
      --model ViT-B-32 --pretrained laion2b_s34b_b79k
  torchrun --nproc_per_node 8 $(which tuna-datastore) build --input ... --out ds --device auto
  tuna-datastore query --datastore ds --image x.jpg -k 5
  tuna-datastore cache --datastore ds --llava-json instruct.json --image-folder images --out cache.parquet
  tuna-datastore train-clip --input 'world/corpus/corpus-{000000..000019}.tar' --out clip
  tuna-datastore build --input ... --out ds --model-config clip/tuna-quickstart-clip.json \
      --pretrained clip/tuna-quickstart-clip.safetensors
"""


def add_clip_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CLIP encoder (open_clip)")
    g.add_argument("--model", help="open_clip architecture, e.g. ViT-B-32, ViT-L-14-336, tuna-tiny-clip")
    g.add_argument("--pretrained", help="open_clip pretrained tag (e.g. laion2b_s34b_b79k) or a local checkpoint")
    g.add_argument("--model-config", help="local open_clip model-config JSON for a custom architecture "
                                          "(its file stem is the model name)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda:LOCAL_RANK if available)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])


def clip_spec_from_args(args):
    from datastore.clip import ClipSpec

    return ClipSpec(model=args.model, pretrained=args.pretrained, model_config=args.model_config,
                    device=resolve_device(args.device), precision=args.precision)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuna-datastore", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Build and query an image→tags datastore: CLIP image embeddings of webdataset "
                    "image-caption pairs, tags parsed from the captions, and a FAISS index.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}

    b = sub.add_parser("build", **defaults, help="embed, tag and index webdataset shards (resumable)",
                       description="Build (or resume) a datastore. Re-running the same command continues "
                                   "from completed parts. Under torchrun each rank takes every N-th shard "
                                   "and rank 0 merges the index at the end.")
    b.add_argument("--input", nargs="+", required=True, help="shard patterns: brace expansion, globs, fsspec URLs")
    b.add_argument("--out", required=True, help="output datastore directory")
    b.add_argument("--image-key", default="jpg;jpeg;png;webp", help="image extension(s), ';'-separated")
    b.add_argument("--caption-key", default="txt", help="caption extension, or json:FIELD")
    b.add_argument("--batch-size", type=int, default=256, help="images per encoder batch")
    b.add_argument("--num-workers", type=int, default=2, help="decode/tag worker processes")
    b.add_argument("--parser", default="rule", help="tag parser: rule (offline, default) or spacy")
    b.add_argument("--tag-emit", default="both", choices=["phrases", "nouns", "both"])
    b.add_argument("--vocabulary", help="text file of allowed tags, one per line")
    b.add_argument("--index-factory", help="force a faiss index_factory string (e.g. 'IVF4096,SQ8')")
    b.add_argument("--max-index-memory", default="4G", help="index memory budget for the automatic choice")
    b.add_argument("--target-recall", type=float, default=0.95, help="recall@k the search params are tuned to")
    b.add_argument("--overwrite", action="store_true", help="delete OUT first instead of resuming")
    b.add_argument("--rank", type=int, help="this job's rank when not launched by torchrun (job arrays)")
    b.add_argument("--world-size", type=int, help="number of jobs when not launched by torchrun")
    b.add_argument("--no-merge", action="store_true", help="only build parts; run 'merge' later")
    b.add_argument("--max-image-pixels", type=int,
                   help="skip (and count as oversized_image) images with more pixels, read from the header "
                        "(default: datastore.reader.MAX_IMAGE_PIXELS, 64 MP)")
    b.add_argument("--decode-device", help="decode JPEGs on this device (e.g. cuda), batched in the main process; "
                                           "workers only read and tag (default: workers decode with PIL)")
    add_clip_args(b)

    m = sub.add_parser("merge", **defaults, help="build the index and manifest once all parts exist")
    m.add_argument("--out", required=True, help="datastore directory")
    m.add_argument("--index-factory", help="force a faiss index_factory string")
    m.add_argument("--max-index-memory", default="4G", help="index memory budget for the automatic choice")
    m.add_argument("--target-recall", type=float, default=0.95, help="recall@k the search params are tuned to")

    from datastore.store import DEDUP_THRESHOLD  # light, as datastore.cache

    q = sub.add_parser("query", **defaults, help="print an image's nearest datastore images and retrieved tags")
    q.add_argument("--datastore", required=True, help="datastore directory")
    q.add_argument("--image", nargs="+", required=True, help="image file(s)")
    q.add_argument("-k", "--k", type=int, default=5, help="neighbour images per query")
    q.add_argument("--max-tags", type=int, default=20, help="tags printed per query")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--exclude-self", action="store_true",
                   help="drop each image's own datastore entry: a key equal to the image path, the path without "
                        "extension or its file stem, or a cosine >= --dedup-threshold (as `cache` does)")
    q.add_argument("--dedup-threshold", type=float, default=DEDUP_THRESHOLD,
                   help="with --exclude-self: cosine at or above which a neighbour is a copy of the image")
    q.add_argument("--device", default="auto", help="CLIP device: cpu, cuda, cuda:N or auto")

    from datastore.cache import (
        CacheConfig,  # light: torch and open_clip load when a command runs
    )

    c = sub.add_parser("cache", **defaults, help="precompute retrieved tags for an instruction/eval set")
    add_config_flags(c, CacheConfig, defaults={"device": "auto"},
                     helps={"device": "CLIP device: cpu, cuda, cuda:N or auto"})
    from datastore.clip_train import (  # light: torch/open_clip load lazily
        TEXT_MODES,
        ClipTrainConfig,
    )

    t = sub.add_parser("train-clip", **defaults,
                       help="train a small CLIP contrastively on webdataset shards (offline stand-in)",
                       description="Train an open_clip CLIP from scratch on image-text shards (e.g. the synthetic "
                                   "world's corpus) and write OUT/<arch>.json (model config), "
                                   "OUT/<arch>.safetensors (checkpoint) and OUT/train.json (recipe, loss curve, "
                                   "timings). Use them with --model-config/--pretrained. Deterministic for a "
                                   "given seed and thread count (unless --max-minutes cuts it short).")
    t.add_argument("--input", nargs="+", required=True, help="shard patterns: brace expansion, globs")
    t.add_argument("--out", required=True, help="output folder")
    add_config_flags(t, ClipTrainConfig,
                     helps={"text_mode": f"one of {', '.join(TEXT_MODES)}: " + field_docs(ClipTrainConfig)["text_mode"]})
    i = sub.add_parser("info", **defaults, help="print a datastore's manifest summary")
    i.add_argument("--datastore", required=True, help="datastore directory")
    i.add_argument("--verify", action="store_true",
                   help="also check every part and index file against the sha256 the manifest records "
                        "(reads them all; without it only the sizes are checked)")
    return parser


def _index_config(args):
    from datastore.index import IndexConfig

    return IndexConfig(factory=args.index_factory, max_index_memory=args.max_index_memory,
                       target_recall=args.target_recall)


def cmd_build(args) -> None:
    from datastore.build import BuildConfig, build
    from datastore.reader import ReaderConfig
    from datastore.tags import TagParserConfig

    config = BuildConfig(
        inputs=args.input, out=args.out, clip=clip_spec_from_args(args),
        reader=ReaderConfig(image_key=args.image_key, caption_key=args.caption_key,
                            batch_size=args.batch_size, num_workers=args.num_workers,
                            **({"max_image_pixels": args.max_image_pixels} if args.max_image_pixels else {})),
        tags=TagParserConfig(name=args.parser, emit=args.tag_emit, vocabulary=args.vocabulary),
        index=_index_config(args), overwrite=args.overwrite, rank=args.rank, world_size=args.world_size,
        merge=not args.no_merge,
        decode_device=resolve_device(args.decode_device) if args.decode_device else None)
    manifest = build(config)
    if manifest is not None:
        print(summarize(manifest, args.out))


def summarize(manifest: dict, root: str) -> str:
    """Human-readable summary of a manifest: counts, index, recall and per-stage timings."""
    counts, index = manifest["counts"], manifest["index"]
    skipped = ", ".join(f"{k} {v}" for k, v in counts["skipped"].items()) or "none"
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in manifest.get("timings_s", {}).items())
    truncated = [p["shard"] for p in manifest["parts"] if p.get("truncated")]
    return (f"datastore {root}: {counts['written']} images written of {counts['read']} read "
            f"(skipped: {skipped}); {len(manifest['parts'])} parts; dim {manifest['dim']}\n"
            + (f"truncated shards (samples after the cut are missing): {', '.join(truncated)}\n" if truncated else "")
            + _duplicates_line(manifest.get("duplicate_keys"))
            + f"index {index['factory']} {index.get('search_params', {})}: "
            f"recall@{index['k']} vs exact {index['recall_at_k']:.4f}\n"
            f"stage seconds (summed over workers): {timings}")


def _duplicates_line(duplicates: dict | None) -> str:
    if not duplicates or not duplicates["rows"]:
        return ""
    return (f"duplicate sample keys: {duplicates['rows']} rows share {duplicates['keys']} keys with an earlier row "
            f"(e.g. {', '.join(duplicates['examples'])}); all kept\n")


def cmd_merge(args) -> None:
    from datastore.merge import merge

    print(summarize(merge(args.out, _index_config(args)), args.out))


def cmd_query(args) -> None:
    from datastore.store import Datastore

    store = Datastore.open(args.datastore, device=resolve_device(args.device))
    results = store.retrieve_tags(images=args.image, k_images=args.k, max_tags=args.max_tags,
                                  exclude_keys=args.image if args.exclude_self else None,
                                  dedup_threshold=args.dedup_threshold if args.exclude_self else None)
    if args.json:
        print(json.dumps([{"image": img, **r.to_dict()} for img, r in zip(args.image, results)], indent=2))
        return
    for image, result in zip(args.image, results):
        print(f"query {image}" + (f"  (excluded: {result.excluded_by_key} by key, {result.excluded_near_dup} "
                                  "near-duplicates)" if args.exclude_self else ""))
        for rank, (key, score) in enumerate(zip(result.neighbours, result.neighbour_scores), 1):
            print(f"  neighbour {rank}: {key}  cos {score:.4f}")
        print("  tags: " + ", ".join(f"{t} ({s:.3f})" for t, s in zip(result.tags, result.scores)))


def cmd_cache(args) -> None:
    from datastore.cache import CacheConfig, build_cache

    meta = build_cache(config_from_args(CacheConfig, args, device=resolve_device(args.device)))
    counts = meta["counts"]
    excluded = counts["excluded"]
    print(f"cache {args.out}: {counts['written']} images, skipped {counts['skipped'] or 'none'}, excluded "
          f"{excluded['by_key']} self neighbours by key and {excluded['near_duplicate']} near-duplicates "
          f"({excluded['images']} images), {meta['seconds']:.1f}s")


def cmd_train_clip(args) -> None:
    from datastore.clip_train import ClipTrainConfig, train_clip

    config = config_from_args(ClipTrainConfig, args)
    result = train_clip(args.input, args.out, config, progress=True)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    print(f"clip {result.spec.model}: {result.steps} steps ({result.step_seconds:.3f}s/step), "
          f"loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f}; {timings}\n"
          f"  --model-config {result.spec.model_config} --pretrained {result.spec.pretrained}")


def cmd_info(args) -> None:
    from datastore.store import Datastore, DatastoreError, read_manifest, verify_files

    if args.verify:
        manifest = read_manifest(args.datastore)
        problems = verify_files(args.datastore, manifest, checksums=True)
        if problems:
            raise DatastoreError(f"verify: {len(problems)} damaged file(s): {'; '.join(problems)}")
        n_files = 2 * len(manifest["parts"]) + len(manifest["index"].get("files") or {"index.faiss": 0})
        recorded = all(p.get("files") for p in manifest["parts"])
        print(f"verify: {n_files} files match the manifest's "
              + ("sizes and sha256" if recorded else "list (it records no sizes or checksums: built by an "
                 "older version; re-run `tuna-datastore merge` to record them)"))
    store = Datastore.open(args.datastore)
    print(summarize(store.manifest, args.datastore))


COMMANDS = {"build": cmd_build, "merge": cmd_merge, "query": cmd_query, "cache": cmd_cache, "info": cmd_info,
            "train-clip": cmd_train_clip}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    start = time.perf_counter()
    try:
        COMMANDS[args.command](args)
    except (ValueError, RuntimeError, OSError, KeyError) as exc:
        print(f"tuna-datastore {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 1
    logger.info("%s finished in %.1fs", args.command, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
