"""LLaVA-1.5 evaluation layouts: ScienceQA-IMG, MME, MMBench (EN/CN, circular) and SEED-Bench (image part).

The data root is LLaVA's ``playground/data/eval``; file names follow LLaVA's ``scripts/v1_5/eval/*.sh``.
Importing this module registers the benchmarks (idempotent, so a second import is harmless).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import logging
from pathlib import Path, PurePosixPath
from typing import Any

from eval.benchmarks import (
    BENCHMARKS, OPTION_LETTER, QUESTION_FIELDS, SHORT_ANSWER, Benchmark, MissingBenchmarkFile, read_jsonl, register,
    strip_suffix,
)
from eval.scorers.choice import rotate_options, score_circular, score_multiple_choice
from eval.scorers.yesno import MME_COGNITION, MME_PERCEPTION, score_mme

logger = logging.getLogger(__name__)

MMBENCH_CN_SUFFIX = "请直接回答选项字母。"
_LETTERS = "ABCDEFGHIJ"
# Cells pandas reads as NaN (LLaVA's model_vqa_mmbench reads the tsv with pandas and drops NaN options/hints).
_NA_CELLS = frozenset({"", "nan", "NaN", "-nan", "None", "none", "NA", "N/A", "n/a", "NULL", "null", "#N/A", "<NA>"})
_MME_YES_NO = "Please answer yes or no."


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


# ---------------------------------------------------------------- ScienceQA-IMG
def load_scienceqa(files: dict[str, Path]) -> list[dict]:
    """ScienceQA test questions that have an image (LLaVA's ``llava_test_CQM-A.json`` + ``problems.json``).

    The question text is the human turn without ``<image>``; a trailing OPTION_LETTER instruction is
    removed (the runner appends it). Gold answer index -> letter; options from ``problems.json`` choices.
    Entries whose id is not in ``pid_splits.json["test"]`` are skipped.

    Args:
        files: resolved files with roles "questions", "problems", "splits".
    Returns:
        Samples {question_id, image, text, answer, options, subject, category, grade}.
    Raises:
        ValueError: on an id missing from problems.json or a malformed entry.
    """
    entries, problems = _read_json(files["questions"]), _read_json(files["problems"])
    splits = _read_json(files["splits"])
    if "test" not in splits:
        raise ValueError(f"{files['splits']}: no 'test' split (keys {sorted(splits)[:10]})")
    test_ids = {str(x) for x in splits["test"]}
    samples, skipped = [], 0
    for entry in entries:
        pid = str(entry["id"])
        if "image" not in entry:
            continue
        if pid not in test_ids:
            skipped += 1
            continue
        prob = problems.get(pid)
        if prob is None:
            raise ValueError(f"ScienceQA question {pid!r} of {files['questions']} is not in {files['problems']}")
        options = {_LETTERS[i]: str(c) for i, c in enumerate(prob["choices"])}
        if not 0 <= int(prob["answer"]) < len(options):
            raise ValueError(f"ScienceQA {pid!r}: answer index {prob['answer']} outside {len(options)} choices")
        human = entry["conversations"][0]["value"].replace("<image>", "")
        samples.append({
            "question_id": pid, "image": entry["image"], "text": strip_suffix(human, OPTION_LETTER),
            "answer": _LETTERS[int(prob["answer"])], "options": options, "subject": prob.get("subject"),
            "category": prob.get("category"), "grade": prob.get("grade"),
        })
    if skipped:
        logger.warning("ScienceQA: skipped %d image questions not in the test split", skipped)
    return samples


# ---------------------------------------------------------------- MME
def _mme_key(question: str) -> str:
    """Question normalised for matching LLaVA's text with the GT txt (LLaVA's convert_answer_to_mme rule,
    made whitespace-insensitive): without the short-answer and yes/no instructions, spaces collapsed."""
    return " ".join(question.replace(SHORT_ANSWER, " ").replace(_MME_YES_NO, " ").split())


def _mme_gt(folder: Path, category: str, stem: str) -> tuple[Path, dict[str, str]]:
    """Read ``<category>/questions_answers_YN/<stem>.txt`` or ``<category>/<stem>.txt`` (question \\t Yes/No)."""
    candidates = [folder / category / "questions_answers_YN" / f"{stem}.txt", folder / category / f"{stem}.txt"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise MissingBenchmarkFile(f"mme: ground-truth file expected at {candidates[0]} or {candidates[1]}")
    answers = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            raise ValueError(f"{path}:{n}: expected 'question<TAB>Yes/No', got {line!r}")
        answers[_mme_key(parts[-2])] = parts[-1].strip()
    return path, answers


def load_mme(files: dict[str, Path]) -> list[dict]:
    """MME from LLaVA's ``llava_mme.jsonl`` with gold answers from the official release's txt files.

    ``question_id`` is "<subtask>/<image file>"; the GT file is the image's stem + ".txt" in the subtask
    folder (or its ``questions_answers_YN`` folder), matched by question text. A trailing
    SHORT_ANSWER instruction is removed from the text (the runner appends it).

    Args:
        files: resolved files with roles "questions" and "images" (MME_Benchmark_release_version).
    Returns:
        Samples {question_id, image, text, answer (Yes/No), category}.
    Raises:
        MissingBenchmarkFile: if a GT txt file is missing.
        ValueError: on an unknown subtask or a question not found in its GT file.
    """
    known = MME_PERCEPTION + MME_COGNITION
    cache: dict[tuple[str, str], tuple[Path, dict[str, str]]] = {}
    samples = []
    for row in read_jsonl(files["questions"], QUESTION_FIELDS):
        qid = str(row["question_id"])
        category = row.get("category") or qid.split("/")[0]
        if category not in known:
            raise ValueError(f"MME question {qid!r}: subtask {category!r} not in {list(known)}")
        stem = PurePosixPath(qid).stem
        if (category, stem) not in cache:
            cache[category, stem] = _mme_gt(files["images"], category, stem)
        gt_path, answers = cache[category, stem]
        text = strip_suffix(row["text"], SHORT_ANSWER)
        answer = answers.get(_mme_key(text))
        if answer is None:
            raise ValueError(f"MME question {qid!r} ({text!r}) not found in {gt_path}")
        samples.append({"question_id": qid, "image": row["image"], "text": text, "answer": answer,
                        "category": category})
    return samples


# ---------------------------------------------------------------- MMBench
def _cell(row: dict[str, str], key: str) -> str | None:
    value = row.get(key)
    return None if value is None or value.strip() in _NA_CELLS else value


def _read_tsv(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(2**31 - 1)  # base64 images exceed the default 128 KiB field limit
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    required = {"index", "question", "answer", "A", "B", "image"}
    if rows and not required <= set(rows[0]):
        raise ValueError(f"{path}: missing columns {sorted(required - set(rows[0]))}")
    return rows


def _decode_image(b64: str, where: str) -> bytes:
    try:
        return base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{where}: image is not valid base64 ({exc})") from exc


def mmbench_samples(row: dict[str, str], image: bytes, image_id: str) -> list[dict]:
    """All circular rotations of one MMBench row, rotation 0 (the original order) first.

    Options are A, B, ... up to the first empty one (as LLaVA's model_vqa_mmbench); the text is
    "[hint\\n]question" plus one "\\nX. option" line per option.

    Args:
        row: tsv row (index, question, hint, A..D, answer, category, l2-category).
        image: decoded image bytes.
        image_id: id shared by all rotations (names the image for the runner).
    Returns:
        One sample per rotation with group = index, rotation = r.
    Raises:
        ValueError: if the row has fewer than 2 options or its answer is not among them.
    """
    options = {}
    for letter in "ABCD":
        value = _cell(row, letter)
        if value is None:
            break
        options[letter] = value
    index = row["index"]
    if len(options) < 2 or row["answer"] not in options:
        raise ValueError(f"MMBench index {index}: answer {row['answer']!r} / options {sorted(options)} invalid")
    hint = _cell(row, "hint")
    stem = (hint + "\n" if hint else "") + row["question"]
    out = []
    for r, (opts, answer) in enumerate(rotate_options(options, row["answer"], len(options))):
        out.append({
            "question_id": f"{index}-r{r}", "group": index, "rotation": r, "image": image_id,
            "image_bytes": image, "text": stem + "".join(f"\n{k}. {v}" for k, v in opts.items()),
            "answer": answer, "options": opts, "category": _cell(row, "category"),
            "l2_category": _cell(row, "l2-category"),
        })
    return out


def load_mmbench(files: dict[str, Path]) -> list[dict]:
    """MMBench dev tsv expanded into circular rotations (images are base64 in the tsv).

    An image cell holding only digits refers to another row's index (deduplicated MMBench tsvs).

    Args:
        files: resolved files with role "questions" (the tsv).
    Returns:
        Samples (see :func:`mmbench_samples`), grouped by question, in file order.
    Raises:
        ValueError: on malformed rows or images.
    """
    path = files["questions"]
    rows = _read_tsv(path)
    by_index = {r["index"]: r["image"] for r in rows}
    samples = []
    for row in rows:
        b64 = row["image"].strip()
        if b64.isdigit() and b64 in by_index:
            b64 = by_index[b64]
        if not b64:
            raise ValueError(f"{path}: index {row['index']} has no image")
        image = _decode_image(b64, f"{path}: index {row['index']}")
        samples += mmbench_samples(row, image, f"{path.stem}/{row['index']}")
    return samples


# ---------------------------------------------------------------- SEED-Bench (image)
def load_seed(files: dict[str, Path]) -> list[dict]:
    """SEED-Bench image questions: LLaVA's ``llava-seed-bench.jsonl`` joined with ``SEED-Bench.json``.

    Video questions (data_type != "image") are skipped; gold letter and options A-D come from
    SEED-Bench.json; a trailing OPTION_LETTER instruction is removed from the text.

    Args:
        files: resolved files with roles "questions" and "annotations".
    Returns:
        Samples {question_id, image, text, answer, options, question_type, category}.
    Raises:
        ValueError: on a question absent from the annotations.
    """
    ann = _read_json(files["annotations"])
    type_names = {str(v): k for k, v in ann.get("question_type", {}).items()}
    all_ids = {str(q["question_id"]): q for q in ann["questions"]}
    samples, skipped = [], 0
    for row in read_jsonl(files["questions"], QUESTION_FIELDS):
        qid = str(row["question_id"])
        gold = all_ids.get(qid)
        if gold is None:
            raise ValueError(f"SEED question {qid!r} of {files['questions']} is not in {files['annotations']}")
        if gold.get("data_type") != "image":
            skipped += 1
            continue
        qtype = type_names.get(str(gold["question_type_id"]), str(gold["question_type_id"]))
        samples.append({
            "question_id": qid, "image": row["image"], "text": strip_suffix(row["text"], OPTION_LETTER),
            "answer": gold["answer"], "options": {x.upper(): gold[f"choice_{x}"] for x in "abcd"},
            "question_type": qtype, "category": qtype,
        })
    n_image = sum(q.get("data_type") == "image" for q in ann["questions"])
    if len(samples) != n_image:
        logger.warning("SEED: %d image questions in the jsonl, %d in the annotations", len(samples), n_image)
    logger.info("SEED: %d image questions (%d video questions skipped)", len(samples), skipped)
    return samples


def _register(bench: Benchmark) -> None:
    if bench.name not in BENCHMARKS:
        register(bench)


_register(Benchmark(
    name="scienceqa_img",
    files={"questions": "scienceqa/llava_test_CQM-A.json", "problems": "scienceqa/problems.json",
           "splits": "scienceqa/pid_splits.json"},
    image_folder="scienceqa/images/test", load=load_scienceqa, score=score_multiple_choice,
    prompt_suffix=OPTION_LETTER, group_by=("subject",), max_new_tokens=8,
    description="ScienceQA test questions with an image (LLaVA-1.5 layout), option letter"))
_register(Benchmark(
    name="mme", files={"questions": "MME/llava_mme.jsonl"}, image_folder="MME/MME_Benchmark_release_version",
    load=load_mme, score=score_mme, prompt_suffix=SHORT_ANSWER, max_new_tokens=8, main_metric="total",
    description="MME yes/no (perception + cognition scores; gold from the official GT txt files)"))
_register(Benchmark(
    name="mmbench", files={"questions": "mmbench/mmbench_dev_20230712.tsv"}, image_folder="mmbench",
    load=load_mmbench, score=score_circular, prompt_suffix=OPTION_LETTER, group_by=("l2_category",),
    max_new_tokens=8, description="MMBench dev (EN), circular evaluation over option rotations"))
_register(Benchmark(
    name="mmbench_cn", files={"questions": "mmbench_cn/mmbench_dev_cn_20231003.tsv"}, image_folder="mmbench_cn",
    load=load_mmbench, score=score_circular, prompt_suffix=MMBENCH_CN_SUFFIX, group_by=("l2_category",),
    max_new_tokens=8, description="MMBench-CN dev, circular evaluation over option rotations"))
_register(Benchmark(
    name="seed", files={"questions": "seed_bench/llava-seed-bench.jsonl", "annotations": "seed_bench/SEED-Bench.json"},
    image_folder="seed_bench", load=load_seed, score=score_multiple_choice, prompt_suffix=OPTION_LETTER,
    group_by=("question_type",), max_new_tokens=8, description="SEED-Bench image questions (LLaVA-1.5 layout)"))
