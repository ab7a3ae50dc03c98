"""Feed: moves decoded batches to the encoder's device and keeps the encoder one batch ahead of the host.

On CUDA each batch's pixels (page-locked by the DataLoader's pinning thread) are copied on a side
stream, so the copy of batch i+1 overlaps the encoding of batch i; batch i+1's encoding is queued
before batch i's embeddings are read back, so the GPU has work while the host writes and waits for
the next batch. On CPU every step runs in place and in order (no copy, no stream): the embeddings are
the same bytes as a plain loop's (tests/datastore/test_device_feed.py).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from datastore.reader import Batch


@dataclass
class _Launched:
    """A batch whose encoding is queued: its embeddings arrive in ``host`` once ``done`` fires."""

    batch: Batch
    host: torch.Tensor | None
    done: Any  # torch.cuda.Event or None (CPU: finished already)
    seconds: float
    keep: Any = None  # host pixels the side-stream copy reads from (alive until the copy is done)


class DeviceFeed:
    """Runs ``encode`` over batches on ``device`` with the transfer and read-back overlapped (CUDA).

    Args:
        device: the encoder's device.
        decoder: a :class:`datastore.gpu_decode.DeviceDecoder` for batches that carry JPEG bytes, or None.
        overlap: copy on a side stream and keep one batch queued ahead (CUDA only; False: one batch at a
            time, the copy on the compute stream, for comparisons).

    After a run, ``seconds`` holds the host's time per step ("wait": blocked on the DataLoader, "decode":
    device decode, "copy", "encode": queueing plus waiting for the embeddings) and ``fallback`` the
    decoder's per-image fallbacks.
    """

    def __init__(self, device: str | torch.device, decoder=None, overlap: bool = True) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.decoder = decoder
        self.overlap = overlap and self.cuda
        self.copy_stream = torch.cuda.Stream(self.device) if self.overlap else None
        self.seconds: Counter = Counter()
        self.fallback: Counter = Counter()

    @property
    def pin_memory(self) -> bool:
        """Whether the DataLoader should page-lock batches (only worth it for a CUDA copy)."""
        return self.cuda

    def run(self, batches: Iterable[Batch], encode: Callable[[torch.Tensor], torch.Tensor]
            ) -> Iterator[tuple[Batch, np.ndarray | None, float]]:
        """Yield (batch, float32 embeddings or None, encode seconds) in the order of ``batches``."""
        pending: _Launched | None = None
        source = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(source, None)
            self.seconds["wait"] += time.perf_counter() - start
            if batch is None:
                break
            launched = self._launch(batch, encode)
            if pending is not None:
                yield self._collect(pending)
            pending = launched
            if not self.overlap:
                yield self._collect(pending)
                pending = None
        if pending is not None:
            yield self._collect(pending)

    def _launch(self, batch: Batch, encode: Callable) -> _Launched:
        pixels, keep = self._pixels(batch)
        if pixels is None:
            return _Launched(batch, None, None, 0.0)
        start = time.perf_counter()
        emb = encode(pixels)
        if not self.cuda:
            host = emb.cpu()
            return _Launched(batch, host, None, time.perf_counter() - start)
        host = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=True)
        host.copy_(emb, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Launched(batch, host, done, time.perf_counter() - start, keep)

    def _collect(self, launched: _Launched) -> tuple[Batch, np.ndarray | None, float]:
        start = time.perf_counter()
        if launched.done is not None:
            launched.done.synchronize()
        seconds = launched.seconds + time.perf_counter() - start
        self.seconds["encode"] += seconds
        emb = launched.host.numpy() if launched.host is not None else None
        return launched.batch, emb, seconds

    def _pixels(self, batch: Batch) -> tuple[torch.Tensor | None, Any]:
        """The batch's pixels on the device (copy issued, the compute stream ordered after it)."""
        if self.decoder is not None and getattr(batch, "images", None) is not None and batch.pixels is None:
            from datastore.gpu_decode import drop_samples

            start = time.perf_counter()
            pixels, kept = self.decoder.decode(batch)
            drop_samples(batch, kept)
            self.fallback.update(batch.fallback)
            batch.images = []  # the bytes are no longer needed
            self.seconds["decode"] += time.perf_counter() - start
            return pixels, None
        if batch.pixels is None or not self.cuda:
            return batch.pixels, None
        start = time.perf_counter()
        host = batch.pixels
        if self.copy_stream is None:
            pixels = host.to(self.device, non_blocking=host.is_pinned())
        else:
            with torch.cuda.stream(self.copy_stream):
                pixels = host.to(self.device, non_blocking=host.is_pinned())
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            pixels.record_stream(torch.cuda.current_stream(self.device))
        self.seconds["copy"] += time.perf_counter() - start
        return pixels, host
