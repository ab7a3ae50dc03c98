"""``tuna ask``: one-off inference, the answer and the tags it read (``tuna quickstart`` is added to the same
command by :mod:`pipeline.cli`, the layer above)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from common.distributed import resolve_device
from common.log import error_line, setup_logging

logger = logging.getLogger("tuna.cli")

EPILOG = """examples:
  tuna quickstart                                  # the whole pipeline on the synthetic world, baseline vs TUNA
  tuna ask --model runs/tuna --image cat.jpg --question "What is this animal?" --datastore ds
  tuna ask --model runs/tuna --image cat.jpg --question "What is it?" --tags "cat,red sofa"
  tuna ask --model runs/tuna --image images/0001.jpg --question "..." --retrieval-cache cache.parquet \\
      --image-id 0001.jpg
  tuna ask --model runs/tuna --image cat.jpg --question "..." --datastore ds --ablation uniform_weights --json
"""


@dataclass(frozen=True)
class Command:
    """A ``tuna`` subcommand contributed by a layer above (``tuna quickstart``: :mod:`pipeline.cli`):
    ``add(subparsers)`` adds its parser, ``run(args)`` runs it."""

    name: str
    add: Callable[[Any], None]
    run: Callable[[argparse.Namespace], Any]


def build_parser(commands: Sequence[Command] = ()) -> argparse.ArgumentParser:
    from tuna.configuration_tuna import ABLATIONS

    parser = argparse.ArgumentParser(
        prog="tuna", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="TUNA: a multimodal LLM that reads tags retrieved for each image from an image→tags datastore.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ask", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="answer one question about one image",
                       description="Load a saved TUNA model (a from_pretrained directory holding the tokenizer "
                                   "too), retrieve tags for the image, generate an answer and print it with the "
                                   "tags and their adaptive weights.")
    a.add_argument("--model", required=True, help="TUNA model directory (save_pretrained output + tokenizer)")
    a.add_argument("--image", required=True, help="image file")
    a.add_argument("--question", required=True, help="the question; an <image> marker is added in front if absent")
    tags = a.add_argument_group("tags (default: none, i.e. the plain-LLaVA behaviour)")
    tags.add_argument("--datastore", help="datastore directory for live retrieval (same CLIP as the model)")
    tags.add_argument("--retrieval-cache", help="retrieval cache parquet (tuna-datastore cache) to look the image up in")
    tags.add_argument("--image-id", help="the image's key in the retrieval cache (default: the --image path)")
    tags.add_argument("--tags", help="comma-separated tags to use instead of retrieval")
    tags.add_argument("--k-images", type=int, default=5, help="neighbours retrieved per query image")
    tags.add_argument("--min-tag-support", type=float, default=0.0,
                      help="read only tags whose entity neighbours holding at least this share of the neighbours' "
                           "summed similarity name (0.5: a majority vote; 0: all)")
    a.add_argument("--ablation", choices=ABLATIONS, help="override the model's ablation switch")
    a.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    a.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    for command in commands:
        command.add(sub)
    return parser


def ask(args) -> dict:
    """Run ``tuna ask``; returns the printed record."""
    from tuna.configuration_tuna import ablation_policy
    from tuna.processing_tuna import load_pretrained

    if not os.path.isfile(args.image):
        raise ValueError(f"image {args.image!r} is not a file")
    if args.tags and args.ablation and ablation_policy(args.ablation).tags == "random":
        raise ValueError(f"--tags gives the tags, --ablation {args.ablation} draws them at random from the "
                         f"datastore's vocabulary: use one of the two")
    timings = {}
    start = time.perf_counter()
    device = resolve_device(args.device)
    model, tokenizer, processor = load_pretrained(
        args.model, device, ablation=args.ablation, retrieval_cache=args.retrieval_cache, datastore=args.datastore,
        k_images=args.k_images, min_support=args.min_tag_support)
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    given = [[t.strip() for t in args.tags.split(",") if t.strip()]] if args.tags else None
    if (given is None and processor.tag_source is None) or not ablation_policy(model.config.ablation).use_tags:
        given = [[]]  # the model reads no tags: show none
    sample = processor.encode(args.question, images=[args.image], image_ids=[args.image_id or args.image],
                              tags=given, sample_id=args.image)
    batch = processor.collate([sample], padding_side="left")
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    timings["retrieve_s"] = time.perf_counter() - start

    start = time.perf_counter()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = model.generate(**batch, max_new_tokens=args.max_new_tokens, pad_token_id=pad)[0]
    stops = set(model.config.stop_token_ids) | {pad}
    answer = tokenizer.decode([t for t in tokens.tolist() if t not in stops], skip_special_tokens=True).strip()
    weights = model.weights_for(batch["pixel_values"], batch["tags"], batch["tag_scores"])[0]
    timings["generate_s"] = time.perf_counter() - start
    tags = batch["tags"][0]
    return {"answer": answer, "tags": [{"tag": t, "weight": w} for t, w in zip(tags, weights or [None] * len(tags))],
            "ablation": model.config.ablation, "timings": {k: round(v, 3) for k, v in timings.items()}}


def _print(record: dict) -> None:
    if record["tags"]:
        # name the ablation only when one is on ("tags (none):" above a real tag list read as "no tags")
        print("tags:" if record["ablation"] == "none" else f"tags (ablation {record['ablation']}):")
        for item in record["tags"]:
            weight = "   -  " if item["weight"] is None else f"{item['weight']:.3f}"
            print(f"  {weight}  {item['tag']}")
    else:
        print("tags: none")
    print(f"answer: {record['answer']}")


def main(argv: list[str] | None = None, commands: Sequence[Command] = ()) -> int:
    """``tuna ask`` (and ``commands`` of the layers above); exit code 1 with a one-line error."""
    args = build_parser(commands).parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        other = {c.name: c for c in commands}.get(args.command)
        if other is not None:
            other.run(args)
            return 0
        record = ask(args)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"tuna {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(record))
    else:
        _print(record)
        logger.info("timings: %s", " ".join(f"{k}={v}" for k, v in record["timings"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
