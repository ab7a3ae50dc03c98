"""Tests for eval.scorers.choice: option parsing, multiple-choice and MMBench circular scoring."""

from __future__ import annotations

import pytest

from eval.scorers.choice import (
    parse_option,
    parse_option_letter,
    rotate_options,
    score_circular,
    score_multiple_choice,
)

ABCD = ["A", "B", "C", "D"]
A_TO_I = list("ABCDEFGHI")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("[D]", "D"),
        ("  C  \n", "C"),
        ("**C**", "C"),
        ("B) cat", "B"),
        ("B. cat", "B"),
        ("(B) cat", "B"),
        ("D: a fish", "D"),
        ("B\nBecause the cat is black.", "B"),
        ("The answer is B.", "B"),
        ("Answer: B", "B"),
        ("answer: (C)", "C"),
        ("The correct option is (C).", "C"),
        ("It's B", "B"),
        ("Looking at the image, the answer is D", "D"),
        # "answer" statements outrank "option X" mentions
        ("Option A is wrong, so the answer is C", "C"),
        ("I think B", "B"),  # "I" is not an allowed letter here
    ],
)
def test_parse_option_letter_finds_letter(text, expected):
    assert parse_option_letter(text, ABCD) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "I think it's a bird",  # "I" is not in A-D, and no other letter token
        "Bird",  # letter inside a word never counts
        "ABC",
        "E",  # not an allowed letter
        "The answer is E.",
        "b",  # letters are case-sensitive: lowercase is never an option
        "a cat",
        "A cat",  # "A" as an English article in a longer reply
        "A or B",  # two candidate letters -> ambiguous
        "The answer is B, no wait, the answer is C",  # conflicting statements
    ],
)
def test_parse_option_letter_non_matches(text):
    assert parse_option_letter(text, ABCD) is None


def test_parse_option_letter_word_letters_with_many_options():
    # With 9 options "I" is a valid letter, but as the first word of a sentence it is a pronoun.
    assert parse_option_letter("I think it's a bird", A_TO_I) is None
    assert parse_option_letter("I think B", A_TO_I) is None  # I and B both candidates
    assert parse_option_letter("I", A_TO_I) == "I"
    assert parse_option_letter("(I) a bird", A_TO_I) == "I"
    assert parse_option_letter("The answer is I.", A_TO_I) == "I"


@pytest.mark.parametrize("letters", [[], ["AB"], ["a"], ["A", 1]])
def test_parse_option_letter_bad_letters(letters):
    with pytest.raises(ValueError, match="letters must be"):
        parse_option_letter("A", letters)


OPTS = {"A": "dog", "B": "a cat", "C": "bird", "D": "fish"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", "A"),  # a bare letter is the letter, never option text
        ("a cat", "B"),  # exact option text (lowercase article)
        ("A cat", "B"),  # text match, case-insensitive; "A" alone is an article here
        ("A cat.", "B"),
        ("Bird.", "C"),
        ("fish", "D"),
        ("A dog", "A"),  # letter A followed by A's own text
        ("(C) bird", "C"),
        ("a dog", None),  # lowercase "a" is no letter, "a dog" is no option text
        ("a cat and a dog", None),
        ("", None),
    ],
)
def test_parse_option_with_text(text, expected):
    assert parse_option(text, OPTS) == expected


def test_parse_option_ambiguous_text():
    opts = {"A": "cat", "B": "a cat"}
    assert parse_option("A cat", opts) is None  # "A"+A's text and B's full text both match
    assert parse_option("a cat", opts) == "B"
    assert parse_option("cat", opts) == "A"
    assert parse_option("cat", {"A": "cat", "B": "Cat."}) is None  # duplicate texts


def _mc(pred, answer, category=None, options=OPTS):
    rec = {"prediction": pred, "answer": answer, "options": options}
    if category is not None:
        rec["category"] = category
    return rec


def test_score_multiple_choice_values():
    records = [
        _mc("A", "A", "nat"),  # right
        _mc("The answer is C.", "C", "nat"),  # right
        _mc("a cat", "A", "soc"),  # parsed B, wrong
        _mc("no idea", "D", "soc"),  # unparsed, wrong
        _mc("D", "D"),  # right, no category
    ]
    scores, metrics = score_multiple_choice(records)
    assert scores == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert metrics["accuracy"] == pytest.approx(60.0)  # 3 / 5
    assert metrics["n"] == 5
    assert metrics["unparsed"] == 1
    assert metrics["per_category"] == {"nat": pytest.approx(100.0), "soc": pytest.approx(0.0)}


