"""Query API: open a built datastore, search neighbours, retrieve the tags a TUNA model reads."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datastore import layout
from datastore.clip import ClipSpec, LoadedClip, describe_mismatch, load_clip, same_clip, spec_from_dict

logger = logging.getLogger(__name__)

AGGREGATIONS = ("sum", "max")


class DatastoreError(RuntimeError):
    """The datastore is missing, incomplete, or queried with the wrong encoder."""


@dataclass
class SearchResult:
    """Nearest datastore images per query: ``keys[q][j]`` has cosine ``scores[q, j]`` (row ``ids[q, j]``)."""

    keys: list[list[str]]
    scores: np.ndarray  # (Q, k) float32, descending; -inf where fewer than k neighbours exist
    ids: np.ndarray  # (Q, k) int64, -1 where fewer than k neighbours exist


@dataclass
class RetrievedTags:
    """One query's ranked, deduplicated tags with aggregated similarity, and the neighbours they came from."""

    tags: list[str]
    scores: list[float]
    neighbours: list[str]
    neighbour_scores: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"tags": self.tags, "scores": self.scores, "neighbours": self.neighbours,
                "neighbour_scores": self.neighbour_scores}


class Datastore:
    """A built datastore opened for queries. Use :meth:`open`."""

    def __init__(self, root: Path, manifest: dict[str, Any], index, keys, tags, clip: LoadedClip | None,
                 device: str = "cpu") -> None:
        self.root, self.manifest, self.index = root, manifest, index
        self._keys, self._tags, self._clip, self._device = keys, tags, clip, device

    @classmethod
    def open(cls, root: str | Path, clip: LoadedClip | ClipSpec | None = None, device: str = "cpu") -> "Datastore":
        """Open ``root`` (index + key/tag tables; the CLIP model loads lazily when images are queried).

        Args:
            root: datastore directory with a manifest.json.
            clip: the query encoder; must be the encoder the datastore was built with.
            device: device for a lazily loaded encoder.

        Raises:
            DatastoreError: no manifest (unfinished build) or a CLIP that differs from the manifest's.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        from datastore.index import load_index

        root = Path(root)
        if not layout.manifest_path(root).exists():
            raise DatastoreError(f"{root} has no manifest.json: not a datastore, or its build has not finished")
        manifest = layout.read_json(layout.manifest_path(root))
        if manifest.get("format_version") != layout.FORMAT_VERSION:
            raise DatastoreError(f"{root}: format_version {manifest.get('format_version')} "
                                 f"is not supported (expected {layout.FORMAT_VERSION})")
        if isinstance(clip, ClipSpec):
            clip = load_clip(clip)
        if clip is not None:
            _check_clip(root, manifest, clip)
        index, _ = load_index(layout.index_dir(root))
        tables = [pq.read_table(root / p["metadata"], columns=["key", "tags"]) for p in manifest["parts"]]
        table = pa.concat_tables(tables)
        if table.num_rows != index.ntotal:
            raise DatastoreError(f"{root}: {table.num_rows} metadata rows but {index.ntotal} index vectors")
        return cls(root, manifest, index, table.column("key").combine_chunks(),
                   table.column("tags").combine_chunks(), clip, device)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def clip(self) -> LoadedClip:
        """The query encoder, loaded from the manifest's description on first use."""
        if self._clip is None:
            spec = spec_from_dict(self.manifest["clip"], device=self._device)
            self._clip = load_clip(spec)
            _check_clip(self.root, self.manifest, self._clip)
        return self._clip

    def encode_images(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """Embed PIL images or image paths with the datastore's encoder → (N, D) float32, L2-normalised."""
        import torch
        from PIL import Image

        out = []
        for start in range(0, len(images), batch_size):
            chunk = [Image.open(x).convert("RGB") if isinstance(x, (str, Path)) else x.convert("RGB")
                     for x in images[start:start + batch_size]]
            pixels = torch.stack([self.clip.preprocess(image) for image in chunk])
            out.append(self.clip.encode_images(pixels).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.manifest["dim"]), np.float32)

    def search(self, embeddings: Any, k: int = 5) -> SearchResult:
        """Top-``k`` datastore images by cosine similarity for each query embedding (Q, D)."""
        queries = _as_queries(embeddings, self.manifest["dim"])
        scores, ids = self.index.search(queries, k)
        valid = ids >= 0
        flat = self._keys.take(np.where(valid, ids, 0).ravel()).to_pylist()
        keys = [[flat[q * k + j] for j in range(k) if valid[q, j]] for q in range(len(queries))]
        return SearchResult(keys=keys, scores=np.where(valid, scores, -np.inf).astype(np.float32), ids=ids)

    def retrieve_tags(self, images: Sequence[Any] | None = None, embeddings: Any = None, k_images: int = 5,
                      max_tags: int | None = None, aggregate: str = "sum",
                      min_support: float = 0.0) -> list[RetrievedTags]:
        """Tags of each query's ``k_images`` nearest images, ranked by aggregated similarity.

        A tag's score is the sum (or max) of the cosine similarities of the neighbours whose caption
        produced it; ties keep the order of first appearance (nearest neighbour first).

        Args:
            images: PIL images or paths (encoded with the datastore's CLIP) — or give ``embeddings``.
            embeddings: (Q, D) query embeddings, L2-normalised.
            k_images: neighbours per query.
            max_tags: keep at most this many tags per query (None = all).
            aggregate: "sum" or "max".
            min_support: keep only tags whose entity has at least this support (see
                :func:`filter_by_support`; needs ``aggregate="sum"``); 0 keeps all.
        """
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate={aggregate!r}: expected one of {AGGREGATIONS}")
        if min_support and aggregate != "sum":
            raise ValueError("min_support needs aggregate='sum' (a tag's score must be its neighbours' summed similarity)")
        if (images is None) == (embeddings is None):
            raise ValueError("give exactly one of images or embeddings")
        if embeddings is None:
            embeddings = self.encode_images(images)
        result = self.search(embeddings, k_images)
        flat_tags = self._tags.take(np.where(result.ids >= 0, result.ids, 0).ravel()).to_pylist()
        out = []
        for q in range(len(result.keys)):
            n = len(result.keys[q])
            rows = flat_tags[q * k_images: q * k_images + n]
            sims = result.scores[q, :n].tolist()
            found = filter_by_support(_aggregate(rows, sims, result.keys[q], aggregate), min_support)
            out.append(truncate_tags(found, max_tags))
        return out

    def vocabulary(self) -> list[str]:
        """All distinct tags in the datastore, sorted (e.g. for a random-tags ablation)."""
        import pyarrow.compute as pc

        return sorted(pc.unique(pc.list_flatten(self._tags)).to_pylist())


