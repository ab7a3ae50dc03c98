"""``tuna``: one-off inference (``tuna ask``: the answer and the tags it read) and ``tuna quickstart``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from datastore.utils import setup_logging

logger = logging.getLogger("tuna.cli")

EPILOG = """examples:
  tuna quickstart                                  # the whole pipeline on the synthetic world, baseline vs TUNA
  tuna ask --model runs/tuna --image cat.jpg --question "What is this animal?" --datastore ds
  tuna ask --model runs/tuna --image cat.jpg --question "What is it?" --tags "cat,red sofa"
  tuna ask --model runs/tuna --image images/0001.jpg --question "..." --retrieval-cache cache.parquet \\
      --image-id 0001.jpg
  tuna ask --model runs/tuna --image cat.jpg --question "..." --datastore ds --ablation uniform_weights --json
"""


def _parser() -> argparse.ArgumentParser:
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
    _add_quickstart_parser(sub)
    return parser


def _add_quickstart_parser(sub) -> None:
    from tuna.quickstart import QuickstartConfig

    d = QuickstartConfig()
    q = sub.add_parser(
        "quickstart", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="the whole pipeline on the synthetic world: baseline vs TUNA (≤ 15 min on 2 CPU cores)",
        description="Synthesize a world with seen and novel object categories; train a tiny CLIP on its corpus "
                    "and a tiny LLM on text only; build the datastore and retrieval caches; train a no-tags "
                    "baseline and TUNA with deepspeed (ZeRO-2, both stages, same data/budget/seed); evaluate "
                    "both plus the random-tags and uniform-weights ablations on seen and novel categories, and "
                    "TUNA with a second world's datastore swapped in. Prints the comparison table and writes "
                    "results.json, results.md and results.png under --out. Re-running continues after the last "
                    "finished stage.")
    q.add_argument("--out", default=d.out, help="output directory")
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--corpus-size", type=int, default=d.corpus_size, help="datastore corpus images")
    q.add_argument("--n-instruct", type=int, default=d.n_instruct, help="instruction images (seen categories)")
    q.add_argument("--n-eval", type=int, default=d.n_eval, help="evaluation images (half seen, half novel)")
    q.add_argument("--n-seen", type=int, default=d.n_seen, help="categories in the instruction data")
    q.add_argument("--n-novel", type=int, default=d.n_novel, help="categories only in the corpus and the eval set")
    q.add_argument("--text-replay", type=float, default=d.text_replay,
                   help="text-only copy conversations mixed into instruction tuning, per instruction image")
    q.add_argument("--swap-corpus-size", type=int, default=d.swap_corpus_size,
                   help="corpus images of the second world (datastore swap)")
    q.add_argument("--no-swap", action="store_true", help="skip the zero-shot datastore swap")
    q.add_argument("--clip-steps", type=int, default=d.clip_steps, help="tiny CLIP training steps")
    q.add_argument("--llm-steps", type=int, default=d.llm_steps, help="LLM text-pretraining steps")
    q.add_argument("--llm-hidden", type=int, default=d.llm_hidden, help="LLM hidden size")
    q.add_argument("--llm-layers", type=int, default=d.llm_layers, help="LLM layers")
    q.add_argument("--stage1-steps", type=int, default=d.stage1_steps, help="connector pretraining steps")
    q.add_argument("--steps", type=int, default=d.steps, help="instruction tuning steps")
    q.add_argument("--batch-size", type=int, default=d.batch_size, help="per-process training batch")
    q.add_argument("--nproc", type=int, default=d.nproc, help="training processes (deepspeed --num_gpus)")
    q.add_argument("--ds-config", default=d.ds_config, help="file in ds_configs/")
    q.add_argument("--rename-p", type=float, default=d.rename_p,
                   help="share of TUNA's instruction samples whose seen names are permuted among each other on the "
                        "LLM side (questions, answers, tag words): the tag block, not the image, gives the name; 0: off")
    q.add_argument("--eval-min-tag-support", type=float, default=d.eval_min_tag_support,
                   help="at evaluation, read only tags whose entity a (similarity-weighted) share of at least this "
                        "of the neighbours names; 0: every retrieved tag")
    q.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    q.add_argument("--device", default=d.device, help="cpu or cuda")
    q.add_argument("--overwrite", action="store_true", help="delete --out first instead of resuming")


def quickstart(args) -> dict:
    from datastore.utils import config_from_args
    from tuna.quickstart import QuickstartConfig, run_quickstart

    return run_quickstart(config_from_args(QuickstartConfig, args, swap=not args.no_swap))


def _tag_source(args, model):
    from tuna.tag_source import TagSource

    if not (args.datastore or args.retrieval_cache):
        return None
    cache = datastore = None
    if args.retrieval_cache:
        from datastore.cache import RetrievalCache

        cache = RetrievalCache(args.retrieval_cache)
    if args.datastore:
        from datastore.store import Datastore

        datastore = Datastore.open(args.datastore, clip=model.vision.clip)
    return TagSource(cache=cache, datastore=datastore, k_images=args.k_images, max_tags=model.config.max_tags,
                     min_support=args.min_tag_support)


def ask(args) -> dict:
    """Run ``tuna ask``; returns the printed record."""
    import torch
    from transformers import AutoTokenizer

    from tuna.modeling_tuna import TunaForCausalLM
    from tuna.processing_tuna import TunaProcessor

    if not os.path.isfile(args.image):
        raise ValueError(f"image {args.image!r} is not a file")
    timings = {}
    start = time.perf_counter()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = TunaForCausalLM.from_pretrained(args.model).to(device).eval()
    if args.ablation:
        model.config.ablation = args.ablation
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    processor = TunaProcessor.from_model(model, tokenizer, tag_source=_tag_source(args, model))
    timings["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    given = [[t.strip() for t in args.tags.split(",") if t.strip()]] if args.tags else None
    if given is None and processor.tag_source is None:
        given = [[]]
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
        print(f"tags ({record['ablation']}):")
        for item in record["tags"]:
            weight = "   -  " if item["weight"] is None else f"{item['weight']:.3f}"
            print(f"  {weight}  {item['tag']}")
    else:
        print("tags: none")
    print(f"answer: {record['answer']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command == "quickstart":
            quickstart(args)
            return 0
        record = ask(args)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"tuna {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(record))
    else:
        _print(record)
        logger.info("timings: %s", " ".join(f"{k}={v}" for k, v in record["timings"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
