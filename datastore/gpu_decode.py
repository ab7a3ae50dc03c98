"""Decode: JPEG bytes → CLIP input tensors on the encoder's device (``tuna-datastore build --decode-device``).

With ``--decode-device`` the DataLoader workers no longer decode images: they read the shard, decode
and tag the captions, and ship each image's raw JPEG bytes (:class:`JpegBatches`). The main process
decodes a whole batch at once with ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on CUDA) and
resizes, crops and normalises it there as open_clip's preprocessing does (:class:`DeviceDecoder`).

Falls back per image, counted in the batch's ``fallback`` counter (logged by the build, returned by
``encode_parts``): bytes that are not a whole JPEG (PNG, WebP, a JPEG cut short ...) are decoded and
preprocessed in the worker with PIL, as without the flag; a JPEG that the device decoder rejects (CMYK,
corrupt ...) is retried with PIL in the main process, and dropped as ``corrupt_image`` when PIL fails too.

The resize runs on tensors (torchvision's antialiased bicubic), not on PIL images, so embeddings match
the PIL path closely but not bit for bit (tests/datastore/test_gpu_decode.py bounds the difference).
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from datastore.reader import (
    Batch,
    OversizedImage,
    ShardBatches,
    ShardStatus,
    _pick,
    decode_caption,
    decode_image,
    iter_raw_samples,
    open_image,
    shard_stat,
)

logger = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(data: bytes) -> bool:
    """Whether ``data`` looks like a whole JPEG file: SOI marker first, EOI marker last (zero padding allowed).

    A file cut short lacks the EOI marker; it goes to PIL, which rejects it as the build without
    ``--decode-device`` does (decoders on the device may fill the missing rows with grey instead).
    """
    return data[:3] == JPEG_MAGIC and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"


@dataclass
class JpegBatch(Batch):
    """A :class:`~datastore.reader.Batch` whose images are still encoded.

    ``images[i]`` is sample ``i``'s raw JPEG bytes, or its preprocessed (3, H, W) tensor when the
    worker already decoded it (not a JPEG); ``pixels`` stays None until :meth:`DeviceDecoder.decode`.
    """

    images: list[Any] = field(default_factory=list)
    fallback: Counter = field(default_factory=Counter)


class JpegBatches(ShardBatches):
    """ShardBatches whose workers ship raw JPEG bytes (captions decoded and tagged as usual)."""

    def _part_batches(self, part: int, shard: str) -> Iterator[Batch]:
        batch = JpegBatch(part, shard)
        read_start = time.perf_counter()
        stat, status = shard_stat(shard), ShardStatus(shard)
        for sample in iter_raw_samples(shard, status):
            batch.n_read += 1
            caption, reason = decode_caption(sample, self.config.caption_key)
            image = None
            if reason is None:
                image, reason = self._image(sample, batch)
            if reason:
                batch.skipped[reason] += 1
                logger.debug("skip %s in %s: %s", sample.get("__key__"), shard, reason)
                continue
            batch.keys.append(sample["__key__"])
            batch.captions.append(caption)
            batch.images.append(image)
            if len(batch.keys) == self.config.batch_size:
                yield self._finish_raw(batch, read_start)
                batch, read_start = JpegBatch(part, shard), time.perf_counter()
        batch.last, batch.shard_stat, batch.truncated = True, stat, status.truncated
        if status.truncated:
            batch.skipped["truncated_shard"] += 1
        yield self._finish_raw(batch, read_start)

    def _image(self, sample: dict[str, Any], batch: JpegBatch) -> tuple[Any, str | None]:
        """(raw JPEG bytes or a preprocessed tensor, None) or (None, skip reason)."""
        key, raw = _pick(sample, self.config.image_key)
        if key is None:
            return None, "missing_image"
        if is_jpeg(raw):
            try:  # the header only: the size cap applies as on the PIL path, and unparsable headers are corrupt
                open_image(io.BytesIO(raw), self.config.max_image_pixels).close()
            except OversizedImage:
                return None, "oversized_image"
            except Exception:  # PIL raises many types for bad data
                return None, "corrupt_image"
            return raw, None
        image, reason = decode_image(sample, self.config.image_key, self.config.max_image_pixels)
        if reason:
            return None, reason
        batch.fallback["not_jpeg"] += 1
        return self.preprocess(image), None

    def _finish_raw(self, batch: JpegBatch, read_start: float) -> JpegBatch:
        batch.seconds["read"] = time.perf_counter() - read_start
        tag_start = time.perf_counter()
        batch.tags = self.tagger(batch.captions)
        batch.seconds["tag"] = time.perf_counter() - tag_start
        return batch


@dataclass(frozen=True)
class PreprocessSpec:
    """open_clip's image preprocessing, read off its torchvision Compose.

    Attributes:
        resize: the shorter side after resizing.
        crop: (height, width) of the centre crop.
        mean, std: per-channel normalisation of [0, 1] pixels.
        interpolation: torchvision interpolation mode name ("bicubic", "bilinear").
    """

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @classmethod
    def from_transform(cls, preprocess: Callable) -> "PreprocessSpec":
        """Read Resize / CenterCrop / Normalize off ``preprocess`` (open_clip's default "shortest" resize).

        Raises:
            ValueError: the pipeline holds a step this module does not reproduce, or lacks one of the three.
        """
        from torchvision import transforms as T

        steps = getattr(preprocess, "transforms", None)
        if steps is None:
            raise ValueError(f"--decode-device needs a torchvision Compose preprocess, got {type(preprocess).__name__}")
        found: dict[str, Any] = {}
        # steps with nothing to reproduce: RGB conversion and [0, 1] scaling happen in _prepare
        passive = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb")
        for step in steps:
            shortest = isinstance(step, T.Resize) and (isinstance(step.size, int) or len(step.size) == 1)
            if shortest:
                size = step.size if isinstance(step.size, int) else step.size[0]
                found["resize"] = (int(size), step.interpolation.value)
            elif isinstance(step, T.CenterCrop):
                found["crop"] = tuple(int(s) for s in step.size)
            elif isinstance(step, T.Normalize):
                found["norm"] = (tuple(float(m) for m in step.mean), tuple(float(s) for s in step.std))
            elif getattr(step, "__name__", type(step).__name__) not in passive:
                raise ValueError(f"--decode-device cannot reproduce preprocessing step {step!r}; build without it")
        missing = [k for k in ("resize", "crop", "norm") if k not in found]
        if missing:
            raise ValueError(f"--decode-device: the CLIP preprocess has no {', '.join(missing)} step ({preprocess!r})")
        (resize, interpolation), crop, (mean, std) = found["resize"], found["crop"], found["norm"]
        crop = crop * 2 if len(crop) == 1 else crop
        return cls(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation)


class DeviceDecoder:
    """Decodes a :class:`JpegBatch`'s JPEG bytes on ``device`` and preprocesses them there.

    Args:
        device: where to decode and where the pixels end up ("cuda", "cuda:1", "cpu").
        preprocess: the CLIP's PIL preprocessing (its sizes and normalisation are read off it; it also
            preprocesses the images that fall back to PIL).
    """

    def __init__(self, device: str, preprocess: Callable) -> None:
        self.device = torch.device(device)
        self.preprocess = preprocess
        self.spec = PreprocessSpec.from_transform(preprocess)
        self.mean = torch.tensor(self.spec.mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(self.spec.std, device=self.device).view(3, 1, 1)

    def decode(self, batch: JpegBatch) -> tuple[torch.Tensor | None, list[int]]:
        """(B', 3, H, W) float32 pixels on the device and the indices (into the batch) of the samples kept.

        Samples whose JPEG neither the device nor PIL can decode are dropped: the caller removes them from
        the batch (:func:`drop_samples`) and counts them as ``corrupt_image``.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        jpeg_at = [i for i, image in enumerate(batch.images) if isinstance(image, (bytes, bytearray))]
        data = [torch.frombuffer(bytearray(batch.images[i]), dtype=torch.uint8) for i in jpeg_at]
        decoded: dict[int, torch.Tensor] = {}
        if data:
            try:  # one batched call: nvJPEG decodes the whole batch together
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                decoded = {i: self._prepare(image) for i, image in zip(jpeg_at, images)}
            except RuntimeError:  # one bad image fails the batched call: retry one by one
                for i, raw in zip(jpeg_at, data):
                    try:
                        decoded[i] = self._prepare(decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        pixels = self._pil(batch.images[i])
                        batch.fallback["device_decode_failed" if pixels is not None else "undecodable"] += 1
                        if pixels is not None:
                            decoded[i] = pixels
        kept, rows, jpegs = [], [], set(jpeg_at)
        for i, image in enumerate(batch.images):
            row = decoded.get(i) if i in jpegs else image.to(self.device)
            if row is not None:
                kept.append(i)
                rows.append(row)
        return (torch.stack(rows) if rows else None), kept

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 (3, h, w) → normalised float32 (3, H, W): resize shorter side, centre crop, normalise."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        pixels = image.float()
        pixels = F.resize(pixels, [self.spec.resize], interpolation=InterpolationMode(self.spec.interpolation),
                          antialias=True)
        pixels = F.center_crop(pixels, list(self.spec.crop))
        pixels = pixels.round_().clamp_(0, 255).div_(255)  # PIL resizes 8-bit images: round as it does
        return (pixels - self.mean) / self.std

    def _pil(self, raw: bytes) -> torch.Tensor | None:
        from PIL import Image

        try:
            image = Image.open(io.BytesIO(raw))
            image.load()
            return self.preprocess(image.convert("RGB")).to(self.device)
        except Exception:  # PIL raises many types for bad data
            return None


def drop_samples(batch: Batch, kept: list[int]) -> None:
    """Keep only samples ``kept`` (indices) of ``batch``; the others count as ``corrupt_image`` skips."""
    dropped = len(batch.keys) - len(kept)
    if not dropped:
        return
    batch.keys = [batch.keys[i] for i in kept]
    batch.captions = [batch.captions[i] for i in kept]
    batch.tags = [batch.tags[i] for i in kept]
    batch.skipped["corrupt_image"] += dropped
