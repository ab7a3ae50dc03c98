"""Build levers on CPU: the device feed writes the same bytes; --decode-device (device cpu) matches PIL closely,
counts the same skips and falls back per image."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.datastore.conftest import build_config, raw_image, write_shards
from tests.datastore.test_build import read_store


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo(i: int, size: tuple[int, int]) -> Image.Image:
    """A textured (not smooth) image, so that resizing and JPEG coding have something to lose."""
    rng = np.random.default_rng(i)
    base = np.asarray(raw_image(i, 32).resize(size, Image.BICUBIC), dtype=np.float32)
    noise = rng.normal(0, 12, size=(size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def test_overlap_on_or_off_writes_the_embeddings_of_a_plain_loop(tmp_path, corpus, tiny_clip):
    from datastore.build import build
    from datastore.reader import ReaderConfig, ShardBatches
    from datastore.tags import TagParserConfig, build_tag_parser

    reader = ReaderConfig(batch_size=16, num_workers=0)
    build(build_config(corpus, tmp_path / "on", reader=reader, overlap=True), show_progress=False)
    build(build_config(corpus, tmp_path / "off", reader=reader, overlap=False), show_progress=False)
    keys_on, _, emb_on = read_store(tmp_path / "on")
    keys_off, _, emb_off = read_store(tmp_path / "off")
    tagger = build_tag_parser(TagParserConfig())
    batches = ShardBatches(list(enumerate(corpus)), reader, tiny_clip.preprocess, tagger.parse_batch)
    plain = np.concatenate([tiny_clip.encode_images(b.pixels).cpu().numpy() for b in batches
                            if b.pixels is not None]).astype(np.float16)
    assert keys_on == keys_off and len(keys_on) == 120
    assert emb_on.tobytes() == emb_off.tobytes() == plain.tobytes()


def test_device_feed_keeps_order_and_reports_stage_seconds(tiny_clip):
    from datastore.device_feed import DeviceFeed
    from datastore.reader import Batch

    batches = [Batch(part=i, shard="s", keys=[f"k{i}"] * 2, pixels=torch.full((2, 3, 64, 64), float(i)))
               for i in range(4)]
    batches.insert(2, Batch(part=9, shard="s", pixels=None))  # every sample skipped
    feed = DeviceFeed("cpu")
    out = list(feed.run(batches, lambda pixels: pixels.mean(dim=(2, 3))))
    assert [b.part for b, _, _ in out] == [0, 1, 9, 2, 3]
    assert out[2][1] is None
    assert [float(emb[0, 0]) for _, emb, _ in out if emb is not None] == [0.0, 1.0, 2.0, 3.0]
    assert not feed.pin_memory and set(feed.seconds) == {"wait", "encode"}


def test_preprocess_spec_reads_open_clip_transforms(tiny_clip):
    import open_clip
    from torchvision import transforms as T

    from datastore.gpu_decode import PreprocessSpec

    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    spec = PreprocessSpec.from_transform(preprocess)
    assert (spec.resize, spec.crop, spec.interpolation) == (224, (224, 224), "bicubic")
    assert spec.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert PreprocessSpec.from_transform(tiny_clip.preprocess).crop == (64, 64)
    with pytest.raises(ValueError, match="RandomHorizontalFlip"):
        PreprocessSpec.from_transform(T.Compose([T.RandomHorizontalFlip(), *preprocess.transforms]))


def test_device_decoder_matches_pil_preprocess(tiny_clip):
    """Resized on tensors vs on PIL images: the same picture up to the resampling's rounding."""
    import open_clip

    from datastore.gpu_decode import DeviceDecoder, JpegBatch

    _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    sizes = [(480, 360), (360, 480), (420, 420), (500, 410)]
    data = [jpeg(photo(i, size)) for i, size in enumerate(sizes)]
    batch = JpegBatch(0, "s", keys=list("abcd"), captions=list("abcd"), tags=[[]] * 4, images=list(data))
    pixels, kept = DeviceDecoder("cpu", preprocess).decode(batch)
    reference = torch.stack([preprocess(Image.open(io.BytesIO(d)).convert("RGB")) for d in data])
    assert kept == [0, 1, 2, 3] and pixels.shape == reference.shape == (4, 3, 224, 224)
    diff = (pixels - reference).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 0.3  # normalised units (1/255 ~ 0.015)


