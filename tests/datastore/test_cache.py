"""Retrieval cache: file contents equal direct retrieval; bad inputs error or are counted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.datastore.conftest import sample_image, write_shards


def _llava_set(tmp_path, indices):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    records = []
    for i in indices:
        sample_image(i).save(folder / "sub" / f"{i}.jpg", quality=95)
        records.append({"id": f"q{i}", "image": f"sub/{i}.jpg", "conversations": []})
    records.append({"id": "text-only", "conversations": []})
    records.append({"id": "dup", "image": f"sub/{indices[0]}.jpg", "conversations": []})
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(records))
    return path, folder


def test_cache_matches_direct_retrieval(built, tmp_path):
    from datastore.cache import CacheConfig, RetrievalCache, build_cache
    from datastore.store import Datastore

    root, _ = built
    path, folder = _llava_set(tmp_path, [3, 50, 77, 101])
    out = tmp_path / "cache.parquet"
    meta = build_cache(CacheConfig(datastore=str(root), out=str(out), llava_json=[str(path)],
                                   image_folder=str(folder), k_images=3, max_tags=6, num_workers=0),
                       show_progress=False)
    assert meta["counts"] == {"written": 4, "skipped": {}}
    cache = RetrievalCache(out)
    assert len(cache) == 4 and "sub/3.jpg" in cache and cache.meta["k_images"] == 3
    store = Datastore.open(root)
    direct = store.retrieve_tags(images=[folder / "sub" / f"{i}.jpg" for i in (3, 50, 77, 101)],
                                 k_images=3, max_tags=6)
    for i, expected in zip((3, 50, 77, 101), direct):
        got = cache[f"sub/{i}.jpg"]
        assert got.tags == expected.tags and got.neighbours == expected.neighbours
        np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
    with pytest.raises(Exception, match="not in retrieval cache"):
        cache["sub/999.jpg"]


def test_cache_from_shards_and_bad_images(built, tmp_path):
    from datastore.cache import CacheConfig, CacheError, RetrievalCache, build_cache

    root, _ = built
    shards = write_shards(tmp_path / "eval", n_shards=1, per_shard=6, bad={2: "truncated_jpeg"})
    out = tmp_path / "c.parquet"
    with pytest.raises(CacheError, match="image 's000002': corrupt image"):
        build_cache(CacheConfig(datastore=str(root), out=str(out), shards=shards), show_progress=False)
    meta = build_cache(CacheConfig(datastore=str(root), out=str(out), shards=shards, on_error="skip"),
                       show_progress=False)
    assert meta["counts"] == {"written": 5, "skipped": {"corrupt_image": 1}}
    assert "s000002" not in RetrievalCache(out) and "s000005" in RetrievalCache(out)

    path, folder = _llava_set(tmp_path, [1])
    (folder / "sub" / "1.jpg").unlink()
    with pytest.raises(CacheError, match="image 'sub/1.jpg': missing file"):
        build_cache(CacheConfig(datastore=str(root), out=str(out), llava_json=[str(path)],
                                image_folder=str(folder), num_workers=0), show_progress=False)
