"""Multiple-choice scorers: option-letter parsing, plain accuracy and MMBench circular evaluation."""

from __future__ import annotations

import logging
import re
import string
from collections import defaultdict
from typing import Any, Mapping, Sequence

from eval.scorers.records import check_records, record_ref

logger = logging.getLogger(__name__)

# One-letter English words: as a free-standing token inside a longer reply they are
# more likely words ("A cat", "I think") than option letters.
_WORD_LETTERS = frozenset({"A", "I"})
# Reply that is only a letter, optionally wrapped/punctuated: "B", "B.", "(B)", "[B]", "B:".
_BARE = re.compile(r"^[(\[]?([A-Z])[)\]]?[.:,;!]?$")
# Reply that starts with an option marker: "(B) cat", "B. cat", "B) cat", "B: cat", "B, because", "B\n..".
_LEADING = re.compile(r"^(?:[(\[]([A-Z])[)\]]|([A-Z])(?:[.):,;]|\s*\n))")
# Explicit answer statements: "The answer is B.", "Answer: (B)", "correct option is C", "answer - D".
_STATEMENT = re.compile(
    r"(?i:\b(answer|option|choice)\b(?:\s+(?:is|would\s+be|should\s+be))?)"
    r"\s*[:\-]?\s*[(\[]?([A-Z])(?![A-Za-z0-9])"
)
# A letter marker followed by more text, for "A cat" == "A" + option A's text.
_LEADING_WORD = re.compile(r"^[(\[]?([A-Z])[)\].:]?\s+(.+)$", re.S)
_SPLIT_CHARS = re.compile(r"[\s.,:;!?()\[\]{}\"'*#`]+")


def _check_letters(letters: Sequence[str]) -> list[str]:
    letters = list(letters)
    bad = [x for x in letters if not (isinstance(x, str) and len(x) == 1 and x in string.ascii_uppercase)]
    if not letters or bad:
        raise ValueError(f"letters must be a non-empty sequence of single letters A-Z, got {letters!r}")
    return letters


def parse_option_letter(text: str, letters: Sequence[str]) -> str | None:
    """Extract the option letter a model answered.

    Rules, first hit wins (letters are matched case-sensitively, so "a" is never option A):
      1. the whole reply is a letter, optionally wrapped/punctuated: "B", "B.", "(B)";
      2. the reply starts with an option marker: "(B) cat", "B. cat", "B) cat", "B: cat";
      3. an answer statement: "The answer is B.", "Answer: B", then "option/choice X"
         ("the correct option is (C)"); conflicting letters within a tier -> None;
      4. exactly one distinct letter occurs as a free-standing token ("It's B"), unless it
         is "A"/"I" in a multi-token reply (likely English words: "A cat", "I think").
    A letter inside a word ("Bird", "ABC") never counts; letters outside ``letters`` are ignored.

    Args:
        text: model output.
        letters: allowed option letters, e.g. ["A", "B", "C", "D"].
    Returns:
        The letter, or None if no unambiguous letter was found.
    Raises:
        ValueError: if ``letters`` is empty or holds anything but single uppercase letters.
    """
    allowed = set(_check_letters(letters))
    cleaned = text.replace("*", "").strip()
    if not cleaned:
        return None
    bare = _BARE.match(cleaned)
    if bare:
        return bare.group(1) if bare.group(1) in allowed else None
    lead = _LEADING.match(cleaned)
    if lead:
        letter = lead.group(1) or lead.group(2)
        if letter in allowed:
            return letter
    statements = [(m.group(1).lower() == "answer", m.group(2)) for m in _STATEMENT.finditer(cleaned)]
    for want_answer in (True, False):  # "answer ..." statements outrank "option/choice X"
        stated = {x for is_answer, x in statements if is_answer == want_answer} & allowed
        if stated:
            return stated.pop() if len(stated) == 1 else None
    tokens = [t for t in _SPLIT_CHARS.split(cleaned) if t]
    found = {t for t in tokens if t in allowed}
    if len(found) != 1:
        return None
    letter = found.pop()
    return None if (letter in _WORD_LETTERS and len(tokens) > 1) else letter


