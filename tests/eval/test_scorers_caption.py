"""Caption metrics via pycocoevalcap (needs java, as the official pipeline)."""

from __future__ import annotations

import pytest

from eval.scorers.caption import score_caption


def test_identical_captions_score_perfect_bleu_and_ranks_cider():
    refs = [["a dog runs on the grass", "a dog running on grass"], ["two cats sleep on a sofa", "cats sleeping"],
            ["a red car parked outside", "a parked red car"]]
    exact = [{"prediction": r[0], "references": r} for r in refs]
    per, metrics = score_caption(exact)
    assert metrics["bleu_1"] == pytest.approx(100.0, abs=1e-3) and metrics["n"] == 3
    wrong = [{"prediction": "a bowl of soup", "references": r} for r in refs]
    per_wrong, metrics_wrong = score_caption(wrong)
    assert metrics_wrong["cider"] < metrics["cider"] and all(a > b for a, b in zip(per, per_wrong))
    assert metrics_wrong["bleu_4"] == pytest.approx(0.0, abs=1e-3)


def test_tokenization_ignores_case_and_punctuation():
    refs = [["A dog runs on the grass."], ["Two cats sleep."]]
    plain = score_caption([{"prediction": "a dog runs on the grass", "references": refs[0]},
                           {"prediction": "two cats sleep", "references": refs[1]}])[1]
    shouty = score_caption([{"prediction": "A DOG runs on the grass!", "references": refs[0]},
                            {"prediction": "Two cats sleep.", "references": refs[1]}])[1]
    assert plain["cider"] == pytest.approx(shouty["cider"]) and plain["bleu_4"] == pytest.approx(shouty["bleu_4"])


def test_errors():
    with pytest.raises(ValueError, match="score_caption: records is empty"):
        score_caption([])
    with pytest.raises(ValueError, match=r"record 'q7' references must be a non-empty list of str, got \[\]"):
        score_caption([{"question_id": "q7", "prediction": "x", "references": []}])


def test_coco_caption_benchmark_loads_and_scores(tmp_path):
    import json

    from PIL import Image

    from eval.benchmarks import get_benchmark

    (tmp_path / "coco" / "val2014").mkdir(parents=True)
    (tmp_path / "coco" / "annotations").mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "val2014" / name)
    data = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
            "annotations": [{"image_id": 1, "caption": "a dog on grass"}, {"image_id": 1, "caption": "a dog"},
                            {"image_id": 2, "caption": "two cats"}]}
    (tmp_path / "coco" / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    bench = get_benchmark("coco_caption_val2014")
    samples = bench.load(bench.resolve(tmp_path))
    assert [(s["question_id"], s["image"], s["references"]) for s in samples] == \
           [(1, "a.jpg", ["a dog on grass", "a dog"]), (2, "b.jpg", ["two cats"])]
    _, metrics = bench.score([{**s, "prediction": s["references"][0]} for s in samples])
    assert metrics["bleu_1"] == pytest.approx(100.0, abs=1e-3) and bench.main_metric == "cider"
    data["annotations"] = data["annotations"][:2]
    (tmp_path / "coco" / "annotations" / "captions_val2014.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"image 2 \(b.jpg\) has no reference captions"):
        bench.load(bench.resolve(tmp_path))
