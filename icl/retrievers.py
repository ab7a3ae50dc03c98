"""Demonstration retrievers: one registry, one interface.

``retrieve(queries, k)`` -> per query a ranked list of ``(demo_id, score)``, most similar first. Built in,
with the ICL literature's names:

- ``random`` (RS): k demos drawn uniformly, the same for a query id and seed whatever the batch;
- ``siir``: query image -> demo images;
- ``sttr``: query question -> demo questions;
- ``sitr``: query image -> demo answer texts (captions, class names: CLIP's zero-shot direction);
- ``sit``: [image; question] / sqrt(2) -> the same for the demos (mean of the two cosines; DRUM's start);
- ``oracle``: demos with the query's label first (ranked by image similarity), then SIIR; experiments only;
- ``bm25``: BM25 of the query's question over the demos' questions (``icl.baselines``, imported on first use).

Learned retrievers (``drum:PATH``, ``lever-lm:PATH``) register a factory under their prefix; ``fixed:FILE``
gives every query the same demos (a file of pool ids); ``image:SPEC`` ranks demo images under any timm or
open_clip image model (``icl.baselines``: e.g. ``image:timm:vit_small_patch14_dinov2.lvd142m``).

Exclusions, counted in :attr:`Retriever.excluded`: the query itself (same id, or same image: another
question on the query's image would leak its answer) and near-duplicate images (cosine >= threshold).
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datastore.store import DEDUP_THRESHOLD
from icl.formats import Example
from icl.pool import Pool

SEARCH_MARGIN = 8  # extra neighbours searched per query so that k usually survive the exclusions
Ranked = list[tuple[str, float]]


@dataclass
class Exclusions:
    """Demos dropped from the queries' lists, by reason."""

    same_id: int = 0
    same_image: int = 0
    near_duplicate: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"same_id": self.same_id, "same_image": self.same_image, "near_duplicate": self.near_duplicate}