def _normalize(text: str) -> str:
    return " ".join(_SPLIT_CHARS.split(text.lower())).strip()


def parse_option(text: str, options: Mapping[str, str]) -> str | None:
    """Extract the chosen option letter, also accepting the option text itself.

    First :func:`parse_option_letter` over the option letters. Otherwise the reply is compared
    with each option text (both lowercased, punctuation dropped): it matches option X if it equals
    X's text, or is the uppercase letter X followed by X's text ("A cat" / "(A) cat" for A="cat").
    Exactly one matching option -> its letter; none or several -> None (e.g. "A cat" with
    A="cat" and B="a cat" is ambiguous, while "a cat" is B).

    Args:
        text: model output.
        options: letter -> option text.
    Returns:
        The letter, or None.
    Raises:
        ValueError: if the option letters are invalid.
    """
    letter = parse_option_letter(text, list(options))
    if letter is not None:
        return letter
    reply = _normalize(text)
    lead = _LEADING_WORD.match(text.replace("*", "").strip())
    rest = (lead.group(1), _normalize(lead.group(2))) if lead else (None, None)
    hits = set()
    for key, option_text in options.items():
        norm = _normalize(str(option_text))
        if norm and (reply == norm or rest == (key, norm)):
            hits.add(key)
    return hits.pop() if len(hits) == 1 else None


def _check_choice_records(records: Sequence[Mapping[str, Any]], name: str, extra: Sequence[str] = ()) -> None:
    """The shared checks, then options: a non-empty letter -> text dict that holds the answer."""
    check_records(records, name, ("answer", "options", *extra))
    for i, rec in enumerate(records):
        where, options = record_ref(name, i, rec), rec["options"]
        if not isinstance(options, Mapping) or not options:
            raise ValueError(f"{where}: options must be a non-empty dict, got {options!r}")
        if rec["answer"] not in options:
            raise ValueError(f"{where}: answer {rec['answer']!r} not in option letters {sorted(options)}")


def _score_one(rec: Mapping[str, Any]) -> tuple[float, bool]:
    """Return (0/1 score, parsed?) for one validated record."""
    letter = parse_option(rec["prediction"], rec["options"])
    return float(letter == rec["answer"]), letter is not None


