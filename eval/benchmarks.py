"""Benchmark registry: each benchmark is one declarative entry (files, loader, prompt suffix, scorer, groups).

A loader turns the benchmark's local files into samples ``{question_id, image, text, ...gold fields}``;
the runner appends the prompt suffix, generates, and hands ``{..., "prediction"}`` records to the scorer.
Missing files raise :class:`MissingBenchmarkFile` saying which file is expected where.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from eval.scorers.choice import score_multiple_choice
from eval.scorers.open import score_open
from eval.scorers.yesno import score_pope
from tuna.conversation import OPTION_LETTER, SHORT_ANSWER


class MissingBenchmarkFile(FileNotFoundError):
    """A benchmark file is not where the layout expects it."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark.

    Attributes:
        name: registry name (``--bench``).
        files: role -> path relative to the data root (e.g. {"questions": "eval/open/questions.jsonl"}).
        image_folder: folder of the questions' relative image paths, relative to the data root.
        load: (resolved files) -> samples.
        score: records with "prediction" -> (per-record scores, metrics).
        prompt_suffix: appended to every question on a new line ("" = none).
        group_by: sample fields whose values get their own metrics (e.g. "novelty": seen / novel).
        max_new_tokens: answer length limit.
    """

    name: str
    files: dict[str, str]
    image_folder: str
    load: Callable[[dict[str, Path]], list[dict[str, Any]]]
    score: Callable[[list[dict[str, Any]]], tuple[list[float], dict[str, Any]]]
    prompt_suffix: str = ""
    group_by: tuple[str, ...] = ()
    max_new_tokens: int = 16
    main_metric: str = "accuracy"
    judged: bool = False  # score(records, judge) with an eval.judge.Judge or None ("not scored: no judge")
    submission: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None  # server upload rows
    description: str = field(default="", compare=False)

    def resolve(self, data_root: str | Path) -> dict[str, Path]:
        """Absolute paths of the files (and ``images``); raises MissingBenchmarkFile for the first missing one."""
        root = Path(data_root)
        paths = {role: root / rel for role, rel in self.files.items()}
        for role, path in paths.items():
            if not path.is_file():
                raise MissingBenchmarkFile(f"{self.name}: {role} file expected at {path} (data root {root})")
        images = root / self.image_folder
        if not images.is_dir():
            raise MissingBenchmarkFile(f"{self.name}: image folder expected at {images} (data root {root})")
        return {**paths, "images": images}


def strip_suffix(text: str, suffix: str) -> str:
    """``text`` stripped, without a trailing ``suffix`` on its own line (the runner appends the benchmark's
    suffix itself, so a question file that already has it would read the instruction twice).

    Args:
        text: a question as a question file gives it.
        suffix: the prompt suffix the runner will append.
    Returns:
        The question without the suffix; only stripped when it does not end with the suffix on its own line.
    """
    body = text.strip()
    if suffix and body.endswith(suffix) and body[:-len(suffix)].endswith("\n"):
        return body[:-len(suffix)].rstrip()
    return body


QUESTION_FIELDS = ("question_id", "image", "text")  # what the runner reads of every question


def read_jsonl(path: Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file (blank lines skipped).

    Raises:
        ValueError: "PATH:LINE: ..." for a line that is not valid JSON, not a JSON object, or lacks one of the
            ``required`` fields (naming the question by its ``question_id`` when it has one).
    """
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                who = f"question {row['question_id']!r} " if "question_id" in row else ""
                raise ValueError(f"{path}:{n}: {who}lacks field {', '.join(map(repr, missing))}")
            rows.append(row)
    return rows


def join_by_question_id(questions: list[dict], golds: list[dict], source: Path) -> list[dict]:
    """Questions with their gold fields; every question needs a gold row (named in the error)."""
    by_id = {g["question_id"]: g for g in golds}
    out = []
    for q in questions:
        gold = by_id.get(q["question_id"])
        if gold is None:
            raise ValueError(f"question {q['question_id']!r} has no answer in {source}")
        out.append({**gold, **q})
    return out


# ---------------------------------------------------------------- synthetic world (tuna-synth --out ROOT)
def _load_synth(files: dict[str, Path], gold_role: str) -> list[dict]:
    return join_by_question_id(read_jsonl(files["questions"], QUESTION_FIELDS),
                               read_jsonl(files[gold_role], ("question_id",)), files[gold_role])


def _load_synth_pope(files: dict[str, Path]) -> list[dict]:
    samples = _load_synth(files, "annotations")
    return [{**s, "answer": s["label"], "split": s["category"]} for s in samples]


def _load_synth_mc(files: dict[str, Path]) -> list[dict]:
    samples = _load_synth(files, "answers")
    return [{**s, "options": {chr(65 + i): o for i, o in enumerate(s["options"])}} for s in samples]


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    if benchmark.name in BENCHMARKS:
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


register(Benchmark(
    name="synth_open", files={"questions": "eval/open/questions.jsonl", "answers": "eval/open/answers.jsonl"},
    image_folder="images", load=lambda f: _load_synth(f, "answers"), score=score_open,
    prompt_suffix=SHORT_ANSWER, group_by=("novelty",),
    description="synthetic world: open-ended identification and attributes (seen / novel categories)"))
register(Benchmark(
    name="synth_pope", files={"questions": "eval/pope/questions.jsonl", "annotations": "eval/pope/annotations.jsonl"},
    image_folder="images", load=_load_synth_pope, score=score_pope, prompt_suffix=SHORT_ANSWER,
    group_by=("novelty",), max_new_tokens=4, main_metric="f1",
    description="synthetic world: POPE-style existence questions (random / popular / adversarial)"))
register(Benchmark(
    name="synth_mc", files={"questions": "eval/mc/questions.jsonl", "answers": "eval/mc/answers.jsonl"},
    image_folder="images", load=_load_synth_mc, score=score_multiple_choice, prompt_suffix=OPTION_LETTER,
    group_by=("novelty",), max_new_tokens=4,
    description="synthetic world: multiple-choice identification"))


register(Benchmark(
    name="synth_icl", files={"questions": "icl/questions.jsonl", "answers": "icl/answers.jsonl"},
    image_folder="images", load=lambda f: _load_synth(f, "answers"), score=score_open,
    prompt_suffix=SHORT_ANSWER, group_by=("novelty", "distractor"),
    description="synthetic world's in-context learning task (tuna-synth --icl-queries): name a single object; "
                "distractor queries wear their confusable partner's colour and background"))


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


# LLaVA-1.5 evaluation layouts (data root = LLaVA's playground/data/eval); they register on import.
import eval.bench_caption  # noqa: E402,F401
import eval.bench_custom  # noqa: E402,F401
import eval.bench_icl  # noqa: E402,F401
import eval.bench_judged  # noqa: E402,F401
import eval.bench_llava_choice  # noqa: E402,F401
import eval.bench_llava_vqa  # noqa: E402,F401
