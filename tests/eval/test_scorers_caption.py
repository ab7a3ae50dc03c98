"""Caption metrics via pycocoevalcap (needs java, as the official pipeline)."""

from __future__ import annotations

import pytest

from eval.scorers.caption import score_caption


def test_identical_captions_score_perfect_bleu_and_ranks_cider():
    refs = [["a dog runs on the grass", "a dog running on grass"], ["two cats sleep on a sofa", "cats sleeping"],
            ["a red car parked outside", "a parked red car"]]
    exact = [{"prediction": r[0], "references": r} for r in refs]
    per, metrics = score_caption(exact)
    assert metrics["bleu_1"] == pytest.approx(100.0, abs=1e-3) and metrics["n"] == 3
    wrong = [{"prediction": "a bowl of soup", "references": r} for r in refs]
    per_wrong, metrics_wrong = score_caption(wrong)
    assert metrics_wrong["cider"] < metrics["cider"] and all(a > b for a, b in zip(per, per_wrong))
    assert metrics_wrong["bleu_4"] == pytest.approx(0.0, abs=1e-3)


def test_tokenization_ignores_case_and_punctuation():
    refs = [["A dog runs on the grass."], ["Two cats sleep."]]
    plain = score_caption([{"prediction": "a dog runs on the grass", "references": refs[0]},
                           {"prediction": "two cats sleep", "references": refs[1]}])[1]
    shouty = score_caption([{"prediction": "A DOG runs on the grass!", "references": refs[0]},
                            {"prediction": "Two cats sleep.", "references": refs[1]}])[1]
    assert plain["cider"] == pytest.approx(shouty["cider"]) and plain["bleu_4"] == pytest.approx(shouty["bleu_4"])


def test_errors():
    with pytest.raises(ValueError, match="no records"):
        score_caption([])
    with pytest.raises(ValueError, match="record 'q7' has no reference captions"):
        score_caption([{"question_id": "q7", "prediction": "x", "references": []}])
