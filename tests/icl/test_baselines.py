"""Baseline retrievers: BM25 over questions and image-only retrieval under timm / open_clip models (offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

TIMM = "image:timm:test_vit:random"  # timm's own tiny test architecture: a 0.3M-parameter ViT, CPU-fast


def tiny_pool(questions: list[tuple[str, str]]):
    """An in-memory pool of (image, question) rows with random unit image vectors: no CLIP, no files."""
    from icl.formats import Example
    from icl.pool import Pool

    examples = [Example(id=f"e{i}", image=image, question=q, answers=("a",), task="vqa")
                for i, (image, q) in enumerate(questions)]
    vectors = np.random.default_rng(0).normal(size=(len(examples), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return Pool(None, {}, examples, {"image": vectors}, {}, None)


PLANTED = [("a.jpg", "What colour is the zebra on the left?"), ("b.jpg", "How many zebras are there?"),
           ("c.jpg", "Is it raining?"), ("d.jpg", "the ZEBRA: what colour, left?"), ("e.jpg", "Who is there?"),
           ("a.jpg", "What colour is the zebra on the left?"), ("f.jpg", "Where is the cat?")]


def test_bm25_ranks_the_demo_with_the_querys_words_first_and_keeps_the_exclusions():
    from icl.retrievers import make_retriever

    pool = tiny_pool(PLANTED)
    retriever = make_retriever("bm25", pool, dedup_threshold=None)
    query = pool.examples[0]
    ranked = retriever.retrieve([query], k=3, vectors={"image": pool.vectors["image"][:1]})[0]
    assert [d for d, _ in ranked][0] == "e3"  # e5 has the very same question but is on the query's image
    assert "e0" not in dict(ranked) and "e5" not in dict(ranked)
    assert ranked[0][1] > ranked[1][1] > 0
    assert retriever.excluded.same_id == 1 and retriever.excluded.same_image == 1


def test_bm25_returns_k_in_pool_order_when_no_word_is_shared():
    from icl.formats import Example
    from icl.retrievers import make_retriever

    pool = tiny_pool(PLANTED)
    retriever = make_retriever("bm25", pool, dedup_threshold=None)
    vectors = {"image": np.zeros((2, 8), np.float32)}
    queries = [Example(id="q", image="new.jpg", question="xyzzy plugh", answers=("a",), task="vqa"),
               Example(id="r", image="new.jpg", question="?!", answers=("a",), task="vqa")]  # no token at all
    for k in (1, 4, len(pool)):
        for ranked in retriever.retrieve(queries, k=k, vectors=vectors):
            assert [d for d, _ in ranked] == [e.id for e in pool.examples[:k]]
            assert all(s == 0 for _, s in ranked)
    wordless = tiny_pool([("a.jpg", "?"), ("b.jpg", "")])  # bm25s cannot index this: all scores are 0
    assert make_retriever("bm25", wordless).retrieve(queries[:1], k=2, vectors=vectors) == [[("e0", 0.0), ("e1", 0.0)]]


def test_bm25_on_the_synthetic_pool_gives_k_demos_never_the_query(synth_pool_dir):
    from icl.pool import Pool
    from icl.retrievers import make_retriever

    pool = Pool.open(synth_pool_dir)
    queries = pool.examples[:8]
    for query, ranked in zip(queries, make_retriever("bm25", pool).retrieve(queries, k=4)):
        assert len(ranked) == 4 and len(set(ranked)) == 4
        assert all(pool.examples[pool.position[d]].image != query.image for d, _ in ranked)


def test_importing_the_registry_imports_no_baseline_package():
    code = ("import sys, icl.retrievers; "
            "print(sorted(m for m in ('bm25s', 'timm', 'icl.baselines') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture
def pool_copy(synth_pool_dir, tmp_path):
    """A private copy: the image-model caches are written inside the pool."""
    from icl.pool import Pool

    shutil.copytree(synth_pool_dir, tmp_path / "pool")
    return Pool.open(tmp_path / "pool")


def count_encodings(monkeypatch) -> list[int]:
    import icl.baselines

    calls, original = [], icl.baselines.encode_image_files

    def counted(encoder, paths, *args, **kwargs):
        calls.append(len(paths))
        return original(encoder, paths, *args, **kwargs)

    monkeypatch.setattr(icl.baselines, "encode_image_files", counted)
    return calls


def test_timm_image_retriever_ranks_a_copy_of_the_querys_image_first(pool_copy, tmp_path):
    from icl.formats import Example
    from icl.retrievers import make_retriever

    retriever = make_retriever(TIMM, pool_copy, dedup_threshold=None, progress=False)
    source = pool_copy.examples[5]
    copy = tmp_path / "copy.png"
    shutil.copy(source.image, copy)
    query = Example(id="new", image=str(copy), question="?", answers=("a",), task="vqa")
    same = sum(e.image == source.image for e in pool_copy.examples)  # other questions on that image
    ranked = retriever.retrieve([query], k=same + 2)[0]
    images = [pool_copy.examples[pool_copy.position[d]].image for d, _ in ranked]
    assert len(ranked) == same + 2 and images[:same] == [source.image] * same and source.image not in images[same:]
    assert [s for _, s in ranked[:same]] == pytest.approx([1.0] * same, abs=2e-3) and ranked[same][1] < 0.999
    for query, ranked in zip(pool_copy.examples[:4], retriever.retrieve(pool_copy.examples[:4], k=3)):
        assert len(ranked) == 3 and all(pool_copy.examples[pool_copy.position[d]].image != query.image
                                        for d, _ in ranked)


def test_image_cache_is_written_reused_and_recomputed_for_another_identity(pool_copy, monkeypatch):
    from icl.retrievers import make_retriever

    calls = count_encodings(monkeypatch)
    first = make_retriever(TIMM, pool_copy, progress=False)
    ranked = first.retrieve(pool_copy.examples[:3], k=2)
    assert calls == [len(pool_copy)]  # the pool once; its own examples as queries reuse their rows
    cache = first.cache_dir
    vectors = np.load(cache / "image.npy")
    identity = json.loads((cache / "identity.json").read_text())
    assert vectors.dtype == np.float16 and vectors.shape[0] == len(pool_copy)
    np.testing.assert_allclose(np.linalg.norm(vectors.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert identity["spec"] == "timm:test_vit:random" and identity["pool_fingerprint"] == pool_copy.fingerprint
    assert identity["weights_sha256"] == first.encoder.weights_sha256

    assert make_retriever(TIMM, pool_copy).retrieve(pool_copy.examples[:3], k=2) == ranked
    assert len(calls) == 1  # reused

    (cache / "identity.json").write_text(json.dumps({**identity, "pool_fingerprint": "another pool"}))
    make_retriever(TIMM, pool_copy, progress=False).retrieve(pool_copy.examples[:1], k=1)
    assert len(calls) == 2 and json.loads((cache / "identity.json").read_text()) == identity

    other = make_retriever("image:timm:test_resnet:random", pool_copy, progress=False)
    other.retrieve(pool_copy.examples[:1], k=1)
    assert len(calls) == 3 and other.cache_dir != cache and (other.cache_dir / "image.npy").is_file()


def test_timm_weights_from_a_local_file_are_used_and_a_changed_file_is_re_embedded(pool_copy, tmp_path, monkeypatch):
    import timm
    import torch
    from safetensors.torch import save_file

    from datastore.clip import weights_sha256
    from icl.retrievers import make_retriever

    calls = count_encodings(monkeypatch)
    path = tmp_path / "weights.safetensors"
    shas = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = timm.create_model("test_vit", num_classes=0)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        retriever = make_retriever(f"image:timm:test_vit:{path}", pool_copy, progress=False)
        assert retriever.encoder.weights_sha256 == weights_sha256(model)
        retriever.retrieve(pool_copy.examples[:1], k=1)
        shas.append(json.loads((retriever.cache_dir / "identity.json").read_text())["weights_sha256"])
    assert calls == [len(pool_copy)] * 2 and shas[0] != shas[1]


def test_open_clip_image_retriever_matches_the_pools_own_clip(pool_copy):
    from icl.retrievers import make_retriever

    # the pool was embedded with tuna-tiny-clip's seeded random init: the same model, so the same vectors
    retriever = make_retriever("image:open_clip:tuna-tiny-clip", pool_copy, progress=False)
    np.testing.assert_allclose(retriever.pool_vectors(), pool_copy.vectors["image"], atol=2e-3)
    queries = pool_copy.examples[:4]
    ours, siir = retriever.retrieve(queries, k=3), make_retriever("siir", pool_copy).retrieve(queries, k=3)
    for a, b in zip(ours, siir):
        np.testing.assert_allclose([s for _, s in a], [s for _, s in b], atol=3e-3)


@pytest.mark.parametrize("spec, message", [
    ("image:", "expected timm:NAME"),
    ("image:dino:vit_small", "expected timm:NAME"),
    ("image:timm", "expected timm:NAME"),
    ("image:timm:no_such_model_xyz:random", "Unknown model"),
    ("image:timm:test_vit:/nonexistent/w.safetensors", "does not exist"),
    ("image:open_clip:NoSuchArch", "unknown open_clip architecture"),
])
def test_bad_image_specs_are_clear_errors(spec, message):
    from icl.retrievers import make_retriever

    with pytest.raises(ValueError, match=message):
        make_retriever(spec, tiny_pool(PLANTED))


def test_an_unreadable_query_image_is_named(pool_copy, tmp_path):
    from icl.formats import Example
    from icl.retrievers import make_retriever

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    query = Example(id="new", image=str(bad), question="?", answers=("a",), task="vqa")
    retriever = make_retriever(TIMM, pool_copy, dedup_threshold=None, progress=False)
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        retriever.retrieve([query], k=1, vectors={"image": np.zeros((1, pool_copy.vectors["image"].shape[1]))})


def test_a_pool_that_cannot_hold_the_cache_still_retrieves(pool_copy):
    from icl.retrievers import make_retriever

    (pool_copy.root / "image_models").write_text("a file where the cache folder would go")
    ranked = make_retriever(TIMM, pool_copy, progress=False).retrieve(pool_copy.examples[:2], k=2)
    assert [len(r) for r in ranked] == [2, 2]
