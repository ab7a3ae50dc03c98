"""Reader: webdataset shards → decoded, preprocessed and tagged batches (one input shard = one part).

Runs inside DataLoader workers so decoding and tagging overlap with encoding in the main process.
Bad samples are skipped and counted by reason; an unreadable shard raises ShardError. A shard that ends
early (no end-of-archive blocks: a partial copy) is read up to the cut and reported as truncated.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

logger = logging.getLogger(__name__)

SKIP_REASONS = ("missing_image", "missing_caption", "corrupt_image", "oversized_image", "empty_caption",
                "undecodable_text")
# Images above this many pixels are skipped before decoding: a 12000x12000 one-colour PNG is 440 KB on disk
# but ~430 MB as RGB (and more while converting), per worker. 64 MP is above any camera photo in web data.
MAX_IMAGE_PIXELS = 64_000_000
# Skip reasons counted once per shard, not per sample (read = written + the per-sample skips).
SHARD_SKIP_REASONS = ("truncated_shard",)
_TAR_END = 2 * tarfile.BLOCKSIZE  # a tar ends with two 512-byte zero blocks
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (skipped, as webdataset does)
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "lzma"))


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
        max_image_pixels: images with more pixels (width x height, read from the header) are skipped
            unread and counted as oversized_image.
    """

    image_key: str = "jpg;jpeg;png;webp"
    caption_key: str = "txt"
    batch_size: int = 256
    num_workers: int = 2
    max_image_pixels: int = MAX_IMAGE_PIXELS

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


@dataclass
class ShardStatus:
    """What reading one shard found: ``truncated`` says why it ended early (None: complete)."""

    url: str
    truncated: str | None = None


def shard_stat(url: str) -> dict[str, Any]:
    """A cheap identity of a shard (size and modification time or version) recorded in its part marker,
    so that a resumed build redoes a part whose shard changed."""
    if "://" not in url:
        st = os.stat(url)
        return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        info = fs.info(path)
    except Exception as exc:  # fsspec raises many types (FileNotFoundError, ClientError ...)
        raise ShardError(f"cannot stat shard {url}: {type(exc).__name__}: {exc}") from exc
    stat: dict[str, Any] = {"size": info.get("size")}
    for key in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            stat["version"] = f"{key}={info[key]}"
            break
    return stat


def check_shards(shards: list[str], threads: int = 16) -> dict[str, dict[str, Any]]:
    """Stat every shard before any is encoded (remote ones in parallel), so that an unreachable URL, a
    missing fsspec backend or a missing local file stops the build at once rather than hours in.

    Returns:
        shard -> :func:`shard_stat`.

    Raises:
        ShardError: naming the first shard (in input order) that cannot be reached.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        results = list(pool.map(_try_stat, shards))
    for shard, result in zip(shards, results):
        if isinstance(result, ShardError):
            raise result
    return dict(zip(shards, results))


def _try_stat(shard: str) -> dict[str, Any] | ShardError:
    try:
        return shard_stat(shard)
    except OSError as exc:
        return ShardError(f"cannot stat shard {shard}: {exc}")
    except ShardError as exc:
        return exc


def iter_raw_samples(url: str, status: ShardStatus | None = None) -> Iterator[dict[str, Any]]:
    """Yield webdataset samples (``__key__`` plus raw bytes per extension) of one shard via fsspec.

    A shard that ends early (cut inside a member, or without the two zero blocks that end a tar — a
    cut at a header boundary, which tarfile reads as a normal end) yields the samples before the cut;
    a member cut short is dropped. With ``status`` the truncation is recorded there for the caller to
    count; without it, ShardError is raised after the last complete sample.

    Raises:
        ShardError: the shard cannot be opened or is not a readable tar (or is truncated, see above).
    """
    import fsspec
    from webdataset.tariterators import group_by_keys

    state = status if status is not None else ShardStatus(url)
    try:
        with fsspec.open(url, "rb") as raw:
            yield from group_by_keys(_split_repeated_keys(_tar_members(_TarBytes(raw), url, state)))
    except ShardError:
        raise
    except Exception as exc:  # tarfile.ReadError, OSError, fsspec errors
        raise ShardError(f"cannot read shard {url}: {type(exc).__name__}: {exc}") from exc
    if state.truncated and status is None:
        raise ShardError(f"shard {url} is truncated: {state.truncated}")


def _split_repeated_keys(members: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Insert webdataset's end-of-sample marker ({}) before a member whose key and extension the current
    sample already has (the same key written twice in a row), so the repeat becomes a sample of its own
    (kept, and counted with the other repeated keys at merge) instead of group_by_keys' ValueError."""
    from webdataset.tariterators import base_plus_ext

    key, seen = None, set()
    for member in members:
        prefix, suffix = base_plus_ext(member["fname"])
        suffix = suffix.lower() if suffix else suffix
        if prefix != key:
            key, seen = prefix, set()
        elif suffix in seen:
            yield {}
            seen = set()
        seen.add(suffix)
        yield member


