"""Baseline retrievers for comparing DRUM against: lexical and image-only.

- ``bm25``: BM25 of the query's question against the demos' questions (lowercase word tokens, no stemming:
  nothing to download);
- ``image:SPEC``: nearest demo images under any timm or open_clip image model (a DINO-style baseline).
  SPEC is ``timm:NAME`` (pretrained weights), ``timm:NAME:random`` (seeded random init: tests, offline),
  ``timm:NAME:FILE`` (local weights), ``open_clip:ARCH`` (seeded random init) or ``open_clip:ARCH:PRETRAINED``
  (a tag or a local checkpoint). The pool's images are embedded once and cached in
  ``POOL/image_models/<name>/`` (``image.npy``, float16, L2-normalised, row i = pool row i, and
  ``identity.json``: the spec, the weights' sha256, the preprocessing and the pool's fingerprint; a cache
  with another identity is recomputed).

Both keep the base class's exclusions; near-duplicate images are still judged with the pool's CLIP vectors.
Importing this module registers the ``image`` prefix in :data:`icl.retrievers.LEARNED`; ``bm25`` is a
built-in that imports it on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icl.formats import Example
from icl.retrievers import LEARNED, Retriever

logger = logging.getLogger(__name__)

CACHE_DIR = "image_models"
LIBRARIES = ("timm", "open_clip")
_WORD = re.compile(r"\w+")
_SCHEMES = ("hf-hub", "hf_hub", "local-dir")  # model names that carry a colon of their own


def tokenize(text: str) -> list[str]:
    """Lowercase word tokens (letters, digits, underscore): no stemmer, so no download."""
    return _WORD.findall(text.lower())


@dataclass
class BM25Retriever(Retriever):
    """BM25 (bm25s, Lucene variant) of the query's question over the pool's questions. Ties, zero scores
    included, rank in pool order, so k demos come back even when no word is shared."""

    bm25: Any = field(default=None, init=False, repr=False, compare=False)

    name = "bm25"

    def _index(self) -> Any:
        if self.bm25 is None:  # built on first use: opening the retriever costs nothing
            import bm25s

            corpus = [tokenize(e.question) for e in self.pool.examples]
            if any(corpus):
                self.bm25 = bm25s.BM25()
                self.bm25.index(corpus, show_progress=False)
            else:  # bm25s cannot index a corpus without a single token; every score is 0
                self.bm25 = False
        return self.bm25

    def _scores_and_ids(self, queries, vectors, depth):
        bm25 = self._index()
        out = []
        for query in queries:
            tokens = tokenize(query.question)
            scores = (np.asarray(bm25.get_scores(tokens), np.float32) if bm25 and tokens
                      else np.zeros(len(self.pool), np.float32))  # bm25s fails on an empty query
            order = np.argsort(-scores, kind="stable")[:depth]
            out.append((scores[order], order))
        return out


@dataclass(frozen=True)
class ImageModelSpec:
    """A parsed ``image:`` spec: ``library:name[:weights]`` (see the module docstring)."""

    library: str
    name: str
    weights: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageModelSpec:
        library, _, rest = text.partition(":")
        parts = rest.split(":")
        if len(parts) > 1 and parts[0] in _SCHEMES:
            parts = [f"{parts[0]}:{parts[1]}", *parts[2:]]
        name, weights = parts[0], ":".join(parts[1:]) or None
        if library == "open_clip" and weights == "random":
            weights = None  # open_clip's random init is its no-weights form
        if library not in LIBRARIES or not name:
            raise ValueError(f"image model spec {text!r}: expected timm:NAME[:random|:FILE] or "
                             f"open_clip:ARCH[:PRETRAINED] (e.g. timm:vit_small_patch14_dinov2.lvd142m)")
        if weights and weights != "random" and library == "timm" and not os.path.isfile(weights):
            raise ValueError(f"image model spec {text!r}: weights file {weights!r} does not exist "
                             "(timm takes :random or a local checkpoint file)")
        if weights and os.path.isfile(weights):
            weights = os.path.abspath(weights)  # the cache's identity must not depend on the working folder
        return cls(library, name, weights)

    def __str__(self) -> str:
        return ":".join([self.library, self.name] + ([self.weights] if self.weights else []))

    @property
    def cache_name(self) -> str:
        """A folder name: readable, and unique per spec through a short hash."""
        text = str(self)
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', text)[:80]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


@dataclass
class ImageEncoder:
    """An image model in eval mode: ``preprocess`` (PIL -> tensor) and ``forward`` (batch -> pooled features)."""

    spec: ImageModelSpec
    preprocess: Callable
    forward: Callable
    device: str
    weights_sha256: str

    def encode(self, pixels: list) -> np.ndarray:
        """(B, d) float32, L2-normalised."""
        import torch

        with torch.inference_mode():
            features = self.forward(torch.stack(pixels).to(self.device)).float()
            return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


def load_image_model(spec: ImageModelSpec, device: str = "cpu") -> ImageEncoder:
    """Build the model of ``spec``; random inits are seeded (0) so that their weights hash is stable."""
    import torch

    from datastore.clip import ClipSpec, load_clip, weights_sha256

    if spec.library == "open_clip":
        clip = load_clip(ClipSpec(model=spec.name, pretrained=spec.weights, device=device))
        return ImageEncoder(spec, clip.preprocess, clip.model.encode_image, device, clip.identity["weights_sha256"])
    import timm
    from timm.data import create_transform, resolve_data_config

    kwargs: dict[str, Any] = {"pretrained": spec.weights != "random", "num_classes": 0}
    if spec.weights not in (None, "random"):
        kwargs["pretrained_cfg_overlay"] = {"file": spec.weights}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            model = timm.create_model(spec.name, **kwargs)
        except RuntimeError as error:  # timm's "Unknown model (...)"
            raise ValueError(f"image model {spec}: {error}") from error
    model.eval().requires_grad_(False)
    sha = weights_sha256(model)
    preprocess = create_transform(**resolve_data_config({}, model=model))
    return ImageEncoder(spec, preprocess, model.to(device), device, sha)


def encode_image_files(encoder: ImageEncoder, paths: Sequence[str], batch_size: int = 64,
                       progress: bool = False) -> np.ndarray:
    """Embeddings of the images at ``paths`` (each distinct path once) -> (n, d) float32 in ``paths`` order.

    Raises:
        ValueError: an image cannot be read (named).
    """
    from PIL import Image
    from tqdm import tqdm

    unique = list(dict.fromkeys(paths))
    chunks = []
    for start in tqdm(range(0, len(unique), batch_size), desc=f"images ({encoder.spec})", unit="batch",
                      disable=not progress):
        pixels = []
        for path in unique[start:start + batch_size]:
            try:
                with Image.open(path) as image:
                    pixels.append(encoder.preprocess(image.convert("RGB")))
            except (OSError, ValueError) as error:
                raise ValueError(f"cannot read image {path}: {error}") from error
        chunks.append(encoder.encode(pixels))
    position = {p: i for i, p in enumerate(unique)}
    table = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return table[[position[p] for p in paths]]


@dataclass
class ImageModelRetriever(Retriever):
    """Nearest demo images under the image model of ``spec`` (exact inner product over the cached pool).

    Attributes:
        spec: ``timm:...`` or ``open_clip:...`` (the module docstring lists the forms).
        device: torch device ("auto": this rank's GPU if any).
        batch_size: images per forward pass.
        progress: show a progress bar while the pool is embedded.
    """

    spec: str = ""
    device: str = "auto"
    batch_size: int = 64
    progress: bool = True
    model_spec: ImageModelSpec | None = field(default=None, init=False, repr=False, compare=False)
    encoder: ImageEncoder | None = field(default=None, init=False, repr=False, compare=False)
    vectors: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    name = "image"

    def __post_init__(self) -> None:
        from common.distributed import resolve_device

        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        self.model_spec = ImageModelSpec.parse(self.spec)
        self.encoder = load_image_model(self.model_spec, resolve_device(self.device))

    @property
    def cache_dir(self) -> Path:
        return Path(self.pool.root) / CACHE_DIR / self.model_spec.cache_name

    def identity(self) -> dict[str, Any]:
        """What the cached embeddings depend on."""
        preprocess = re.sub(r" at 0x[0-9a-f]+", "", repr(self.encoder.preprocess))  # no addresses of lambdas
        return {"spec": str(self.model_spec), "weights_sha256": self.encoder.weights_sha256,
                "preprocess": preprocess, "pool_fingerprint": self.pool.fingerprint}

    def pool_vectors(self) -> np.ndarray:
        """(n, d) float32 embeddings of the pool's images: from the cache, or computed and cached."""
        if self.vectors is None:
            identity, meta, data = self.identity(), self.cache_dir / "identity.json", self.cache_dir / "image.npy"
            if meta.is_file() and data.is_file() and json.loads(meta.read_text()) == identity:
                self.vectors = np.load(data).astype(np.float32)
            else:
                logger.info("pool %s: embedding %d images with %s", self.pool.root, len(self.pool), self.model_spec)
                vectors = encode_image_files(self.encoder, [e.image for e in self.pool.examples], self.batch_size,
                                             self.progress).astype(np.float16)
                self._write_cache(vectors, identity)
                self.vectors = vectors.astype(np.float32)
        return self.vectors

    def _write_cache(self, vectors: np.ndarray, identity: dict[str, Any]) -> None:
        from datastore.layout import tmp_sibling, write_json_atomic

        meta, data = self.cache_dir / "identity.json", self.cache_dir / "image.npy"
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            meta.unlink(missing_ok=True)  # no moment where an old identity vouches for new rows
            tmp = tmp_sibling(data)
            with open(tmp, "wb") as handle:  # np.save would append ".npy" to a temporary name
                np.save(handle, vectors)
            os.replace(tmp, data)
            write_json_atomic(meta, identity)
        except OSError as error:  # a read-only pool still serves; it embeds again next time
            logger.warning("pool %s: cannot cache %s embeddings (%s)", self.pool.root, self.model_spec, error)

    def query_image_vectors(self, queries: Sequence[Example]) -> np.ndarray:
        """Cached rows for the pool's own examples, the model for other queries."""
        table = self.pool_vectors()
        rows = [self.pool.position.get(q.id) for q in queries]
        new = [i for i, r in enumerate(rows) if r is None or self.pool.examples[r] != queries[i]]
        out = table[[r if r is not None else 0 for r in rows]]
        if new:
            out[new] = encode_image_files(self.encoder, [queries[i].image for i in new], self.batch_size)
        return out

    def _scores_and_ids(self, queries, vectors, depth):
        from datastore.index import exact_search

        scores, ids = exact_search(self.pool_vectors(), self.query_image_vectors(queries), depth)
        return list(zip(scores, ids))


LEARNED["image"] = lambda pool, path, **kw: ImageModelRetriever(pool, spec=path, **kw)

__all__ = ["BM25Retriever", "ImageModelRetriever", "ImageModelSpec", "encode_image_files", "load_image_model",
           "tokenize"]
