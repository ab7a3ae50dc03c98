"""Tests for eval.scorers.yesno: POPE (LLaVA rule) and MME (official rule) scoring."""

from __future__ import annotations

import logging

import pytest

from eval.scorers.yesno import (
    MME_COGNITION,
    MME_PERCEPTION,
    mme_label,
    pope_label,
    score_mme,
    score_pope,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("yes, there is a dog in the image.", "yes"),
        ("No", "no"),
        ("no.", "no"),
        ("No, there is no cat.", "no"),
        ("There is not a dog.", "no"),
        ("I do not see one", "no"),
        # LLaVA keeps only the first sentence and looks for the *word* "no":
        # "Yes, there is no doubt" -> words [Yes, there, is, no, doubt] -> "no".
        ("Yes, there is no doubt.", "no"),
        ("Yes. There is no dog.", "yes"),  # the "no" is in the second sentence
        ("There is a note on the table", "yes"),  # "note" is not the word "no"
        ("nothing", "yes"),
        # LLaVA does not lowercase or strip other punctuation, so these count as yes:
        ("NO", "yes"),
        ("Not really", "yes"),
        ("No!", "yes"),
        ("", "yes"),
    ],
)
def test_pope_label(text, expected):
    assert pope_label(text) == expected


def _pope(pred, answer, split):
    return {"prediction": pred, "answer": answer, "split": split}


POPE_RECORDS = [
    _pope("Yes, there is a dog.", "yes", "random"),  # TP
    _pope("There is not a dog.", "no", "random"),  # TN
    _pope("Yes.", "no", "random"),  # FP
    _pope("No, there is no cat.", "yes", "random"),  # FN
    _pope("No", "no", "adversarial"),  # TN
    _pope("No.", "Yes", "adversarial"),  # FN (gold answer case-insensitive)
    _pope("There is not. Yes.", "no", "adversarial"),  # first sentence "There is not" -> TN
]


def test_score_pope_overall_and_per_split():
    scores, m = score_pope(POPE_RECORDS)
    assert scores == [1, 1, 0, 0, 1, 0, 1]
    # overall: TP=1 FP=1 TN=3 FN=2, n=7
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (1, 1, 3, 2, 7)
    assert m["accuracy"] == pytest.approx(400 / 7)  # (1+3)/7 = 57.14%
    assert m["precision"] == pytest.approx(50.0)  # 1/(1+1)
    assert m["recall"] == pytest.approx(100 / 3)  # 1/(1+2)
    assert m["f1"] == pytest.approx(40.0)  # 2*0.5*(1/3)/(0.5+1/3) = 0.4
    assert m["yes_ratio"] == pytest.approx(200 / 7)  # 2 predicted yes of 7
    # random: TP=FP=TN=FN=1 -> everything 50%
    rnd = m["per_split"]["random"]
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert rnd[key] == pytest.approx(50.0), key
    # adversarial: TP=0 FP=0 TN=2 FN=1 -> no predicted yes: precision 0 by convention
    adv = m["per_split"]["adversarial"]
    assert adv["accuracy"] == pytest.approx(200 / 3)
    assert (adv["precision"], adv["recall"], adv["f1"], adv["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)
    assert sorted(m["per_split"]) == ["adversarial", "random"]
    assert m["f1_mean_splits"] == pytest.approx(25.0)  # LLaVA-1.5's POPE number: mean(50, 0)


def test_score_pope_zero_division_no_positives():
    # every gold "no" and every prediction "no": no positives at all
    _, m = score_pope([_pope("No", "no", "popular")] * 3)
    assert m["accuracy"] == pytest.approx(100.0)
    assert (m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0.0, 0.0, 0.0, 0.0)


def test_score_pope_all_yes_predictions():
    # 2 gold yes, 2 gold no, always "yes": precision 50, recall 100, f1 = 2*.5*1/1.5 = 66.67
    recs = [_pope("Yes", g, "random") for g in ("yes", "yes", "no", "no")]
    _, m = score_pope(recs)
    assert m["precision"] == pytest.approx(50.0)
    assert m["recall"] == pytest.approx(100.0)
    assert m["f1"] == pytest.approx(200 / 3)
    assert m["yes_ratio"] == pytest.approx(100.0)


def test_score_pope_without_split_counts_only_overall():
    _, m = score_pope([{"prediction": "Yes", "answer": "yes"}, _pope("No", "yes", "random")])
    assert m["n"] == 2 and m["accuracy"] == pytest.approx(50.0)
    assert list(m["per_split"]) == ["random"] and m["per_split"]["random"]["n"] == 1


def test_score_pope_errors():
    with pytest.raises(ValueError, match="empty"):
        score_pope([])
    with pytest.raises(ValueError, match="lacks field 'answer'"):
        score_pope([{"prediction": "Yes"}])


def test_score_pope_gold_negative_only_if_exactly_no(caplog):
    # LLaVA's eval_pope.py: label == 'no' -> 0, anything else -> 1 (even "No")
    golds = ["yes", "Yes ", "true", "No", "maybe", "no"]
    with caplog.at_level(logging.WARNING, logger="eval.scorers.yesno"):
        scores, m = score_pope([_pope("Yes", g, "random") for g in golds])
    assert scores == [1, 1, 1, 1, 1, 0]
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (5, 1, 0, 0)
    assert "4 gold answers are neither 'yes' nor 'no'" in caplog.text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes", "yes"),
        ("yes, there is", "yes"),
        ("YES.", "yes"),
        (" No", "no"),
        ("No, it is not.", "no"),
        ("Not sure", "no"),  # prefix "not " contains "no" (official rule)
        ("I cannot tell", "other"),
        ("The answer is yes", "other"),  # only the first 4 characters are inspected
        ("", "other"),
        # no strip, as the official parse_pred_ans: whitespace takes up room in the 4-character prefix
        (" yes", "yes"),
        ("yes\n", "yes"),
        (" No\n", "no"),
        ("  yes", "other"),
        ("\n\nYes", "other"),
        ("   no", "other"),
        (" Not sure", "no"),
    ],
)
def test_mme_label(text, expected):
    assert mme_label(text) == expected


