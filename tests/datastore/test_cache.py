"""Retrieval cache: file contents equal direct retrieval; bad inputs error or are counted; self-exclusion."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from tests.datastore.conftest import sample_jpeg, write_shards


def _llava_set(tmp_path, indices):
    """LLaVA records whose images are datastore images (the stored JPEG bytes) under other names."""
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    records = []
    for i in indices:
        (folder / "sub" / f"{i}.jpg").write_bytes(sample_jpeg(i))
        records.append({"id": f"q{i}", "image": f"sub/{i}.jpg", "conversations": []})
    records.append({"id": "text-only", "conversations": []})
    records.append({"id": "dup", "image": f"sub/{indices[0]}.jpg", "conversations": []})
    path = tmp_path / "instruct.json"
    path.write_text(json.dumps(records))
    return path, folder


@pytest.mark.parametrize("exclude_self", [True, False])
def test_cache_matches_direct_retrieval(built, tmp_path, exclude_self, caplog):
    from datastore.cache import CacheConfig, RetrievalCache, build_cache
    from datastore.store import DEDUP_THRESHOLD, Datastore

    root, _ = built
    indices = (3, 50, 77, 101)
    path, folder = _llava_set(tmp_path, list(indices))
    out = tmp_path / "cache.parquet"
    with caplog.at_level(logging.INFO, logger="datastore.cache"):
        meta = build_cache(CacheConfig(datastore=str(root), out=str(out), llava_json=[str(path)],
                                       image_folder=str(folder), k_images=3, max_tags=6, num_workers=0,
                                       exclude_self=exclude_self), show_progress=False)
    # each image is a datastore image under another name: dropped as a near-duplicate (cosine 1)
    n = 4 if exclude_self else 0
    assert meta["counts"] == {"written": 4, "skipped": {},
                              "excluded": {"images": n, "by_key": 0, "near_duplicate": n}}
    assert f"excluded {n} neighbours of {n} of 4 images (0 by key, {n} near-duplicates)" in caplog.text
    cache = RetrievalCache(out)
    assert len(cache) == 4 and "sub/3.jpg" in cache and cache.meta["k_images"] == 3
    assert (cache.meta["exclude_self"], cache.meta["dedup_threshold"]) == (exclude_self, DEDUP_THRESHOLD)
    store = Datastore.open(root)
    ids = [f"sub/{i}.jpg" for i in indices]
    direct = store.retrieve_tags(images=[folder / x for x in ids], k_images=3, max_tags=6,
                                 exclude_keys=ids if exclude_self else None,
                                 dedup_threshold=DEDUP_THRESHOLD if exclude_self else None)
    for i, expected in zip(indices, direct):
        got = cache[f"sub/{i}.jpg"]
        assert got.tags == expected.tags and got.neighbours == expected.neighbours
        np.testing.assert_allclose(got.scores, expected.scores, atol=1e-5)
        assert (f"s{i:06d}" in got.neighbours) != exclude_self and len(got.neighbours) == 3
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
    # the shards hold datastore images under their datastore keys: each drops its own entry by key
    assert meta["counts"] == {"written": 5, "skipped": {"corrupt_image": 1},
                              "excluded": {"images": 5, "by_key": 5, "near_duplicate": 0}}
    cache = RetrievalCache(out)
    assert "s000002" not in cache and "s000005" in cache and "s000005" not in cache["s000005"].neighbours

    path, folder = _llava_set(tmp_path, [1])
    (folder / "sub" / "1.jpg").unlink()
    with pytest.raises(CacheError, match="image 'sub/1.jpg': missing file"):
        build_cache(CacheConfig(datastore=str(root), out=str(out), llava_json=[str(path)],
                                image_folder=str(folder), num_workers=0), show_progress=False)


def test_cache_rejects_a_bad_threshold(built, tmp_path):
    from datastore.cache import CacheConfig

    with pytest.raises(ValueError, match="dedup_threshold=0: must be > 0"):
        CacheConfig(datastore=str(built[0]), out=str(tmp_path / "c.parquet"), shards=["x.tar"], dedup_threshold=0)


def _with_meta(src, dst, **changes):
    """A copy of cache ``src`` at ``dst`` whose metadata has ``changes`` (a value None drops the key)."""
    import pyarrow.parquet as pq

    from datastore.cache import CACHE_META_KEY

    table = pq.read_table(src)
    meta = {**json.loads(table.schema.metadata[CACHE_META_KEY]), **changes}
    meta = {k: v for k, v in meta.items() if v is not None}
    pq.write_table(table.replace_schema_metadata({CACHE_META_KEY: json.dumps(meta)}), dst)
    return dst


def test_cache_identity_and_its_checks_against_a_clip_and_a_datastore(built, tmp_path):
    """A cache names the CLIP and the datastore it was built from; a different CLIP (model or datastore) or a
    different datastore build is a one-line CacheError naming the cache file and what differs."""
    from types import SimpleNamespace

    from datastore.cache import CacheConfig, CacheError, RetrievalCache, build_cache
    from datastore.store import Datastore

    root, manifest = built
    path, folder = _llava_set(tmp_path, [3, 50])
    out = tmp_path / "cache.parquet"
    build_cache(CacheConfig(datastore=str(root), out=str(out), llava_json=[str(path)], image_folder=str(folder),
                            k_images=3, num_workers=0), show_progress=False)
    cache, store = RetrievalCache(out), Datastore.open(root)
    identity = cache.identity()
    assert identity["path"] == str(out.resolve()) and identity["rows"] == 2 == len(cache)
    assert identity["clip"] == {k: manifest["clip"][k] for k in ("model", "pretrained", "weights_sha256")}
    assert identity["datastore"] == str(root.resolve()) and identity["datastore_created"] == manifest["created"]
    assert identity["datastore_rows"] == manifest["counts"]["written"] and identity["k_images"] == 3
    cache.check_clip(manifest["clip"])  # same CLIP, same datastore: accepted
    cache.check_clip({})  # nothing to compare with (a model without a recorded CLIP)
    cache.check_datastore(store)

    other = {**manifest["clip"], "weights_sha256": "f" * 64}
    with pytest.raises(CacheError) as err:
        cache.check_clip(other)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"retrieval cache {out} was built with a different CLIP than "
                                                      "the model: expected tuna-tiny-clip")
    assert "weights ffffffffffff" in message and manifest["clip"]["weights_sha256"][:12] in message
    with pytest.raises(CacheError, match=f"retrieval cache {out} was built with a different CLIP than datastore"):
        cache.check_datastore(SimpleNamespace(root=root, manifest={**manifest, "clip": other}))
    rebuilt = SimpleNamespace(root=root, manifest={**manifest, "created": "2000-01-01T00:00:00+00:00"})
    cache.check_datastore(rebuilt)  # the same contents built again: accepted
    written = manifest["counts"]["written"]
    other_rows = SimpleNamespace(root=root, manifest={**manifest, "counts": {**manifest["counts"], "written": 7}})
    with pytest.raises(CacheError, match=re.escape(f"retrieval cache {out} was built from another datastore than "
                                                   f"{root}: from {root.resolve()} with {written} images, this one "
                                                   "has 7")):
        cache.check_datastore(other_rows)
    unknown = RetrievalCache(_with_meta(out, tmp_path / "old.parquet", clip=None))
    assert unknown.identity()["clip"] is None
    with pytest.raises(CacheError, match="old.parquet records no CLIP identity"):
        unknown.check_clip(manifest["clip"])
