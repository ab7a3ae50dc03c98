"""The ICL literature's k-shot layouts: OK-VQA val (VQAv2's format) and an image-folder classification split."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from eval.benchmarks import BENCHMARKS


def test_okvqa_val_reads_the_official_files(tmp_path):
    (tmp_path / "okvqa" / "val2014").mkdir(parents=True)
    (tmp_path / "okvqa" / "OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps({"questions": [
        {"image_id": 297147, "question": "What sport can you use this for?", "question_id": 2971475}]}))
    answers = ["racing"] * 6 + ["motocross"] * 4
    (tmp_path / "okvqa" / "mscoco_val2014_annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 2971475, "image_id": 297147, "answer_type": "other", "multiple_choice_answer": "racing",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}]}))
    Image.new("RGB", (8, 8)).save(tmp_path / "okvqa" / "val2014" / "COCO_val2014_000000297147.jpg")
    bench = BENCHMARKS["okvqa_val"]
    samples = bench.load(bench.resolve(tmp_path))
    assert samples[0]["image"] == "COCO_val2014_000000297147.jpg" and len(samples[0]["answers"]) == 10
    scores, metrics = bench.score([{**samples[0], "prediction": "motocross"}])
    assert scores == [pytest.approx(1.0)] and metrics["accuracy"] == pytest.approx(100.0)  # 4 of 10 humans: min(1, 4/3)


def test_classification_folder(tmp_path):
    for cls, names in (("golden_retriever", ["a.jpg", "b.png"]), ("tabby", ["c.JPG"])):
        (tmp_path / "classification" / "val" / cls).mkdir(parents=True)
        for name in names:
            Image.new("RGB", (8, 8)).save(tmp_path / "classification" / "val" / cls / name,
                                          format="PNG" if name.endswith("png") else "JPEG")
    (tmp_path / "classification" / "val" / "tabby" / "notes.txt").write_text("not an image")
    bench = BENCHMARKS["classification_val"]
    samples = bench.load(bench.resolve(tmp_path))
    assert [s["image"] for s in samples] == ["golden_retriever/a.jpg", "golden_retriever/b.png", "tabby/c.JPG"]
    assert samples[0]["answers"] == ["golden retriever"] and samples[2]["category"] == "tabby"
    scores, _ = bench.score([{**samples[0], "prediction": "A golden retriever."}, {**samples[2], "prediction": "dog"}])
    assert scores == [1.0, 0.0]
    (tmp_path / "empty" / "classification" / "val").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        bench.load(bench.resolve(tmp_path / "empty"))
