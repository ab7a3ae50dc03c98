"""LLaVA-1.5 evaluation layouts (POPE, GQA, TextVQA, VQAv2, VizWiz) as registered benchmarks.

The data root is LLaVA's ``playground/data/eval`` folder. File names follow LLaVA's
``scripts/v1_5/eval/*.sh`` and ``llava/eval/eval_*.py``. LLaVA ships only test questions for VQAv2
and VizWiz (scored by the EvalAI server): ``vqav2_testdev`` / ``vizwiz_test`` write the upload file,
``vqav2_val`` / ``vizwiz_val`` score the official *val* annotations locally.
LLaVA's question files already end with the short-answer instruction; loaders strip that trailing
suffix so the runner, which appends ``prompt_suffix``, does not add it twice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from eval.benchmarks import (
    BENCHMARKS, QUESTION_FIELDS, SHORT_ANSWER, Benchmark, read_jsonl, register, strip_suffix,
)
from eval.scorers.vqa import evalai_answer, score_gqa, score_textvqa, score_vizwiz, score_vqa
from eval.scorers.yesno import score_pope

logger = logging.getLogger(__name__)

POPE_SPLITS = ("adversarial", "popular", "random")
OCR_PREFIX = "Reference OCR token:"
VIZWIZ_SUFFIX = "When the provided information is insufficient, respond with 'Unanswerable'.\n" + SHORT_ANSWER


def read_json(path: Path) -> Any:
    """Parsed JSON of ``path``; a ValueError naming the file if it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


def _field(row: dict, key: str, source: Path, where: str) -> Any:
    if key not in row:
        raise ValueError(f"{source}: {where} lacks field {key!r}")
    return row[key]


# ---------------------------------------------------------------- POPE
def load_pope(files: dict[str, Path]) -> list[dict]:
    """POPE questions joined with the labels of ``pope/coco/coco_pope_<split>.json``.

    Like LLaVA's eval_pope.py, the i-th question of a category is paired with the i-th line of
    that category's label file; counts must agree and, where a label line has "image" / "text",
    they must match the question's (so a reordered or wrong file fails instead of mis-scoring).

    Raises:
        ValueError: on an unknown category, differing counts or a mismatched image/question.
    """
    questions = read_jsonl(files["questions"], QUESTION_FIELDS)
    by_split: dict[str, list[dict]] = {s: [] for s in POPE_SPLITS}
    for q in questions:
        split = _field(q, "category", files["questions"], f"question {q.get('question_id')!r}")
        if split not in by_split:
            raise ValueError(f"{files['questions']}: question {q['question_id']!r} category {split!r} "
                             f"not in {POPE_SPLITS}")
        by_split[split].append(q)
    samples = []
    for split in POPE_SPLITS:
        labels = read_jsonl(files[split])
        if by_split[split] and len(labels) != len(by_split[split]):
            raise ValueError(f"{files[split]}: {len(labels)} labels for {len(by_split[split])} "
                             f"{split!r} questions in {files['questions']}")
        for n, (q, lab) in enumerate(zip(by_split[split], labels), 1):
            text = strip_suffix(q["text"], SHORT_ANSWER)
            same = (lab.get("image", q["image"]) == q["image"]
                    and strip_suffix(lab.get("text", text), SHORT_ANSWER).strip() == text.strip())
            if not same:
                raise ValueError(f"{files[split]}:{n}: label line {lab!r} does not match question "
                                 f"{q['question_id']!r} ({q['image']}, {text!r})")
            answer = _field(lab, "label", files[split], f"line {n}")
            samples.append({**q, "text": text, "answer": answer, "split": split})
    return samples


# ---------------------------------------------------------------- GQA
def load_gqa(files: dict[str, Path]) -> list[dict]:
    """LLaVA's GQA testdev-balanced questions with answers from the official questions JSON
    (a dict question id -> {"answer", "types", ...}); ids are compared as strings."""
    gold = read_json(files["annotations"])
    if not isinstance(gold, dict):
        raise ValueError(f"{files['annotations']}: expected a dict question id -> question, got {type(gold).__name__}")
    samples = []
    for q in read_jsonl(files["questions"], QUESTION_FIELDS):
        entry = gold.get(str(q["question_id"]))
        if entry is None:
            raise ValueError(f"question {q['question_id']!r} has no answer in {files['annotations']}")
        answer = _field(entry, "answer", files["annotations"], f"question {q['question_id']!r}")
        samples.append({**q, "text": strip_suffix(q["text"], SHORT_ANSWER), "answer": answer,
                        "structural": entry.get("types", {}).get("structural")})
    return samples


