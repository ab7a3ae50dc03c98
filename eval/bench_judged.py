"""Judge-scored benchmarks in LLaVA-1.5's layout: LLaVA-Bench-in-the-wild and MM-Vet (see eval/judge.py)."""

from __future__ import annotations

import json
from pathlib import Path

from eval.benchmarks import (
    BENCHMARKS, QUESTION_FIELDS, Benchmark, join_by_question_id, read_jsonl, register,
)
from eval.judge import score_llava_wild, score_mmvet


def load_llava_wild(files: dict[str, Path]) -> list[dict]:
    """questions.jsonl + answers_gpt4.jsonl (the reference answers) + context.jsonl (captions by image)."""
    references = [{"question_id": a["question_id"], "reference": a["text"]}
                  for a in read_jsonl(files["answers"], ("question_id", "text"))]
    samples = join_by_question_id(read_jsonl(files["questions"], QUESTION_FIELDS), references, files["answers"])
    captions = {c["image"]: c["caption"] for c in read_jsonl(files["context"], ("image", "caption"))}
    for s in samples:
        if s["image"] not in captions:
            raise ValueError(f"question {s['question_id']!r}: image {s['image']!r} has no caption in {files['context']}")
        s["context"] = captions[s["image"]]
    return samples


def load_mmvet(files: dict[str, Path]) -> list[dict]:
    """LLaVA's llava-mm-vet.jsonl questions + the official mm-vet.json (answer, capability) by question id."""
    gold = json.loads(Path(files["annotations"]).read_text())
    rows = [{"question_id": qid, "answer": g["answer"], "capability": list(g.get("capability", []))}
            for qid, g in gold.items()]
    return join_by_question_id(read_jsonl(files["questions"], QUESTION_FIELDS), rows, files["annotations"])


for _bench in (
    Benchmark(name="llava_wild", image_folder="llava-bench-in-the-wild/images", load=load_llava_wild,
              score=score_llava_wild, judged=True, max_new_tokens=512, main_metric="relative_score",
              files={"questions": "llava-bench-in-the-wild/questions.jsonl",
                     "answers": "llava-bench-in-the-wild/answers_gpt4.jsonl",
                     "context": "llava-bench-in-the-wild/context.jsonl"},
              description="LLaVA-Bench-in-the-wild: judge scores vs the reference answers (relative score)"),
    Benchmark(name="mmvet", image_folder="mm-vet/images", load=load_mmvet, score=score_mmvet, judged=True,
              max_new_tokens=512, main_metric="total",
              files={"questions": "mm-vet/llava-mm-vet.jsonl", "annotations": "mm-vet/mm-vet.json"},
              description="MM-Vet: judge correctness 0-1 against the ground truth, per capability"),
):
    if _bench.name not in BENCHMARKS:
        register(_bench)
