"""The k-shot evaluation layouts of the in-context learning literature that LLaVA's eval set lacks:
OK-VQA val (VQA accuracy) and an image-folder classification split (accuracy). VQAv2 (``vqav2_val``),
COCO captions (``coco_caption_val2014``) and the synthetic ICL task (``synth_icl``) are registered elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from eval.bench_llava_vqa import load_vqav2_val
from eval.benchmarks import BENCHMARKS, SHORT_ANSWER, Benchmark, register
from eval.scorers.open import score_open
from eval.scorers.vqa import score_vqa

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CLASSIFICATION_QUESTION = "What is in the image?"


def load_classification(files: dict[str, Path]) -> list[dict]:
    """One question per image of ``images/CLASS/...``; the answer is the class name ("_" read as a space)."""
    root = files["images"]
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders (expected one sub-folder per class)")
    samples = []
    for folder in classes:
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
            rel = str(path.relative_to(root))
            samples.append({"question_id": rel, "image": rel, "text": CLASSIFICATION_QUESTION,
                            "answers": [folder.name.replace("_", " ")], "category": folder.name})
    return samples


ICL_BENCHMARKS = (
    Benchmark(
        name="okvqa_val", image_folder="okvqa/val2014", load=load_vqav2_val, score=score_vqa,
        files={"questions": "okvqa/OpenEnded_mscoco_val2014_questions.json",
               "annotations": "okvqa/mscoco_val2014_annotations.json"},
        prompt_suffix=SHORT_ANSWER, group_by=("answer_type",),
        description="OK-VQA val (the official question/annotation files, VQAv2's format; COCO val2014 images), "
                    "VQA accuracy"),
    Benchmark(
        name="classification_val", image_folder="classification/val", load=load_classification, score=score_open,
        files={}, prompt_suffix=SHORT_ANSWER, max_new_tokens=8,
        description="image classification from a folder per class (classification/val/CLASS/IMAGE): "
                    "the class name in the answer, accuracy"),
)

for _bench in ICL_BENCHMARKS:
    if _bench.name not in BENCHMARKS:
        register(_bench)
