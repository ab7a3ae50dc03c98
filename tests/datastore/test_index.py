"""Tests for datastore.index: factory choice, memory estimates, recall tuning, ids, save/load."""

from __future__ import annotations

import json
import re

import faiss
import numpy as np
import pytest

from datastore.index import (
    IndexConfig,
    apply_search_params,
    build_index,
    exact_search,
    load_index,
    recall_at_k,
    save_index,
)
from datastore.index import _drop_self
from datastore.index_choice import choose_factory, estimate_memory, rabitq_available

D = 64


def clustered(n: int, seed: int = 0, clusters: int = 40, d: int = D, world_seed: int = 123) -> np.ndarray:
    """Normalised gaussian clusters (varying spread, low-dimensional noise) around random centres."""
    world = np.random.default_rng(world_seed)
    centres = world.standard_normal((clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spreads = world.uniform(0.3, 1.0, clusters)
    spectrum = np.arange(1, d + 1) ** -0.5
    basis = (spectrum / np.linalg.norm(spectrum))[:, None] * np.linalg.qr(world.standard_normal((d, d)))[0].T
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, clusters, n)
    x = centres[labels] + spreads[labels, None] * (rng.standard_normal((n, d)) @ basis)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(20_000)


def test_choose_factory_follows_size_and_budget() -> None:
    big = 1 << 40
    assert choose_factory(10_000, D, big) == "Flat"
    assert choose_factory(100_000, D, big) == "HNSW32,Flat"
    # Flat does not fit 1 MB at n=10k (2.56 MB): fall through to IVF with 256 lists (10k/39 caps 512)
    assert choose_factory(10_000, D, 1_000_000) == "IVF256,SQ8"
    # HNSW needs more than flat memory, so a flat-sized budget at medium n gives IVF
    assert choose_factory(100_000, D, 100_000 * D * 4) == "IVF1024,SQ8"
    assert choose_factory(1_000_000, 512, 1 << 40) == "IVF4096,SQ8"
    quarter = choose_factory(1_000_000, 512, 1_000_000 * 512)  # 1/4 of flat: SQ8 + ids is too big
    assert quarter == ("IVF4096,RaBitQ7" if rabitq_available() else "IVF4096,SQ6")
    assert estimate_memory(quarter, 1_000_000, 512) <= 1_000_000 * 512
    assert choose_factory(100_000_000, D, 10 << 30) == "IVF32768_HNSW32,SQ8"
    assert choose_factory(1_000_000, 512, 120_000_000).startswith("OPQ")


def test_choose_factory_errors_with_minimum_when_nothing_fits() -> None:
    with pytest.raises(ValueError, match="raise --max-index-memory") as err:
        choose_factory(1_000_000, 512, 10_000_000)
    message = str(err.value)
    assert "OPQ8_32,IVF4096,PQ8x8" in message
    needed = int(re.search(r"\((\d+) bytes\)", message).group(1))
    assert needed == estimate_memory("OPQ8_32,IVF4096,PQ8x8", 1_000_000, 512)
    assert choose_factory(1_000_000, 512, needed) == "OPQ8_32,IVF4096,PQ8x8"
    with pytest.raises(ValueError, match="raise --max-index-memory"):
        build_index(clustered(500), IndexConfig(max_index_memory=1000, n_eval_queries=50))


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,Flat", "IVF64,SQ8", "IVF64,SQ4", "IVF64,RaBitQ5",
                                     "IVF32_HNSW32,SQ6", "IVF32,PQ8x8"])
def test_memory_estimate_matches_serialized_size(factory: str, data: np.ndarray) -> None:
    config = IndexConfig(factory=factory, n_eval_queries=50, target_recall=0.5)
    index, info = build_index(data[:5000], config)
    assert info["factory"] == factory and not info["auto_chosen"]
    assert info["memory_bytes"] == faiss.serialize_index(index).nbytes
    assert info["estimated_memory_bytes"] == pytest.approx(info["memory_bytes"], rel=0.01)


def test_flat_is_exact_and_ids_map_to_rows(data: np.ndarray) -> None:
    vectors = data[:3000].astype(np.float16)  # float16 input is converted chunk by chunk
    index, info = build_index(vectors, IndexConfig(n_eval_queries=200))
    assert info["factory"] == "Flat" and info["auto_chosen"]
    assert info["recall_at_k"] == 1.0
    assert info["search_params"] == {}
    assert (info["query_source"], info["n_eval_queries"], info["n_tune_queries"]) == ("leave-one-out", 200, 200)
    rows = np.array([0, 17, 1234, 2999])
    ids = index.search(vectors[rows].astype(np.float32), 3)[1]
    np.testing.assert_array_equal(ids[:, 0], rows)


