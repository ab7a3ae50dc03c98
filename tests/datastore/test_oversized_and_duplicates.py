"""Issue 27 item 12: images over the pixel cap are skipped unread and counted; repeated sample keys are kept
and counted in the manifest."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.datastore.conftest import build_config, sample_caption, sample_jpeg

REPO = Path(__file__).resolve().parents[2]


def huge_png() -> bytes:
    """A 12000x12000 one-colour PNG: 17 KB on disk, 432 MB if decoded to RGB."""
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    return buf.getvalue()


def write_shard(path: Path, samples: list[tuple[str, dict]]) -> str:
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for key, members in samples:
            sink.write({"__key__": key, **members})
    return str(path)


def clean(i: int) -> dict:
    return {"jpg": sample_jpeg(i), "txt": sample_caption(i)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("dup")
    first = [(f"k{i}", clean(i)) for i in range(6)] + [
        ("k5", clean(24)),  # k5 twice in a row: webdataset alone would refuse the shard
        ("huge", {"png": huge_png(), "txt": "a huge blank page"}),
        ("k2", clean(20))]  # k2 again, not next to the first
    second = [("k0", clean(21)), ("m1", clean(22))]  # k0 again, in another shard
    return [write_shard(root / "shard-000000.tar", first), write_shard(root / "shard-000001.tar", second)]


def test_oversized_images_skipped_and_duplicate_keys_counted(shards, tmp_path):
    from datastore.build import build

    manifest = build(build_config(shards, tmp_path / "ds"), show_progress=False)
    assert manifest["counts"] == {"read": 11, "written": 10, "skipped": {"oversized_image": 1}}
    duplicates = manifest["duplicate_keys"]
    assert (duplicates["rows"], duplicates["keys"], sorted(duplicates["examples"])) == (3, 3, ["k0", "k2", "k5"])
    # the CLI's summary says so
    result = subprocess.run([sys.executable, "-m", "datastore.cli", "info", "--datastore", str(tmp_path / "ds")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "oversized_image 1" in result.stdout
    assert "duplicate sample keys: 3 rows share 3 keys" in result.stdout


def test_pixel_cap_is_a_build_flag(shards, tmp_path):
    from datastore.build import build
    from datastore.reader import ReaderConfig

    reader = ReaderConfig(batch_size=4, num_workers=0, max_image_pixels=32 * 32)  # the 64x64 samples too
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="no sample was written"):
        build(build_config(shards, out, reader=reader), show_progress=False)
    markers = [json.loads(p.read_text()) for p in sorted((out / "parts").glob("part_*.json"))]
    assert sum(m["skipped"].get("oversized_image", 0) for m in markers) == 11


def test_training_images_over_the_cap_are_a_sample_error(tmp_path):
    from tuna.processing_tuna import _open_image

    path = tmp_path / "huge.png"
    path.write_bytes(huge_png())
    with pytest.raises(ValueError, match=r"sample 'x': cannot read image .*huge.png': 12000x12000, over the 64,000,000-pixel cap"):
        _open_image(path, "x")
