"""FAISS index for L2-normalised image embeddings: automatic choice, training, recall tuning, save/load."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common.files import parse_bytes
from common.log import StageTimer
from datastore.index_choice import choose_factory, estimate_memory, fmt_bytes

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
INFO_FILE = "index_infos.json"
SEARCH_PARAMS = ("nprobe", "efSearch", "quantizer_efSearch")
_CHUNK_ROWS = 65_536
_PLATEAU = 0.002  # stop widening the search when recall gains less than this per doubling


@dataclass
class IndexConfig:
    """How to build the index.

    ``factory`` forces a faiss index_factory string; otherwise :func:`choose_factory` picks one that
    fits ``max_index_memory``. Search parameters are tuned to the smallest value reaching
    ``target_recall`` recall@``k`` against exact search on ``n_eval_queries`` sampled rows.
    ``threads`` = 0 uses every available core.
    """

    factory: str | None = None
    max_index_memory: str | int = "4G"
    target_recall: float = 0.95
    k: int = 10
    n_eval_queries: int = 1000
    seed: int = 0
    threads: int = 0
    train_points_per_centroid: int = 40
    max_train_points: int = 500_000
    hnsw_ef_construction: int = 64

    def __post_init__(self) -> None:
        if self.factory is not None and not str(self.factory).strip():
            raise ValueError(f"factory={self.factory!r}: expected a faiss index_factory string or None")
        try:
            if parse_bytes(self.max_index_memory) <= 0:
                raise ValueError("must be > 0 bytes")
        except ValueError as err:
            raise ValueError(f"max_index_memory={self.max_index_memory!r}: {err}") from err
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall={self.target_recall!r}: allowed range is (0, 1]")
        for name in ("k", "n_eval_queries", "train_points_per_centroid", "max_train_points",
                     "hnsw_ef_construction"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be an integer >= 1")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads!r}: allowed values are 0 (all cores) or >= 1")

    @property
    def max_memory_bytes(self) -> int:
        return parse_bytes(self.max_index_memory)



# --------------------------------------------------------------------------- exact search + recall


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int,
                 chunk_rows: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-``k``, streaming the database in float32 chunks.

    Args:
        vectors: (n, d) float array (float16 / memmap fine).
        queries: (nq, d) float array.
        k: neighbours per query; ids are -1 (score -inf) where n < k.
        chunk_rows: database rows converted to float32 at a time.
    Returns:
        (scores, ids), each (nq, k), best first.
    """
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(vectors), chunk_rows):
        block = np.ascontiguousarray(vectors[start:start + chunk_rows], dtype=np.float32)
        scores, ids = faiss.knn(queries, block, min(k, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        all_s = np.concatenate([best_s, scores], axis=1)
        all_i = np.concatenate([best_i, np.where(ids >= 0, ids + start, -1)], axis=1)
        order = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(all_s, order, axis=1)
        best_i = np.take_along_axis(all_i, order, axis=1)
    return best_s, best_i


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int | None = None) -> float:
    """Mean fraction of the exact top-k ids found in the approximate top-k (k = exact width if None)."""
    k = exact_ids.shape[1] if k is None else k
    if approx_ids.shape[0] != exact_ids.shape[0] or min(approx_ids.shape[1], exact_ids.shape[1]) < k:
        raise ValueError(f"recall_at_k: shapes {approx_ids.shape} and {exact_ids.shape} do not give top-{k}")
    approx, exact = approx_ids[:, :k], exact_ids[:, :k]
    hits = ((approx[:, :, None] == exact[:, None, :]) & (approx[:, :, None] >= 0)).any(axis=2).sum()
    return float(hits) / (exact.shape[0] * k)


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Remove each query's own id from its (k+1)-wide result row and keep the first k."""
    keep = ids != self_ids[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, order preserved
    return np.take_along_axis(ids, order, axis=1)[:, :k]


# --------------------------------------------------------------------------- search parameters


def _ivf(index: Any) -> Any:
    import faiss

    return faiss.try_extract_index_ivf(index)


def _hnsw(index: Any) -> Any:
    import faiss

    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def apply_search_params(index: Any, params: dict[str, int]) -> None:
    """Set search-time parameters (``nprobe``, ``efSearch``, ``quantizer_efSearch``) on ``index``,
    looking through IndexPreTransform (OPQ/PCA) wrappers.

    Raises:
        ValueError: unknown parameter name, or one the index does not have.
    """
    import faiss

    space = faiss.ParameterSpace()
    for name, value in params.items():
        if name not in SEARCH_PARAMS:
            raise ValueError(f"search param {name!r}: allowed names are {SEARCH_PARAMS}")
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as err:
            raise ValueError(f"cannot set {name}={value} on {type(index).__name__}: {err}") from err


def _param_grid(index: Any, k: int) -> tuple[str, int, int] | None:
    """(parameter, smallest, largest) to tune, or None for exact indexes."""
    ivf = _ivf(index)
    if ivf is not None:
        return "nprobe", 1, int(ivf.nlist)
    if _hnsw(index) is not None:
        return "efSearch", max(k, 16), 4096
    return None


def _params_for(index: Any, name: str, value: int) -> dict[str, int]:
    params = {name: int(value)}
    ivf = _ivf(index)
    if name == "nprobe" and ivf is not None and _hnsw(ivf.quantizer) is not None:
        params["quantizer_efSearch"] = max(64, 2 * int(value))
    return params


def _tune(index: Any, evaluate: Callable[[dict[str, int]], float],
          target: float, k: int) -> tuple[dict[str, int], list[list[float]], bool]:
    """Smallest search parameter whose recall reaches ``target``: doubling, then bisection.

    Stops widening at the largest value or when recall stops improving (plateau).
    Returns (params, [[value, recall], ...] tried, target reached).
    """
    grid = _param_grid(index, k)
    if grid is None:
        return {}, [], True
    name, value, largest = grid
    curve: dict[int, float] = {}

    def score(v: int) -> float:
        curve[v] = evaluate(_params_for(index, name, v))
        logger.info("tune %s=%d: recall@%d %.4f", name, v, k, curve[v])
        return curve[v]

    failed = 0
    while score(value) < target:
        plateau = bool(failed) and curve[value] - curve[failed] < _PLATEAU
        if value >= largest or plateau:
            best = failed if plateau else value
            logger.warning("recall@%d target %.3f not reached; using %s=%d (recall %.4f)",
                           k, target, name, best, curve[best])
            return _params_for(index, name, best), _curve(curve), False
        failed = value
        value = min(2 * value, largest)
    while failed and value - failed > max(1, failed // 8):  # bisect between last failure and success
        middle = (value + failed) // 2
        if score(middle) >= target:
            value = middle
        else:
            failed = middle
    return _params_for(index, name, value), _curve(curve), True


def _curve(curve: dict[int, float]) -> list[list[float]]:
    return [[v, round(r, 5)] for v, r in sorted(curve.items())]


# --------------------------------------------------------------------------- build


def _check_vectors(vectors: np.ndarray, k: int) -> None:
    if vectors.ndim != 2 or vectors.dtype not in (np.float16, np.float32):
        raise ValueError(f"vectors: expected a 2-D float16/float32 array, got {vectors.dtype} {vectors.shape}")
    if len(vectors) < 2:
        raise ValueError(f"vectors: need at least 2 rows (one image has no neighbour), got {len(vectors)}")
    if len(vectors) <= k:
        raise ValueError(f"vectors: need more than k={k} rows for leave-one-out recall, got {len(vectors)}")
    sample = np.asarray(vectors[:: max(1, len(vectors) // 1000)][:1000], dtype=np.float32)
    norms = np.linalg.norm(sample, axis=1)
    if not np.all(np.isfinite(norms)) or np.abs(norms - 1.0).max() > 1e-2:
        raise ValueError(f"vectors: rows must be finite and L2-normalised, sampled norms span "
                         f"[{norms.min():.4f}, {norms.max():.4f}]")


def _train(index: Any, vectors: np.ndarray, config: IndexConfig) -> None:
    """Train on a seeded random sample: nlist*train_points_per_centroid rows for IVF (>= 20k)."""
    if index.is_trained:
        return
    ivf = _ivf(index)
    size = 20_000 if ivf is None else max(20_000, ivf.nlist * config.train_points_per_centroid)
    size = min(len(vectors), size, config.max_train_points)
    rows = np.sort(np.random.default_rng(config.seed).choice(len(vectors), size, replace=False))
    if ivf is not None:
        ivf.cp.seed = config.seed
    logger.info("training on %d sampled rows", size)
    index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))


def _add(index: Any, vectors: np.ndarray, config: IndexConfig) -> None:
    """Add rows in order (faiss id i = row i), converting to float32 one chunk at a time."""
    hnsw = _hnsw(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = config.hnsw_ef_construction
    step = max(1, len(vectors) // 10)
    for start in range(0, len(vectors), _CHUNK_ROWS):
        index.add(np.ascontiguousarray(vectors[start:start + _CHUNK_ROWS], dtype=np.float32))
        if (start + _CHUNK_ROWS) // step > start // step:
            logger.info("added %d / %d vectors", index.ntotal, len(vectors))


@dataclass
class _QuerySet:
    """Queries, their own row ids for leave-one-out (None for given queries) and exact top-k ids."""

    queries: np.ndarray
    self_ids: np.ndarray | None
    truth: np.ndarray | None = None

    def recall(self, index: Any, k: int) -> float:
        if self.self_ids is None:
            return recall_at_k(index.search(self.queries, k)[1], self.truth)
        return recall_at_k(_drop_self(index.search(self.queries, k + 1)[1], self.self_ids, k), self.truth)


def _query_sets(vectors: np.ndarray, config: IndexConfig,
                queries: np.ndarray | None) -> tuple[_QuerySet, _QuerySet]:
    """(tuning set, evaluation set) with exact ground truth.

    Tuning uses ``n_eval_queries`` seeded data rows (leave-one-out: each row's own id is dropped
    from exact and approximate results); recall is reported on the given ``queries`` or on a
    disjoint leave-one-out sample of rows.
    """
    n_pool = min(len(vectors), config.n_eval_queries * (2 if queries is None else 1))
    rows = np.random.default_rng(config.seed + 1).choice(len(vectors), n_pool, replace=False)
    split = max(1, n_pool // 2) if queries is None else n_pool
    tune_rows, eval_rows = np.sort(rows[:split]), np.sort(rows[split:])
    tune = _QuerySet(np.asarray(vectors[tune_rows], dtype=np.float32), tune_rows)
    if queries is None:
        evals = _QuerySet(np.asarray(vectors[eval_rows], dtype=np.float32), eval_rows)
    else:
        evals = _QuerySet(np.ascontiguousarray(queries, dtype=np.float32), None)
        if evals.queries.ndim != 2 or evals.queries.shape[1] != vectors.shape[1] or not len(queries):
            raise ValueError(f"queries: expected shape (m>0, {vectors.shape[1]}), got {queries.shape}")
    exact = exact_search(vectors, np.concatenate([tune.queries, evals.queries]), config.k + 1)[1]
    for part, ids in ((tune, exact[: len(tune.queries)]), (evals, exact[len(tune.queries):])):
        part.truth = ids[:, : config.k] if part.self_ids is None else _drop_self(ids, part.self_ids, config.k)
    return tune, evals


def index_memory_bytes(index: Any) -> int:
    """Serialized size of ``index`` in bytes, counted while streaming (no copy in memory)."""
    import faiss

    sizes: list[int] = []
    faiss.write_index(index, faiss.PyCallbackIOWriter(lambda chunk: sizes.append(len(chunk))))
    return sum(sizes)


def build_index(vectors: np.ndarray, config: IndexConfig,
                queries: np.ndarray | None = None) -> tuple[Any, dict[str, Any]]:
    """Build, train, fill and tune an inner-product index over L2-normalised rows.

    Args:
        vectors: (n, d) float32/float16 array or memmap of L2-normalised rows; faiss id i = row i.
        config: see :class:`IndexConfig`.
        queries: optional held-out (m, d) queries on which recall is reported; otherwise a disjoint
            leave-one-out sample of rows is used.
    Returns:
        (index with tuned search params applied, JSON-serialisable info dict).
    Raises:
        ValueError: bad vectors/queries, or no index fits the memory budget.
    """
    import faiss

    if 2 <= len(vectors) <= config.k and queries is None:  # a tiny datastore: measure recall at a smaller k
        logger.warning("only %d vectors: measuring leave-one-out recall@%d instead of recall@%d",
                       len(vectors), len(vectors) - 1, config.k)
        config = dataclasses.replace(config, k=len(vectors) - 1)
    _check_vectors(vectors, config.k)
    threads = config.threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    n, d = vectors.shape
    factory = config.factory or choose_factory(n, d, config.max_memory_bytes)
    timer = StageTimer()
    try:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"factory={factory!r}: faiss cannot build it for d={d}: {err}") from err
    with timer("train"):
        _train(index, vectors, config)
    with timer("add"):
        _add(index, vectors, config)
    with timer("ground_truth"):
        tune_set, eval_set = _query_sets(vectors, config, queries)

    def evaluate(params: dict[str, int]) -> float:
        apply_search_params(index, params)
        return tune_set.recall(index, config.k)

    with timer("tune"):
        params, curve, reached = _tune(index, evaluate, config.target_recall, config.k)
        apply_search_params(index, params)
    with timer("eval"):
        recall = eval_set.recall(index, config.k)
    info = {
        "factory": factory, "auto_chosen": config.factory is None, "metric": "inner_product",
        "n": int(n), "d": int(d), "k": config.k, "search_params": params,
        "recall_at_k": round(recall, 5), "target_recall": config.target_recall, "target_reached": reached,
        "n_eval_queries": len(eval_set.queries), "n_tune_queries": len(tune_set.queries),
        "query_source": "leave-one-out" if queries is None else "given", "tuning_curve": curve,
        "memory_bytes": index_memory_bytes(index), "estimated_memory_bytes": _estimate_or_none(factory, n, d),
        "max_index_memory_bytes": config.max_memory_bytes,
        "seconds": {stage: round(sec, 3) for stage, sec in timer.seconds.items()},
        "threads": threads, "seed": config.seed, "faiss_version": faiss.__version__,
    }
    if info["memory_bytes"] > config.max_memory_bytes:
        logger.warning("%s takes %s, above max_index_memory", factory, fmt_bytes(info["memory_bytes"]))
    logger.info("built %s: recall@%d %.4f with %s, %s, %s", factory, config.k, recall, params,
                fmt_bytes(info["memory_bytes"]), timer.summary())
    return index, info


def _estimate_or_none(factory: str, n: int, d: int) -> int | None:
    try:
        return estimate_memory(factory, n, d)
    except ValueError:  # a forced factory outside the memory model
        return None


# --------------------------------------------------------------------------- persistence


def save_index(index: Any, info: dict[str, Any], directory: str | Path) -> Path:
    """Write ``index.faiss`` and ``index_infos.json`` into ``directory`` (created); returns it."""
    import faiss

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(directory / (INDEX_FILE + ".tmp")))
    os.replace(directory / (INDEX_FILE + ".tmp"), directory / INDEX_FILE)
    (directory / (INFO_FILE + ".tmp")).write_text(json.dumps(info, indent=2, sort_keys=True))
    os.replace(directory / (INFO_FILE + ".tmp"), directory / INFO_FILE)
    return directory


def load_index(directory: str | Path) -> tuple[Any, dict[str, Any]]:
    """Read an index saved by :func:`save_index` and apply its tuned search params.

    Raises:
        FileNotFoundError: a file is missing.  RuntimeError: the info does not match the index.
    """
    import faiss

    directory = Path(directory)
    for name in (INDEX_FILE, INFO_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found (expected output of save_index)")
    index = faiss.read_index(str(directory / INDEX_FILE))
    info = json.loads((directory / INFO_FILE).read_text())
    if (info.get("n"), info.get("d")) != (index.ntotal, index.d):
        raise RuntimeError(f"{directory}: {INFO_FILE} says n={info.get('n')} d={info.get('d')} but "
                           f"the index holds n={index.ntotal} d={index.d}")
    apply_search_params(index, info.get("search_params", {}))
    return index, info