# ---------------------------------------------------------------- TextVQA
def _textvqa_question(text: str) -> tuple[str, bool]:
    """(question line, whether an OCR-token line is present) of a LLaVA TextVQA prompt."""
    lines = [line for line in text.split("\n") if line.strip()]
    questions = [line for line in lines if not line.startswith(OCR_PREFIX)]
    if len(questions) != 1:
        raise ValueError(f"TextVQA prompt must have one question line besides the OCR line, got {text!r}")
    return questions[0], len(questions) != len(lines)


def load_textvqa(files: dict[str, Path]) -> list[dict]:
    """LLaVA's TextVQA val questions (OCR-token variant) with the 10 answers of TextVQA_0.5.1_val.json.

    LLaVA's question_id is the image id (several questions per image), so, like eval_textvqa.py,
    questions are matched on (image id, lowercased question). The sample's question_id becomes the
    official (unique) one; LLaVA's is kept as ``llava_question_id``.

    Raises:
        ValueError: on a malformed prompt or a question without an annotation.
    """
    data = _field(read_json(files["annotations"]), "data", files["annotations"], "the file")
    by_key = {(a["image_id"], a["question"].strip().lower()): a for a in data}
    samples = []
    for q in read_jsonl(files["questions"], QUESTION_FIELDS):
        text = strip_suffix(q["text"], SHORT_ANSWER)
        question, has_ocr = _textvqa_question(text)
        key = (Path(q["image"]).stem, question.strip().lower())
        ann = by_key.get(key)
        if ann is None:
            raise ValueError(f"question {q['question_id']!r} (image {key[0]}, {question!r}) has no answer "
                             f"in {files['annotations']}")
        samples.append({**q, "question_id": ann["question_id"], "llava_question_id": q["question_id"],
                        "text": text, "answers": list(ann["answers"]), "ocr_tokens_in_prompt": has_ocr})
    return samples


# ---------------------------------------------------------------- VQAv2 val
def load_vqav2_val(files: dict[str, Path]) -> list[dict]:
    """Official VQAv2 val2014 questions + annotations (10 human answers each); images
    ``COCO_val2014_%012d.jpg``."""
    questions = _field(read_json(files["questions"]), "questions", files["questions"], "the file")
    anns = _field(read_json(files["annotations"]), "annotations", files["annotations"], "the file")
    by_id = {a["question_id"]: a for a in anns}
    samples = []
    for q in questions:
        ann = by_id.get(q["question_id"])
        if ann is None:
            raise ValueError(f"question {q['question_id']!r} has no annotation in {files['annotations']}")
        samples.append({"question_id": q["question_id"], "image": f"COCO_val2014_{q['image_id']:012d}.jpg",
                        "text": q["question"], "answers": [a["answer"] for a in ann["answers"]],
                        "answer_type": ann.get("answer_type")})
    return samples


# ---------------------------------------------------------------- VizWiz val
def load_vizwiz_val(files: dict[str, Path]) -> list[dict]:
    """Official VizWiz-VQA val.json (a list, one question per image); question_id = image stem."""
    rows = read_json(files["annotations"])
    if not isinstance(rows, list):
        raise ValueError(f"{files['annotations']}: expected a list of questions, got {type(rows).__name__}")
    samples = []
    for n, row in enumerate(rows):
        image = _field(row, "image", files["annotations"], f"entry {n}")
        answers = _field(row, "answers", files["annotations"], f"entry {n}")
        samples.append({"question_id": Path(image).stem, "image": image,
                        "text": _field(row, "question", files["annotations"], f"entry {n}"),
                        "answers": [a["answer"] for a in answers], "answerable": row.get("answerable"),
                        "answer_type": row.get("answer_type")})
    return samples


def _score_vizwiz(records: list[dict]) -> tuple[list[float], dict]:
    # "answerable" is None when the annotation lacks it: let the scorer fall back to the answers
    return score_vizwiz([{k: v for k, v in r.items() if not (k == "answerable" and v is None)}
                         for r in records])


# ---------------------------------------------------------------- server-scored test splits
def load_test_questions(files: dict[str, Path]) -> list[dict]:
    """LLaVA's test question jsonl (no answers here: the evaluation server scores the submission file)."""
    return [{**q, "text": strip_suffix(q["text"], VIZWIZ_SUFFIX) if "Unanswerable" in q["text"]
             else strip_suffix(q["text"], SHORT_ANSWER)}
            for q in read_jsonl(files["questions"], QUESTION_FIELDS)]


