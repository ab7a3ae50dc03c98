"""Reader: webdataset shards → decoded, preprocessed and tagged batches (one input shard = one part).

Runs inside DataLoader workers so decoding and tagging overlap with encoding in the main process.
Bad samples are skipped and counted by reason; an unreadable shard raises ShardError.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger(__name__)

SKIP_REASONS = ("missing_image", "missing_caption", "corrupt_image", "empty_caption", "undecodable_text")


class ShardError(RuntimeError):
    """An input shard could not be opened or read."""


@dataclass
class ReaderConfig:
    """How samples are read from shards.

    Attributes:
        image_key: extension(s) of the image member, alternatives separated by ";" (first present wins).
        caption_key: extension(s) of the caption member, same convention; "json:FIELD" reads a JSON field.
        batch_size: samples per encoder batch (a batch never spans two shards).
        num_workers: DataLoader worker processes decoding and tagging (0 = in the main process).
    """

    image_key: str = "jpg;jpeg;png;webp"
    caption_key: str = "txt"
    batch_size: int = 256
    num_workers: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}: must be >= 0")
        if not self.image_key or not self.caption_key:
            raise ValueError("image_key and caption_key must be non-empty")


def expand_shards(patterns: list[str] | str) -> list[str]:
    """Expand brace patterns ("shard-{000000..000099}.tar") and local globs into shard URLs.

    Local paths must exist (ShardError names the first missing one); fsspec URLs ("s3://", "gs://",
    "https://") are passed through and checked when opened.
    """
    import braceexpand

    if isinstance(patterns, str):
        patterns = [patterns]
    shards: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if "://" in url:
                shards.append(url)
                continue
            matches = sorted(glob.glob(url)) if glob.has_magic(url) else [url]
            if not matches or not all(os.path.isfile(m) for m in matches):
                raise ShardError(f"input shard not found: {url}")
            shards.extend(matches)
    if not shards:
        raise ShardError(f"no input shards match {patterns}")
    return shards


def iter_raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Yield webdataset samples (``__key__`` plus raw bytes per extension) of one shard via fsspec."""
    import fsspec
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        with fsspec.open(url, "rb") as stream:
            files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
            yield from group_by_keys(files)
    except ShardError:
        raise
    except Exception as exc:  # tarfile.ReadError, OSError, fsspec errors
        raise ShardError(f"cannot read shard {url}: {type(exc).__name__}: {exc}") from exc


def _pick(sample: dict[str, Any], key_spec: str) -> tuple[str | None, Any]:
    for key in key_spec.split(";"):
        name = key.split(":", 1)[0]
        if name in sample:
            return key, sample[name]
    return None, None


def decode_caption(sample: dict[str, Any], caption_key: str) -> tuple[str | None, str | None]:
    """Return (caption, None) or (None, skip_reason)."""
    key, raw = _pick(sample, caption_key)
    if key is None:
        return None, "missing_caption"
    try:
        text = raw.decode("utf-8")
        if ":" in key:  # "json:caption" reads a field of a JSON member
            text = json.loads(text)[key.split(":", 1)[1]]
            if not isinstance(text, str):
                return None, "undecodable_text"
    except (UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None, "undecodable_text"
    text = " ".join(text.split())
    return (text, None) if text else (None, "empty_caption")


def decode_image(sample: dict[str, Any], image_key: str):
    """Return (RGB PIL image, None) or (None, skip_reason); truncated files count as corrupt."""
    from PIL import Image

    key, raw = _pick(sample, image_key)
    if key is None:
        return None, "missing_image"
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()  # forces a full decode: truncated JPEGs raise here
        return image.convert("RGB"), None
    except Exception:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError ...)
        return None, "corrupt_image"


@dataclass
class Batch:
    """A batch of decoded samples from one part (shard); ``last`` marks the part's final batch."""

    part: int
    shard: str
    keys: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)
    pixels: Any = None  # torch.Tensor (B, 3, H, W) or None when every sample was skipped
    n_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)
    last: bool = False


class ShardBatches(torch.utils.data.IterableDataset):
    """Iterable over Batches of the given (part, shard) list; DataLoader workers split parts."""

    def __init__(self, parts: list[tuple[int, str]], config: ReaderConfig,
                 preprocess: Callable, tagger: Callable[[list[str]], list[list[str]]]) -> None:
        super().__init__()
        self.parts, self.config, self.preprocess, self.tagger = parts, config, preprocess, tagger

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for part, shard in self.parts[worker::workers]:
            yield from self._part_batches(part, shard)

    def _part_batches(self, part: int, shard: str) -> Iterator[Batch]:
        batch, pixels = Batch(part, shard), []
        read_start = time.perf_counter()
        for sample in iter_raw_samples(shard):
            batch.n_read += 1
            caption, reason = decode_caption(sample, self.config.caption_key)
            image, image_reason = decode_image(sample, self.config.image_key) if reason is None else (None, None)
            if reason or image_reason:
                batch.skipped[reason or image_reason] += 1
                logger.debug("skip %s in %s: %s", sample.get("__key__"), shard, reason or image_reason)
                continue
            batch.keys.append(sample["__key__"])
            batch.captions.append(caption)
            pixels.append(self.preprocess(image))
            if len(batch.keys) == self.config.batch_size:
                yield self._finish(batch, pixels, read_start)
                batch, pixels = Batch(part, shard), []
                read_start = time.perf_counter()
        batch.last = True
        yield self._finish(batch, pixels, read_start)

    def _finish(self, batch: Batch, pixels: list, read_start: float) -> Batch:
        batch.pixels = torch.stack(pixels) if pixels else None
        batch.seconds["read"] = time.perf_counter() - read_start
        tag_start = time.perf_counter()
        batch.tags = self.tagger(batch.captions)
        batch.seconds["tag"] = time.perf_counter() - tag_start
        return batch
