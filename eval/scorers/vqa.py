"""Open-ended VQA scorers: VQAv2 / TextVQA / VizWiz soft accuracy (official rules) and GQA exact match.

Answer processing per benchmark (the scorer each reference number comes from):

* ``vqav2_val`` (official VQA evaluation, GT-Vision-Lab/VQA vqaEval.py; EvalAI's and LAVIS's copies
  are the same): the prediction always goes through :func:`normalize_answer`; the human answers get
  only the punctuation rule, and only when they are not all identical (:func:`official_vqa_answers`).
* ``vizwiz_val`` (official VizWiz-VQA evaluation): the prediction through :func:`normalize_answer`;
  the human answers are compared as stored.
* Both scorers also take ``normalization="always"``: :func:`normalize_answer` on the prediction and
  on every human answer, unconditionally (more lenient: a human "Two" then matches "2").
* ``textvqa`` (LLaVA's eval_textvqa.py, i.e. the m4c TextVQA evaluator): :func:`evalai_answer`, the
  EvalAI answer processor = the :func:`evalai_word_tokenize` pre-step, then :func:`normalize_answer`,
  on the prediction and on every human answer, unconditionally.
* ``vqav2_testdev``, ``vizwiz_test`` submission files: each prediction goes through
  :func:`evalai_answer`, as LLaVA's convert_vqav2/vizwiz_for_submission.py do; the server then
  applies the official rule.
* GQA: :func:`gqa_match` (LLaVA's rule), no EvalAI processing.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Mapping, Sequence

from eval.scorers.records import check_records

logger = logging.getLogger(__name__)

# Official answer-normalisation tables (VQA evaluation code as run by EvalAI, LLaVA, lmms-eval).
# Contractions are stored as "missing=fixed" pairs. Keys with capitals ("Im", "Ive", ...) and the
# reversed "somebody'd=somebodyd" entry are kept as in the official table; the capitalised keys
# can never fire because the text is lowercased before the lookup.
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've
something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas
wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's
whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(p.split("=") for p in _CONTRACTION_PAIRS.split())
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# EvalAI punctuation list (the one LLaVA / lmms-eval use); "." and "'" are not in it.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
               ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA = re.compile(r"\d,\d")  # exactly one comma, as the official "(\d)(\,)(\d)": "1,,2" is no match
# The official pattern "(?!<=\d)(\.)(?!\d)" opens with a mistyped look-behind that is really a
# look-ahead and always passes, so it removes every "." not followed by a digit ("3.5" survives,
# "yes." does not). It is called with re.UNICODE (== 32) in the count slot: at most 32 removals.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_MAX_REMOVALS = 32
UNANSWERABLE = "unanswerable"


def _strip_punctuation(text: str) -> str:
    """Official punctuation rule. Each mark is deleted if it touches a space anywhere in the input
    (or if the input has a digit-comma-digit such as "1,000": then every mark is deleted), else it
    becomes a space ("t-shirt" -> "t shirt", "red, blue" -> "red blue", "1,000" -> "1000").
    No lowercasing or whitespace strip: the official script applies this alone to the human answers."""
    out = text
    has_digit_comma = _DIGIT_COMMA.search(text) is not None
    for mark in PUNCTUATION:
        touches_space = (mark + " ") in text or (" " + mark) in text  # tested on the input text
        out = out.replace(mark, "" if touches_space or has_digit_comma else " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVALS)


def normalize_answer(text: str) -> str:
    """Normalise an answer exactly as the official VQA / EvalAI evaluation does.

    Steps: newlines/tabs -> spaces and strip; punctuation rule (see ``_strip_punctuation``);
    remove periods not followed by a digit; lowercase; split on whitespace; number words
    none/zero..ten -> digits; drop articles a/an/the; expand the official contractions
    ("dont" -> "don't"); join with single spaces. E.g. "Two dogs." -> "2 dogs",
    "The 1,000" -> "1000", "3.5" -> "3.5", "It's" -> "it's".

    Args:
        text: a model prediction or a human answer.
    Returns:
        The normalised answer (may be "" for e.g. "a" or "?").
    Raises:
        ValueError: if ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise ValueError(f"normalize_answer: text must be str, got {type(text).__name__}")
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def evalai_word_tokenize(text: str) -> str:
    """The pre-step of the EvalAI answer processor (LLaVA's TextVQA scorer and submission converters).

    Lowercase; delete every "," and "?"; "'s" -> " 's"; strip. Deleting commas before the
    punctuation rule changes its outcome: "1,000-2" -> "1000-2" (no digit comma left, so "-" then
    becomes a space), "red,blue" -> "redblue". E.g. "Dog's?" -> "dog 's".

    Raises:
        ValueError: if ``text`` is not a str.
    """
    if not isinstance(text, str):
        raise ValueError(f"evalai_word_tokenize: text must be str, got {type(text).__name__}")
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def evalai_answer(text: str) -> str:
    """The whole EvalAI answer processor: :func:`evalai_word_tokenize`, then :func:`normalize_answer`.
    E.g. "Dog's?" -> "dog 's", "What's" -> "what 's", "1,000-2" -> "1000 2", "Two, please" -> "2 please".

    Raises:
        ValueError: if ``text`` is not a str.
    """
    return normalize_answer(evalai_word_tokenize(text))


