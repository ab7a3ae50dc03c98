"""Query API: open a built datastore, search neighbours, retrieve the tags a TUNA model reads."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np

from datastore import layout
from datastore.clip import ClipSpec, LoadedClip, describe_mismatch, load_clip, same_clip, spec_from_dict

logger = logging.getLogger(__name__)

AGGREGATIONS = ("sum", "max")
# Cosine at or above which a neighbour counts as a copy of the query. Exact copies score 1.0; distinct images
# of the synthetic worlds' tiny CLIPs reach 0.99976 (docs/datastore.md, "Self-retrieval"), so the default
# drops only exact copies. A web CLIP's re-processed copies score lower: set e.g. 0.95 for real data.
DEDUP_THRESHOLD = 0.9999
EXCLUDE_MARGIN = 4  # extra neighbours searched per query so that k_images usually survive the exclusions


class DatastoreError(RuntimeError):
    """The datastore is missing, incomplete, damaged, or queried with the wrong encoder."""


MANIFEST_KEYS = ("format_version", "created", "clip", "dim", "counts", "parts", "index")
PART_KEYS = ("part", "shard", "n_written", "embeddings", "metadata")


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read and check ``root/manifest.json``; DatastoreError names the file and what is wrong."""
    path = layout.manifest_path(root)
    if not path.exists():
        raise DatastoreError(f"{root} has no manifest.json: not a datastore, or its build has not finished")
    try:
        manifest = layout.read_json_object(path)
    except ValueError as err:
        raise DatastoreError(str(err)) from None
    if "format_version" in manifest and manifest["format_version"] != layout.FORMAT_VERSION:
        raise DatastoreError(f"{root}: format_version {manifest.get('format_version')} "
                             f"is not supported (expected {layout.FORMAT_VERSION})")
    try:
        layout.require_keys(path, manifest, MANIFEST_KEYS)
    except ValueError as err:
        raise DatastoreError(str(err)) from None
    if not isinstance(manifest["parts"], list) or not manifest["parts"]:
        raise DatastoreError(f"{path}: 'parts' must be a non-empty list of parts")
    for i, part in enumerate(manifest["parts"]):
        missing = [k for k in PART_KEYS if k not in part] if isinstance(part, dict) else list(PART_KEYS)
        if missing:
            raise DatastoreError(f"{path}: parts[{i}] lacks {', '.join(repr(k) for k in missing)}")
    for key in ("clip", "counts", "index"):
        if not isinstance(manifest[key], dict):
            raise DatastoreError(f"{path}: {key!r} must be a JSON object")
    return manifest


def verify_files(root: str | Path, manifest: dict[str, Any], checksums: bool = True) -> list[str]:
    """Check every file the manifest records (part embeddings and metadata, the index) against its
    recorded size, and sha256 with ``checksums``; returns one line per damaged file (empty: all good).
    A manifest written before sizes were recorded gets an existence check only."""
    root = Path(root)
    problems = []
    for part in manifest["parts"]:
        files = part.get("files") or {}
        for name in ("embeddings", "metadata"):
            problems.append(layout.check_file(root, part[name], files.get(name), checksums))
    index_files = manifest["index"].get("files") or {}
    for name in sorted(set(index_files) | {"index.faiss"}):
        problems.append(layout.check_file(root, f"index/{name}", index_files.get(name), checksums))
    return [p for p in problems if p]


@dataclass
class SearchResult:
    """Nearest datastore images per query: ``keys[q][j]`` has cosine ``scores[q, j]`` (row ``ids[q, j]``)."""

    keys: list[list[str]]
    scores: np.ndarray  # (Q, k) float32, descending; -inf where fewer than k neighbours exist
    ids: np.ndarray  # (Q, k) int64, -1 where fewer than k neighbours exist


