"""Self-retrieval: a query image that is in the datastore must not get itself (or a copy) as a neighbour."""

from __future__ import annotations

import numpy as np
import pytest

from datastore.store import (
    DEDUP_THRESHOLD,
    Datastore,
    _aggregate,
    self_keys,
    truncate_tags,
)
from tests.datastore.conftest import raw_image, sample_image, sample_jpeg


@pytest.fixture(scope="module")
def store(built):
    return Datastore.open(built[0])


@pytest.fixture(scope="module")
def emb(store):
    """Embeddings of datastore images 3 and 40 (decoded from their stored bytes) and of an unseen image."""
    return store.encode_images([sample_image(3), sample_image(40), raw_image(1000)])


def test_self_keys_rule():
    assert self_keys("images/000123.jpg") == {"images/000123.jpg", "images/000123", "000123"}
    assert self_keys("s000003") == {"s000003"} and self_keys(None) == frozenset()


def test_exclusion_off_keeps_the_old_result(store, emb):
    plain = store.retrieve_tags(embeddings=emb, k_images=4, max_tags=6)
    explicit = store.retrieve_tags(embeddings=emb, k_images=4, max_tags=6, exclude_keys=None, dedup_threshold=None)
    assert plain == explicit
    search = store.search(emb, 4)
    assert [r.neighbours for r in plain] == search.keys and plain[0].neighbours[0] == "s000003"
    assert all(r.excluded_by_key == r.excluded_near_dup == 0 for r in plain)


@pytest.mark.parametrize("key", ["s000003", "shards/s000003.jpg"])
def test_query_with_its_own_key_skips_itself(store, emb, key):
    got = store.retrieve_tags(embeddings=emb[:1], k_images=4, max_tags=6, exclude_keys=[key])[0]
    ranked = store.search(emb[:1], 5)
    assert ranked.keys[0][0] == "s000003" and got.neighbours == ranked.keys[0][1:]  # the next 4 after itself
    assert (got.excluded_by_key, got.excluded_near_dup) == (1, 0)
    rows = store._tags.take(ranked.ids[0, 1:]).to_pylist()  # the tags are the 4 survivors' only
    expected = truncate_tags(_aggregate(rows, ranked.scores[0, 1:].tolist(), ranked.keys[0][1:], "sum"), 6)
    assert (got.tags, got.scores) == (expected.tags, expected.scores) and len(got.tags) == 6


def test_copy_under_another_key_is_dropped_at_the_threshold(store, emb):
    plain = store.retrieve_tags(embeddings=emb, k_images=4)
    got = store.retrieve_tags(embeddings=emb, k_images=4, exclude_keys=["a.jpg", None, "b.jpg"],
                              dedup_threshold=DEDUP_THRESHOLD)
    ranked = store.search(emb[:2], 5).keys
    for q, own in enumerate(("s000003", "s000040")):
        assert plain[q].neighbours[0] == own and got[q].neighbours == ranked[q][1:]
        assert (got[q].excluded_by_key, got[q].excluded_near_dup) == (0, 1)
    assert got[2] == plain[2]  # not in the datastore: distinct images (cosine < 0.9982 here) all stay
    distinct_top1 = store.search(emb, 2).scores[:2, 1]
    assert distinct_top1.max() < DEDUP_THRESHOLD


def test_many_exclusions_search_deeper(store, emb):
    # drop the 10 nearest (more than the search margin): the next 5 are taken, counted as near-duplicates
    ranked = store.search(emb[2:], 20)
    got = store.retrieve_tags(embeddings=emb[2:], k_images=5, dedup_threshold=float(ranked.scores[0, 9]))[0]
    assert got.neighbours == ranked.keys[0][10:15] and got.excluded_near_dup == 10
    np.testing.assert_allclose(got.neighbour_scores, ranked.scores[0, 10:15], atol=1e-6)
    everything = store.retrieve_tags(embeddings=emb[2:], k_images=5, dedup_threshold=-1.0)[0]
    assert everything.neighbours == everything.tags == [] and everything.excluded_near_dup == len(store)


def test_counts_survive_support_filter_and_truncation(store, emb):
    got = store.retrieve_tags(embeddings=emb[:1], k_images=5, max_tags=2, min_support=0.5, exclude_keys=["s000003"])
    assert got[0].excluded_by_key == 1 and len(got[0].tags) <= 2


def test_bad_exclude_keys(store, emb):
    with pytest.raises(ValueError, match="1 exclude_keys for 3 queries"):
        store.retrieve_tags(embeddings=emb, exclude_keys=["x"])


def test_query_cli_exclude_self(built, tmp_path, capsys):
    from datastore.cli import main

    (tmp_path / "s000037.jpg").write_bytes(sample_jpeg(37))  # named like its key
    (tmp_path / "copy.jpg").write_bytes(sample_jpeg(37))  # the same image under another name
    images = [str(tmp_path / "s000037.jpg"), str(tmp_path / "copy.jpg")]
    assert main(["query", "--datastore", str(built[0]), "--image", *images, "-k", "2", "--device", "cpu",
                 "--exclude-self"]) == 0
    out = capsys.readouterr().out
    assert "s000037  cos" not in out and "(excluded: 1 by key, 0 near-duplicates)" in out
    assert "(excluded: 0 by key, 1 near-duplicates)" in out
