"""Thumbnails for the report: each distinct image once, as a base64 JPEG data URI."""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

logger = logging.getLogger(__name__)


class Thumbnails:
    """Every distinct image becomes one base64 JPEG thumbnail, referred to by its index."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.index: dict[tuple[str, str], int] = {}
        self.missing: list[str] = []

    def ref(self, source: str, name: str) -> int:
        """The index of image ``name`` from ``source`` ("file", or a webdataset shard holding key ``name``)."""
        return self.index.setdefault((source, name), len(self.index))

    def make(self, image_exts: list[str], progress: bool = True) -> list[str | None]:
        """The data URIs in index order (None: unreadable or not found; named in :attr:`missing`)."""
        from tqdm import tqdm

        uris: list[str | None] = [None] * len(self.index)
        shards: dict[str, dict[str, int]] = {}
        with tqdm(total=len(self.index), desc="thumbnails", unit="img", disable=not progress) as bar:
            for (source, name), i in self.index.items():
                if source == "file":
                    uris[i] = self._thumbnail(name, name)
                    bar.update()
                else:
                    shards.setdefault(source, {})[name] = i
            for shard, wanted in shards.items():
                for key, data in _shard_images(shard, set(wanted), image_exts):
                    uris[wanted[key]] = self._thumbnail(io.BytesIO(data), f"{shard}:{key}")
                bar.update(len(wanted))
        self.missing = [f"{s}:{n}" if s != "file" else n for (s, n), i in self.index.items() if uris[i] is None]
        return uris

    def _thumbnail(self, source: Any, name: str) -> str | None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(source) as image:
                image.draft("RGB", (self.size, self.size))  # JPEG: decode at a reduced scale, much faster
                image = image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            logger.debug("image %s: %s", name, exc)
            return None
        image.thumbnail((self.size, self.size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _shard_images(shard: str, keys: set[str], image_exts: list[str]):
    """(key, image bytes) of ``keys`` in one webdataset shard; stops once all are found."""
    from datastore.reader import ShardError, iter_raw_samples

    left = set(keys)
    try:
        for sample in iter_raw_samples(shard):
            if sample.get("__key__") in left:
                data = next((sample[e] for e in image_exts if sample.get(e) is not None), None)
                if data is not None:
                    yield sample["__key__"], data
                left.discard(sample["__key__"])
                if not left:
                    return
    except ShardError as exc:
        logger.warning("neighbour images: %s", exc)
