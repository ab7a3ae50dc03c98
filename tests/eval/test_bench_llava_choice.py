"""Tests for the LLaVA-1.5 ScienceQA / MME / MMBench / SEED benchmark entries on tiny on-disk fixtures."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

import eval.bench_llava_choice as llava
from eval.benchmarks import BENCHMARKS, OPTION_LETTER, SHORT_ANSWER, MissingBenchmarkFile


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def test_registered_once_and_reimport_is_harmless():
    import importlib

    importlib.reload(llava)
    for name in ("scienceqa_img", "mme", "mmbench", "mmbench_cn", "seed"):
        assert name in BENCHMARKS
    assert BENCHMARKS["mmbench_cn"].prompt_suffix == "请直接回答选项字母。"
    assert BENCHMARKS["mme"].main_metric == "total"


# ---------------------------------------------------------------- ScienceQA
def _scienceqa(root: Path) -> None:
    d = root / "scienceqa"
    _json(d / "llava_test_CQM-A.json", [
        {"id": "4", "image": "4/image.png", "conversations": [
            {"from": "human", "value": "<image>\nContext: a map.\nQuestion: Which is north?\nOptions: (A) Maine (B) Texas"},
            {"from": "gpt", "value": "A"}]},
        {"id": "7", "image": "7/image.png", "conversations": [
            {"from": "human", "value": f"<image>\nQuestion: Which is a gas?\nOptions: (A) ice (B) steam (C) rock\n{OPTION_LETTER}"},
            {"from": "gpt", "value": "B"}]},
        {"id": "9", "conversations": [{"from": "human", "value": "Question: no image"}, {"from": "gpt", "value": "A"}]},
        {"id": "11", "image": "11/image.png", "conversations": [{"from": "human", "value": "<image>\nval only"}]},
    ])
    _json(d / "problems.json", {
        "4": {"choices": ["Maine", "Texas"], "answer": 0, "subject": "social science", "category": "Geography"},
        "7": {"choices": ["ice", "steam", "rock"], "answer": 1, "subject": "natural science", "category": "Matter"},
        "9": {"choices": ["x", "y"], "answer": 0, "subject": "language science"},
        "11": {"choices": ["x", "y"], "answer": 0, "subject": "natural science"},
    })
    _json(d / "pid_splits.json", {"test": ["4", "7", "9"], "val": ["11"]})
    (d / "images" / "test").mkdir(parents=True)


def test_scienceqa_load_and_score(tmp_path):
    _scienceqa(tmp_path)
    bench = BENCHMARKS["scienceqa_img"]
    samples = bench.load(bench.resolve(tmp_path))
    assert [s["question_id"] for s in samples] == ["4", "7"]  # no image / not test -> dropped
    first, second = samples
    assert first["text"] == "Context: a map.\nQuestion: Which is north?\nOptions: (A) Maine (B) Texas"
    assert first["answer"] == "A" and first["options"] == {"A": "Maine", "B": "Texas"}
    assert first["image"] == "4/image.png" and first["subject"] == "social science"
    assert second["text"].endswith("(C) rock")  # the file's own suffix is stripped
    assert OPTION_LETTER not in second["text"] and second["answer"] == "B"
    records = [{**first, "prediction": "A"}, {**second, "prediction": "The answer is C."}]
    scores, metrics = bench.score(records)
    assert scores == [1.0, 0.0]
    assert metrics["accuracy"] == 50.0 and metrics["per_category"] == {"Geography": 100.0, "Matter": 0.0}


def test_scienceqa_missing_file_names_path(tmp_path):
    _scienceqa(tmp_path)
    (tmp_path / "scienceqa" / "pid_splits.json").unlink()
    with pytest.raises(MissingBenchmarkFile, match=r"splits file expected at .*scienceqa/pid_splits\.json"):
        BENCHMARKS["scienceqa_img"].resolve(tmp_path)


# ---------------------------------------------------------------- MME
def _mme(root: Path) -> None:
    rel = root / "MME" / "MME_Benchmark_release_version"
    (rel / "OCR").mkdir(parents=True)
    (rel / "OCR" / "0001.txt").write_text(
        "Is the word \"angie\"? Please answer yes or no.\tYes\nIs the word \"angle\"? Please answer yes or no.\tNo\n\n")
    qa = rel / "artwork" / "questions_answers_YN"
    qa.mkdir(parents=True)
    (qa / "10002.txt").write_text(
        "Is it a painting? Please answer yes or no.\tYes\nIs it glassware?  Please answer yes or no.\tNo\n")
    _jsonl(root / "MME" / "llava_mme.jsonl", [
        {"question_id": "OCR/0001.jpg", "image": "OCR/0001.jpg", "category": "OCR",
         "text": f"Is the word \"angie\"? Please answer yes or no.\n{SHORT_ANSWER}"},
        {"question_id": "OCR/0001.jpg", "image": "OCR/0001.jpg", "category": "OCR",
         "text": "Is the word \"angle\"? Please answer yes or no."},
        {"question_id": "artwork/10002.jpg", "image": "artwork/images/10002.jpg",
         "text": "Is it a painting?\nAnswer the question using a single word or phrase."},
        {"question_id": "artwork/10002.jpg", "image": "artwork/images/10002.jpg",
         "text": "Is it glassware? Please answer yes or no."},
    ])


def test_mme_load_and_score(tmp_path):
    _mme(tmp_path)
    bench = BENCHMARKS["mme"]
    samples = bench.load(bench.resolve(tmp_path))
    assert [(s["category"], s["answer"]) for s in samples] == [
        ("OCR", "Yes"), ("OCR", "No"), ("artwork", "Yes"), ("artwork", "No")]
    assert samples[0]["text"] == "Is the word \"angie\"? Please answer yes or no."  # suffix stripped
    assert samples[2]["image"] == "artwork/images/10002.jpg"
    preds = ["Yes", "No", "Yes", "Yes"]  # OCR both right; artwork one of two
    scores, metrics = bench.score([{**s, "prediction": p} for s, p in zip(samples, preds)])
    assert scores == [1.0, 1.0, 1.0, 0.0]
    assert metrics["per_subtask"]["OCR"]["score"] == 200.0
    assert metrics["per_subtask"]["artwork"]["score"] == 50.0  # acc 50 + acc_plus 0
    assert metrics["perception"] == 250.0 and metrics["total"] == 250.0 and metrics["cognition"] == 0.0


def test_mme_missing_gt_and_unknown_question(tmp_path):
    _mme(tmp_path)
    bench = BENCHMARKS["mme"]
    files = bench.resolve(tmp_path)
    (tmp_path / "MME" / "MME_Benchmark_release_version" / "OCR" / "0001.txt").unlink()
    with pytest.raises(MissingBenchmarkFile, match=r"OCR/questions_answers_YN/0001\.txt or .*OCR/0001\.txt"):
        bench.load(files)
    _mme(tmp_path / "b")
    path = tmp_path / "b" / "MME" / "llava_mme.jsonl"
    path.write_text(json.dumps({"question_id": "OCR/0001.jpg", "image": "OCR/0001.jpg", "text": "Other?"}) + "\n")
    with pytest.raises(ValueError, match=r"'Other\?'\) not found in .*OCR/0001\.txt"):
        bench.load(bench.resolve(tmp_path / "b"))


# ---------------------------------------------------------------- MMBench
def _mmbench(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, delimiter="\t")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c, "") for c in cols})


def _mmbench_rows() -> list[dict]:
    img = base64.b64encode(_png(color="blue")).decode()
    return [
        {"index": "10", "question": "What color?", "hint": "nan", "A": "red", "B": "blue", "C": "green", "D": "pink",
         "answer": "B", "category": "color", "l2-category": "attribute", "image": img},
        {"index": "11", "question": "Is it \"blue\"?", "hint": "Look closely.", "A": "yes", "B": "no",
         "answer": "A", "category": "color", "l2-category": "attribute", "image": "10"},
    ]


def test_mmbench_rotations_and_circular_score(tmp_path):
    _mmbench(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", _mmbench_rows())
    bench = BENCHMARKS["mmbench"]
    samples = bench.load(bench.resolve(tmp_path))
    assert [(s["group"], s["rotation"]) for s in samples] == [
        ("10", 0), ("10", 1), ("10", 2), ("10", 3), ("11", 0), ("11", 1)]
    first = samples[0]
    assert first["text"] == "What color?\nA. red\nB. blue\nC. green\nD. pink"  # "nan" hint dropped
    assert samples[1]["text"] == "What color?\nA. blue\nB. green\nC. pink\nD. red"
    assert [s["answer"] for s in samples[:4]] == ["B", "A", "D", "C"]
    assert samples[4]["text"] == "Look closely.\nIs it \"blue\"?\nA. yes\nB. no"
    assert samples[5]["options"] == {"A": "no", "B": "yes"} and samples[5]["answer"] == "B"
    assert Image.open(io.BytesIO(samples[5]["image_bytes"])).getpixel((0, 0)) == (0, 0, 255)  # shared image
    assert first["image"] == "mmbench_dev_20230712/10"
    preds = ["B", "A", "D", "A", "A", "B"]  # group 10: 3 of 4 rotations right -> 0; group 11 all right
    scores, metrics = bench.score([{**s, "prediction": p} for s, p in zip(samples, preds)])
    assert scores == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert metrics["accuracy"] == 50.0 and metrics["n_groups"] == 2
    assert metrics["single_pass_accuracy"] == 100.0


def test_mmbench_cn_layout_and_bad_answer(tmp_path):
    rows = _mmbench_rows()[:1]
    rows[0]["question"] = "什么颜色？"
    _mmbench(tmp_path / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv", rows)
    bench = BENCHMARKS["mmbench_cn"]
    samples = bench.load(bench.resolve(tmp_path))
    assert len(samples) == 4 and samples[0]["text"].startswith("什么颜色？\nA. red")
    rows[0]["answer"] = "E"
    _mmbench(tmp_path / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv", rows)
    with pytest.raises(ValueError, match="MMBench index 10: answer 'E'"):
        bench.load(bench.resolve(tmp_path))


def test_mmbench_missing_file_names_path(tmp_path):
    with pytest.raises(MissingBenchmarkFile, match=r"questions file expected at .*mmbench/mmbench_dev_20230712\.tsv"):
        BENCHMARKS["mmbench"].resolve(tmp_path)


# ---------------------------------------------------------------- SEED
def _seed(root: Path) -> None:
    d = root / "seed_bench"
    suffix = "\n" + OPTION_LETTER
    _jsonl(d / "llava-seed-bench.jsonl", [
        {"question_id": 101, "image": "SEED-Bench-image/a.jpg", "text": "How many cats?\nA. 1\nB. 2\nC. 3\nD. 4" + suffix},
        {"question_id": 102, "image": "SEED-Bench-image/b.jpg", "text": "Where?\nA. park\nB. beach\nC. road\nD. room"},
        {"question_id": 900, "image": "SEED-Bench-video-image/v.png", "text": "Action?" + suffix},
    ])
    q = {"choice_a": "1", "choice_b": "2", "choice_c": "3", "choice_d": "4"}
    _json(d / "SEED-Bench.json", {
        "question_type": {"Scene Understanding": 1, "Instances Counting": 5, "Action Recognition": 10},
        "questions": [
            {**q, "question_id": "101", "answer": "C", "question_type_id": 5, "data_type": "image"},
            {"question_id": "102", "answer": "B", "question_type_id": 1, "data_type": "image",
             "choice_a": "park", "choice_b": "beach", "choice_c": "road", "choice_d": "room"},
            {**q, "question_id": "900", "answer": "A", "question_type_id": 10, "data_type": "video"},
        ]})


def test_seed_load_and_score(tmp_path):
    _seed(tmp_path)
    bench = BENCHMARKS["seed"]
    samples = bench.load(bench.resolve(tmp_path))
    assert [s["question_id"] for s in samples] == ["101", "102"]  # video question dropped
    assert samples[0]["text"] == "How many cats?\nA. 1\nB. 2\nC. 3\nD. 4"
    assert samples[0]["options"] == {"A": "1", "B": "2", "C": "3", "D": "4"} and samples[0]["answer"] == "C"
    assert samples[0]["question_type"] == "Instances Counting" and samples[1]["question_type"] == "Scene Understanding"
    scores, metrics = bench.score([{**samples[0], "prediction": "C"}, {**samples[1], "prediction": "A"}])
    assert scores == [1.0, 0.0] and metrics["accuracy"] == 50.0
    assert metrics["per_category"] == {"Instances Counting": 100.0, "Scene Understanding": 0.0}


def test_seed_unknown_question_and_missing_annotations(tmp_path):
    _seed(tmp_path)
    bench = BENCHMARKS["seed"]
    _jsonl(tmp_path / "seed_bench" / "llava-seed-bench.jsonl", [{"question_id": 5, "image": "x.jpg", "text": "?"}])
    with pytest.raises(ValueError, match="SEED question '5'"):
        bench.load(bench.resolve(tmp_path))
    (tmp_path / "seed_bench" / "SEED-Bench.json").unlink()
    with pytest.raises(MissingBenchmarkFile, match=r"annotations file expected at .*seed_bench/SEED-Bench\.json"):
        bench.resolve(tmp_path)
