"""Demonstration pools (build, resume, open, info) and the retriever registry on a tiny synthetic world."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from datastore.clip import ClipSpec


@pytest.fixture(scope="module")
def pool_dir(synth_pool_dir):
    return synth_pool_dir


@pytest.fixture(scope="module")
def pool(pool_dir):
    from icl.pool import Pool

    return Pool.open(pool_dir)


def test_pool_files_and_manifest(pool_dir, pool, world):
    manifest = json.loads((pool_dir / "manifest.json").read_text())
    questions = (world["data_root"] / "eval" / "open" / "questions.jsonl").read_text().splitlines()
    assert manifest["n"] == len(pool) == len(questions) - manifest["skipped"]["total"]
    assert set(manifest["index"]) == {"image", "question", "answer", "sit"}
    assert manifest["dim"] == pool.vectors["image"].shape[1]
    for kind, vectors in pool.vectors.items():
        assert vectors.shape == (len(pool), manifest["dim"] * (2 if kind == "sit" else 1))
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=2e-3)
    assert "identification" in manifest["tasks"]


def test_rebuild_with_same_settings_is_a_no_op_and_other_settings_are_refused(pool_dir, world):
    from icl.pool import PoolConfig, PoolError, build_pool

    config = PoolConfig(format="synth", inputs=[str(world["data_root"])], out=str(pool_dir),
                        clip=ClipSpec(model="tuna-tiny-clip"))
    before = (pool_dir / "examples.parquet").stat().st_mtime_ns
    assert build_pool(config, progress=False)["n"] > 0
    assert (pool_dir / "examples.parquet").stat().st_mtime_ns == before
    with pytest.raises(PoolError, match="other settings"):
        build_pool(replace(config, limit=3), progress=False)


def test_siir_is_exact_nearest_images_without_the_query_or_its_image(pool):
    from icl.retrievers import make_retriever

    retriever = make_retriever("siir", pool, dedup_threshold=None)
    queries = pool.examples[:6]
    ranked = retriever.retrieve(queries, k=3)
    for query, demos in zip(queries, ranked):
        assert len(demos) == 3
        allowed = [i for i, e in enumerate(pool.examples) if e.image != query.image]
        sims = pool.vectors["image"][allowed] @ pool.vectors["image"][pool.position[query.id]]
        expected = np.sort(sims)[::-1][:3]
        np.testing.assert_allclose([s for _, s in demos], expected, atol=1e-4)
        assert all(pool.examples[pool.position[d]].image != query.image for d, _ in demos)
    assert retriever.excluded.same_id >= 6 and retriever.excluded.same_image > 0


def test_sit_scores_the_mean_of_image_and_question_cosines(pool):
    from icl.retrievers import make_retriever

    query = pool.examples[0]
    (demo, score), = make_retriever("sit", pool).retrieve([query], k=1)[0:1][0]
    q, d = pool.position[query.id], pool.position[demo]
    mean = (pool.vectors["image"][q] @ pool.vectors["image"][d] + pool.vectors["question"][q] @ pool.vectors["question"][d]) / 2
    assert score == pytest.approx(float(mean), abs=2e-3)


def test_sttr_and_sitr_search_the_text_indexes(pool):
    from icl.retrievers import make_retriever

    query = pool.examples[1]
    q = pool.position[query.id]
    for name, query_kind, demo_kind in (("sttr", "question", "question"), ("sitr", "image", "answer")):
        demo, score = make_retriever(name, pool).retrieve([query], k=1)[0][0]
        cos = float(pool.vectors[query_kind][q] @ pool.vectors[demo_kind][pool.position[demo]])
        assert score == pytest.approx(cos, abs=2e-3), name


def test_random_is_a_function_of_seed_and_query_id(pool):
    from icl.retrievers import make_retriever

    queries = pool.examples[:5]
    a = make_retriever("random", pool, seed=1).retrieve(queries, k=4)
    b = make_retriever("random", pool, seed=1).retrieve(list(reversed(queries)), k=4)
    c = make_retriever("random", pool, seed=2).retrieve(queries, k=4)
    assert a == list(reversed(b)) and a != c
    assert all(len({d for d, _ in demos}) == 4 for demos in a)


def test_oracle_puts_same_label_demos_first(pool):
    from icl.retrievers import make_retriever

    labelled = [e for e in pool.examples if e.label is not None]
    query = next(e for e in labelled if sum(x.label == e.label and x.image != e.image for x in labelled) >= 1)
    same = sum(x.label == query.label and x.image != query.image for x in pool.examples)
    demos = make_retriever("oracle", pool).retrieve([query], k=same + 1)[0]
    labels = [pool.examples[pool.position[d]].label for d, _ in demos]
    assert labels[:same] == [query.label] * same and labels[same] != query.label


def test_near_duplicate_images_are_excluded_and_counted(pool, tmp_path):
    from icl.formats import Example
    from icl.retrievers import make_retriever

    source = pool.examples[0]
    copy = tmp_path / "copy.jpg"
    shutil.copy(source.image, copy)
    query = Example(id="new", image=str(copy), question=source.question, answers=source.answers, task=source.task)
    retriever = make_retriever("siir", pool)
    demos = retriever.retrieve([query], k=2)[0]
    assert all(pool.examples[pool.position[d]].image != source.image for d, _ in demos)
    assert retriever.excluded.near_duplicate >= 1 and retriever.excluded.same_id == 0


def test_fingerprint_names_ids_and_image_embeddings(pool_dir, tmp_path):
    from icl.pool import Pool

    copy = tmp_path / "copy"
    shutil.copytree(pool_dir, copy)
    assert Pool.open(copy).fingerprint == Pool.open(pool_dir).fingerprint
    images = np.load(copy / "embeddings" / "image.npy")
    np.save(copy / "embeddings" / "image.npy", images[::-1].copy())  # same ids, other images (another world)
    assert Pool.open(copy).fingerprint != Pool.open(pool_dir).fingerprint


def test_fixed_demos_are_the_files_first_k_in_prompt_order_without_the_query(pool, tmp_path):
    from icl.retrievers import make_retriever, order_demos

    by_image = {}
    for e in pool.examples:
        by_image.setdefault(e.image, e)
    distinct = list(by_image.values())  # one example per image: only the query itself is excluded
    ids = [e.id for e in distinct[:5]]
    path = tmp_path / "golden.txt"
    path.write_text("\n".join(ids) + "\n")
    retriever = make_retriever(f"fixed:{path}", pool)
    other, first = distinct[7], distinct[0]
    ranked = retriever.retrieve([other, first], k=3)
    assert [d for d, _ in order_demos(ranked[0])] == ids[:3]
    assert [d for d, _ in order_demos(ranked[1])] == ids[1:4]  # the query itself is skipped, the next one joins
    assert retriever.excluded.same_id == 1
    path.write_text("not-a-pool-id\n")
    with pytest.raises(ValueError, match="not in the pool"):
        make_retriever(f"fixed:{path}", pool)


def test_unknown_retriever_and_order(pool):
    from icl.retrievers import make_retriever, order_demos

    with pytest.raises(ValueError, match="expected one of random, siir"):
        make_retriever("no-such-retriever", pool)
    with pytest.raises(ValueError, match="no learned retriever 'nope'"):
        make_retriever("nope:/x", pool)
    ranked = [("a", 0.9), ("b", 0.5), ("c", 0.1)]
    assert order_demos(ranked) == [("c", 0.1), ("b", 0.5), ("a", 0.9)]
    assert order_demos(ranked, "similar-first") == ranked
    assert sorted(order_demos(ranked, "shuffled", query_id="q")) == sorted(ranked)


def test_cli_build_info_retrieve(world, tmp_path):
    out = tmp_path / "pool"
    run = [sys.executable, "-m", "icl.cli"]
    build = subprocess.run([*run, "pool", "build", "--format", "synth", "--input", str(world["data_root"]),
                            "--out", str(out), "--model", "tuna-tiny-clip", "--device", "cpu"],
                           capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-2000:]
    assert "examples, CLIP tuna-tiny-clip" in build.stdout and "indexes: image" in build.stdout
    demos = tmp_path / "demos.jsonl"
    retrieve = subprocess.run([*run, "retrieve", "--pool", str(out), "--retriever", "sttr", "-k", "2", "--limit", "4",
                               "--out", str(demos)], capture_output=True, text=True, check=False)
    assert retrieve.returncode == 0, retrieve.stderr[-2000:]
    rows = [json.loads(line) for line in demos.read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["demos"]) == 2 and r["id"] not in r["demos"] for r in rows)
    missing = subprocess.run([*run, "pool", "info", str(tmp_path / "nope")], capture_output=True, text=True, check=False)
    assert missing.returncode == 1 and "not a demonstration pool" in missing.stderr


def test_a_pool_smaller_than_the_index_k_builds_and_a_one_example_pool_is_refused(tmp_path):
    from PIL import Image

    from icl.pool import PoolConfig, PoolError, build_pool

    for cls in ("red_box", "blue_ball"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (200 if cls == "red_box" else 20, 40 * i, 60)).save(tmp_path / "train" / cls / f"{i}.jpg")
    (tmp_path / "train" / "blue_ball" / "broken.jpg").write_bytes(b"not a jpeg")
    manifest = build_pool(PoolConfig(format="image-folder", inputs=[str(tmp_path / "train")], out=str(tmp_path / "p"),
                                     clip=ClipSpec(model="tuna-tiny-clip")), progress=False)
    assert manifest["n"] == 4 and manifest["skipped"]["counts"] == {"bad image": 1}
    (tmp_path / "one" / "only").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "one" / "only" / "x.jpg")
    with pytest.raises(PoolError, match="a pool needs 2 or more"):
        build_pool(PoolConfig(format="image-folder", inputs=[str(tmp_path / "one")], out=str(tmp_path / "p1"),
                              clip=ClipSpec(model="tuna-tiny-clip")), progress=False)
