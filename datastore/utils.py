"""Small shared helpers: stage timers, byte-size parsing, hashing, rank-0 logging, lr schedule, CLI configs."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import time
from contextlib import contextmanager
from typing import Any, Iterator

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value: str | int) -> int:
    """Parse a size such as ``"16G"``, ``"512M"``, ``"1.5T"`` or a plain integer into bytes.

    Raises:
        ValueError: the string is not a number with an optional K/M/G/T suffix.
    """
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(value).upper())
    if not match:
        raise ValueError(f"cannot parse size {value!r}: expected e.g. '512M', '16G' or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


class StageTimer:
    """Accumulates wall-clock seconds per named stage (``read``, ``encode``, ``write`` ...)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def merge(self, other: dict[str, float]) -> None:
        for stage, seconds in other.items():
            self.add(stage, seconds)

    def summary(self) -> str:
        return ", ".join(f"{k} {v:.2f}s" for k, v in self.seconds.items())


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun-style environment variables (defaults 0, 1, 0)."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


TUNA_LOGGERS = ("datastore", "tuna", "train", "eval")


def setup_logging(level: int = logging.INFO) -> None:
    """Log tuna's messages at ``level`` (third-party libraries at WARNING), with the rank when distributed."""
    rank, world, _ = dist_env()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")
    for name in TUNA_LOGGERS:
        logging.getLogger(name).setLevel(level)


def warmup_cosine_lr(step: int, steps: int, warmup: int, lr: float, min_ratio: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine decay from
    ``lr`` to ``lr * min_ratio`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def config_from_args(cls: type, args: Any, **overrides: Any) -> Any:
    """A dataclass config from parsed CLI arguments: every field whose name is an argument's ``dest``,
    then ``overrides`` (for options spelled differently, e.g. ``--no-swap`` -> ``swap``)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