NORMALIZATIONS = ("official", "always")


def official_vqa_answers(answers: Sequence[str]) -> list[str]:
    """The human answers as the official VQA script compares them: the punctuation rule alone (no
    lowercasing, strip, number words or articles), and only when the answers are not all identical.
    E.g. ["Two"] * 10 stays ["Two"] * 10 (so "two" -> "2" scores 0), ["red-white", "red"] ->
    ["red white", "red"]."""
    return [_strip_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)


def _soft_score(hits: Sequence[bool]) -> float:
    """Mean over the leave-one-out subsets of min(1, matches / threshold); ``hits[i]``: whether human
    answer i matches. Leaving out answer i leaves k - hits[i] matches. Terms are summed in answer
    order like the official script, so N >= 4 (threshold 3) gives its exact float, not just a close one."""
    n, k = len(hits), sum(hits)
    if n == 1:
        return float(k)  # single reference: plain exact match
    threshold = min(3, n - 1)
    return sum(min(1, (k - hit) / threshold) for hit in hits) / n


def vqa_accuracy(prediction: str, answers: Sequence[str], normalize: Callable[[str], str] = normalize_answer,
                 process_answers: Callable[[Sequence[str]], list[str]] | None = None) -> float:
    """VQA soft accuracy of one prediction against the human answers.

    The prediction goes through ``normalize`` (:func:`normalize_answer`, or :func:`evalai_answer` for
    TextVQA); the answers through ``process_answers`` (e.g. :func:`official_vqa_answers`), or through
    ``normalize`` each when it is None (the "always" rule). For each of the N
    answers, the other N-1 are kept and the prediction scores min(1, #matches / 3); the result
    is the mean over the N subsets. With N = 10 and k matching humans: k=0 -> 0, 1 -> 0.3,
    2 -> 0.6, 3 -> 0.9, k>=4 -> 1.0.
    Other N (not in VQAv2/TextVQA/VizWiz): N >= 4 uses the same rule; N = 2 or 3 divides by
    N-1 instead of 3 so that full agreement can reach 1.0; N = 1 is exact match (the official
    code would always give 0 there).

    Args:
        prediction: model output (a short answer).
        answers: the human answers, N >= 1.
        normalize: answer processing of the prediction (and of the answers when
            ``process_answers`` is None).
        process_answers: processing of the list of human answers, or None.
    Returns:
        Accuracy in [0, 1].
    Raises:
        ValueError: if ``answers`` is empty or any item is not a str.
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"vqa_accuracy: answers must be a non-empty list of str, got {answers!r}")
    pred = normalize(prediction)
    refs = [normalize(a) for a in answers] if process_answers is None else process_answers(answers)
    return _soft_score([ref == pred for ref in refs])


def _score_soft(records: Sequence[Mapping[str, Any]], name: str, normalize: Callable[[str], str],
                normalization: str, official: Callable[[Sequence[str]], list[str]] | None
                ) -> tuple[list[float], dict]:
    """Soft accuracy of every record; ``official`` is the benchmark's human-answer rule used when
    ``normalization == "official"``."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{name}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    check_records(records, name, str_lists=("answers",))
    process = official if normalization == "official" else None
    scores = [vqa_accuracy(rec["prediction"], rec["answers"], normalize, process) for rec in records]
    metrics = {"accuracy": 100.0 * sum(scores) / len(scores), "n": len(scores), "normalization": normalization}
    logger.info("%s: accuracy %.2f%% over %d (%s normalization)", name, metrics["accuracy"], metrics["n"],
                normalization)
    return scores, metrics


def score_vqa(records: Sequence[Mapping[str, Any]], normalization: str = "official") -> tuple[list[float], dict]:
    """Score VQAv2-style records with :func:`vqa_accuracy`.

    Args:
        records: dicts with "prediction" (str) and "answers" (list of human answers).
        normalization: "official" (default; the VQA script: prediction always normalised, answers
            as :func:`official_vqa_answers`) or "always" (:func:`normalize_answer` on both sides).
    Returns:
        (per-record scores in [0, 1], {"accuracy": mean score in %, "n": number of records,
        "normalization": the mode used}).
    Raises:
        ValueError: on empty input, a missing field, a non-str prediction, bad answers or an
            unknown ``normalization``.
    """
    return _score_soft(records, "score_vqa", normalize_answer, normalization, official_vqa_answers)