def _mme(pred, answer, category, image):
    return {"prediction": pred, "answer": answer, "category": category, "image": image}


def test_score_mme_values():
    records = [
        # existence: e1 both right; e2 one right one wrong -> acc 3/4 = 75, acc+ 1/2 = 50
        _mme("Yes", "Yes", "existence", "e1"),
        _mme("No", "No", "existence", "e1"),
        _mme("yes, there is", "Yes", "existence", "e2"),
        _mme("Yes", "No", "existence", "e2"),
        # count: "other" counts wrong -> acc 50, acc+ 0
        _mme("I cannot tell", "Yes", "count", "c1"),
        _mme("no", "No", "count", "c1"),
        # commonsense_reasoning: both right -> 100 + 100
        _mme("Not sure", "No", "commonsense_reasoning", "r1"),
        _mme("YES.", "Yes", "commonsense_reasoning", "r1"),
    ]
    scores, m = score_mme(records)
    assert scores == [1, 1, 1, 0, 0, 1, 1, 1]
    ex = m["per_subtask"]["existence"]
    assert (ex["acc"], ex["acc_plus"], ex["score"]) == pytest.approx((75.0, 50.0, 125.0))
    assert (ex["n_questions"], ex["n_images"]) == (4, 2)
    cnt = m["per_subtask"]["count"]
    assert (cnt["acc"], cnt["acc_plus"], cnt["score"]) == pytest.approx((50.0, 0.0, 50.0))
    assert m["per_subtask"]["commonsense_reasoning"]["score"] == pytest.approx(200.0)
    assert m["perception"] == pytest.approx(175.0)  # 125 + 50
    assert m["cognition"] == pytest.approx(200.0)
    assert m["total"] == pytest.approx(375.0)
    assert m["other"] == 1
    expected_missing = [n for n in MME_PERCEPTION + MME_COGNITION
                        if n not in ("existence", "count", "commonsense_reasoning")]
    assert m["missing_subtasks"] == expected_missing and len(expected_missing) == 11


def test_score_mme_pair_one_right_one_wrong():
    _, m = score_mme([_mme("Yes", "Yes", "OCR", "o1"), _mme("Yes", "No", "OCR", "o1")])
    assert m["per_subtask"]["OCR"]["acc"] == pytest.approx(50.0)
    assert m["per_subtask"]["OCR"]["acc_plus"] == pytest.approx(0.0)
    assert m["perception"] == pytest.approx(50.0) and m["cognition"] == 0.0


def test_score_mme_same_image_id_in_two_subtasks_is_separate():
    recs = [_mme("Yes", "Yes", "color", "x"), _mme("No", "No", "color", "x"),
            _mme("Yes", "Yes", "scene", "x"), _mme("No", "Yes", "scene", "x")]
    _, m = score_mme(recs)
    assert m["per_subtask"]["color"]["acc_plus"] == pytest.approx(100.0)
    assert m["per_subtask"]["scene"]["acc_plus"] == pytest.approx(0.0)


def test_mme_subtask_lists():
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4
    assert not set(MME_PERCEPTION) & set(MME_COGNITION)


def test_score_mme_errors():
    with pytest.raises(ValueError, match="empty"):
        score_mme([])
    with pytest.raises(ValueError, match="exactly 2 questions"):
        score_mme([_mme("Yes", "Yes", "count", "c1")])
    with pytest.raises(ValueError, match="exactly 2 questions"):
        score_mme([_mme("Yes", "Yes", "count", "c1")] * 3)
    with pytest.raises(ValueError, match="category 'ocr' not in"):
        score_mme([_mme("Yes", "Yes", "ocr", "o1")] * 2)
    with pytest.raises(ValueError, match="answer must be one of"):
        score_mme([_mme("Yes", "maybe", "OCR", "o1")] * 2)
    with pytest.raises(ValueError, match="lacks field 'image'"):
        score_mme([{"prediction": "Yes", "answer": "Yes", "category": "OCR"}])