def _tar_members(stream: "_TarBytes", url: str, state: ShardStatus) -> Iterator[dict[str, Any]]:
    """Regular members of a tar stream as webdataset file dicts; records a truncation in ``state``."""
    seen_header = False
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
        for info in tar:
            seen_header = True
            if not info.isreg() or _META.match(info.name) or (
                    "/" not in info.name and info.name.startswith("__") and info.name.endswith("__")):
                continue
            data = tar.extractfile(info).read()
            if len(data) != info.size:
                state.truncated = (f"member {info.name} is cut after {len(data)} of {info.size} bytes "
                                   f"(the file ends at byte {stream.pos})")
                return
            yield {"fname": info.name, "data": data, "__url__": url}
            tar.members = []
        end = tar.offset
    except (tarfile.ReadError, EOFError) as exc:  # EOFError: a compressed stream cut short
        if not seen_header or (not isinstance(exc, EOFError) and not stream.at_eof()):
            raise
        state.truncated = f"the file ends inside a member at byte {stream.pos} ({exc})"
        return
    state.truncated = stream.check_end(end, url)


class _TarBytes:
    """The (decompressed) byte stream tarfile reads, counting bytes and keeping the last ones read so
    that the end of the archive can be checked: tarfile stops silently where a shard is cut at a header."""

    _KEEP = 8 * tarfile.RECORDSIZE  # tarfile reads at most one record ahead of the header it parses

    def __init__(self, raw) -> None:
        head = raw.read(6)
        codec = next((name for magic, name in _COMPRESSED if head.startswith(magic)), None)
        prefixed = _Prefixed(head, raw)
        if codec is None:
            self.raw = prefixed
        else:  # decompress here so that a cut compressed stream raises EOFError (tarfile stops silently)
            import importlib

            module = importlib.import_module(codec)
            self.raw = (module.GzipFile(fileobj=prefixed) if codec == "gzip"
                        else getattr(module, "BZ2File" if codec == "bz2" else "LZMAFile")(prefixed))
        self.pos = 0
        self.chunks: list[tuple[int, bytes]] = []  # (absolute start, bytes) of the last bytes read
        self.kept = 0
        self.eof = False

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if not data and size != 0:
            self.eof = True
        self._keep(data)
        return data

    def _keep(self, data: bytes) -> None:
        if data:
            self.chunks.append((self.pos, data))
            self.pos += len(data)
            self.kept += len(data)
            while len(self.chunks) > 1 and self.kept - len(self.chunks[0][1]) >= self._KEEP:
                self.kept -= len(self.chunks.pop(0)[1])

    def at_eof(self) -> bool:
        """Whether the stream has no byte left (reads one byte if needed)."""
        return self.eof or not self.read(1)

    def check_end(self, end: int, url: str) -> str | None:
        """After tarfile stopped at byte ``end``: None when two zero blocks follow, else why the shard is
        truncated. Raises ShardError when a non-header block follows (corrupt, not truncated)."""
        window = bytearray()
        start = self.chunks[0][0] if self.chunks else self.pos
        if end < start:  # never happens with tarfile's one-record read-ahead; be safe
            raise ShardError(f"cannot check the end of shard {url}: stopped at byte {end}, kept from {start}")
        for chunk_start, data in self.chunks:
            window += data[max(0, end - chunk_start):] if chunk_start + len(data) > end else b""
        self.chunks, self.kept = [], 0
        while not self.eof and len(window) < _TAR_END:
            data = self.raw.read(1 << 16)
            self.eof = not data
            self.pos += len(data)
            window += data
        while not self.eof:  # count the rest (normally the zero padding of the last record)
            data = self.raw.read(1 << 20)
            self.eof = not data
            self.pos += len(data)
        block = bytes(window[:_TAR_END])
        if len(block) == _TAR_END and not any(block):
            return None
        if any(block[: tarfile.BLOCKSIZE]) and len(block) >= tarfile.BLOCKSIZE:
            raise ShardError(f"cannot read shard {url}: no valid tar header at byte {end} (of {self.pos})")
        return f"the file ends at byte {self.pos} without the tar end-of-archive blocks"