def score_textvqa(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict]:
    """TextVQA as LLaVA scores it (m4c evaluator): :func:`evalai_answer` on the prediction and on all
    answers, unconditionally (m4c's own rule, reported as ``"normalization": "always"``), then the
    soft accuracy of :func:`vqa_accuracy` (10 answers per question)."""
    return _score_soft(records, "score_textvqa", evalai_answer, "always", None)


def vizwiz_prediction(text: str) -> str:
    """Canonical form of a VizWiz reply: :func:`normalize_answer` only, so "Unanswerable." ->
    "unanswerable". Paraphrases ("I cannot answer") are deliberately not mapped; LLaVA's VizWiz
    prompt asks the model to reply "Unanswerable" itself."""
    return normalize_answer(text)


def is_unanswerable(record: Mapping[str, Any]) -> bool:
    """Whether a VizWiz record belongs to the unanswerable subset.

    Uses the annotation's "answerable" flag (0/1 or bool) when the record has one; otherwise
    a strict majority (more than N/2) of the normalised human answers must be "unanswerable".

    Raises:
        ValueError: if "answerable" is present but not 0/1/bool.
    """
    if "answerable" in record:
        flag = record["answerable"]
        if flag not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"answerable must be 0/1 or bool, got {flag!r}")
        return not flag
    answers = record["answers"]
    return 2 * sum(normalize_answer(a) == UNANSWERABLE for a in answers) > len(answers)


def score_vizwiz(records: Sequence[Mapping[str, Any]], normalization: str = "official"
                 ) -> tuple[list[float], dict]:
    """VizWiz-VQA: VQA soft accuracy, overall and split by answerability.

    Args:
        records: dicts with "prediction", "answers" and optional "answerable" (see
            :func:`is_unanswerable` for how the subsets are formed).
        normalization: "official" (default; the VizWiz script: prediction through
            :func:`normalize_answer`, human answers compared as stored) or "always" (both sides).
    Returns:
        (per-record scores, {"accuracy", "n", "normalization", "accuracy_unanswerable",
        "n_unanswerable", "accuracy_answerable", "n_answerable"}); accuracies in %, NaN for an
        empty subset.
    Raises:
        ValueError: as :func:`score_vqa`, or on a bad "answerable" flag.
    """
    scores, metrics = _score_soft(records, "score_vizwiz", normalize_answer, normalization, list)
    unans = [is_unanswerable(rec) for rec in records]
    for key, want in (("unanswerable", True), ("answerable", False)):
        subset = [s for s, u in zip(scores, unans) if u == want]
        metrics[f"accuracy_{key}"] = 100.0 * sum(subset) / len(subset) if subset else float("nan")
        metrics[f"n_{key}"] = len(subset)
    return scores, metrics


def gqa_match(prediction: str, answer: str) -> bool:
    """GQA exact match, LLaVA's rule (convert_gqa_for_eval.py, then the official GQA eval.py): the
    prediction with trailing periods dropped and lowercased must equal the gold answer as stored.
    No whitespace strip, as there: LLaVA (and our runner) strip the decoded reply before scoring,
    so " left" or "left\\n" here means the reply really had it, and it counts wrong.

    Args:
        prediction: model output.
        answer: the GQA gold answer.
    Returns:
        True if the normalised strings are equal.
    Raises:
        ValueError: if either argument is not a str.
    """
    if not isinstance(prediction, str) or not isinstance(answer, str):
        raise ValueError(f"gqa_match: prediction and answer must be str, got {prediction!r}, {answer!r}")
    return prediction.rstrip(".").lower() == answer


def score_gqa(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict]:
    """Score GQA with :func:`gqa_match`.

    Args:
        records: dicts with "prediction" (str) and "answer" (str).
    Returns:
        (per-record 0/1 scores, {"accuracy": % correct, "n": number of records}).
    Raises:
        ValueError: on empty input, a missing field or non-str values.
    """
    check_records(records, "score_gqa", ("answer",))
    scores = [float(gqa_match(rec["prediction"], rec["answer"])) for rec in records]
    metrics = {"accuracy": 100.0 * sum(scores) / len(scores), "n": len(scores)}
    logger.info("score_gqa: accuracy %.2f%% over %d", metrics["accuracy"], metrics["n"])
    return scores, metrics
