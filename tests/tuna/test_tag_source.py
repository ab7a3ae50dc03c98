"""TagSource: cache first, live retrieval on a miss, clear error otherwise; ablations."""

from __future__ import annotations

import json

import pytest

from datastore.cache import CacheConfig, RetrievalCache, build_cache
from datastore.store import Datastore
from tests.datastore.conftest import build_config, sample_image, write_shards
from tuna.configuration_tuna import ABLATION_POLICIES
from tuna.tag_source import MissingTagsError, TagSource


@pytest.fixture(scope="module")
def store_and_cache(tmp_path_factory):
    from datastore.build import build

    root = tmp_path_factory.mktemp("ts")
    shards = write_shards(root / "in", n_shards=2, per_shard=20)
    build(build_config(shards, root / "ds"), show_progress=False)
    folder = root / "images"
    folder.mkdir()
    sample_image(5).save(folder / "a.jpg")
    (root / "set.json").write_text(json.dumps([{"id": "x", "image": "a.jpg", "conversations": []}]))
    build_cache(CacheConfig(datastore=str(root / "ds"), out=str(root / "c.parquet"), llava_json=[str(root / "set.json")],
                            image_folder=str(folder), k_images=3, num_workers=0), show_progress=False)
    return Datastore.open(root / "ds"), RetrievalCache(root / "c.parquet")


def test_cache_hit_live_miss_and_error(store_and_cache):
    store, cache = store_and_cache
    source = TagSource(cache=cache, datastore=store, k_images=3, max_tags=3)
    hit = source("a.jpg")
    assert hit.tags == cache["a.jpg"].tags[:3] and len(hit.tags) == 3
    live = source("unseen.jpg", image=sample_image(7))
    assert live.neighbours[0] == "s000007" and len(live.tags) == 3
    with pytest.raises(MissingTagsError, match="no tags for image 'unseen.jpg': not in retrieval cache"):
        TagSource(cache=cache)("unseen.jpg")


def test_ablations(store_and_cache):
    store, cache = store_and_cache
    assert TagSource(cache=cache, ablation="no_tags")("a.jpg").tags == []
    rand = TagSource(cache=cache, datastore=store, ablation="random_tags", max_tags=4)
    first, again = rand("a.jpg"), rand("a.jpg")
    assert first.tags == again.tags and len(first.tags) == 4  # deterministic per image id and seed
    assert set(first.tags) <= set(store.vocabulary())
    other_seed = TagSource(cache=cache, datastore=store, ablation="random_tags", max_tags=4, seed=1)("a.jpg")
    assert other_seed.tags != first.tags
    with pytest.raises(ValueError, match="random_tags needs a vocabulary"):
        TagSource(cache=cache, ablation="random_tags")
    with pytest.raises(ValueError, match="ablation='x'"):
        TagSource(ablation="x")


def test_for_model_follows_the_ablation_table(store_and_cache, tmp_path):
    from types import SimpleNamespace

    store, cache = store_and_cache
    model = SimpleNamespace(config=SimpleNamespace(ablation="none", max_tags=4), vision=SimpleNamespace(clip=None))
    flags = {"retrieval_cache": cache.path, "datastore": store.root, "k_images": 3}
    real = TagSource(cache=cache, max_tags=4)("a.jpg").tags
    for ablation, policy in ABLATION_POLICIES.items():
        source = TagSource.for_model(model, ablation=ablation, seed=1, **flags)
        assert model.config.ablation == source.ablation == ablation  # the flag switches the model too
        assert not policy.use_tags or (source.k_images, source.max_tags, source.seed) == (3, 4, 1)
        expected = {"none": [], "random": TagSource(datastore=store, ablation="random_tags", max_tags=4, seed=1,
                                                    cache=cache)("a.jpg").tags, "retrieved": real}[policy.tags]
        assert source("a.jpg").tags == expected
    model.config.ablation = "random_tags"  # no flag: the model's own switch
    assert TagSource.for_model(model, **flags)("a.jpg").tags != real
    assert TagSource.for_model(model) is None  # tags read, none to be had: the caller decides
    no_tags = TagSource.for_model(model, ablation="no_tags", datastore=str(tmp_path / "missing"))  # not opened
    assert no_tags("a.jpg").tags == [] and no_tags.datastore is None
    with pytest.raises(ValueError, match="ablation='x'"):
        TagSource.for_model(model, ablation="x")
    assert model.config.ablation == "no_tags"


def test_random_tags_from_a_vocabulary_file(store_and_cache, tmp_path):
    """--random-tags-vocab: random blocks come from the file only (a small datastore's own tags would
    hold the right entity by chance); blank and repeated lines are dropped; an empty file is an error."""
    from types import SimpleNamespace

    from tuna.tag_source import read_vocabulary

    store, cache = store_and_cache
    names = [f"name{i}" for i in range(50)]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(names + ["", "name3", "  "]) + "\n")
    assert read_vocabulary(vocab) == names
    model = SimpleNamespace(config=SimpleNamespace(ablation="random_tags", max_tags=4), vision=SimpleNamespace(clip=None))
    source = TagSource.for_model(model, retrieval_cache=cache.path, random_vocabulary=str(vocab))
    drawn = source("a.jpg").tags
    assert len(drawn) == 4 and set(drawn) <= set(names)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt holds no tag"):
        TagSource.for_model(model, retrieval_cache=cache.path, random_vocabulary=str(tmp_path / "empty.txt"))


def test_live_retrieval_is_remembered_per_image_id(store_and_cache):
    store, _ = store_and_cache
    calls = []

    class Counting:
        def retrieve_tags(self, **kw):
            calls.append(kw)
            return store.retrieve_tags(**kw)

    source = TagSource(datastore=Counting(), k_images=3, max_tags=3)
    first = source("q.jpg", image=sample_image(7))
    again = source("q.jpg", image=sample_image(7))
    assert again == first and len(calls) == 1
    source("other.jpg", image=sample_image(8))
    assert len(calls) == 2


