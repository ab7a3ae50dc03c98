"""Category purity of nearest neighbours: does retrieval find images that show the query's objects?

A neighbour is *pure* when its category set intersects the query's; purity@k is the mean, over
queries, of the fraction of pure neighbours among the top k. Reported for all queries and for
single-object queries (one category: the neighbour must contain exactly that one), split by the
query's novelty ("seen" / "novel") when given. The functions take arrays and lists, so the same
code scores a fresh CLIP (exact search) and a built datastore (its FAISS neighbours).
Labels come from any :data:`LabelSource`: ``datastore.synth.layout.World.categories`` reads the ground
truth of synthetic-world keys, :class:`Labels` a jsonl/csv file for any other images.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# image keys -> (label set per key, group per key or None); World.categories is one
LabelSource = Callable[[Sequence[str]], tuple[list[frozenset[str]], list[str] | None]]
UNGROUPED = "ungrouped"


@dataclass(frozen=True)
class Labels:
    """Labels (and optional groups such as seen / novel) of image keys, from any source; a LabelSource.

    Keys are matched exactly as the retrieval cache names images: the questions' ``image`` fields for
    queries, the datastore's sample keys for neighbours.
    """

    labels: dict[str, frozenset[str]]
    groups: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> Labels:
        """A label file: ``.csv`` with a header ``image,label[,group]`` (one row per label; a key's rows add
        up), or jsonl lines ``{"image": KEY, "labels": [...] (or "label": "..."), "group": optional}``.

        Raises:
            ValueError: "PATH:LINE: ..." for invalid JSON or a row without a key or a label.
        """
        path = Path(path)
        if path.suffix.lower() == ".csv":
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if not {"image", "label"} <= set(reader.fieldnames or ()):
                    raise ValueError(f"{path}: expected a header with image,label[,group], got {reader.fieldnames}")
                rows = [(n, r["image"], [r["label"]], r.get("group")) for n, r in enumerate(reader, 2)]
        else:
            rows = []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
                r = r if isinstance(r, dict) else {}
                names = r.get("labels", r.get("label"))
                rows.append((n, r.get("image"), names if isinstance(names, list) else [names], r.get("group")))
        labels: dict[str, frozenset[str]] = {}
        groups: dict[str, str] = {}
        for n, key, names, group in rows:
            if not isinstance(key, str) or not key or not names \
                    or not all(isinstance(x, str) and x.strip() for x in names):
                raise ValueError(f"{path}:{n}: needs an image key and at least one non-empty label")
            labels[key] = labels.get(key, frozenset()) | {x.strip() for x in names}
            if group:
                groups[key] = str(group)
        return cls(labels, groups)

    def __call__(self, keys: Sequence[str]) -> tuple[list[frozenset[str]], list[str] | None]:
        missing = [k for k in keys if k not in self.labels]
        if missing:
            raise ValueError(f"{len(missing)} of {len(keys)} image keys have no label, e.g. {missing[:5]}")
        groups = [self.groups.get(k, UNGROUPED) for k in keys] if self.groups else None
        return [self.labels[k] for k in keys], groups


def key_purity(images: Sequence[str], neighbours: Sequence[Sequence[str]], labels: LabelSource,
               ks: Sequence[int] = (1, 5)) -> dict[str, dict]:
    """Purity@k of neighbours named by key (e.g. a retrieval cache's ``neighbours``), both sides labelled
    by ``labels``: ``World.categories`` for synthetic-world keys, :class:`Labels` for any others. Rows
    per group come from the queries' groups (see :func:`purity_from_neighbours`)."""
    categories, groups = labels(list(images))
    keys = list(dict.fromkeys(k for row in neighbours for k in row))
    of_key = dict(zip(keys, labels(keys)[0]))
    return purity_from_neighbours(categories, [[of_key[k] for k in row] for row in neighbours], groups, ks)


def exact_neighbours(queries: np.ndarray, database: np.ndarray, k: int, exclude: Sequence[int] | None = None,
                     chunk: int = 1024) -> np.ndarray:
    """Indices (Q, k) of the top-k database rows by inner product (cosine for L2-normalised rows).

    Args:
        queries: (Q, D) query embeddings.
        database: (N, D) database embeddings.
        k: neighbours per query.
        exclude: optional database row per query to skip (the query itself when it is in the database).
        chunk: queries scored per matrix product.
    """
    queries, database = np.asarray(queries, np.float32), np.asarray(database, np.float32)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"embeddings must be (Q, D) and (N, D) with the same D; got {queries.shape} and {database.shape}")
    if not 1 <= k <= database.shape[0] - (exclude is not None):
        raise ValueError(f"k={k} but the database holds {database.shape[0]} rows")
    out = np.empty((len(queries), k), dtype=np.int64)
    for lo in range(0, len(queries), chunk):
        scores = queries[lo:lo + chunk] @ database.T
        if exclude is not None:
            scores[np.arange(len(scores)), np.asarray(exclude[lo:lo + chunk])] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[lo:lo + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def purity_from_neighbours(query_categories: Sequence[Collection[str]],
                           neighbour_categories: Sequence[Sequence[Collection[str]]],
                           novelty: Sequence[str] | None = None, ks: Sequence[int] = (1, 5)) -> dict[str, dict]:
    """Purity@k of given neighbour lists.

    Args:
        query_categories: per query, its category names.
        neighbour_categories: per query, its neighbours' category-name sets, best first (at least max(ks)).
        novelty: optional per-query group label ("seen" / "novel"); adds one row per group.
        ks: the k values reported.

    Returns:
        ``{row: {"n": queries, "top1": purity@1, "top5": ...}}`` with rows "all", "single" and, when
        novelty is given, "<group>" and "<group>/single" (rows without queries are left out).

    Raises:
        ValueError: lengths differ, a query has fewer than max(ks) neighbours, or a query has no category.
    """
    n = len(query_categories)
    if len(neighbour_categories) != n or (novelty is not None and len(novelty) != n):
        raise ValueError(f"{n} queries but {len(neighbour_categories)} neighbour lists"
                         + (f" and {len(novelty)} novelty labels" if novelty is not None else ""))
    kmax = max(ks)
    pure = np.zeros((n, kmax), dtype=bool)
    single = np.zeros(n, dtype=bool)
    for i, (cats, neighbours) in enumerate(zip(query_categories, neighbour_categories)):
        cats = set(cats)
        if not cats:
            raise ValueError(f"query {i} has no category")
        if len(neighbours) < kmax:
            raise ValueError(f"query {i} has {len(neighbours)} neighbours; purity@{kmax} needs {kmax}")
        pure[i] = [bool(cats & set(nb)) for nb in list(neighbours)[:kmax]]
        single[i] = len(cats) == 1
    masks = {"all": np.ones(n, dtype=bool), "single": single}
    if novelty is not None:
        labels = np.asarray(novelty)
        for group in dict.fromkeys(novelty):
            masks[str(group)] = labels == group
            masks[f"{group}/single"] = (labels == group) & single
    report = {}
    for row, mask in masks.items():
        if mask.any():
            report[row] = {"n": int(mask.sum()), **{f"top{k}": float(pure[mask, :k].mean()) for k in ks}}
    return report


def neighbour_purity(query_embeddings: np.ndarray, query_categories: Sequence[Collection[str]],
                     database_embeddings: np.ndarray, database_categories: Sequence[Collection[str]],
                     novelty: Sequence[str] | None = None, ks: Sequence[int] = (1, 5),
                     exclude: Sequence[int] | None = None) -> dict[str, dict]:
    """Purity@k of exact inner-product neighbours (see :func:`purity_from_neighbours` for the result).

    ``exclude`` names, per query, a database row to skip (the query itself, for leave-one-out).
    """
    if len(database_categories) != len(database_embeddings):
        raise ValueError(f"{len(database_embeddings)} database embeddings but {len(database_categories)} category sets")
    if len(query_categories) != len(query_embeddings):
        raise ValueError(f"{len(query_embeddings)} query embeddings but {len(query_categories)} category sets")
    ids = exact_neighbours(query_embeddings, database_embeddings, max(ks), exclude=exclude)
    return purity_from_neighbours(query_categories, [[database_categories[j] for j in row] for row in ids],
                                  novelty, ks)


def format_purity(report: dict[str, dict]) -> str:
    """A small text table: one line per row of a purity report."""
    ks = [key for key in next(iter(report.values())) if key.startswith("top")]
    lines = [f"{'queries':<14}{'n':>6}" + "".join(f"{'purity@' + k[3:]:>11}" for k in ks)]
    for row, values in report.items():
        lines.append(f"{row:<14}{values['n']:>6}" + "".join(f"{100 * values[k]:>10.1f}%" for k in ks))
    return "\n".join(lines)
