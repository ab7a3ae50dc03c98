"""DRUM as a retriever: ``make_retriever("drum:PATH", pool)`` ranks the pool by a trained embedder.

PATH is a training run (``tuna-icl drum train --out``: its latest round) or one round's folder. Importing
this module registers the ``drum`` prefix in :data:`icl.retrievers.LEARNED`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icl.drum.embedder import CONFIG, DrumEmbedder
from icl.retrievers import LEARNED, Retriever

POOL_EMBEDDINGS, POOL_EMBEDDINGS_INFO = "pool_embeddings.npy", "pool_embeddings.json"


def embedder_folder(path: str | Path) -> Path:
    """The embedder folder of ``path``: itself, or a training run's latest round.

    Raises:
        ValueError: neither an embedder folder nor a run with a finished round.
    """
    path = Path(path)
    if (path / CONFIG).is_file():
        return path
    rounds = sorted((int(p.parent.name.split("-")[1]), p.parent) for p in path.glob(f"round-*/{CONFIG}"))
    if not rounds:
        raise ValueError(f"drum: {path} is neither a DRUM embedder folder nor a training run with a round")
    return rounds[-1][1]


@dataclass
class DrumRetriever(Retriever):
    """Nearest pool demos of the query under a DRUM embedder (exact inner-product search).

    Attributes:
        path: embedder folder or training run (ignored when ``embedder`` is given).
        embedder: an embedder in memory (training uses the current one this way).
        device: torch device of the embedder.
        cache_embeddings: store the pool's embeddings in the embedder folder for the next load.
    """

    path: str = ""
    embedder: Any = None
    device: str = "cpu"
    cache_embeddings: bool = True
    demo_vectors: np.ndarray = field(default=None, init=False, repr=False)

    name = "drum"

    def __post_init__(self) -> None:
        import faiss

        folder = None
        if self.embedder is None:
            if not self.path:
                raise ValueError("drum: give the embedder folder or training run (drum:PATH)")
            folder = embedder_folder(self.path)
            self.embedder = DrumEmbedder.load(folder, device=self.device)
        if self.embedder.config.clip_weights_sha256 != self.pool.manifest["clip"]["weights_sha256"]:
            raise ValueError(f"drum embedder {self.path or '(in memory)'} was built on another CLIP than pool "
                             f"{self.pool.root}'s; build the pool with that CLIP or train on this pool")
        self.demo_vectors = self._pool_embeddings(folder)
        self.index = faiss.IndexFlatIP(self.demo_vectors.shape[1])
        self.index.add(self.demo_vectors)

    def _pool_embeddings(self, folder: Path | None) -> np.ndarray:
        """The pool under the embedder, from the folder's cache when it was computed for this pool."""
        info = {"pool_fingerprint": self.pool.fingerprint}
        if (folder is not None and (folder / POOL_EMBEDDINGS_INFO).is_file()
                and json.loads((folder / POOL_EMBEDDINGS_INFO).read_text()) == info):
            return np.load(folder / POOL_EMBEDDINGS).astype(np.float32)
        vectors = self.embedder.embed_rows(self.pool.examples, self.pool.vectors)
        if folder is not None and self.cache_embeddings:
            try:
                np.save(folder / POOL_EMBEDDINGS, vectors.astype(np.float32))
                (folder / POOL_EMBEDDINGS_INFO).write_text(json.dumps(info))
            except OSError:  # a read-only model folder: embed again next time
                pass
        return vectors

    def save_pool_embeddings(self, folder: str | Path) -> None:
        """Store the pool's embeddings beside a saved embedder (training does this for every round)."""
        np.save(Path(folder) / POOL_EMBEDDINGS, self.demo_vectors.astype(np.float32))  # float16 would reorder near ties
        (Path(folder) / POOL_EMBEDDINGS_INFO).write_text(json.dumps({"pool_fingerprint": self.pool.fingerprint}))

    def _scores_and_ids(self, queries, vectors, depth):
        embedded = self.embedder.embed_rows(queries, vectors)
        scores, ids = self.index.search(np.ascontiguousarray(embedded, dtype=np.float32), depth)
        return list(zip(scores, ids))


LEARNED["drum"] = lambda pool, path, **kw: DrumRetriever(pool, path=path, **kw)

__all__ = ["DrumRetriever", "embedder_folder"]
