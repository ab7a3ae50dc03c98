"""Datastore build throughput vs the bare encoder's throughput on the same batches, same run, any device.

The build overlaps decoding, preprocessing and tagging (DataLoader workers) and writing with
encoding; the goal is build img/s >= 0.90 x encoder-only img/s. The corpus is the synthetic world,
by default its 96 px renders; ``--photo-size 448`` writes CC3M-like JPEGs instead (longer side
394-502 px, quality 90, with grain: ``tuna-synth --corpus-photo-size``), whose decoding costs what a
web photo's does.

Measured in one run, in this order: the encoder alone (before), the build, the encoder alone (after).
"Encoder only" encodes ``--encoder-batches`` distinct batches, decoded beforehand and held in host
memory (page-locked on CUDA), cycled over ``--n-images`` images: host→device copy, forward and
read-back, one batch at a time. On CUDA the forward alone on batches already on the GPU is also
reported. The build is ``datastore.build.encode_parts`` (parts written, no index); its stage seconds
are "read"/"tag" summed over the DataLoader workers and "wait" (blocked on the workers), "decode"
(``--decode-device``), "copy", "encode", "write" in the main process.

    python bench/bench_build.py                                   # ViT-B-32 (random init), 2,000 images, CPU
    python bench/bench_build.py --model tuna-tiny-clip --n-images 5000
    python bench/bench_build.py --model ViT-L-14 --device cuda --precision bf16 --batch-size 256 \\
        --num-workers 15 --n-images 20000 --photo-size 448 [--decode-device cuda] --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
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
from datastore.clip import PRECISIONS, ClipSpec, load_clip
from datastore.reader import ReaderConfig, ShardBatches
from datastore.synth.layout import World
from datastore.tags import TagParserConfig, build_tag_parser


def make_world(out: Path, n_images: int, shard_size: int, photo_size: int = 0) -> list[str]:
    """Synthetic corpus shards of ``n_images`` (photo-sized JPEGs when ``photo_size``)."""
    cmd = [sys.executable, "-m", "datastore.synth.cli", "--out", str(out), "--seed", "0",
           "--n-corpus", str(n_images), "--n-instruct", "10", "--n-eval", "10", "--shard-size", str(shard_size)]
    if photo_size:
        cmd += ["--corpus-photo-size", str(photo_size)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return World.open(out).corpus_shards()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_only(clip, batches: list[torch.Tensor], n_images: int, on_device: bool = False) -> float:
    """img/s of copy + ``clip.encode_images`` + read-back over ``batches`` cycled up to ``n_images`` images
    (after one warm-up batch). ``on_device``: the batches are on the encoder's device already (no copy)."""
    device = torch.device(clip.spec.device)
    if on_device:
        batches = [b.to(device) for b in batches]
    clip.encode_images(batches[0]).cpu()
    sync(device)
    start, n = time.perf_counter(), 0
    for pixels in itertools.cycle(batches):
        if n >= n_images:
            break
        pixels = pixels.to(device, non_blocking=True) if device.type == "cuda" else pixels
        clip.encode_images(pixels).cpu()  # the read-back waits for the forward
        n += len(pixels)
    sync(device)
    return n / (time.perf_counter() - start)


