"""Your own questions as benchmarks: ``custom_open`` (open-ended) and ``custom_yesno`` (yes/no).

Each reads one JSONL file under the data root, ``custom/open.jsonl`` / ``custom/yesno.jsonl``, one
question per line (schema in docs/eval.md, "Your own questions"); images are relative to
``DATA_ROOT/custom/`` or absolute. A bad line is a ValueError naming the file and line, as the other
loaders fail: a silently skipped question would change the score unnoticed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval.benchmarks import BENCHMARKS, SHORT_ANSWER, Benchmark, register
from eval.scorers.open import score_open
from eval.scorers.yesno import score_pope

CUSTOM_FOLDER = "custom"
UNGROUPED = "ungrouped"  # the group of questions without one
REQUIRED = ("question_id", "image", "question")
# fields the runner or the scorers set themselves (image_bytes would even replace the image file)
RESERVED = ("text", "index", "prompt", "tags", "neighbours", "prediction", "score", "split", "image_bytes", "shots",
            "demos")


def read_questions(path: Path, yes_no: bool) -> list[dict[str, Any]]:
    """Samples of a custom question file.

    Args:
        path: the JSONL file.
        yes_no: yes/no questions (gold ``answer`` "yes"/"no") instead of open-ended ones (gold ``answers``).
    Returns:
        Samples ``{question_id, image, text, answers | answer, group, [category, split]}`` plus the line's
        other fields; a question ending with the short-answer instruction keeps it on a line of its own,
        where the runner strips (and counts) it before appending it once.
    Raises:
        ValueError: "PATH:LINE: ..." for invalid JSON, a missing or malformed field, a yes/no answer that
            is not yes/no or a duplicate question_id; "PATH: no questions" for an empty file. Missing or
            unreadable images are found by ``eval.validate`` before the model loads (an error naming the
            question, or skipped and counted with ``--on-bad-sample skip``).
    """
    samples, first_line = [], {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
            sample = _sample(row, where, yes_no)
            qid = str(sample["question_id"])  # the runner names questions by str(id): 7 and "7" collide
            if qid in first_line:
                raise ValueError(f"{where}: question_id {sample['question_id']!r} already used on line "
                                 f"{first_line[qid]}")
            first_line[qid] = n
            samples.append(sample)
    if not samples:
        raise ValueError(f"{path}: no questions")
    return samples


def _sample(row: Any, where: str, yes_no: bool) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    gold = ("answers",) if not yes_no or "answer" not in row else ()
    missing = [key for key in REQUIRED + gold if key not in row]
    if missing:
        raise ValueError(f"{where}: missing field {', '.join(map(repr, missing))}")
    reserved = [key for key in RESERVED if key in row]
    if reserved:
        raise ValueError(f"{where}: field {', '.join(map(repr, reserved))} is set by the evaluation; rename it")
    qid = row["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or not str(qid).strip():
        raise ValueError(f"{where}: question_id must be a non-empty string or an integer, got {qid!r}")
    for key in ("image", "question"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise ValueError(f"{where}: {key} must be a non-empty string, got {row[key]!r}")
    sample = {**row, "text": _question(row["question"], where)}
    del sample["question"]
    sample["group"] = UNGROUPED if row.get("group") is None else str(row["group"])
    if sample.pop("category", None) is not None:  # str: the scorers sort categories
        sample["category"] = str(row["category"])
    if yes_no:
        sample.pop("answers", None)
        sample["answer"] = _yes_no(row, where)
        if "category" in sample:
            sample["split"] = sample["category"]  # score_pope reports per split
    elif not (isinstance(row["answers"], list) and row["answers"]
              and all(isinstance(a, str) and a.strip() for a in row["answers"])):
        raise ValueError(f"{where}: answers must be a non-empty list of strings, e.g. [\"kelbo\"], "
                         f"got {row['answers']!r}")
    return sample


def _question(text: str, where: str) -> str:
    body = text.strip()
    if body.endswith(SHORT_ANSWER):
        # on the same line too ("What is it? Answer ..."): move it to its own line, the form the runner strips
        body = body[:-len(SHORT_ANSWER)].rstrip()
        if not body:
            raise ValueError(f"{where}: the question is only the instruction {SHORT_ANSWER!r}")
        body += "\n" + SHORT_ANSWER
    return body


def _yes_no(row: dict, where: str) -> str:
    """The one gold label of ``answer`` and/or ``answers`` ("Yes", " no" read as yes / no)."""
    values = [v for key in ("answer", "answers") if key in row
              for v in (row[key] if isinstance(row[key], list) else [row[key]])]
    labels = {v.strip().lower() if isinstance(v, str) else None for v in values}
    if len(labels) != 1 or not labels <= {"yes", "no"}:
        raise ValueError(f"{where}: a yes/no question needs answer \"yes\" or \"no\", got {values!r}")
    return labels.pop()


def load_open(files: dict[str, Path]) -> list[dict[str, Any]]:
    return read_questions(files["questions"], yes_no=False)


def load_yesno(files: dict[str, Path]) -> list[dict[str, Any]]:
    return read_questions(files["questions"], yes_no=True)


CUSTOM_BENCHMARKS = (
    Benchmark(
        name="custom_open", files={"questions": f"{CUSTOM_FOLDER}/open.jsonl"}, image_folder=CUSTOM_FOLDER,
        load=load_open, score=score_open, prompt_suffix=SHORT_ANSWER, group_by=("group",),
        description="your own open-ended questions (custom/open.jsonl): a gold answer as whole words in the "
                    "reply, accuracy per group and category"),
    Benchmark(
        name="custom_yesno", files={"questions": f"{CUSTOM_FOLDER}/yesno.jsonl"}, image_folder=CUSTOM_FOLDER,
        load=load_yesno, score=score_pope, prompt_suffix=SHORT_ANSWER, group_by=("group",), max_new_tokens=4,
        main_metric="f1",
        description="your own yes/no questions (custom/yesno.jsonl): POPE metrics per group and category"),
)

for _bench in CUSTOM_BENCHMARKS:
    if _bench.name not in BENCHMARKS:
        register(_bench)
