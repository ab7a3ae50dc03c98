"""Where a sample's tags come from: a precomputed retrieval cache, a live datastore, or an ablation."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from datastore.cache import RetrievalCache
from datastore.store import (
    DEDUP_THRESHOLD,
    Datastore,
    RetrievedTags,
    filter_by_support,
    truncate_tags,
)
from tuna.configuration_tuna import ablation_policy

LIVE_CACHE_SIZE = 4096  # live retrievals remembered per image id


class MissingTagsError(KeyError):
    """An image has no cache entry and no datastore is available for live retrieval."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def read_vocabulary(path: str | Path) -> list[str]:
    """Distinct non-empty lines of a text file (a tag vocabulary), in file order.

    Raises:
        ValueError: the file holds no tag (an unreadable file raises OSError).
    """
    tags = list(dict.fromkeys(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()))
    tags = [t for t in tags if t]
    if not tags:
        raise ValueError(f"tag vocabulary {path} holds no tag (one per line expected)")
    return tags


def model_clip_identity(model: Any) -> dict[str, Any] | None:
    """The CLIP identity a model's tags must come from: its config's ``clip_identity`` (what it was trained
    with), else its loaded tower's; None when neither is known."""
    identity = getattr(getattr(model, "config", None), "clip_identity", None)
    if not identity:
        identity = getattr(getattr(getattr(model, "vision", None), "clip", None), "identity", None)
    return identity or None


