"""TagSource.prefetch: a batch's uncached images in one datastore call, same tags as the per-image path;
live retrieval's self-exclusion."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from datastore.cache import RetrievalCache
from datastore.store import DEDUP_THRESHOLD, Datastore
from tuna.tag_source import TagSource


class Counting:
    """A datastore that records how many images each retrieve_tags call gets."""

    def __init__(self, store: Datastore) -> None:
        self.store, self.calls = store, []

    def retrieve_tags(self, images, **kw):
        self.calls.append(len(images))
        return self.store.retrieve_tags(images=images, **kw)


@pytest.fixture(scope="module")
def store(world):
    return Datastore.open(world["datastore"])


def _eval_images(world, n):
    paths = sorted((world["images"] / "eval").glob("*.jpg"))[:n]
    assert len(paths) == n
    return [p.name for p in paths], [Image.open(p).convert("RGB") for p in paths]


def test_prefetch_is_one_call_and_matches_per_image(world, store):
    ids, images = _eval_images(world, 3)
    batched = Counting(store)
    source = TagSource(datastore=batched, k_images=3, max_tags=4)
    # ids[0] twice: retrieved once
    assert source.prefetch(ids + ids[:1], images + images[:1]) == 3
    assert batched.calls == [3]
    got = [source(i, im) for i, im in zip(ids, images)]
    assert batched.calls == [3]  # served from the prefetched results
    assert source.prefetch(ids, images) == 0 and batched.calls == [3]
    single = Counting(store)
    one_by_one = TagSource(datastore=single, k_images=3, max_tags=4)
    want = [one_by_one(i, im) for i, im in zip(ids, images)]
    assert single.calls == [1, 1, 1]
    assert got == want and all(r.tags for r in got)


def test_prefetch_skips_cached_and_tagless_cases(world, store):
    import json

    cache = RetrievalCache(world["cache"])
    cached = json.loads(Path(world["instruct"]).read_text())[0]["image"]
    assert cached in cache
    ids, images = _eval_images(world, 2)
    counting = Counting(store)
    source = TagSource(cache=cache, datastore=counting, k_images=3, max_tags=4)
    assert source.prefetch([cached], [images[0]]) == 0  # in the cache
    assert source.prefetch(ids, [images[0], None]) == 1 and counting.calls == [1]  # no image: left to __call__
    assert TagSource(datastore=counting, ablation="no_tags").prefetch(ids, images) == 0
    assert TagSource(cache=cache).prefetch(ids, images) == 0  # no datastore
    assert counting.calls == [1]
    with pytest.raises(ValueError, match="prefetch: 2 image ids for 1 images"):
        source.prefetch(ids, images[:1])


def _corpus_image(world):
    """A datastore image (decoded from its corpus shard) and its datastore key."""
    import io
    import tarfile

    with tarfile.open(world["data_root"] / "corpus" / "corpus-000000.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        return member.name[:-4], Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")


def test_live_retrieval_excludes_the_image_itself(world, store):
    key, image = _corpus_image(world)
    assert TagSource(datastore=store, k_images=3, max_tags=4)(f"corpus/{key}.jpg", image).neighbours[0] == key
    counting = Counting(store)
    source = TagSource(datastore=counting, k_images=3, max_tags=4, exclude_self=True)
    own = source(f"corpus/{key}.jpg", image)  # its file stem is its key
    assert key not in own.neighbours and len(own.neighbours) == 3
    assert (own.excluded_by_key, own.excluded_near_dup) == (1, 0)
    copy = source("copy.jpg", image)  # the same image under another name: a near-duplicate
    assert copy.neighbours == own.neighbours and (copy.excluded_by_key, copy.excluded_near_dup) == (0, 1)
    batched = TagSource(datastore=store, k_images=3, max_tags=4, exclude_self=True)
    assert batched.prefetch([f"corpus/{key}.jpg"], [image]) == 1 and batched(f"corpus/{key}.jpg") == own
    # the world's training images are not in its datastore: the default cache excluded nothing
    cache = RetrievalCache(world["cache"])
    assert cache.meta["exclude_self"] and set(cache.meta["counts"]["excluded"].values()) == {0}


def test_exclusion_settings_reach_the_tag_source(world):
    from types import SimpleNamespace

    from train.arguments import TagArguments
    from train.train import build_tag_source

    model = SimpleNamespace(config=SimpleNamespace(ablation="none", max_tags=4), vision=SimpleNamespace(clip=None))
    source = TagSource.for_model(model, datastore=str(world["datastore"]), exclude_self=True, dedup_threshold=0.5)
    assert (source.exclude_self, source.dedup_threshold) == (True, 0.5)
    assert not TagSource.for_model(model, datastore=str(world["datastore"])).exclude_self  # eval: off
    trained = build_tag_source(TagArguments(datastore=str(world["datastore"])), model)
    assert trained.exclude_self and trained.dedup_threshold == DEDUP_THRESHOLD  # training: on by default