@dataclass
class RetrievedTags:
    """One query's ranked, deduplicated tags with aggregated similarity, and the neighbours they came from.

    ``excluded_by_key`` / ``excluded_near_dup``: neighbours dropped as the query image itself (see
    :meth:`Datastore.retrieve_tags`); not part of :meth:`to_dict` (the cache stores their totals).
    """

    tags: list[str]
    scores: list[float]
    neighbours: list[str]
    neighbour_scores: list[float]
    excluded_by_key: int = 0
    excluded_near_dup: int = 0

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
        manifest = read_manifest(root)
        problems = verify_files(root, manifest, checksums=False)
        if problems:
            raise DatastoreError(f"{root} is damaged: {problems[0]}"
                                 + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                                 + "; `tuna-datastore info --verify` lists them all")
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
                      max_tags: int | None = None, aggregate: str = "sum", min_support: float = 0.0,
                      exclude_keys: Sequence[str | None] | None = None,
                      dedup_threshold: float | None = None) -> list[RetrievedTags]:
        """Tags of each query's ``k_images`` nearest images, ranked by aggregated similarity.

        A tag's score is the sum (or max) of the cosine similarities of the neighbours whose caption
        produced it; ties keep the order of first appearance (nearest neighbour first).

        Self-exclusion: a query image that is itself in the datastore (a training image from the web
        crawl the datastore was built from) would read its own caption, which it never gets at test
        time. Neighbours that are the query are dropped and the next ones taken (the search grows until
        ``k_images`` survive or the datastore is exhausted); the counts are on the result.

        Args:
            images: PIL images or paths (encoded with the datastore's CLIP) — or give ``embeddings``.
            embeddings: (Q, D) query embeddings, L2-normalised.
            k_images: neighbours per query.
            max_tags: keep at most this many tags per query (None = all).
            aggregate: "sum" or "max".
            min_support: keep only tags whose entity has at least this support (see
                :func:`filter_by_support`; needs ``aggregate="sum"``); 0 keeps all.
            exclude_keys: one image id per query (None: no key): drop neighbours whose datastore key names
                the same image (:func:`self_keys`: the id, its path without extension, or its file stem).
            dedup_threshold: drop neighbours with cosine >= this (copies under another key; the index's
                score, exact for Flat/HNSW indexes, approximate for quantised ones); None keeps them.
        """
        if aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate={aggregate!r}: expected one of {AGGREGATIONS}")
        if min_support and aggregate != "sum":
            raise ValueError("min_support needs aggregate='sum' (a tag's score must be its neighbours' summed similarity)")
        if (images is None) == (embeddings is None):
            raise ValueError("give exactly one of images or embeddings")
        if embeddings is None:
            embeddings = self.encode_images(images)
        queries = _as_queries(embeddings, self.manifest["dim"])
        if exclude_keys is not None and len(exclude_keys) != len(queries):
            raise ValueError(f"{len(exclude_keys)} exclude_keys for {len(queries)} queries")
        hits = self._search_excluding(queries, k_images, exclude_keys, dedup_threshold)
        flat_tags = self._tags.take(np.array([i for h in hits for i in h.ids], dtype=np.int64)).to_pylist()
        out, start = [], 0
        for h in hits:
            rows, start = flat_tags[start:start + len(h.ids)], start + len(h.ids)
            found = replace(_aggregate(rows, h.scores, h.keys, aggregate), excluded_by_key=h.by_key,
                            excluded_near_dup=h.near_dup)
            out.append(truncate_tags(filter_by_support(found, min_support), max_tags))
        return out

    def _search_excluding(self, queries: np.ndarray, k: int, exclude_keys: Sequence[str | None] | None,
                          dedup_threshold: float | None) -> list[_Hits]:
        """Per query the first ``k`` neighbours that survive the exclusions, and what was dropped before them."""
        selves = [self_keys(x) for x in exclude_keys] if exclude_keys is not None else [frozenset()] * len(queries)
        excluding = exclude_keys is not None or dedup_threshold is not None
        hits: list[_Hits | None] = [None] * len(queries)
        todo, fetch = list(range(len(queries))), min(k + EXCLUDE_MARGIN if excluding else k, max(len(self), 1))
        while todo:
            result = self.search(queries[todo], fetch)
            deeper = []
            for row, q in enumerate(todo):
                h = _Hits()
                for j, key in enumerate(result.keys[row]):
                    if len(h.keys) == k:
                        break
                    if key in selves[q]:
                        h.by_key += 1
                    elif dedup_threshold is not None and result.scores[row, j] >= dedup_threshold:
                        h.near_dup += 1
                    else:
                        h.ids.append(int(result.ids[row, j]))
                        h.keys.append(key)
                        h.scores.append(float(result.scores[row, j]))
                if len(h.keys) < k and len(result.keys[row]) == fetch < len(self):
                    deeper.append(q)  # exclusions ate the margin: more neighbours may survive further down
                else:
                    hits[q] = h
            todo, fetch = deeper, min(2 * fetch, len(self))
        return hits

    def vocabulary(self) -> list[str]:
        """All distinct tags in the datastore, sorted (e.g. for a random-tags ablation)."""
        import pyarrow.compute as pc

        return sorted(pc.unique(pc.list_flatten(self._tags)).to_pylist())


def self_keys(image_id: str | None) -> frozenset[str]:
    """The datastore keys that name the image ``image_id`` itself: the id, and for a path its path without
    extension and its file stem ("images/000123.jpg" -> "images/000123.jpg", "images/000123", "000123").

    LLaVA ids are paths relative to an image folder and webdataset keys are file stems, so the stem links an
    image extracted from a datastore shard to its datastore entry. An unrelated image whose stem happens to
    equal a key only loses that one neighbour (the next one is taken).
    """
    if not image_id:
        return frozenset()
    path = PurePosixPath(image_id)
    return frozenset({image_id, str(path.with_suffix("")), path.stem})


@dataclass
class _Hits:
    """One query's surviving neighbours (datastore rows, keys, cosines) and the counts of dropped ones."""

    ids: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    by_key: int = 0
    near_dup: int = 0


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
        return replace(found, tags=[], scores=[])
    support: dict[str, float] = defaultdict(float)
    for tag, score in zip(found.tags, found.scores):
        support[entity_of(tag)] = max(support[entity_of(tag)], score / total)
    keep = [j for j, tag in enumerate(found.tags) if support[entity_of(tag)] >= min_support - 1e-6]
    return replace(found, tags=[found.tags[j] for j in keep], scores=[found.scores[j] for j in keep])


def truncate_tags(found: RetrievedTags, max_tags: int | None) -> RetrievedTags:
    """A copy of ``found`` with its first ``max_tags`` tags (and scores); None keeps all."""
    n = len(found.tags) if max_tags is None else max_tags
    return replace(found, tags=found.tags[:n], scores=found.scores[:n])


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