def test_device_decoder_falls_back_per_image(tiny_clip):
    from datastore.gpu_decode import DeviceDecoder, JpegBatch, drop_samples, is_jpeg

    good = jpeg(photo(1, (80, 70)))
    broken = b"\xff\xd8\xff\xe0" + b"\x13" * 300 + b"\xff\xd9"  # looks whole, decodes as nothing
    assert is_jpeg(good) and is_jpeg(broken) and not is_jpeg(good[: len(good) // 2])
    ready = tiny_clip.preprocess(photo(2, (64, 64)))  # what a worker ships for a PNG
    batch = JpegBatch(0, "s", keys=["a", "b", "c"], captions=["x", "y", "z"], tags=[["x"], ["y"], ["z"]],
                      images=[good, broken, ready])
    pixels, kept = DeviceDecoder("cpu", tiny_clip.preprocess).decode(batch)
    assert kept == [0, 2] and pixels.shape == (2, 3, 64, 64)
    assert torch.equal(pixels[1], ready)
    assert batch.fallback == Counter(undecodable=1)
    drop_samples(batch, kept)
    assert batch.keys == ["a", "c"] and batch.tags == [["x"], ["z"]] and batch.skipped == Counter(corrupt_image=1)


def test_decode_device_build_counts_skips_like_pil_and_embeds_alike(tmp_path):
    import webdataset as wds

    from datastore.build import build, encode_parts
    from datastore.clip import load_clip
    from datastore.reader import ReaderConfig
    from datastore.tags import TagParserConfig, build_tag_parser

    bad = {1: "truncated_jpeg", 2: "garbage_jpeg", 3: "missing_image", 5: "missing_caption", 21: "garbage_jpeg"}
    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=12, bad=bad)
    png = tmp_path / "in" / "shard-000002.tar"  # one PNG sample: decoded by the worker with PIL
    with wds.TarWriter(str(png)) as sink:
        buf = io.BytesIO()
        raw_image(99).save(buf, format="PNG")
        sink.write({"__key__": "p000099", "png": buf.getvalue(), "txt": "a red blorp", "json": json.dumps({})})
        sink.write({"__key__": "big", "jpg": jpeg(photo(7, (100, 100))), "txt": "a big blorp", "json": "{}"})
    shards.append(str(png))
    reader = ReaderConfig(batch_size=16, num_workers=0, max_image_pixels=5000)  # 64 x 64 passes, 100 x 100 not
    pil = build(build_config(shards, tmp_path / "pil", reader=reader), show_progress=False)
    dev = build(build_config(shards, tmp_path / "dev", reader=reader, decode_device="cpu"), show_progress=False)
    assert dev["counts"] == pil["counts"] and pil["counts"]["written"] == 20
    assert pil["counts"]["skipped"]["oversized_image"] == 1 and pil["counts"]["skipped"]["corrupt_image"] == 3
    keys_pil, tags_pil, emb_pil = read_store(tmp_path / "pil")
    keys_dev, tags_dev, emb_dev = read_store(tmp_path / "dev")
    assert keys_dev == keys_pil and tags_dev == tags_pil
    cos = (emb_pil.astype(np.float32) * emb_dev.astype(np.float32)).sum(axis=1)
    assert cos.min() > 0.99

    config = build_config(shards, tmp_path / "again", reader=reader, decode_device="cpu")
    stats = encode_parts(config, load_clip(config.clip), build_tag_parser(TagParserConfig()),
                         list(enumerate(shards)))
    assert stats["images"] == 20 and stats["decode_fallback"] == {"not_jpeg": 1}
    assert {"read", "tag", "wait", "decode", "encode", "write"} <= set(stats["stages"])


def test_cli_build_with_decode_device(tmp_path, corpus):
    from datastore.cli import main

    out = tmp_path / "ds"
    assert main(["build", "--input", *corpus[:2], "--out", str(out), "--model", "tuna-tiny-clip", "--device", "cpu",
                 "--batch-size", "16", "--num-workers", "0", "--decode-device", "cpu"]) == 0
    assert json.loads((Path(out) / "manifest.json").read_text())["counts"]["written"] == 60
