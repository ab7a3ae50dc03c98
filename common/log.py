"""tuna's logging set-up and per-stage wall-clock timers."""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from typing import Iterator

from common.distributed import dist_env

TUNA_LOGGERS = ("common", "datastore", "tuna", "icl", "train", "eval", "pipeline")


def setup_logging(level: int = logging.INFO) -> None:
    """Log tuna's messages at ``level`` (third-party libraries at WARNING), with the rank when distributed."""
    rank, world, _ = dist_env()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")
    for name in TUNA_LOGGERS:
        logging.getLogger(name).setLevel(level)


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


def error_line(exc: BaseException) -> str:
    """The one-line reason a CLI prints for ``exc``; the full text goes to the log at DEBUG (``-v``).

    An exception raised in a DataLoader worker reaches the main process with the worker's whole traceback
    in its message ("Caught X in DataLoader worker process 0. Original Traceback ..."); the reason is the
    traceback's last entry, whose ``module.Type:`` prefix is dropped. Other messages are returned as they are.
    """
    text = str(exc)
    logging.getLogger("common").debug("%s: %s", type(exc).__name__, text, exc_info=exc)
    if "Original Traceback" in text:
        lines = text.rstrip().splitlines()
        # the final exception's header is the last unindented line; a multi-line message continues after it
        start = max(i for i, line in enumerate(lines) if line and not line[0].isspace())
        text = " ".join(line.strip() for line in lines[start:])
        text = re.sub(r"^[\w.]+: ", "", text, count=1)
    return text or type(exc).__name__
