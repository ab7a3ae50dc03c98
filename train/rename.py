"""Name randomisation: per training sample, replace the object names on the LLM side by random names.

With probability ``p`` a sample's names (every word of ``names`` and its "-s" plural, in the questions,
answers and the tag words the LLM reads) become distinct names drawn from ``pool``; the tags' CLIP text
embeddings and the image stay as they are. A name the model memorised from the image is then wrong, and
only the name read from the tag block is right: the signal for copying names it cannot have memorised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NameRandomiser:
    """Draws each sample's renaming (deterministic in ``seed`` and the sample index).

    Args:
        names: the words to rename (e.g. the instruction data's category names).
        pool: the replacement names, at least as many (kept sorted, without repeats); it may hold ``names``
            themselves (a sample's names then may be permuted among each other, so a name in the block is
            no cue to answer from memory).
        p: share of samples renamed.
        seed: seed of the draws.

    Raises:
        ValueError: p outside [0, 1] or a pool smaller than ``names``.
    """

    names: tuple[str, ...]
    pool: tuple[str, ...]
    p: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"rename p={self.p}: must be in [0, 1]")
        object.__setattr__(self, "pool", tuple(sorted(set(self.pool))))  # once, not per draw
        if len(self.pool) < len(set(self.names)):
            raise ValueError(f"rename pool of {len(self.pool)} names is smaller than the "
                             f"{len(set(self.names))} names to rename")

    @classmethod
    def from_files(cls, names: str | Path, pool: str | Path, p: float, seed: int = 0) -> "NameRandomiser":
        """From two files of one word per line (blank lines ignored)."""
        return cls(_words(names), _words(pool), p, seed)

    def __call__(self, index: int) -> dict[str, str] | None:
        """The word map of sample ``index``, or None when it is not renamed."""
        rng = random.Random(f"{self.seed}:{index}")
        if self.p == 0.0 or rng.random() >= self.p:
            return None
        return dict(zip(self.names, rng.sample(self.pool, len(self.names))))


def _words(path: str | Path) -> tuple[str, ...]:
    try:
        words = tuple(w for w in (line.strip() for line in Path(path).read_text().splitlines()) if w)
    except OSError as exc:
        raise ValueError(f"cannot read the word list {str(path)!r}: {exc}") from exc
    if not words:
        raise ValueError(f"word list {str(path)!r} is empty")
    bad = [w for w in words if not w.isalnum()]
    if bad:
        raise ValueError(f"word list {str(path)!r}: not single words: {bad[:3]}")
    return words