@dataclass
class Retriever:
    """Base: ranks pool demos for queries. Subclasses implement :meth:`_scores_and_ids`.

    Attributes:
        pool: the demonstration pool.
        seed: seed of every random choice.
        exclude_self: drop the query itself and demos on the query's image.
        dedup_threshold: image cosine at or above which a demo counts as a copy of the query; None: off.
    """

    pool: Pool
    seed: int = 0
    exclude_self: bool = True
    dedup_threshold: float | None = DEDUP_THRESHOLD
    excluded: Exclusions = field(default_factory=Exclusions)

    name = "base"
    nested = True  # the top k of a deeper list is the k-list (false for sequence generators such as Lever-LM)

    def retrieve(self, queries: Sequence[Example], k: int, vectors: dict[str, np.ndarray] | None = None
                 ) -> list[Ranked]:
        """Top-``k`` demos per query, most similar first (fewer only when the pool runs out)."""
        if k < 0:
            raise ValueError(f"k={k}: must be >= 0")
        if not queries or k == 0:
            return [[] for _ in queries]
        vectors = vectors if vectors is not None else self.pool.query_vectors(queries)
        depth = min(len(self.pool), k + SEARCH_MARGIN)
        out = []
        for q, (scores, ids) in enumerate(self._scores_and_ids(queries, vectors, depth)):
            kept = self._filter(queries[q], vectors["image"][q], scores, ids, k)
            if len(kept) < k and depth < len(self.pool):  # exclusions ate the margin: rank the whole pool
                scores, ids = self._scores_and_ids([queries[q]], {kk: v[q:q + 1] for kk, v in vectors.items()},
                                                   len(self.pool))[0]
                kept = self._filter(queries[q], vectors["image"][q], scores, ids, k, count=False)
            out.append(kept)
        return out

    def _scores_and_ids(self, queries: Sequence[Example], vectors: dict[str, np.ndarray], depth: int
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
        raise NotImplementedError

    def _filter(self, query: Example, image_vector: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int,
                count: bool = True) -> Ranked:
        kept: Ranked = []
        found = Exclusions()
        for score, i in zip(scores, ids):
            if i < 0:
                continue
            demo = self.pool.examples[int(i)]
            if self.exclude_self and demo.id == query.id:
                found.same_id += 1
            elif self.exclude_self and demo.image == query.image:
                found.same_image += 1
            elif (self.dedup_threshold is not None
                  and float(self.pool.vectors["image"][int(i)] @ image_vector) >= self.dedup_threshold):
                found.near_duplicate += 1
            else:
                kept.append((demo.id, float(score)))
                if len(kept) == k:
                    break
        if count:
            for name, n in found.to_dict().items():
                setattr(self.excluded, name, getattr(self.excluded, name) + n)
        return kept


@dataclass
class IndexRetriever(Retriever):
    """Nearest neighbours of the query's ``query_kind`` vector in the pool's ``demo_kind`` index."""

    query_kind: str = "image"
    demo_kind: str = "image"

    def _scores_and_ids(self, queries, vectors, depth):
        scores, ids = self.pool.indexes[self.demo_kind].search(
            np.ascontiguousarray(vectors[self.query_kind], dtype=np.float32), depth)
        return list(zip(scores, ids))


@dataclass
class RandomRetriever(Retriever):
    """Uniform demos, a pure function of (seed, query id): the same whatever the batch or its order."""

    def _scores_and_ids(self, queries, vectors, depth):
        out = []
        for q in queries:
            digest = hashlib.sha256(f"{self.seed}:{q.id}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            ids = rng.permutation(len(self.pool))[:depth]  # a prefix: deeper searches extend it
            out.append((np.zeros(depth, np.float32), ids))
        return out


@dataclass
class OracleRetriever(Retriever):
    """Demos with the query's label first, by image similarity; then the rest by image similarity."""

    def _scores_and_ids(self, queries, vectors, depth):
        sims = vectors["image"] @ self.pool.vectors["image"].T  # (Q, n): the oracle is for small experiment pools
        labels = np.array([e.label for e in self.pool.examples], dtype=object)
        out = []
        for q, query in enumerate(queries):
            same = labels == query.label if query.label is not None else np.zeros(len(labels), bool)
            order = np.lexsort((-sims[q], ~same))[:max(depth, 1)]  # label match first, then similarity
            out.append((sims[q][order] + same[order], order))
        return out


@dataclass
class FixedRetriever(Retriever):
    """The same demos for every query: the first K usable ids of a file (one pool id per line, prompt order).
    Lever-LM's "golden" sequence and fixed random sets; ranked lists are the reversed prompt order (rank 1
    sits next to the query), so the default ``similar-last`` order shows the file's order."""

    path: str = ""
    nested = False  # K demos are the file's first K, in prompt order

    def __post_init__(self) -> None:
        lines = [line.strip() for line in Path(self.path).read_text().splitlines() if line.strip()]
        unknown = [i for i in lines if i not in self.pool.position]
        if unknown:
            raise ValueError(f"fixed demos {self.path}: {len(unknown)} ids are not in the pool, e.g. {unknown[0]!r}")
        self.ids = np.array([self.pool.position[i] for i in lines])

    def retrieve(self, queries, k, vectors=None):
        if k < 0:
            raise ValueError(f"k={k}: must be >= 0")
        vectors = vectors if vectors is not None or not queries or k == 0 else self.pool.query_vectors(queries)
        return [list(reversed(self._filter(q, vectors["image"][i], np.zeros(len(self.ids)), self.ids, k)))
                if k else [] for i, q in enumerate(queries)]


RETRIEVERS: dict[str, Callable[..., Retriever]] = {
    "random": RandomRetriever,
    "siir": lambda pool, **kw: IndexRetriever(pool, query_kind="image", demo_kind="image", **kw),
    "sttr": lambda pool, **kw: IndexRetriever(pool, query_kind="question", demo_kind="question", **kw),
    "sitr": lambda pool, **kw: IndexRetriever(pool, query_kind="image", demo_kind="answer", **kw),
    "sit": lambda pool, **kw: IndexRetriever(pool, query_kind="sit", demo_kind="sit", **kw),
    "oracle": OracleRetriever,
    "bm25": lambda pool, **kw: importlib.import_module("icl.baselines").BM25Retriever(pool, **kw),
}
# learned retrievers: prefix -> factory(pool, path, **kw), registered by their modules, imported on first use
LEARNED: dict[str, Callable[..., Retriever]] = {"fixed": lambda pool, path, **kw: FixedRetriever(pool, path=path, **kw)}
LEARNED_MODULES = {"lever-lm": "icl.lever_lm.retriever", "drum": "icl.drum.retriever", "image": "icl.baselines"}


def make_retriever(name: str, pool: Pool, **kwargs) -> Retriever:
    """The retriever called ``name`` (a built-in, or ``PREFIX:PATH`` for a learned one) over ``pool``."""
    if ":" in name:
        prefix, path = name.split(":", 1)
        if prefix not in LEARNED and prefix in LEARNED_MODULES:
            importlib.import_module(LEARNED_MODULES[prefix])
        if prefix not in LEARNED:
            raise ValueError(f"retriever {name!r}: no learned retriever {prefix!r} (known: {sorted(LEARNED) or 'none'})")
        retriever = LEARNED[prefix](pool, path, **kwargs)
    elif name in RETRIEVERS:
        retriever = RETRIEVERS[name](pool, **kwargs)
    else:
        raise ValueError(f"retriever {name!r}: expected one of {', '.join(RETRIEVERS)} or PREFIX:PATH")
    retriever.name = name
    return retriever


def order_demos(ranked: Ranked, order: str = "similar-last", seed: int = 0, query_id: str = "") -> Ranked:
    """Prompt order of ranked demos: ``similar-last`` (next to the query, the default), ``similar-first``,
    or ``shuffled`` (a pure function of seed and query id)."""
    if order == "similar-last":
        return list(reversed(ranked))
    if order == "similar-first":
        return list(ranked)
    if order == "shuffled":
        digest = hashlib.sha256(f"{seed}:order:{query_id}".encode()).digest()
        perm = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(ranked))
        return [ranked[i] for i in perm]
    raise ValueError(f"order={order!r}: expected similar-last, similar-first or shuffled")


def label_precision(pool: Pool, queries: Sequence[Example], ranked: Sequence[Ranked]) -> float | None:
    """Share of retrieved demos whose label is the query's (over labelled queries; None without any): how
    often a retriever shows the model demonstrations of the right class."""
    hits = [pool.examples[pool.position[d]].label == q.label for q, r in zip(queries, ranked) if q.label is not None
            for d, _ in r]
    return 100.0 * sum(hits) / len(hits) if hits else None
