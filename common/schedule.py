"""Learning-rate schedules of tuna's own training loops (the DeepSpeed / HF Trainer runs use theirs)."""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, steps: int, warmup: int, lr: float, min_ratio: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup over ``warmup`` steps, then cosine decay from
    ``lr`` to ``lr * min_ratio`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