def test_ivf_tuning_reaches_target_with_smallest_nprobe(data: np.ndarray) -> None:
    queries = clustered(500, seed=7)
    config = IndexConfig(factory="IVF256,SQ8", target_recall=0.95, n_eval_queries=500)
    index, info = build_index(data, config, queries=queries)
    nprobe = info["search_params"]["nprobe"]
    curve = dict((int(v), r) for v, r in info["tuning_curve"])
    assert info["target_reached"] and curve[nprobe] >= 0.95
    assert nprobe > 1 and curve[nprobe - 1] < 0.95  # bisection tried the value just below
    assert faiss.extract_index_ivf(index).nprobe == nprobe
    assert info["query_source"] == "given" and info["n_eval_queries"] == 500
    exact = exact_search(data, queries, 10)[1]
    held_out = recall_at_k(index.search(queries, 10)[1], exact)
    assert held_out == pytest.approx(info["recall_at_k"], abs=1e-5)
    assert held_out >= 0.93
    for row in (5, 19_999):
        assert index.search(data[row:row + 1], 1)[1][0, 0] == row


def test_hnsw_tunes_ef_search(data: np.ndarray) -> None:
    index, info = build_index(data[:8000], IndexConfig(factory="HNSW32,Flat", target_recall=0.99))
    ef = info["search_params"]["efSearch"]
    assert ef >= 16 and faiss.downcast_index(index).hnsw.efSearch == ef
    assert info["recall_at_k"] >= 0.97


@pytest.mark.parametrize("factory", ["PCA32,IVF64,SQ8", "IVF64_HNSW32,SQ8"])
def test_save_load_round_trip(factory: str, data: np.ndarray, tmp_path) -> None:
    index, info = build_index(data[:10_000], IndexConfig(factory=factory, n_eval_queries=300))
    save_index(index, info, tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "index_infos.json"]
    loaded, loaded_info = load_index(tmp_path / "idx")
    assert loaded_info == json.loads(json.dumps(info))
    ivf = faiss.extract_index_ivf(loaded)
    assert ivf.nprobe == info["search_params"]["nprobe"] > 0
    if "quantizer_efSearch" in info["search_params"]:
        assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == info["search_params"]["quantizer_efSearch"]
    queries = clustered(200, seed=3)
    for before, after in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(before, after)


def test_info_is_json_with_required_keys(data: np.ndarray) -> None:
    _, info = build_index(data[:4000], IndexConfig(factory="IVF32,SQ8", n_eval_queries=100, seed=1))
    decoded = json.loads(json.dumps(info))
    required = {"factory", "metric", "n", "d", "search_params", "recall_at_k", "k", "n_eval_queries",
                "query_source", "memory_bytes", "seconds"}
    assert required <= decoded.keys()
    assert (decoded["metric"], decoded["n"], decoded["d"], decoded["k"]) == ("inner_product", 4000, D, 10)
    assert {"train", "add", "tune"} <= decoded["seconds"].keys()


def test_apply_search_params_rejects_bad_names() -> None:
    flat = faiss.IndexFlatIP(D)
    with pytest.raises(ValueError, match="allowed names"):
        apply_search_params(flat, {"nprob": 3})
    with pytest.raises(ValueError, match="cannot set nprobe=3 on IndexFlat"):
        apply_search_params(flat, {"nprobe": 3})


def test_exact_search_and_recall_helpers(data: np.ndarray) -> None:
    queries = clustered(50, seed=9)
    database = data[:5000].astype(np.float16)  # converted to float32 one 700-row chunk at a time
    flat = faiss.IndexFlatIP(D)
    flat.add(database.astype(np.float32))
    scores, ids = exact_search(database, queries, 5, chunk_rows=700)
    ref_scores, ref_ids = flat.search(queries, 5)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5)
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 4, 1]])) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, -1], [5, 6]]), np.array([[1, 2], [6, 5]])) == pytest.approx(3 / 4)
    # leave-one-out: the query's own id is removed wherever it appears, otherwise the row is cut to k
    dropped = _drop_self(np.array([[5, 1, 2], [3, 9, 4], [7, 8, 6]]), np.array([5, 9, 0]), 2)
    np.testing.assert_array_equal(dropped, [[1, 2], [3, 4], [7, 8]])


def test_config_and_input_validation(data: np.ndarray, tmp_path) -> None:
    with pytest.raises(ValueError, match="target_recall=1.5"):
        IndexConfig(target_recall=1.5)
    with pytest.raises(ValueError, match="max_index_memory='lots'"):
        IndexConfig(max_index_memory="lots")
    with pytest.raises(ValueError, match="k=0"):
        IndexConfig(k=0)
    with pytest.raises(ValueError, match="L2-normalised"):
        build_index(data[:100] * 2, IndexConfig())
    with pytest.raises(ValueError, match="float16/float32"):
        build_index(data[:100].astype(np.float64), IndexConfig())
    with pytest.raises(ValueError, match="factory='IVF12,Bogus'"):
        build_index(data[:100], IndexConfig(factory="IVF12,Bogus"))
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        load_index(tmp_path)


@pytest.mark.parametrize("n", [2, 5, 10])
def test_tiny_sets_lower_k_instead_of_failing(n, caplog) -> None:
    import logging

    vectors = clustered(n)
    with caplog.at_level(logging.WARNING, logger="datastore.index"):
        index, info = build_index(vectors, IndexConfig(k=10))
    assert info["k"] == n - 1 and info["recall_at_k"] == 1.0 and index.ntotal == n
    assert f"only {n} vectors: measuring leave-one-out recall@{n - 1} instead of recall@10" in caplog.text
    with pytest.raises(ValueError, match="need at least 2 rows"):
        build_index(vectors[:1], IndexConfig(k=10))
