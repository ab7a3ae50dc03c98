"""Fixtures for datastore tests: tiny webdataset shards with planted captions and the tiny CLIP."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = ["red", "blue", "green", "yellow", "purple"]
NOUNS = ["blorp", "zinnet", "quoffle", "dabbet", "mirrow", "tepple"]


def raw_image(i: int, size: int = 64) -> Image.Image:
    """A distinct deterministic image per index (smooth random field)."""
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BILINEAR)


def sample_jpeg(i: int) -> bytes:
    """The exact JPEG bytes stored for sample ``i`` in the test shards."""
    return jpeg_bytes(raw_image(i))


def sample_image(i: int) -> Image.Image:
    """Sample ``i`` decoded from its stored bytes: querying with it finds the stored image at cos ~1."""
    return Image.open(io.BytesIO(sample_jpeg(i))).convert("RGB")


def sample_caption(i: int) -> str:
    return f"a photo of a {COLOURS[i % 5]} {NOUNS[i % 6]} and two small {NOUNS[(i + 1) % 6]}s"


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shards(root: Path, n_shards: int, per_shard: int, bad: dict[int, str] | None = None) -> list[str]:
    """Write ``n_shards`` tar shards; ``bad`` maps a global sample index to a defect to plant."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    bad = bad or {}
    paths = []
    for s in range(n_shards):
        path = root / f"shard-{s:06d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for j in range(per_shard):
                i = s * per_shard + j
                sample = {"__key__": f"s{i:06d}", "jpg": sample_jpeg(i),
                          "txt": sample_caption(i), "json": json.dumps({"i": i})}
                defect = bad.get(i)
                if defect == "truncated_jpeg":
                    sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
                elif defect == "garbage_jpeg":
                    sample["jpg"] = b"not a jpeg at all"
                elif defect == "missing_image":
                    del sample["jpg"]
                elif defect == "missing_caption":
                    del sample["txt"]
                elif defect == "empty_caption":
                    sample["txt"] = "   "
                elif defect == "undecodable_text":
                    sample["txt"] = b"\xff\xfe\xfa caption"
                sink.write(sample)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def tiny_clip():
    from datastore.clip import ClipSpec, load_clip

    return load_clip(ClipSpec(model="tuna-tiny-clip"))


def build_config(inputs, out, **overrides):
    from datastore.build import BuildConfig
    from datastore.clip import ClipSpec
    from datastore.index import IndexConfig
    from datastore.reader import ReaderConfig

    reader = overrides.pop("reader", ReaderConfig(batch_size=16, num_workers=0))
    return BuildConfig(inputs=inputs, out=str(out), clip=ClipSpec(model="tuna-tiny-clip"), reader=reader,
                       index=IndexConfig(n_eval_queries=50), **overrides)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> list[str]:
    """4 shards × 30 clean samples."""
    return write_shards(tmp_path_factory.mktemp("corpus"), n_shards=4, per_shard=30)


@pytest.fixture(scope="session")
def built(corpus, tmp_path_factory):
    """(datastore dir, manifest) of a clean build of ``corpus``."""
    from datastore.build import build

    out = tmp_path_factory.mktemp("ds") / "store"
    manifest = build(build_config([str(Path(corpus[0]).parent / "shard-{000000..000003}.tar")], out),
                     show_progress=False)
    return out, manifest


def member_offsets(shard: str) -> list[int]:
    """Byte offsets of the member headers of a tar shard (three members per test sample)."""
    import tarfile

    with tarfile.open(shard) as tar:
        return [member.offset for member in tar.getmembers()]


def cut_shard(src: str, dst: Path, n_bytes: int) -> Path:
    """Copy the first ``n_bytes`` of shard ``src`` to ``dst`` (a partial copy)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(Path(src).read_bytes()[:n_bytes])
    return dst
