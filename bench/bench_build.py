"""Datastore build throughput vs the bare encoder's forward throughput on the same batches, same run.

The build overlaps decoding, preprocessing and tagging (DataLoader workers) and writing with
encoding; the goal is build img/s >= 0.90 x encoder-only img/s. The corpus is the synthetic world.

    python bench/bench_build.py                                   # ViT-B-32 (random init), 2,000 images
    python bench/bench_build.py --model tuna-tiny-clip --n-images 5000
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.log import setup_logging
from datastore.build import BuildConfig, encode_parts
from datastore.clip import ClipSpec, load_clip
from datastore.reader import ReaderConfig, ShardBatches
from datastore.synth.layout import World
from datastore.tags import TagParserConfig, build_tag_parser


def make_world(out: Path, n_images: int, shard_size: int) -> list[str]:
    subprocess.run([sys.executable, "-m", "datastore.synth.cli", "--out", str(out), "--seed", "0",
                    "--n-corpus", str(n_images), "--n-instruct", "10", "--n-eval", "10",
                    "--shard-size", str(shard_size)], check=True, stdout=subprocess.DEVNULL)
    return World.open(out).corpus_shards()


def encoder_only(clip, batches: list[torch.Tensor]) -> float:
    """img/s of clip.encode_images over pre-decoded batches (after one warm-up batch)."""
    clip.encode_images(batches[0])
    start = time.perf_counter()
    n = 0
    for pixels in batches:
        clip.encode_images(pixels)
        n += len(pixels)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init)")
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=125)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args()
    setup_logging(logging.WARNING)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        shards = make_world(work / "world", args.n_images, args.shard_size)
        clip = load_clip(ClipSpec(model=args.model))
        tagger = build_tag_parser(TagParserConfig())
        reader = ReaderConfig(batch_size=args.batch_size, num_workers=args.num_workers)
        todo = list(enumerate(shards))
        batches = [b.pixels for b in ShardBatches(todo, reader, clip.preprocess, tagger.parse_batch)
                   if b.pixels is not None]
        base_before = encoder_only(clip, batches)
        config = BuildConfig(inputs=shards, out=str(work / "ds"), clip=clip.spec, reader=reader)
        stats = encode_parts(config, clip, tagger, todo)
        base_after = encoder_only(clip, batches)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = (base_before + base_after) / 2
    build_rate = stats["images"] / stats["seconds"]
    print(f"model {args.model} (image size {clip.identity['image_size']}), {stats['images']} images, "
          f"batch {args.batch_size}, {args.num_workers} decode worker(s), {args.threads} torch threads")
    print(f"encoder forward only : {base:8.1f} img/s  (before {base_before:.1f}, after {base_after:.1f})")
    print(f"full build (no index): {build_rate:8.1f} img/s")
    print(f"ratio build / encoder: {build_rate / base:8.3f}  (goal >= 0.90)")


if __name__ == "__main__":
    main()