class TagSource:
    """Tags for an image id: cache first, then live retrieval, truncated to ``max_tags``.

    Live results are remembered per image id; :meth:`prefetch` retrieves a whole batch's missing
    images in one datastore call (the per-image path gives the same tags).

    Args:
        cache: a retrieval cache (``tuna-datastore cache`` output) keyed by image id.
        datastore: for live retrieval of cache misses (needs the image itself) and for the
            random-tags vocabulary.
        k_images, max_tags: retrieval settings for live queries and the cut-off for all tags.
        ablation: a name in :data:`tuna.configuration_tuna.ABLATIONS`; its policy's ``tags`` decides:
            "retrieved", "none" (always empty; no_tags) or "random" (random_tags: as many tags as retrieved,
            drawn from ``vocabulary`` or the datastore's, deterministically per image id and seed).
        vocabulary: tag vocabulary for random tags (defaults to the datastore's).
        seed: seed of the random-tags draw.
        min_support: keep only tags whose entity most neighbours name
            (:func:`datastore.store.filter_by_support`; 0 keeps all), applied before ``max_tags``;
            the random-tags ablation then draws as many tags as survive.
        exclude_self: live retrieval drops the image's own datastore entry (key = the image id, its path
            without extension or its file stem; or cosine >= ``dedup_threshold``) from its neighbours, as
            ``tuna-datastore cache`` does by default: for training images that the datastore may contain.
        dedup_threshold: cosine at or above which a neighbour is a copy of the image (with ``exclude_self``).

    Raises:
        ValueError: unknown ablation, random tags without any vocabulary, ``min_support`` outside [0, 1],
            or ``min_support`` with a cache of max-aggregated scores.
    """

    def __init__(self, cache: RetrievalCache | None = None, datastore: Datastore | None = None,
                 k_images: int = 5, max_tags: int = 10, ablation: str = "none",
                 vocabulary: Sequence[str] | None = None, seed: int = 0, min_support: float = 0.0,
                 exclude_self: bool = False, dedup_threshold: float = DEDUP_THRESHOLD) -> None:
        self._tags = ablation_policy(ablation).tags
        if self._tags == "random" and vocabulary is None and datastore is None:
            raise ValueError(f"{ablation} needs a vocabulary or a datastore to draw tags from")
        if not 0.0 <= min_support <= 1.0:
            raise ValueError(f"min_support={min_support}: must be in [0, 1]")
        if min_support and cache is not None and cache.meta.get("aggregate", "sum") != "sum":
            raise ValueError(f"min_support needs a cache built with aggregate='sum'; {cache.path} has "
                             f"aggregate={cache.meta['aggregate']!r}")
        self.min_support = min_support
        self.exclude_self, self.dedup_threshold = exclude_self, dedup_threshold
        self.cache, self.datastore = cache, datastore
        self.k_images, self.max_tags, self.ablation, self.seed = k_images, max_tags, ablation, seed
        self._vocabulary = list(vocabulary) if vocabulary is not None else None
        self._live: OrderedDict[str, RetrievedTags] = OrderedDict()  # live results by image id (LRU)

    @classmethod
    def for_model(cls, model: Any, *, ablation: str | None = None, retrieval_cache: str | None = None,
                  datastore: str | None = None, k_images: int = 5, min_support: float = 0.0,
                  seed: int = 0, exclude_self: bool = False, dedup_threshold: float = DEDUP_THRESHOLD,
                  random_vocabulary: str | None = None) -> TagSource | None:
        """The tag source of ``model`` under its ablation: how every command turns its tag flags into one.

        Args:
            model: a :class:`tuna.TunaForCausalLM` (its config gives the ablation and ``max_tags``; its
                CLIP opens the datastore).
            ablation: overrides the model's ablation, in ``model.config`` too: the model and its tags
                then follow the same switch.
            retrieval_cache, datastore: paths of a retrieval cache parquet and of a datastore directory.
            k_images, min_support, seed, exclude_self, dedup_threshold: as in the constructor.
            random_vocabulary: a text file, one tag per line, that random tags are drawn from (default: the
                datastore's tags). A small world's datastore names only a few entities, so its random
                blocks hold the right one by chance; a real datastore's vocabulary makes that negligible.
        Returns:
            A source; with ``no_tags`` one that gives none (the paths are not opened). None when the
            ablation reads tags but neither path is given: the caller passes tags itself or says which
            of its flags are missing.
        Raises:
            ValueError: unknown ablation, or as the constructor.
            datastore.cache.CacheError: the retrieval cache was built with another CLIP than the model's, or
                from another datastore than ``datastore`` (a one-line message naming the cache file).
            datastore.store.DatastoreError: the datastore was built with another CLIP than the model's.
        """
        if ablation:
            ablation_policy(ablation)  # check before changing the model
            model.config.ablation = ablation
        ablation = model.config.ablation
        if not ablation_policy(ablation).use_tags:
            return cls(ablation=ablation)
        if not (retrieval_cache or datastore):
            return None
        store = Datastore.open(datastore, clip=model.vision.clip) if datastore else None
        cache = RetrievalCache(retrieval_cache) if retrieval_cache else None
        if cache is not None:
            cache.check_clip(model_clip_identity(model))
            if store is not None:
                cache.check_datastore(store)
        return cls(cache=cache, datastore=store,
                   k_images=k_images, max_tags=model.config.max_tags, ablation=ablation, seed=seed,
                   min_support=min_support, exclude_self=exclude_self, dedup_threshold=dedup_threshold,
                   vocabulary=read_vocabulary(random_vocabulary) if random_vocabulary else None)

    @property
    def vocabulary(self) -> list[str]:
        if self._vocabulary is None:
            self._vocabulary = self.datastore.vocabulary()
        return self._vocabulary

    def __call__(self, image_id: str, image: Any = None) -> RetrievedTags:
        """Tags of ``image_id`` (``image``: a PIL image or path, used only for live retrieval)."""
        if self._tags == "none":
            return RetrievedTags(tags=[], scores=[], neighbours=[], neighbour_scores=[])
        found = truncate_tags(self._lookup(image_id, image), self.max_tags)
        return self._randomise(image_id, found) if self._tags == "random" else found

    def prefetch(self, image_ids: Sequence[str], images: Sequence[Any]) -> int:
        """Retrieve live, in one datastore call, the tags of every image that neither the cache nor the
        remembered live results have (each id once), so later calls for them do not retrieve.

        Args:
            image_ids: ids as later passed to ``__call__``.
            images: the matching PIL images or paths (None entries are skipped).
        Returns:
            How many images were retrieved (0 without a datastore or with ``no_tags``).
        Raises:
            ValueError: if the two sequences differ in length.
        """
        if len(image_ids) != len(images):
            raise ValueError(f"prefetch: {len(image_ids)} image ids for {len(images)} images")
        if self._tags == "none" or self.datastore is None:
            return 0
        missing: dict[str, Any] = {}
        for image_id, image in zip(image_ids, images):
            if image is not None and image_id not in missing and not self._known(image_id):
                missing[image_id] = image
        if missing:
            found = self._retrieve(list(missing), list(missing.values()))
            for image_id, tags in zip(missing, found):
                self._remember(image_id, tags)
        return len(missing)

    def _known(self, image_id: str) -> bool:
        if self.cache is not None and image_id in self.cache:
            return True
        if image_id in self._live:
            self._live.move_to_end(image_id)  # keep it until it is used
            return True
        return False

    def _remember(self, image_id: str, found: RetrievedTags) -> None:
        self._live[image_id] = found
        if len(self._live) > LIVE_CACHE_SIZE:
            self._live.popitem(last=False)

    def _lookup(self, image_id: str, image: Any) -> RetrievedTags:
        if self.cache is not None and image_id in self.cache:
            return filter_by_support(self.cache[image_id], self.min_support)  # live results come filtered
        if image_id in self._live:  # e.g. several questions about one eval image, or prefetched
            self._live.move_to_end(image_id)
            return self._live[image_id]
        if self.datastore is not None and image is not None:
            found = self._retrieve([image_id], [image])[0]
            self._remember(image_id, found)
            return found
        where = f"retrieval cache {self.cache.path}" if self.cache is not None else "no retrieval cache"
        raise MissingTagsError(f"no tags for image {image_id!r}: not in {where}, and no datastore "
                               "(with the image) for live retrieval")

    def _retrieve(self, image_ids: list[str], images: list[Any]) -> list[RetrievedTags]:
        return self.datastore.retrieve_tags(
            images=images, k_images=self.k_images, max_tags=self.max_tags, min_support=self.min_support,
            exclude_keys=image_ids if self.exclude_self else None,
            dedup_threshold=self.dedup_threshold if self.exclude_self else None)

    def _randomise(self, image_id: str, found: RetrievedTags) -> RetrievedTags:
        digest = hashlib.sha256(f"{self.seed}:{image_id}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        vocab = self.vocabulary
        picks = rng.choice(len(vocab), size=min(len(found.tags), len(vocab)), replace=False)
        return RetrievedTags([vocab[i] for i in picks], [0.0] * len(picks), [], [])