def vqav2_submission(records: list[dict]) -> list[dict]:
    """EvalAI VQAv2 upload: [{question_id, answer}], each answer through the EvalAI answer processor
    (:func:`eval.scorers.vqa.evalai_answer`, as LLaVA's convert_vqav2_for_submission.py)."""
    return [{"question_id": r["question_id"], "answer": evalai_answer(r["prediction"])} for r in records]


def vizwiz_submission(records: list[dict]) -> list[dict]:
    """EvalAI VizWiz upload: [{image, answer}], answers as :func:`vqav2_submission`'s
    (LLaVA's convert_vizwiz_for_submission.py)."""
    return [{"image": Path(str(r["image"])).name, "answer": evalai_answer(r["prediction"])} for r in records]


def _server_scored(records: list[dict]) -> tuple[list[None], dict]:
    return [None] * len(records), {"status": "not scored here: upload submission.json to the EvalAI server",
                                   "n": len(records)}


LLAVA_VQA_BENCHMARKS = (
    Benchmark(
        name="pope", image_folder="pope/val2014", load=load_pope, score=score_pope,
        files={"questions": "pope/llava_pope_test.jsonl",
               **{s: f"pope/coco/coco_pope_{s}.json" for s in POPE_SPLITS}},
        prompt_suffix=SHORT_ANSWER, max_new_tokens=8, main_metric="f1_mean_splits",
        description="POPE (COCO val2014, LLaVA's llava_pope_test.jsonl); metrics per split under per_split; "
                    "LLaVA-1.5 reports the mean F1 of the three splits"),
    Benchmark(
        name="gqa", image_folder="gqa/data/images", load=load_gqa, score=score_gqa,
        files={"questions": "gqa/llava_gqa_testdev_balanced.jsonl",
               "annotations": "gqa/data/testdev_balanced_questions.json"},
        prompt_suffix=SHORT_ANSWER, group_by=("structural",),
        description="GQA testdev-balanced, exact match (LLaVA's rule); groups by structural question type"),
    Benchmark(
        name="textvqa", image_folder="textvqa/train_images", load=load_textvqa, score=score_textvqa,
        files={"questions": "textvqa/llava_textvqa_val_v051_ocr.jsonl",
               "annotations": "textvqa/TextVQA_0.5.1_val.json"},
        prompt_suffix=SHORT_ANSWER,
        description="TextVQA val v0.5.1, VQA soft accuracy; prompts carry LLaVA's 'Reference OCR token:' "
                    "line (the OCR-token variant LLaVA-1.5 reports), flagged per sample as ocr_tokens_in_prompt"),
    Benchmark(
        name="vqav2_val", image_folder="vqav2/val2014", load=load_vqav2_val, score=score_vqa,
        files={"questions": "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
               "annotations": "vqav2/v2_mscoco_val2014_annotations.json"},
        prompt_suffix=SHORT_ANSWER, group_by=("answer_type",),
        description="VQAv2 val2014 (official questions/annotations, scored locally; LLaVA-1.5 reports "
                    "test-dev from the server), groups by answer type"),
    Benchmark(
        name="vizwiz_val", image_folder="vizwiz/val", load=load_vizwiz_val, score=_score_vizwiz,
        files={"annotations": "vizwiz/val.json"}, prompt_suffix=VIZWIZ_SUFFIX,
        description="VizWiz-VQA val (official val.json, scored locally; LLaVA-1.5 reports test-dev), "
                    "LLaVA's 'Unanswerable' prompt; accuracy also split by answerability"),
    Benchmark(
        name="vqav2_testdev", image_folder="vqav2/test2015", load=load_test_questions, score=_server_scored,
        files={"questions": "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl"}, prompt_suffix=SHORT_ANSWER,
        submission=vqav2_submission,
        description="VQAv2 test-dev (LLaVA-1.5's reported split): writes submission.json for EvalAI"),
    Benchmark(
        name="vizwiz_test", image_folder="vizwiz/test", load=load_test_questions, score=_server_scored,
        files={"questions": "vizwiz/llava_test.jsonl"}, prompt_suffix=VIZWIZ_SUFFIX,
        submission=vizwiz_submission,
        description="VizWiz-VQA test (LLaVA-1.5's reported split): writes submission.json for EvalAI"),
)

for _bench in LLAVA_VQA_BENCHMARKS:
    if _bench.name not in BENCHMARKS:  # idempotent: eval.benchmarks may import this module too
        register(_bench)