def entity_of(tag: str) -> str:
    """The entity a tag names: its last word ("small red kelbo" -> "kelbo"), as the rule parser emits them."""
    words = tag.split()
    return words[-1] if words else tag


def filter_by_support(found: RetrievedTags, min_support: float) -> RetrievedTags:
    """Keep the tags whose entity is named by neighbours holding at least ``min_support`` of the neighbours'
    summed similarity (a similarity-weighted vote: 0.5 is a majority, e.g. 3 of 5 about equally close
    neighbours).

    An entity's support is the largest sum-aggregated score among its tags (the bare entity tag, which
    the parser emits for every caption naming it, has the sum over all of them) divided by the sum of
    ``neighbour_scores``. The other objects of a neighbour's scene then stay out of the block unless most
    neighbours show them too. Order and scores of the kept tags are unchanged.

    Raises:
        ValueError: ``min_support`` outside [0, 1].
    """
    if not 0.0 <= min_support <= 1.0:
        raise ValueError(f"min_support={min_support}: must be in [0, 1]")
    if min_support == 0 or not found.tags:
        return found
    total = sum(s for s in found.neighbour_scores if np.isfinite(s))
    if total <= 0:
        return RetrievedTags([], [], found.neighbours, found.neighbour_scores)
    support: dict[str, float] = defaultdict(float)
    for tag, score in zip(found.tags, found.scores):
        support[entity_of(tag)] = max(support[entity_of(tag)], score / total)
    keep = [j for j, tag in enumerate(found.tags) if support[entity_of(tag)] >= min_support - 1e-6]
    return RetrievedTags([found.tags[j] for j in keep], [found.scores[j] for j in keep], found.neighbours,
                         found.neighbour_scores)


def truncate_tags(found: RetrievedTags, max_tags: int | None) -> RetrievedTags:
    """A copy of ``found`` with its first ``max_tags`` tags (and scores); None keeps all."""
    n = len(found.tags) if max_tags is None else max_tags
    return RetrievedTags(found.tags[:n], found.scores[:n], found.neighbours, found.neighbour_scores)


def _aggregate(rows: list[list[str]], sims: list[float], keys: list[str], how: str) -> RetrievedTags:
    score: dict[str, float] = defaultdict(float)
    for tags, sim in zip(rows, sims):
        for tag in dict.fromkeys(tags):  # a neighbour votes once per tag
            score[tag] = score[tag] + sim if how == "sum" else max(score.get(tag, -np.inf), sim)
    order = sorted(score, key=lambda t: -score[t])  # stable: ties keep first-appearance order
    return RetrievedTags(tags=order, scores=[round(float(score[t]), 6) for t in order],
                         neighbours=list(keys), neighbour_scores=[round(float(s), 6) for s in sims])


def _as_queries(embeddings: Any, dim: int) -> np.ndarray:
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().float().cpu().numpy()
    queries = np.ascontiguousarray(np.atleast_2d(np.asarray(embeddings, dtype=np.float32)))
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise ValueError(f"query embeddings have shape {queries.shape}; the datastore expects (N, {dim})")
    return queries


def _check_clip(root: Path, manifest: dict[str, Any], clip: LoadedClip) -> None:
    if not same_clip(manifest["clip"], clip.identity):
        raise DatastoreError(f"{root} was built with a different CLIP model: "
                             f"{describe_mismatch(manifest['clip'], clip.identity)}")