class _Prefixed:
    """``head`` followed by the rest of ``raw`` (a peek that works on streams that cannot seek)."""

    def __init__(self, head: bytes, raw) -> None:
        self.head, self.raw = head, raw

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.raw.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.raw.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        if len(data) < size:
            data += self.raw.read(size - len(data))
        return data


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


class OversizedImage(ValueError):
    """An image has more pixels than the cap allows."""


def open_image(source, max_pixels: int = MAX_IMAGE_PIXELS):
    """``PIL.Image.open`` (lazy: only the header is read) that raises OversizedImage above ``max_pixels``."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # PIL warns above its own limit; the cap below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError as exc:  # PIL's own hard limit (2x its warning limit)
        raise OversizedImage(str(exc)) from None
    if image.width * image.height > max_pixels:
        image.close()
        raise OversizedImage(f"{image.width}x{image.height}, over the {max_pixels:,}-pixel cap")
    return image


def decode_image(sample: dict[str, Any], image_key: str, max_pixels: int = MAX_IMAGE_PIXELS):
    """Return (RGB PIL image, None) or (None, skip_reason); truncated files count as corrupt, images over
    ``max_pixels`` as oversized (checked from the header, before anything is decoded)."""
    key, raw = _pick(sample, image_key)
    if key is None:
        return None, "missing_image"
    try:
        image = open_image(io.BytesIO(raw), max_pixels)
        image.load()  # forces a full decode: truncated JPEGs raise here
        return image.convert("RGB"), None
    except OversizedImage:
        return None, "oversized_image"
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
    shard_stat: dict[str, Any] | None = None  # on the last batch: the shard's size/mtime when it was read
    truncated: str | None = None  # on the last batch: why the shard ended early (None: complete)

    def pin_memory(self) -> "Batch":
        """Page-lock the pixels (a DataLoader with ``pin_memory=True`` calls this in its pinning thread)."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


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
        stat, status = shard_stat(shard), ShardStatus(shard)
        for sample in iter_raw_samples(shard, status):
            batch.n_read += 1
            caption, reason = decode_caption(sample, self.config.caption_key)
            image, image_reason = (None, None) if reason else decode_image(
                sample, self.config.image_key, self.config.max_image_pixels)
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
        batch.last, batch.shard_stat, batch.truncated = True, stat, status.truncated
        if status.truncated:
            batch.skipped["truncated_shard"] += 1
        yield self._finish(batch, pixels, read_start)

    def _finish(self, batch: Batch, pixels: list, read_start: float) -> Batch:
        batch.pixels = torch.stack(pixels) if pixels else None
        batch.seconds["read"] = time.perf_counter() - read_start
        tag_start = time.perf_counter()
        batch.tags = self.tagger(batch.captions)
        batch.seconds["tag"] = time.perf_counter() - tag_start
        return batch
