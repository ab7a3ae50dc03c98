"""Beam search for demonstration sequences by InfoScore: what Lever-LM learns from.

For one anchor x (a pool example with answer y) and a candidate set C, every kept sequence S is extended
by each unused candidate c, placed next to the query, and scored with InfoScore(c | S, x) =
P(y | S ⊕ c, x) - P(y | S, x). The ``beam`` best extensions are kept, ranked by the InfoScore
accumulated along their path; the sum telescopes to P(y | S, x) - P(y | x), so the beam keeps the
sequences the model finds most helpful, and a step's ranking among extensions of one sequence is its
InfoScore ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from icl.formats import Example
from icl.scoring import Scorer


@dataclass
class BeamSequence:
    """A demonstration sequence (candidate positions, prompt order) and the InfoScore each step added."""

    demos: list[int]
    step_scores: list[float]
    probability: float  # P(y | S, x)


@dataclass
class BeamResult:
    """The kept sequences (best first), P(y | x) without demos, and the scoring work done."""

    sequences: list[BeamSequence]
    base_probability: float
    first_step_scores: np.ndarray  # InfoScore of every candidate alone: how the model ranks single demos
    sets_scored: int = 0
    steps: list[int] = field(default_factory=list)  # sets scored per step


def beam_search(scorer: Scorer, query: Example, candidates: Sequence[Example], beam: int = 5, length: int = 2
                ) -> BeamResult:
    """Sequences of ``length`` distinct candidates with the highest P(y | S, x), by beam search."""
    if beam < 1 or length < 1:
        raise ValueError(f"beam={beam}, length={length}: both must be >= 1")
    if length > len(candidates):
        raise ValueError(f"length={length} needs at least as many candidates, got {len(candidates)}")
    base = float(scorer.loglik(query, [[]]).probability[0])
    kept = [BeamSequence([], [], base)]
    first = np.zeros(0)
    sets_per_step = []
    for step in range(length):
        extensions = [(seq, c) for seq in kept for c in range(len(candidates)) if c not in seq.demos]
        sets = [[candidates[i] for i in seq.demos] + [candidates[c]] for seq, c in extensions]
        probability = scorer.loglik(query, sets).probability
        sets_per_step.append(len(sets))
        gains = np.array([p - seq.probability for p, (seq, _) in zip(probability, extensions)])
        if step == 0:
            first = gains.copy()
        # accumulated InfoScore = P(S ⊕ c) - P(empty): rank by it; ties go to the earlier candidate
        order = np.argsort(-(probability - base), kind="stable")[:beam]
        kept = [BeamSequence(extensions[i][0].demos + [extensions[i][1]],
                             extensions[i][0].step_scores + [float(gains[i])], float(probability[i])) for i in order]
    return BeamResult(kept, base, first, sets_scored=1 + sum(sets_per_step), steps=sets_per_step)