def host_batches(clip, shards: list[str], reader: ReaderConfig, tagger, count: int, pin: bool) -> list[torch.Tensor]:
    """The first ``count`` full batches of the corpus, decoded and preprocessed as the build's workers do."""
    batches = []
    for batch in ShardBatches(list(enumerate(shards)), reader, clip.preprocess, tagger.parse_batch):
        if batch.pixels is not None and len(batch.pixels) == reader.batch_size:
            batches.append(batch.pixels.pin_memory() if pin else batch.pixels)
        if len(batches) == count:
            break
    if not batches:
        raise ValueError(f"no full batch of {reader.batch_size} images: use more --n-images or a smaller --batch-size")
    return batches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random init)")
    p.add_argument("--n-images", type=int, default=2000, help="corpus images (the build encodes them all)")
    p.add_argument("--shard-size", type=int, default=250, help="images per shard (= per part)")
    p.add_argument("--batch-size", type=int, default=125)
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader decode/tag workers")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (main process)")
    p.add_argument("--device", default="cpu", help="encoder device: cpu, cuda, cuda:N")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="encoder weights and activations")
    p.add_argument("--photo-size", type=int, default=0,
                   help="write CC3M-like JPEGs with this longer side (e.g. 448; 0: the 96 px renders)")
    p.add_argument("--decode-device", help="build with JPEG decoding on this device (e.g. cuda); default: workers")
    p.add_argument("--no-overlap", action="store_true", help="build one batch at a time (no side-stream copy)")
    p.add_argument("--encoder-batches", type=int, default=8, help="distinct batches the encoder-only runs cycle")
    p.add_argument("--world", type=Path,
                   help="keep the synthetic corpus in this folder and reuse it when it exists (runs that compare "
                        "build options read the same shards; --n-images, --shard-size and --photo-size must match)")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    setup_logging(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench_build_"))
    try:
        start = time.perf_counter()
        if args.world is not None and (args.world / "world.json").is_file():
            shards = World.open(args.world).corpus_shards()
        else:
            shards = make_world(args.world or work / "world", args.n_images, args.shard_size, args.photo_size)
        world_s = time.perf_counter() - start
        clip = load_clip(ClipSpec(model=args.model, device=args.device, precision=args.precision))
        tagger = build_tag_parser(TagParserConfig())
        reader = ReaderConfig(batch_size=args.batch_size, num_workers=args.num_workers)
        batches = host_batches(clip, shards, reader, tagger, args.encoder_batches, pin=device.type == "cuda")
        base_before = encoder_only(clip, batches, args.n_images)
        config = BuildConfig(inputs=shards, out=str(work / "ds"), clip=clip.spec, reader=reader,
                             decode_device=args.decode_device, overlap=not args.no_overlap)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stats = encode_parts(config, clip, tagger, list(enumerate(shards)))
        sync(device)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        base_after = encoder_only(clip, batches, args.n_images)
        resident = encoder_only(clip, batches, args.n_images, on_device=True) if device.type == "cuda" else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = (base_before + base_after) / 2
    build_rate = stats["images"] / stats["seconds"]
    result = {
        "model": args.model, "device": str(device), "precision": args.precision,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "images": stats["images"], "batch_size": args.batch_size, "num_workers": args.num_workers,
        "threads": args.threads, "photo_size": args.photo_size, "decode_device": args.decode_device,
        "overlap": not args.no_overlap, "image_size": clip.identity["image_size"], "world_s": round(world_s, 1),
        "encoder_img_s": round(base, 1), "encoder_img_s_before": round(base_before, 1),
        "encoder_img_s_after": round(base_after, 1),
        "encoder_on_device_img_s": round(resident, 1) if resident else None,
        "build_img_s": round(build_rate, 1), "build_s": round(stats["seconds"], 2),
        "ratio": round(build_rate / base, 3), "stages_s": {k: round(v, 2) for k, v in sorted(stats["stages"].items())},
        "decode_fallback": stats["decode_fallback"], "build_peak_mb": round(peak_mb) if peak_mb else None,
    }
    print(f"model {args.model} (image size {clip.identity['image_size']}) on {result['device_name']} "
          f"({args.precision}), {stats['images']} images ({'photo ' + str(args.photo_size) + ' px' if args.photo_size else 'synthetic renders'}), "
          f"batch {args.batch_size}, {args.num_workers} decode worker(s), {args.threads} torch threads, "
          f"decode on {args.decode_device or 'workers'}, overlap {'on' if result['overlap'] else 'off'}")
    print(f"encoder only (copy incl.): {base:8.1f} img/s  (before {base_before:.1f}, after {base_after:.1f})")
    if resident:
        print(f"encoder only (on device) : {resident:8.1f} img/s")
    print(f"full build (no index)    : {build_rate:8.1f} img/s  ({stats['seconds']:.1f} s)")
    print(f"ratio build / encoder    : {build_rate / base:8.3f}  (goal >= 0.90)")
    print("stage seconds            : " + ", ".join(f"{k} {v:.2f}" for k, v in result["stages_s"].items())
          + "  (read, tag: summed over workers)")
    if stats["decode_fallback"]:
        print(f"decode fallbacks         : {stats['decode_fallback']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
