"""Yes/no scorers: POPE (LLaVA's eval_pope rule) and MME (official calculation.py rule)."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Mapping, Sequence

from eval.scorers.records import check_records, record_ref

logger = logging.getLogger(__name__)

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters",
    "celebrity", "scene", "landmark", "artwork", "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_YES_NO = ("yes", "no")


def _mme_gold(name: str, i: int, rec: Mapping[str, Any]) -> str:
    answer = rec["answer"]
    gold = str(answer).strip().lower()
    if gold not in _YES_NO:
        raise ValueError(f"{record_ref(name, i, rec)}: answer must be one of {_YES_NO} (any case), got {answer!r}")
    return gold


def pope_label(text: str) -> str:
    """Map a reply to "yes"/"no" exactly as LLaVA's eval_pope.py does.

    Keep the text before the first '.', delete commas, split on single spaces; the reply is "no"
    if a word is exactly "No", "no" or "not", else "yes". Consequences kept on purpose:
    "Yes, there is no doubt" -> "no"; "NO" / "Not really" / "No!" -> "yes" (case and other
    punctuation are not normalised); an empty reply -> "yes".

    Args:
        text: model output.
    Returns:
        "yes" or "no".
    """
    first = text.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _binary_metrics(preds: Sequence[str], golds: Sequence[str]) -> dict:
    """POPE metrics in %, positive class "yes". Zero denominators give 0 (precision with no
    predicted yes, recall with no gold yes, F1 when precision + recall == 0)."""
    tp = sum(p == "yes" and g == "yes" for p, g in zip(preds, golds))
    fp = sum(p == "yes" and g == "no" for p, g in zip(preds, golds))
    fn = sum(p == "no" and g == "yes" for p, g in zip(preds, golds))
    tn = len(preds) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / len(preds),
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * (tp + fp) / len(preds),
        "n": len(preds),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def score_pope(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict]:
    """Score POPE with LLaVA's answer rule (:func:`pope_label`).

    Args:
        records: dicts with "prediction" (str), "answer" and optional "split" (e.g. "random",
            "popular", "adversarial"). As in LLaVA's eval_pope.py, a gold answer is negative only
            if it is exactly "no"; anything else ("yes", "No", "true", ...) is positive. Answers
            other than "yes"/"no" are counted in a warning.
    Returns:
        (per-record 0/1 scores, overall metrics {"accuracy", "precision", "recall", "f1",
        "yes_ratio" (all %), "n", "tp", "fp", "tn", "fn", "per_split": {split: same keys},
        "f1_mean_splits": the mean of the splits' F1 (the overall F1 when there are no splits)}).
        Records without a split count only in the overall metrics.
    Raises:
        ValueError: on empty input or missing fields.
    """
    check_records(records, "score_pope", ("answer",))
    preds, golds, scores = [], [], []
    by_split: dict[str, list[int]] = defaultdict(list)
    odd = sum(rec["answer"] not in _YES_NO for rec in records)
    if odd:
        logger.warning("POPE: %d gold answers are neither 'yes' nor 'no'; counted positive as eval_pope.py does", odd)
    for i, rec in enumerate(records):
        gold, pred = "no" if rec["answer"] == "no" else "yes", pope_label(rec["prediction"])
        preds.append(pred)
        golds.append(gold)
        scores.append(float(pred == gold))
        if rec.get("split") is not None:
            by_split[str(rec["split"])].append(i)
    metrics = _binary_metrics(preds, golds)
    metrics["per_split"] = {
        split: _binary_metrics([preds[i] for i in idx], [golds[i] for i in idx])
        for split, idx in sorted(by_split.items())
    }
    # LLaVA-1.5 reports POPE as the mean F1 of its splits (random, popular, adversarial)
    split_f1 = [m["f1"] for m in metrics["per_split"].values()]
    metrics["f1_mean_splits"] = sum(split_f1) / len(split_f1) if split_f1 else metrics["f1"]
    logger.info("POPE: accuracy %.2f%% f1 %.2f%% over %d", metrics["accuracy"], metrics["f1"], len(preds))
    return scores, metrics


def mme_label(text: str) -> str:
    """Map a reply to "yes"/"no"/"other" with MME's official rule (eval_tool/calculation.py).

    Lowercase, but no whitespace strip (the official code strips nothing); "yes"/"no" as the whole
    reply are taken as is; otherwise look at the first 4 characters: containing "yes" -> "yes",
    else containing "no" -> "no", else "other". So "Yes, it is" -> yes, "No." -> no,
    "Not sure" / "None" -> no, "I see yes" -> other; " yes" and "yes\\n" -> yes (still in the
    first 4), but "  yes" -> other. The runner strips the decoded reply first, as LLaVA does.

    Args:
        text: model output.
    Returns:
        "yes", "no" or "other" ("other" is always scored wrong).
    """
    reply = text.lower()
    if reply in _YES_NO:
        return reply
    prefix = reply[:4]
    if "yes" in prefix:
        return "yes"
    return "no" if "no" in prefix else "other"


def _mme_subtask(correct: Sequence[float], images: Sequence[Any], name: str) -> dict:
    """acc (% questions), acc_plus (% images with both questions right), score = acc + acc_plus."""
    per_image: dict[Any, list[float]] = defaultdict(list)
    for ok, image in zip(correct, images):
        per_image[image].append(ok)
    bad = {img: len(v) for img, v in per_image.items() if len(v) != 2}
    if bad:
        sample = dict(list(bad.items())[:5])
        raise ValueError(f"MME subtask {name!r}: every image needs exactly 2 questions; counts {sample}")
    acc = 100.0 * sum(correct) / len(correct)
    acc_plus = 100.0 * sum(all(v) for v in per_image.values()) / len(per_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
            "n_questions": len(correct), "n_images": len(per_image)}


def score_mme(records: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict]:
    """Score MME: per-subtask acc + acc_plus, summed into perception and cognition totals.

    Args:
        records: dicts with "prediction" (str), "answer" ("Yes"/"No", any case), "category"
            (a name in MME_PERCEPTION or MME_COGNITION) and "image" (image id; 2 questions each,
            grouped per category).
    Returns:
        (per-record 0/1 scores, {"per_subtask": {name: {"acc", "acc_plus", "score", "n_questions",
        "n_images"}}, "perception", "cognition", "total", "other": count of unparsable replies,
        "missing_subtasks": names absent from the data (left out of the totals)}).
    Raises:
        ValueError: on empty input, missing fields, unknown subtasks, answers other than yes/no,
            or an image without exactly 2 questions.
    """
    check_records(records, "score_mme", ("answer", "category", "image"))
    known = MME_PERCEPTION + MME_COGNITION
    scores, other = [], 0
    groups: dict[str, tuple[list[float], list[Any]]] = defaultdict(lambda: ([], []))
    for i, rec in enumerate(records):
        if rec["category"] not in known:
            raise ValueError(f"{record_ref('score_mme', i, rec)} category {rec['category']!r} not in {list(known)}")
        gold, pred = _mme_gold("score_mme", i, rec), mme_label(rec["prediction"])
        other += pred == "other"
        scores.append(float(pred == gold))
        groups[rec["category"]][0].append(scores[-1])
        groups[rec["category"]][1].append(rec["image"])
    per_subtask = {name: _mme_subtask(*groups[name], name) for name in known if name in groups}
    metrics = {
        "per_subtask": per_subtask,
        "perception": sum(per_subtask[n]["score"] for n in MME_PERCEPTION if n in per_subtask),
        "cognition": sum(per_subtask[n]["score"] for n in MME_COGNITION if n in per_subtask),
        "other": other,
        "missing_subtasks": [n for n in known if n not in per_subtask],
    }
    metrics["total"] = metrics["perception"] + metrics["cognition"]
    if metrics["missing_subtasks"]:
        logger.warning("MME: subtasks missing from data, left out of totals: %s", metrics["missing_subtasks"])
    logger.info("MME: perception %.2f cognition %.2f", metrics["perception"], metrics["cognition"])
    return scores, metrics
