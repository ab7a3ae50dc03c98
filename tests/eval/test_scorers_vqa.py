"""Tests for eval.scorers.vqa: official VQA normalisation / soft accuracy, VizWiz subsets, GQA."""

from __future__ import annotations

import math

import pytest

from eval.scorers.vqa import (
    CONTRACTIONS,
    evalai_answer,
    evalai_word_tokenize,
    gqa_match,
    is_unanswerable,
    normalize_answer,
    official_vqa_answers,
    score_gqa,
    score_textvqa,
    score_vizwiz,
    score_vqa,
    vizwiz_prediction,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        # case, whitespace, newlines/tabs
        ("YES", "yes"),
        ("  big \t  dog\n", "big dog"),
        ("red\nblue", "red blue"),
        # number words (only none/zero..ten)
        ("Two", "2"),
        ("two dogs", "2 dogs"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        # articles
        ("A dog", "dog"),
        ("the Dog", "dog"),
        ("an apple", "apple"),
        ("a", ""),
        # periods: removed unless followed by a digit
        ("yes.", "yes"),
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        ("Mr. Smith", "mr smith"),
        # apostrophe is not in the punctuation list
        ("It's", "it's"),
        # comma: digit,digit -> every mark deleted; otherwise space unless it touches a space
        ("1,000", "1000"),
        ("1,000-2,000", "10002000"),  # the digit comma makes "-" vanish instead of becoming a space
        ("red,blue", "red blue"),
        ("red, blue", "red blue"),
        ("t-shirt", "t shirt"),
        ("yes!", "yes"),
        ("(yes)", "yes"),
        # the touches-a-space test looks at the whole input: "/" -> space, " -" -> deleted, then "a" dropped
        ("a - b/c", "b c"),
        # contractions
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("whats up", "what's up"),
        ("Im", "im"),  # official key is "Im", but lookup happens after lowercasing
        # the official digit-comma test wants exactly one comma between digits
        ("1,,2", "1 2"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_normalize_period_removal_capped_at_32():
    # The official call passes re.UNICODE (== 32) as the count: 40 periods -> 8 survive.
    assert normalize_answer("x" + "." * 40) == "x" + "." * 8


def test_contraction_table_is_complete():
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["dont"] == "don't"
    assert CONTRACTIONS["somebody'd"] == "somebodyd"  # reversed entry kept as official
    assert CONTRACTIONS["yall'd've"] == "y'all'd've"


def test_normalize_rejects_non_str():
    with pytest.raises(ValueError, match="must be str, got int"):
        normalize_answer(3)


def _answers(k: int, match: str = "2", other: str = "3", n: int = 10) -> list[str]:
    return [match] * k + [other] * (n - k)


# With k of 10 humans matching, leaving out a matching human leaves k-1 matches (k such subsets)
# and leaving out another leaves k (10-k subsets); each subset scores min(1, matches/3).
#   k=1: (1*0   + 9*1/3) / 10 = 3/10 = 0.3
#   k=2: (2*1/3 + 8*2/3) / 10 = 6/10 = 0.6
#   k=3: (3*2/3 + 7*1)   / 10 = 9/10 = 0.9
#   k=4: (4*1   + 6*1)   / 10 = 1.0
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_annotators(k, expected):
    assert vqa_accuracy("two", _answers(k)) == pytest.approx(expected)


def test_vqa_accuracy_default_normalises_both_sides():
    answers = ["Two."] * 2 + ["2"] + ["three"] * 7  # all three "2"-answers normalise to "2"
    assert vqa_accuracy("  TWO\n", answers) == pytest.approx(0.9)
    assert vqa_accuracy("a dog", ["Dog"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("dont know", ["don't know"] * 10) == 1.0
    assert vqa_accuracy("dog", ["dogs"] * 10) == 0.0  # no stemming


def test_vqa_accuracy_other_annotator_counts():
    assert vqa_accuracy("cat", ["Cat."]) == 1.0  # N=1: exact match
    assert vqa_accuracy("cat", ["dog"]) == 0.0
    assert vqa_accuracy("cat", ["cat", "cat"]) == 1.0  # N=2: threshold 1
    assert vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(0.5)  # (0/1 + 1/1) / 2
    # N=3, threshold 2, k=2: (2*min(1, 1/2) + 1*min(1, 2/2)) / 3 = 2/3
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == pytest.approx(2 / 3)
    # N=5 uses the official threshold 3, k=3: (3*2/3 + 2*1) / 5 = 0.8
    assert vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 2) == pytest.approx(0.8)


@pytest.mark.parametrize("answers", [[], "cat"])
def test_vqa_accuracy_bad_answers(answers):
    with pytest.raises(ValueError, match="non-empty list of str"):
        vqa_accuracy("cat", answers)


def test_score_vqa_and_textvqa():
    records = [
        {"prediction": "Two", "answers": _answers(3)},  # 0.9
        {"prediction": "yes.", "answers": ["yes"] * 10},  # 1.0
        {"prediction": "no", "answers": _answers(1, match="no", other="yes")},  # 0.3
        {"prediction": "blue", "answers": ["red"] * 10},  # 0.0
    ]
    scores, metrics = score_vqa(records)
    assert scores == pytest.approx([0.9, 1.0, 0.3, 0.0])
    assert metrics["accuracy"] == pytest.approx(55.0)
    assert metrics["n"] == 4
    assert metrics["normalization"] == "official"
    t_scores, t_metrics = score_textvqa(records)
    assert t_scores == scores
    assert t_metrics == {"accuracy": metrics["accuracy"], "n": 4, "normalization": "always"}


def _official_vqa_loop(prediction: str, answers: list[str]) -> float:
    """The official vqaEval.py loop written out literally (answers as dicts with distinct ids, as in
    the annotation files), to check our result is the very same float."""
    pred = normalize_answer(prediction)
    gts = [{"answer": a, "answer_id": i} for i, a in enumerate(official_vqa_answers(answers))]
    accs = []
    for left_out in gts:
        others = [g for g in gts if g != left_out]
        accs.append(min(1, float(len([g for g in others if g["answer"] == pred])) / 3))
    return float(sum(accs)) / len(accs)


@pytest.mark.parametrize("n", range(4, 11))
def test_soft_accuracy_is_the_official_float_for_every_match_pattern(n):
    # e.g. N=10 with matches at positions 3 and 4: the official sum gives 0.6000000000000001, not 0.6
    for mask in range(2 ** n):
        answers = ["2" if mask >> i & 1 else "3" for i in range(n)]
        record = {"prediction": "two", "answers": answers}
        assert score_vqa([record])[0][0] == _official_vqa_loop("two", answers), answers


def test_official_vqa_answers():
    assert official_vqa_answers(["Two"] * 10) == ["Two"] * 10  # all agree: untouched
    assert official_vqa_answers(["red-white", "Red", "a dog.", " x "]) == ["red white", "Red", "a dog", " x "]


# (prediction, human answers, official VQAv2 score, official VizWiz score, "always" score)
NORMALIZATION_CASES = [
    ("two", ["Two"] * 10, 0.0, 0.0, 1.0),  # humans agree: the VQA script leaves them raw
    ("two", ["two"] * 10, 0.0, 0.0, 1.0),  # prediction always normalised to "2"
    ("red", ["Red"] * 4 + ["blue"] * 6, 0.0, 0.0, 1.0),  # answers never lowercased officially
    ("dog", ["the dog"] * 4 + ["cat"] * 6, 0.0, 0.0, 1.0),  # nor articles dropped
    ("red white", ["red-white"] * 3 + ["red"] * 7, 0.9, 0.0, 0.9),  # VQA: punctuation rule when they disagree
    ("Yes.", ["yes"] * 10, 1.0, 1.0, 1.0),
    ("  Unanswerable\n", ["unanswerable"] * 10, 1.0, 1.0, 1.0),
]


@pytest.mark.parametrize("prediction, answers, vqa_official, vizwiz_official, always", NORMALIZATION_CASES)
def test_official_and_always_normalization(prediction, answers, vqa_official, vizwiz_official, always):
    record = {"prediction": prediction, "answers": answers}
    for scorer, official in ((score_vqa, vqa_official), (score_vizwiz, vizwiz_official)):
        scores, metrics = scorer([record])
        assert scores == [pytest.approx(official)] and metrics["normalization"] == "official"
        scores, metrics = scorer([record], normalization="always")
        assert scores == [pytest.approx(always)] and metrics["normalization"] == "always"
    assert score_vqa([record])[0][0] == _official_vqa_loop(prediction, answers)


@pytest.mark.parametrize("scorer", [score_vqa, score_vizwiz])
def test_unknown_normalization(scorer):
    with pytest.raises(ValueError, match=r"normalization must be one of \('official', 'always'\), got 'lenient'"):
        scorer([{"prediction": "a", "answers": ["a"]}], normalization="lenient")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Dog's?", "dog 's"),
        ("1,000", "1000"),
        ("What's up?", "what 's up"),
        ("  Red, Blue  ", "red blue"),
        ("a,b?c", "abc"),
    ],
)
def test_evalai_word_tokenize(text, expected):
    assert evalai_word_tokenize(text) == expected


# (text, EvalAI processor with the pre-step, official normalisation alone)
@pytest.mark.parametrize(
    "text, with_pre_step, official",
    [
        ("Dog's?", "dog 's", "dog's"),
        ("what's", "what 's", "what's"),
        ("whats", "what's", "what's"),  # no "'s" to split: the contraction table still applies
        ("1,000", "1000", "1000"),
        ("1,000-2", "1000 2", "10002"),  # commas gone first: no digit comma, so "-" becomes a space
        ("red,blue", "redblue", "red blue"),
        ("Red, white and blue", "red white and blue", "red white and blue"),
        ("Two, please?", "2 please", "2 please"),
    ],
)
def test_evalai_answer_vs_official_normalisation(text, with_pre_step, official):
    assert evalai_answer(text) == with_pre_step
    assert normalize_answer(text) == official


def test_evalai_rejects_non_str():
    with pytest.raises(ValueError, match="evalai_word_tokenize: text must be str, got NoneType"):
        evalai_answer(None)


def test_textvqa_applies_the_pre_step_to_prediction_and_answers():
    records = [
        # pre-step: "what 's" matches the 2 "what's" (the 8 "whats" become "what's") -> 0.6;
        # normalize_answer alone: all 10 normalise to "what's" -> 1.0
        {"prediction": "What's", "answers": ["what's"] * 2 + ["whats"] * 8},
        # pre-step: "redwhite" != "red white" -> 0.0; official: "red white" == "red white" -> 1.0
        {"prediction": "red,white", "answers": ["red white"] * 10},
        # both: every "1,000"/"1000" -> "1000", k=6 -> 1.0
        {"prediction": "1,000", "answers": ["1000"] * 3 + ["1,000"] * 3 + ["one thousand"] * 4},
        # both: k=3 of 10 -> 0.9 ("dog 's" with the pre-step, "dog's" without)
        {"prediction": "Dog's?", "answers": ["dog's"] * 3 + ["dog"] * 7},
    ]
    scores, metrics = score_textvqa(records)
    assert scores == pytest.approx([0.6, 0.0, 1.0, 0.9])
    assert metrics["accuracy"] == pytest.approx(62.5)
    official, official_metrics = score_vqa(records, normalization="always")
    assert official == pytest.approx([1.0, 1.0, 1.0, 0.9])
    assert official_metrics["accuracy"] == pytest.approx(97.5)


@pytest.mark.parametrize(
    "records, message",
    [
        ([], "records is empty"),
        ([{"answers": ["a"]}], "lacks field 'prediction'"),
        ([{"prediction": "a"}], "lacks field 'answers'"),
        ([{"prediction": None, "answers": ["a"]}], "prediction must be str"),
        ([{"prediction": "a", "answers": []}], "answers must be a non-empty list"),
        ([{"prediction": "a", "answers": ["a", 1]}], "answers must be a non-empty list"),
    ],
)
def test_score_vqa_bad_input(records, message):
    with pytest.raises(ValueError, match=message):
        score_vqa(records)


def test_score_textvqa_empty():
    with pytest.raises(ValueError, match="score_textvqa: records is empty"):
        score_textvqa([])


def test_vizwiz_prediction_only_normalises():
    assert vizwiz_prediction("Unanswerable.") == "unanswerable"
    assert vizwiz_prediction("I cannot answer") == "i cannot answer"


def test_is_unanswerable_rule():
    assert is_unanswerable({"answers": ["unanswerable"] * 6 + ["dog"] * 4})
    assert not is_unanswerable({"answers": ["Unanswerable"] * 5 + ["dog"] * 5})  # tie is not a majority
    assert is_unanswerable({"answers": ["dog"] * 10, "answerable": 0})  # annotation flag wins
    assert not is_unanswerable({"answers": ["unanswerable"] * 10, "answerable": True})
    with pytest.raises(ValueError, match="answerable must be 0/1 or bool, got 'no'"):
        is_unanswerable({"answers": ["dog"], "answerable": "no"})


def test_score_vizwiz_subsets():
    records = [
        # 6 of 10 say unanswerable -> unanswerable subset; prediction matches 6 -> 1.0
        {"prediction": "Unanswerable.", "answers": ["unanswerable"] * 6 + ["dog"] * 4},
        # 3 of 10 -> answerable subset; prediction matches 3 -> 0.9
        {"prediction": "unanswerable", "answers": ["unanswerable"] * 3 + ["cat"] * 7},
        # 5/5 tie -> answerable; "a cat" matches 5 -> 1.0
        {"prediction": "a cat", "answers": ["unanswerable"] * 5 + ["cat"] * 5},
        {"prediction": "blue", "answers": ["red"] * 10},  # answerable, 0.0
    ]
    scores, metrics = score_vizwiz(records)
    assert scores == pytest.approx([1.0, 0.9, 1.0, 0.0])
    assert metrics["accuracy"] == pytest.approx(72.5)  # (1 + 0.9 + 1 + 0) / 4
    assert metrics["n"] == 4
    assert metrics["accuracy_unanswerable"] == pytest.approx(100.0)
    assert metrics["n_unanswerable"] == 1
    assert metrics["accuracy_answerable"] == pytest.approx(190.0 / 3)  # (0.9 + 1 + 0) / 3
    assert metrics["n_answerable"] == 3


def test_score_vizwiz_empty_subset_is_nan():
    _, metrics = score_vizwiz([{"prediction": "red", "answers": ["red"] * 10}])
    assert metrics["accuracy_answerable"] == 100.0 and metrics["n_answerable"] == 1
    assert math.isnan(metrics["accuracy_unanswerable"]) and metrics["n_unanswerable"] == 0


@pytest.mark.parametrize(
    "prediction, answer, expected",
    [
        ("Yes.", "yes", True),
        ("yes...", "yes", True),
        ("Left", "left", True),
        # no whitespace strip (LLaVA's convert_gqa_for_eval.py: rstrip('.').lower() only)
        (" left", "left", False),
        ("left\n", "left", False),
        ("yes. ", "yes", False),  # the space stops rstrip('.')
        ("left", "Left", False),  # the gold answer is compared as stored
        ("3.5", "3.5", True),
        ("the left", "left", False),  # no article removal in GQA
        ("two", "2", False),  # no number-word mapping in GQA
        ("Yes, it is", "yes", False),
    ],
)
def test_gqa_match(prediction, answer, expected):
    assert gqa_match(prediction, answer) is expected


def test_score_gqa():
    records = [
        {"prediction": "Yes.", "answer": "yes"},
        {"prediction": "man", "answer": "woman"},
        {"prediction": "Table", "answer": "table"},
    ]
    scores, metrics = score_gqa(records)
    assert scores == [1.0, 0.0, 1.0]
    assert metrics == {"accuracy": pytest.approx(200.0 / 3), "n": 3}


@pytest.mark.parametrize(
    "records, message",
    [
        ([], "score_gqa: records is empty"),
        ([{"prediction": "yes"}], "lacks field 'answer'"),
        ([{"prediction": "yes", "answer": 1}], "must be str"),
    ],
)
def test_score_gqa_bad_input(records, message):
    with pytest.raises(ValueError, match=message):
        score_gqa(records)