def test_score_multiple_choice_errors():
    with pytest.raises(ValueError, match="empty"):
        score_multiple_choice([])
    with pytest.raises(ValueError, match="not in option letters"):
        score_multiple_choice([_mc("A", "E")])
    with pytest.raises(ValueError, match="lacks field 'options'"):
        score_multiple_choice([{"prediction": "A", "answer": "A"}])
    with pytest.raises(ValueError, match="prediction must be str"):
        score_multiple_choice([_mc(None, "A")])


def test_rotate_options_shifts():
    opts = {"A": "cat", "B": "dog", "C": "owl", "D": "fox"}
    rots = rotate_options(opts, "B", 4)
    assert rots[0] == (opts, "B")
    assert rots[1] == ({"A": "dog", "B": "owl", "C": "fox", "D": "cat"}, "A")
    assert rots[2] == ({"A": "owl", "B": "fox", "C": "cat", "D": "dog"}, "D")
    assert rots[3] == ({"A": "fox", "B": "cat", "C": "dog", "D": "owl"}, "C")
    # the answer letter always points at the same text; every rotation is a permutation
    assert all(o[a] == "dog" and sorted(o.values()) == sorted(opts.values()) for o, a in rots)
    assert rotate_options(opts, "B", 2) == rots[:2]


def test_rotate_options_errors():
    opts = {"A": "cat", "B": "dog"}
    for k in (0, 3):
        with pytest.raises(ValueError, match="k must be"):
            rotate_options(opts, "A", k)
    with pytest.raises(ValueError, match="not in option letters"):
        rotate_options(opts, "C", 2)


def _circular_group(group, category, correct_flags):
    """Records for one question; rotation r answered right iff correct_flags[r]."""
    opts = {"A": "cat", "B": "dog", "C": "owl", "D": "fox"}
    records = []
    for r, (rot_opts, ans) in enumerate(rotate_options(dict(list(opts.items())[: len(correct_flags)]), "A",
                                                       len(correct_flags))):
        wrong = next(x for x in rot_opts if x != ans)
        records.append({"prediction": ans if correct_flags[r] else wrong, "answer": ans,
                        "options": rot_opts, "group": group, "rotation": r, "category": category})
    return records


def test_score_circular_all_rotations_required():
    records = (
        _circular_group(0, "ocr", [True, True, True, True])  # group right
        + _circular_group(1, "ocr", [True, True, False, True])  # 3 of 4 -> group counts 0
        + _circular_group(2, "logic", [False, True])  # rotation 0 wrong, 2 options
    )
    scores, metrics = score_circular(records)
    assert scores == [1, 1, 1, 1, 1, 1, 0, 1, 0, 1]  # each record's own 0/1
    assert metrics["n_groups"] == 3
    assert metrics["n"] == 10
    assert metrics["accuracy"] == pytest.approx(100 / 3)  # 1 of 3 groups
    assert metrics["single_pass_accuracy"] == pytest.approx(200 / 3)  # rot0 right in groups 0, 1
    assert metrics["per_category"] == {"logic": pytest.approx(0.0), "ocr": pytest.approx(50.0)}
    assert metrics["unparsed"] == 0


def test_score_circular_record_order_irrelevant():
    records = _circular_group("q7", None, [True, True, True])
    _, metrics = score_circular(list(reversed(records)))
    assert metrics["accuracy"] == pytest.approx(100.0)
    assert metrics["per_category"] == {}


def test_score_circular_errors():
    with pytest.raises(ValueError, match="empty"):
        score_circular([])
    good = _circular_group(0, "ocr", [True, True, True])
    with pytest.raises(ValueError, match="rotations must be 0..k-1"):
        score_circular(good[1:])  # rotation 0 missing
    with pytest.raises(ValueError, match="duplicate rotation 1"):
        score_circular(good + [dict(good[1])])
    with pytest.raises(ValueError, match="mixed categories"):
        score_circular(good[:2] + [dict(good[2], category="logic")])
    with pytest.raises(ValueError, match="rotation must be an int"):
        score_circular([dict(good[0], rotation="0")])
    with pytest.raises(ValueError, match="lacks field 'group'"):
        score_circular([{k: v for k, v in good[0].items() if k != "group"}])


def test_parse_option_bad_option_letters():
    with pytest.raises(ValueError, match="letters must be"):
        parse_option("A", {"A": "cat", 2: "dog"})