def test_min_support_filters_cache_and_live_results_alike(store_and_cache):
    from datastore.store import filter_by_support

    store, cache = store_and_cache
    strict = TagSource(cache=cache, datastore=store, k_images=3, max_tags=3, min_support=0.6)
    assert strict("a.jpg").tags == filter_by_support(cache["a.jpg"], 0.6).tags[:3]
    live = strict("unseen.jpg", image=sample_image(7))
    full = store.retrieve_tags(images=[sample_image(7)], k_images=3)[0]
    assert live.tags == filter_by_support(full, 0.6).tags[:3]
    assert store.retrieve_tags(images=[sample_image(7)], k_images=3, max_tags=3, min_support=0.6)[0].tags == live.tags
    with pytest.raises(ValueError, match="min_support=2"):
        TagSource(cache=cache, min_support=2)
    max_cache = RetrievalCache(cache.path)
    max_cache.meta = {**cache.meta, "aggregate": "max"}
    with pytest.raises(ValueError, match="min_support needs a cache built with aggregate='sum'"):
        TagSource(cache=max_cache, min_support=0.5)
    with pytest.raises(ValueError, match="min_support needs aggregate='sum'"):
        store.retrieve_tags(images=[sample_image(7)], aggregate="max", min_support=0.5)


@pytest.fixture(scope="module")
def other_clip_cache(store_and_cache, tmp_path_factory):
    """(datastore dir, cache) of the same images and corpus as ``store_and_cache``, built with a tiny CLIP of
    other random weights (a checkpoint file): same architecture, different encoder."""
    import torch

    from datastore.build import BuildConfig, build
    from datastore.clip import ClipSpec, load_clip, save_checkpoint
    from datastore.index import IndexConfig
    from datastore.reader import ReaderConfig

    store, _ = store_and_cache
    root = tmp_path_factory.mktemp("other_clip")
    clip = load_clip(ClipSpec(model="tuna-tiny-clip"))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in clip.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    checkpoint = save_checkpoint(clip, str(root / "other.safetensors"))
    shards = sorted(str(p) for p in (store.root.parent / "in").glob("*.tar"))
    build(BuildConfig(inputs=shards, out=str(root / "ds"), clip=ClipSpec(model="tuna-tiny-clip", pretrained=checkpoint),
                      reader=ReaderConfig(batch_size=16, num_workers=0), index=IndexConfig(n_eval_queries=10)),
          show_progress=False)
    build_cache(CacheConfig(datastore=str(root / "ds"), out=str(root / "other.parquet"),
                            llava_json=[str(store.root.parent / "set.json")], image_folder=str(store.root.parent / "images"),
                            k_images=3, num_workers=0), show_progress=False)
    return root / "ds", RetrievalCache(root / "other.parquet")


def test_for_model_refuses_a_cache_of_another_clip_or_datastore(store_and_cache, other_clip_cache, make_model,
                                                                tmp_path):
    """Training and tuna-eval build their tags with for_model: a cache built with another CLIP than the model's
    (or than the datastore's, or from another build of the datastore) is a one-line error naming the file."""
    import shutil
    from types import SimpleNamespace

    from datastore.cache import CacheError

    store, cache = store_and_cache
    other_ds, other = other_clip_cache
    assert other.meta["clip"]["weights_sha256"] != cache.meta["clip"]["weights_sha256"]
    model = make_model(max_tags=4)  # the plain tiny CLIP, as ``store_and_cache`` was built with
    assert TagSource.for_model(model, retrieval_cache=str(cache.path), datastore=str(store.root))("a.jpg").tags
    with pytest.raises(CacheError) as err:
        TagSource.for_model(model, retrieval_cache=str(other.path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"retrieval cache {other.path} was built with a different "
                                                      "CLIP than the model: expected tuna-tiny-clip (pretrained=None")
    assert f"got tuna-tiny-clip (pretrained={other.meta['clip']['pretrained']}" in message
    with pytest.raises(CacheError, match="was built with a different CLIP than the model"):
        TagSource.for_model(model, retrieval_cache=str(other.path), ablation="random_tags",
                            datastore=str(store.root))

    # a model that records no CLIP: the cache is still checked against the datastore it is used with
    bare = SimpleNamespace(config=SimpleNamespace(ablation="none", max_tags=4), vision=SimpleNamespace(clip=None))
    with pytest.raises(CacheError, match=f"retrieval cache {cache.path} was built with a different CLIP than "
                                         f"datastore {other_ds}: expected tuna-tiny-clip"):
        TagSource.for_model(bare, retrieval_cache=str(cache.path), datastore=str(other_ds))
    rebuilt = tmp_path / "rebuilt"  # another datastore with the same CLIP (other contents)
    shutil.copytree(store.root, rebuilt)
    manifest = json.loads((rebuilt / "manifest.json").read_text())
    (rebuilt / "manifest.json").write_text(json.dumps({**manifest, "counts": {**manifest["counts"], "written": 7}}))
    with pytest.raises(CacheError, match=f"retrieval cache {cache.path} was built from another datastore than "
                                         f"{rebuilt}: from {store.root.resolve()} with"):
        TagSource.for_model(bare, retrieval_cache=str(cache.path), datastore=str(rebuilt))
    assert TagSource.for_model(bare, retrieval_cache=str(cache.path), datastore=str(store.root))("a.jpg").tags
    assert TagSource.for_model(model, retrieval_cache=str(other.path), ablation="no_tags")("a.jpg").tags == []
