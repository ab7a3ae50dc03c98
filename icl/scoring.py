"""Answer-likelihood scoring of demonstration sets: the signal DRUM and Lever-LM learn from.

For one query x with answer y and candidate demo sets S (prompt order), a scorer gives

- the summed answer log-likelihood log P(y | S, x) (DRUM's s(z)) and its per-token mean;
- :func:`info_score`: InfoScore(c | S, x) = P(y | S ⊕ c, x) - P(y | S, x), with P = exp(mean answer-token
  log-probability) (Lever-LM's definition); c joins S next to the query (Lever-LM grows sequences that way).

Backends share the :class:`Scorer` interface: :class:`TunaScorer` here, ``icl.hf_scorer.HFScorer`` for
Hugging Face image-text-to-text models that take interleaved images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from icl.formats import Example
from icl.prompts import encode_kshot


@dataclass
class SetScores:
    """Per candidate set: summed and mean answer log-likelihood, answer tokens, demos dropped to fit."""

    sum: np.ndarray
    mean: np.ndarray
    n_tokens: np.ndarray
    dropped: np.ndarray

    @property
    def probability(self) -> np.ndarray:
        """exp(mean answer-token log-probability): Lever-LM's P(y | S, x)."""
        return np.exp(self.mean)

    @classmethod
    def from_lists(cls, sums: list[float], counts: list[int], dropped: list[int]) -> SetScores:
        total, n = np.asarray(sums, np.float64), np.asarray(counts, np.int64)
        return cls(sum=total, mean=total / np.maximum(n, 1), n_tokens=n, dropped=np.asarray(dropped, np.int64))


class Scorer(Protocol):
    def loglik(self, query: Example, candidate_sets: Sequence[Sequence[Example]], answer: str | None = None
               ) -> SetScores:
        """log P(answer | S, query) for every S (prompt order); ``answer`` defaults to the query's first."""


@dataclass
class TunaScorer:
    """Scores with a :class:`tuna.modeling_tuna.TunaForCausalLM` and its processor.

    Attributes:
        batch_size: candidate sets per forward pass.
        demo_tags / query_tags: retrieved tags for the demos' / the query's images.
    """

    model: Any
    processor: Any
    batch_size: int = 8
    demo_tags: bool = True
    query_tags: bool = True

    @classmethod
    def from_pretrained(cls, path: str, *, datastore: str | None = None, retrieval_cache: str | None = None,
                        k_images: int = 5, min_tag_support: float = 0.0, device: str = "cpu", batch_size: int = 8,
                        demo_tags: bool = True) -> TunaScorer:
        """A saved TUNA model with the tag source its flags describe (a tag-free model needs neither path)."""
        from tuna.processing_tuna import load_pretrained

        model, _, processor = load_pretrained(path, device, retrieval_cache=retrieval_cache, datastore=datastore,
                                          k_images=k_images, min_support=min_tag_support)
        if processor.tag_source is None:
            raise ValueError(f"{path} reads retrieved tags: give --datastore or --retrieval-cache")
        return cls(model, processor, batch_size=batch_size, demo_tags=demo_tags)

    def loglik(self, query: Example, candidate_sets: Sequence[Sequence[Example]], answer: str | None = None
               ) -> SetScores:
        import torch

        sums, counts, dropped = [], [], []
        for start in range(0, len(candidate_sets), self.batch_size):
            samples = [encode_kshot(self.processor, demos, query, answer, self.demo_tags, self.query_tags)
                       for demos in candidate_sets[start:start + self.batch_size]]
            batch = self.processor.collate([s.encoded for s in samples], padding_side="right")
            batch = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = self.model.score(**batch)
            sums += out.sum.float().cpu().tolist()
            counts += out.n_tokens.cpu().tolist()
            dropped += [s.dropped for s in samples]
        return SetScores.from_lists(sums, counts, dropped)


def model_identity(path: str | Path, **settings: Any) -> dict[str, Any]:
    """What names a scoring model in a mined dataset's manifest: its folder, a hash of its config and the size
    of its weights (hashing billions of weights per run is too slow), plus the settings that change scores."""
    import hashlib

    folder = Path(path)
    if not folder.is_dir():  # a hub id: the name is all there is
        return {"model": str(path), **settings}
    config = folder / "config.json"
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"model": str(folder.resolve()),
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "weights_bytes": sum(p.stat().st_size for p in weights), **settings}


def info_score(scorer: Scorer, query: Example, base: Sequence[Example], candidates: Sequence[Example]) -> np.ndarray:
    """InfoScore of each candidate c given the set ``base``: P(y | base ⊕ c, x) - P(y | base, x)."""
    sets = [list(base)] + [list(base) + [c] for c in candidates]
    probability = scorer.loglik(query, sets).probability
    return probability[1:] - probability[0]