def _pct(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def score_multiple_choice(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict]:
    """Score single-pass multiple choice (ScienceQA-IMG, SEED-Bench).

    An unparsable reply scores 0 (LLaVA's ScienceQA script picks a random option instead;
    that is not reproducible, so we count it wrong and report it under "unparsed").

    Args:
        records: dicts with "prediction" (str), "answer" (letter), "options" (letter -> text)
            and optional "category".
    Returns:
        (per-record 0/1 scores, {"accuracy": %, "n", "unparsed": count, "per_category": {cat: %}});
        per_category covers only records that carry a category.
    Raises:
        ValueError: on empty input or malformed records.
    """
    _check_choice_records(records, "score_multiple_choice")
    scores, unparsed = [], 0
    by_cat: dict[str, list[float]] = defaultdict(list)
    for rec in records:
        score, parsed = _score_one(rec)
        scores.append(score)
        unparsed += not parsed
        if rec.get("category") is not None:
            by_cat[str(rec["category"])].append(score)
    metrics = {
        "accuracy": _pct(scores),
        "n": len(scores),
        "unparsed": unparsed,
        "per_category": {cat: _pct(v) for cat, v in sorted(by_cat.items())},
    }
    logger.info("multiple choice: accuracy %.2f%% over %d (unparsed %d)", metrics["accuracy"], len(scores), unparsed)
    return scores, metrics


def _group_results(records: Sequence[Mapping[str, Any]], scores: Sequence[float]) -> dict[Any, dict]:
    """Collect per-group rotations, scores and category; validate rotations are 0..k-1."""
    groups: dict[Any, dict] = {}
    for rec, score in zip(records, scores):
        g = groups.setdefault(rec["group"], {"rot": {}, "category": rec.get("category")})
        rot = rec["rotation"]
        if not isinstance(rot, int) or isinstance(rot, bool) or rot < 0:
            raise ValueError(f"group {rec['group']!r}: rotation must be an int >= 0, got {rot!r}")
        if rot in g["rot"]:
            raise ValueError(f"group {rec['group']!r}: duplicate rotation {rot}")
        if rec.get("category") != g["category"]:
            raise ValueError(f"group {rec['group']!r}: mixed categories {g['category']!r} and {rec.get('category')!r}")
        g["rot"][rot] = score
    for key, g in groups.items():
        if sorted(g["rot"]) != list(range(len(g["rot"]))):
            raise ValueError(f"group {key!r}: rotations must be 0..k-1, got {sorted(g['rot'])}")
    return groups


def score_circular(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict]:
    """Score MMBench circular evaluation: a question counts only if every rotation is right.

    Args:
        records: dicts as for :func:`score_multiple_choice` plus "group" (original question id)
            and "rotation" (0..k-1, each exactly once per group).
    Returns:
        (per-record 0/1 scores of each record itself, {"accuracy": % of groups fully right,
        "n_groups", "n", "unparsed", "single_pass_accuracy": % of rotation-0 records right,
        "per_category": {cat: % of groups}}).
    Raises:
        ValueError: on empty input, malformed records or bad rotations.
    """
    _check_choice_records(records, "score_circular", extra=("group", "rotation"))
    scores, unparsed = [], 0
    for rec in records:
        score, parsed = _score_one(rec)
        scores.append(score)
        unparsed += not parsed
    groups = _group_results(records, scores)
    group_ok = {key: float(all(v == 1.0 for v in g["rot"].values())) for key, g in groups.items()}
    by_cat: dict[str, list[float]] = defaultdict(list)
    for key, g in groups.items():
        if g["category"] is not None:
            by_cat[str(g["category"])].append(group_ok[key])
    metrics = {
        "accuracy": _pct(list(group_ok.values())),
        "n_groups": len(groups),
        "n": len(scores),
        "unparsed": unparsed,
        "single_pass_accuracy": _pct([g["rot"][0] for g in groups.values()]),
        "per_category": {cat: _pct(v) for cat, v in sorted(by_cat.items())},
    }
    logger.info("circular: accuracy %.2f%% over %d groups", metrics["accuracy"], len(groups))
    return scores, metrics


def rotate_options(options: Mapping[str, str], answer: str, k: int) -> list[tuple[dict, str]]:
    """Make the first ``k`` circular shifts of the option texts over the same (sorted) letters.

    In rotation r the letter at position j holds the original text at position (j + r) mod n,
    so the answer text moves from position a to (a - r) mod n. Rotation 0 is the original.
    E.g. {A: cat, B: dog, C: owl}, answer A, rotation 1 -> {A: dog, B: owl, C: cat}, answer C.

    Args:
        options: letter -> option text.
        answer: correct letter (a key of ``options``).
        k: number of rotations, 1 <= k <= len(options).
    Returns:
        k (options, answer_letter) pairs.
    Raises:
        ValueError: on bad letters, an answer not among them or k out of range.
    """
    letters = sorted(_check_letters(list(options)))
    if answer not in options:
        raise ValueError(f"answer {answer!r} not in option letters {letters}")
    n = len(letters)
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, {n}] (number of options), got {k!r}")
    texts = [options[x] for x in letters]
    a = letters.index(answer)
    return [({letters[j]: texts[(j + r) % n] for j in range(n)}, letters[(a - r) % n]) for r in range(k)]
