"""Open-ended scorer of the synthetic world: whole-word match after the VQA normalisation."""

from __future__ import annotations

import pytest

from eval.benchmarks import get_benchmark
from eval.scorers.open import contains_answer, score_open


@pytest.mark.parametrize(
    "prediction, answers, hit",
    [
        ("a red kelbo.", ["kelbo"], True),  # in a sentence, article and period dropped
        ("Kelbo", ["kelbo"], True),  # case
        ("kelbos", ["kelbo"], False),  # whole words only
        ("akelbo", ["kelbo"], False),
        ("There are two.", ["2", "two"], True),  # number words -> digits on both sides
        ("big red ball", ["red ball"], True),  # multi-word answer
        ("red", ["red ball"], False),
        ("anything", ["", " "], False),  # blank gold answers never match
    ],
)
def test_contains_answer(prediction, answers, hit):
    assert contains_answer(prediction, answers) is hit


def test_score_open_accuracy_and_categories():
    records = [
        {"prediction": "a red kelbo.", "answers": ["kelbo"], "category": "identification"},
        {"prediction": "kelbos", "answers": ["kelbo"], "category": "identification"},
        {"prediction": "It is blue", "answers": ["blue"], "category": "color"},
        {"prediction": "small", "answers": ["large"]},
    ]
    scores, metrics = score_open(records)
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert metrics == {"accuracy": pytest.approx(50.0), "n": 4,
                       "per_category": {"all": 0.0, "color": 100.0, "identification": pytest.approx(50.0)}}


@pytest.mark.parametrize(
    "records, message",
    [
        ([], "score_open: records is empty"),
        ([{"question_id": "q3", "answers": ["a"]}], "score_open: record 'q3' lacks field 'prediction'"),
        ([{"prediction": "a"}], "score_open: record 0 lacks field 'answers'"),
        ([{"prediction": None, "answers": ["a"]}], "record 0 prediction must be str, got NoneType"),
        ([{"prediction": "a", "answers": "a"}], "answers must be a non-empty list of str"),
        ([{"prediction": "a", "answers": []}], "answers must be a non-empty list of str"),
    ],
)
def test_score_open_bad_input(records, message):
    with pytest.raises(ValueError, match=message):
        score_open(records)


def test_synth_open_benchmark_uses_it():
    assert get_benchmark("synth_open").score is score_open
