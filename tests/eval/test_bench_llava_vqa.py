"""Tests for the LLaVA-1.5 VQA benchmark layouts: tiny on-disk fixtures, loading, scoring, missing files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import eval.bench_llava_vqa as llava
from eval.benchmarks import BENCHMARKS, SHORT_ANSWER, MissingBenchmarkFile

SFX = "\n" + SHORT_ANSWER


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / name)


def _pope(root: Path) -> None:
    qs = [("adversarial", "a.jpg", "Is there a dog in the image?", "yes"),
          ("adversarial", "a.jpg", "Is there a cat in the image?", "no"),
          ("popular", "b.jpg", "Is there a car in the image?", "yes"),
          ("random", "b.jpg", "Is there a tree in the image?", "no")]
    _jsonl(root / "pope/llava_pope_test.jsonl",
           [{"question_id": i + 1, "image": img, "text": t + SFX, "category": c} for i, (c, img, t, _) in enumerate(qs)])
    for split in llava.POPE_SPLITS:
        rows = [(img, t, lab) for c, img, t, lab in qs if c == split]
        _jsonl(root / f"pope/coco/coco_pope_{split}.json",
               [{"question_id": i + 1, "image": img, "text": t, "label": lab} for i, (img, t, lab) in enumerate(rows)])
    _images(root / "pope/val2014", ["a.jpg", "b.jpg"])


def test_registered_once_and_reimport_is_harmless():
    import importlib
    importlib.reload(llava)  # a second registration pass must not raise
    for name in ("pope", "gqa", "textvqa", "vqav2_val", "vizwiz_val"):
        assert name in BENCHMARKS


def test_strip_suffix():
    assert llava.strip_suffix("Q?" + SFX, SHORT_ANSWER) == "Q?"
    assert llava.strip_suffix("Q?" + SFX + "\n", SHORT_ANSWER) == "Q?"
    assert llava.strip_suffix("Q?", SHORT_ANSWER) == "Q?"
    assert llava.strip_suffix("Q? " + SHORT_ANSWER, SHORT_ANSWER) == "Q? " + SHORT_ANSWER  # not on its own line


def test_pope_load_and_score(tmp_path):
    _pope(tmp_path)
    bench = BENCHMARKS["pope"]
    files = bench.resolve(tmp_path)
    samples = bench.load(files)
    assert [(s["question_id"], s["split"], s["answer"]) for s in samples] == [
        (1, "adversarial", "yes"), (2, "adversarial", "no"), (3, "popular", "yes"), (4, "random", "no")]
    assert samples[0]["text"] == "Is there a dog in the image?"  # suffix stripped, the runner adds it
    assert (files["images"] / samples[0]["image"]).is_file()
    preds = ["Yes", "Yes", "No", "No."]  # tp, fp, fn, tn
    scores, m = bench.score([{**s, "prediction": p} for s, p in zip(samples, preds)])
    assert scores == [1.0, 0.0, 0.0, 1.0]
    assert m["accuracy"] == 50.0 and m["f1"] == 50.0
    assert m["per_split"]["adversarial"]["accuracy"] == 50.0 and m["per_split"]["random"]["n"] == 1


def test_pope_mismatched_label_file_fails(tmp_path):
    _pope(tmp_path)
    _jsonl(tmp_path / "pope/coco/coco_pope_popular.json",
           [{"question_id": 1, "image": "zzz.jpg", "text": "Is there a car in the image?", "label": "yes"}])
    bench = BENCHMARKS["pope"]
    with pytest.raises(ValueError, match="coco_pope_popular.json:1: label line"):
        bench.load(bench.resolve(tmp_path))
    _jsonl(tmp_path / "pope/coco/coco_pope_popular.json", [])
    with pytest.raises(ValueError, match="0 labels for 1 'popular' questions"):
        bench.load(bench.resolve(tmp_path))


def test_pope_missing_file_names_path(tmp_path):
    _pope(tmp_path)
    (tmp_path / "pope/coco/coco_pope_random.json").unlink()
    with pytest.raises(MissingBenchmarkFile, match=r"pope: random file expected at .*pope/coco/coco_pope_random\.json"):
        BENCHMARKS["pope"].resolve(tmp_path)


def _gqa(root: Path) -> None:
    _jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201307251", "image": "n1.jpg", "text": "Is the sky dark?" + SFX, "category": "default"},
        {"question_id": "201640614", "image": "n2.jpg", "text": "What color is the cup?" + SFX}])
    _json(root / "gqa/data/testdev_balanced_questions.json", {
        "201307251": {"imageId": "n1", "question": "Is the sky dark?", "answer": "yes",
                      "types": {"structural": "verify", "semantic": "attr"}},
        "201640614": {"imageId": "n2", "question": "What color is the cup?", "answer": "white",
                      "types": {"structural": "query", "semantic": "attr"}},
        "999": {"imageId": "n3", "question": "unused", "answer": "no"}})
    _images(root / "gqa/data/images", ["n1.jpg", "n2.jpg"])


def test_gqa_load_and_score(tmp_path):
    _gqa(tmp_path)
    bench = BENCHMARKS["gqa"]
    samples = bench.load(bench.resolve(tmp_path))
    assert [(s["text"], s["answer"], s["structural"]) for s in samples] == [
        ("Is the sky dark?", "yes", "verify"), ("What color is the cup?", "white", "query")]
    scores, m = bench.score([{**samples[0], "prediction": "Yes."}, {**samples[1], "prediction": "black"}])
    assert scores == [1.0, 0.0] and m["accuracy"] == 50.0


def test_gqa_missing_answer_and_missing_images(tmp_path):
    _gqa(tmp_path)
    _jsonl(tmp_path / "gqa/llava_gqa_testdev_balanced.jsonl", [{"question_id": 5, "image": "x.jpg", "text": "Q?"}])
    bench = BENCHMARKS["gqa"]
    with pytest.raises(ValueError, match="question 5 has no answer in .*testdev_balanced_questions.json"):
        bench.load(bench.resolve(tmp_path))
    for p in (tmp_path / "gqa/data/images").iterdir():
        p.unlink()
    (tmp_path / "gqa/data/images").rmdir()
    with pytest.raises(MissingBenchmarkFile, match=r"gqa: image folder expected at .*gqa/data/images"):
        bench.resolve(tmp_path)


def _textvqa(root: Path) -> None:
    # LLaVA's question_id is the image id; two questions share image 003a.
    _jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": "003a", "image": "003a.jpg",
         "text": "what is the brand of this camera?\nReference OCR token: dakota, digital" + SFX},
        {"question_id": "003a", "image": "003a.jpg", "text": "What year is shown?" + SFX}])
    answers = ["dakota"] * 4 + ["dakota digital"] * 6
    _json(root / "textvqa/TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "003a", "question": "what is the brand of this camera?", "answers": answers},
        {"question_id": 34603, "image_id": "003a", "question": "what year is shown?", "answers": ["1999"] * 10}]})
    _images(root / "textvqa/train_images", ["003a.jpg"])


def test_textvqa_load_and_score(tmp_path):
    _textvqa(tmp_path)
    bench = BENCHMARKS["textvqa"]
    samples = bench.load(bench.resolve(tmp_path))
    assert [s["question_id"] for s in samples] == [34602, 34603]
    assert [s["llava_question_id"] for s in samples] == ["003a", "003a"]
    assert samples[0]["text"] == "what is the brand of this camera?\nReference OCR token: dakota, digital"
    assert [s["ocr_tokens_in_prompt"] for s in samples] == [True, False]
    assert samples[1]["answers"] == ["1999"] * 10
    assert "OCR-token variant" in bench.description
    scores, m = bench.score([{**samples[0], "prediction": "Dakota"}, {**samples[1], "prediction": "2000"}])
    assert scores[0] == pytest.approx(1.0) and scores[1] == 0.0 and m["accuracy"] == pytest.approx(50.0)


def test_textvqa_unmatched_question(tmp_path):
    _textvqa(tmp_path)
    _jsonl(tmp_path / "textvqa/llava_textvqa_val_v051_ocr.jsonl",
           [{"question_id": "003a", "image": "003a.jpg", "text": "who made it?" + SFX}])
    bench = BENCHMARKS["textvqa"]
    with pytest.raises(ValueError, match=r"\(image 003a, 'who made it\?'\) has no answer"):
        bench.load(bench.resolve(tmp_path))


def _vqav2(root: Path) -> None:
    _json(root / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"image_id": 42, "question": "How many dogs?", "question_id": 42000},
        {"image_id": 7, "question": "Is it sunny?", "question_id": 7001}]})
    def ann(qid, image_id, answers, kind):
        return {"question_id": qid, "image_id": image_id, "answer_type": kind, "multiple_choice_answer": answers[0],
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]}
    _json(root / "vqav2/v2_mscoco_val2014_annotations.json", {"annotations": [
        ann(7001, 7, ["yes"] * 10, "yes/no"), ann(42000, 42, ["2"] * 2 + ["3"] * 8, "number")]})
    _images(root / "vqav2/val2014", ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg"])


def test_vqav2_val_load_and_score(tmp_path):
    _vqav2(tmp_path)
    bench = BENCHMARKS["vqav2_val"]
    files = bench.resolve(tmp_path)
    samples = bench.load(files)
    assert samples[0]["image"] == "COCO_val2014_000000000042.jpg" and (files["images"] / samples[0]["image"]).is_file()
    assert samples[0]["text"] == "How many dogs?" and len(samples[0]["answers"]) == 10
    assert [s["answer_type"] for s in samples] == ["number", "yes/no"]
    scores, m = bench.score([{**samples[0], "prediction": "two"}, {**samples[1], "prediction": "no"}])
    assert scores == [pytest.approx(0.6), 0.0] and m["accuracy"] == pytest.approx(30.0)


def test_vqav2_missing_annotations_names_path(tmp_path):
    _vqav2(tmp_path)
    (tmp_path / "vqav2/v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(MissingBenchmarkFile, match=r"annotations file expected at .*vqav2/v2_mscoco_val2014_annotations"):
        BENCHMARKS["vqav2_val"].resolve(tmp_path)


def _vizwiz(root: Path) -> None:
    def row(image, question, answers, answerable):
        return {"image": image, "question": question, "answer_type": "other", "answerable": answerable,
                "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]}
    _json(root / "vizwiz/val.json", [
        row("VizWiz_val_00000000.jpg", "What is this?", ["soup"] * 10, 1),
        row("VizWiz_val_00000001.jpg", "What color?", ["unanswerable"] * 9 + ["blue"], 0),
        row("VizWiz_val_00000002.jpg", "Which can?", ["beans"] * 10, 1)])
    _images(root / "vizwiz/val", [f"VizWiz_val_0000000{i}.jpg" for i in range(3)])


def test_vizwiz_val_load_and_score(tmp_path):
    _vizwiz(tmp_path)
    bench = BENCHMARKS["vizwiz_val"]
    samples = bench.load(bench.resolve(tmp_path))
    assert [s["question_id"] for s in samples] == ["VizWiz_val_00000000", "VizWiz_val_00000001", "VizWiz_val_00000002"]
    assert samples[1]["text"] == "What color?" and samples[1]["answerable"] == 0
    assert bench.prompt_suffix.startswith("When the provided information is insufficient, respond with 'Unanswerable'.\n")
    assert bench.prompt_suffix.endswith(SHORT_ANSWER)
    preds = ["Soup.", "Unanswerable", "corn"]
    scores, m = bench.score([{**s, "prediction": p} for s, p in zip(samples, preds)])
    assert scores == [1.0, 1.0, 0.0]
    assert m["accuracy_unanswerable"] == 100.0 and m["accuracy_answerable"] == 50.0 and m["n_answerable"] == 2


def test_vizwiz_bad_file(tmp_path):
    _vizwiz(tmp_path)
    (tmp_path / "vizwiz/val.json").write_text('{"not": "a list"}')
    bench = BENCHMARKS["vizwiz_val"]
    with pytest.raises(ValueError, match="expected a list of questions, got dict"):
        bench.load(bench.resolve(tmp_path))
    (tmp_path / "vizwiz/val.json").write_text("[{")
    with pytest.raises(ValueError, match=r"val.json: not valid JSON"):
        bench.load(bench.resolve(tmp_path))


def test_vizwiz_without_answerable_flag_uses_majority(tmp_path):
    rows = [{"image": "VizWiz_val_00000000.jpg", "question": "What?", "answers": [{"answer": "unanswerable"}] * 10}]
    _json(tmp_path / "vizwiz/val.json", rows)
    _images(tmp_path / "vizwiz/val", ["VizWiz_val_00000000.jpg"])
    bench = BENCHMARKS["vizwiz_val"]
    samples = bench.load(bench.resolve(tmp_path))
    assert samples[0]["answerable"] is None
    scores, m = bench.score([{**samples[0], "prediction": "unanswerable"}])
    assert scores == [1.0] and m["n_unanswerable"] == 1 and m["n_answerable"] == 0


def test_test_splits_write_evalai_submission_files(tmp_path):
    from eval.runner import score_records

    _jsonl(tmp_path / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
           [{"question_id": 5, "image": "COCO_test2015_000000000001.jpg", "text": "How many?" + SFX}])
    _images(tmp_path / "vqav2/test2015", ["COCO_test2015_000000000001.jpg"])
    bench = BENCHMARKS["vqav2_testdev"]
    samples = bench.load(bench.resolve(tmp_path))
    assert samples[0]["text"] == "How many?"
    entry = score_records(bench, [{**samples[0], "prediction": "Two.", "prompt": "p"}], tmp_path, 0.0)
    assert entry["metrics"]["status"].startswith("not scored here")
    assert json.loads((tmp_path / "submission.json").read_text()) == [{"question_id": 5, "answer": "2"}]
    rows = [{"image": "VizWiz_test_00000001.jpg", "prediction": "Unanswerable"},
            {"image": "VizWiz_test_00000002.jpg", "prediction": "It's a dog's toy, blue?"}]
    assert BENCHMARKS["vizwiz_test"].submission(rows) == [
        {"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000002.jpg", "answer": "it 's dog 's toy blue"}]  # EvalAI pre-step applied
    assert BENCHMARKS["vqav2_testdev"].submission([{"question_id": 6, "prediction": "1,000-2"}]) == [
        {"question_id": 6, "answer": "1000 2"}]


def test_answer_processing_per_benchmark():
    # "red,white": "redwhite" with the EvalAI pre-step (TextVQA), "red white" with the official rule alone
    record = {"prediction": "red,white", "answers": ["red white"] * 10}
    assert BENCHMARKS["textvqa"].score([record])[0] == [0.0]
    assert BENCHMARKS["vqav2_val"].score([record])[0] == [1.0]
    assert BENCHMARKS["vizwiz_val"].score([record])[0] == [1.0]
