"""Captioning benchmarks from COCO-format caption annotations (COCO val2014, NoCaps val), scored by pycocoevalcap."""

from __future__ import annotations

import json
from pathlib import Path

from eval.benchmarks import BENCHMARKS, Benchmark, register
from eval.scorers.caption import score_caption

CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."


def load_coco_captions(files: dict[str, Path]) -> list[dict]:
    """One sample per image of a COCO caption file ({images: [{id, file_name}], annotations: [{image_id, caption}]})."""
    path = files["annotations"]
    try:
        data = json.loads(Path(path).read_text())
        images, annotations = data["images"], data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a COCO caption file with 'images' and 'annotations' ({exc})") from exc
    references: dict[int, list[str]] = {}
    for ann in annotations:
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    samples = []
    for image in images:
        if not references.get(image["id"]):
            raise ValueError(f"{path}: image {image['id']} ({image['file_name']}) has no reference captions")
        samples.append({"question_id": image["id"], "image": image["file_name"], "text": CAPTION_PROMPT,
                        "references": references[image["id"]]})
    return samples


for _bench in (
    Benchmark(name="coco_caption_val2014", image_folder="coco/val2014", load=load_coco_captions,
              score=score_caption, files={"annotations": "coco/annotations/captions_val2014.json"},
              max_new_tokens=64, main_metric="cider",
              description="COCO val2014 captions (all val images; use --limit for a subset): CIDEr, BLEU-1..4"),
    Benchmark(name="nocaps_val", image_folder="nocaps/validation", load=load_coco_captions, score=score_caption,
              files={"annotations": "nocaps/nocaps_val_4500_captions.json"}, max_new_tokens=64,
              main_metric="cider", description="NoCaps validation (COCO-format file): CIDEr, BLEU-1..4"),
):
    if _bench.name not in BENCHMARKS:
        register(_bench)
