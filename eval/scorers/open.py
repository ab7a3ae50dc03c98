"""Open-ended identification/attribute scorer (the synthetic world's synth_open benchmark).

A reply counts if a gold answer occurs in it as whole words, after the official VQA normalisation
of both sides: the model may answer in a sentence ("a red kelbo.") but "kelbos" is not "kelbo".
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from eval.scorers.records import check_records
from eval.scorers.vqa import normalize_answer


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    """True if a normalised gold answer occurs as whole words in the normalised prediction."""
    text = f" {normalize_answer(prediction)} "
    return any(re.search(rf"(?<!\w){re.escape(normalize_answer(a))}(?!\w)", text) for a in answers if a.strip())


def score_open(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict]:
    """Score open-ended replies with :func:`contains_answer`.

    Args:
        records: dicts with "prediction" (str), "answers" (gold names/attributes) and optional "category".
    Returns:
        (per-record 0/1 scores, {"accuracy": %, "n", "per_category": {category ("all" if none): %}}).
    Raises:
        ValueError: on empty input, a missing field, a non-str prediction or bad answers.
    """
    check_records(records, "score_open", str_lists=("answers",))
    scores = [float(contains_answer(r["prediction"], r["answers"])) for r in records]
    per_category: dict[str, list[float]] = {}
    for r, s in zip(records, scores):
        per_category.setdefault(r.get("category", "all"), []).append(s)
    return scores, {"accuracy": 100 * sum(scores) / len(scores), "n": len(scores),
                    "per_category": {c: 100 * sum(v) / len(v) for c, v in sorted(per_category.items())}}
