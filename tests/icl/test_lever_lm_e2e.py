"""Lever-LM end to end on a tiny TUNA and the literature's layouts: VQAv2 pool -> build-data -> train ->
retrieve K > l demos -> k-shot tuna-eval on OK-VQA's layout; and a COCO-Karpathy caption pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.eval.test_runner import model_dir  # noqa: F401  (module fixture: a saved tiny TUNA model)

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}


def vqav2_layout(root: Path, split: str, per_colour: int) -> tuple[Path, Path, Path]:
    """VQAv2's official files (questions + annotations, COCO_<split>_<id>.jpg images): one colour question per
    image, so the answer is the image's colour."""
    images, questions, annotations = root / split, [], []
    images.mkdir(parents=True, exist_ok=True)
    for n, (name, rgb) in enumerate(c for c in COLOURS.items() for _ in range(per_colour)):
        image_id = 1000 + n
        shade = tuple(min(255, v + 7 * (n % per_colour)) for v in rgb)
        Image.new("RGB", (32, 32), shade).save(images / f"COCO_{split}_{image_id:012d}.jpg")
        questions.append({"image_id": image_id, "question": "What colour is the square?", "question_id": 10 * image_id})
        annotations.append({"question_id": 10 * image_id, "image_id": image_id, "multiple_choice_answer": name,
                            "answers": [{"answer": name, "answer_id": i + 1} for i in range(10)]})
    q, a = root / f"OpenEnded_mscoco_{split}_questions.json", root / f"mscoco_{split}_annotations.json"
    q.write_text(json.dumps({"questions": questions}))
    a.write_text(json.dumps({"annotations": annotations}))
    return q, a, images


def run_cli(argv: list[str]) -> None:
    from icl.cli import main

    assert main(argv) == 0, argv


@pytest.fixture(scope="module")
def trained(world, model_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("lever_e2e")
    q, a, images = vqav2_layout(root / "vqav2", "train2014", per_colour=3)
    pool = root / "pool"
    run_cli(["pool", "build", "--format", "vqav2", "--input", str(q), str(a), "--image-root", str(images),
             "--out", str(pool), "--model", "tuna-tiny-clip"])
    dm = root / "dm"
    run_cli(["lever-lm", "build-data", "--pool", str(pool), "--model", str(model_dir), "--datastore",
             str(world["datastore"]), "--anchors", "6", "--candidates", "4", "--beam", "2", "--length", "2",
             "--block", "3", "--out", str(dm), "--device", "cpu", "--scorer-batch-size", "8"])
    lever = root / "lever-lm"
    run_cli(["lever-lm", "train", "--data", str(dm), "--out", str(lever), "--hidden-size", "32", "--num-heads", "2",
             "--epochs", "3", "--batch-size", "4"])
    return {"root": root, "pool": pool, "dm": dm, "lever": lever}


def test_build_data_manifest_names_the_scorer_and_settings(trained, model_dir):  # noqa: F811
    manifest = json.loads((trained["dm"] / "manifest.json").read_text())
    assert manifest["anchors"] == 6 and manifest["sequences"] == 12
    assert manifest["scorer"]["model"] == str(Path(model_dir).resolve()) and manifest["scorer"]["backend"] == "tuna"
    assert manifest["scorer"]["config_sha256"] and manifest["settings"]["candidates"] == 4
    assert manifest["sets_scored"] == 6 * (1 + 4 + 2 * 3) and manifest["sets_per_second"] > 0


def test_retrieve_extrapolates_past_the_trained_length(trained, tmp_path):
    from icl.pool import Pool

    out = tmp_path / "demos.jsonl"
    run_cli(["retrieve", "--pool", str(trained["pool"]), "--retriever", f"lever-lm:{trained['lever']}", "-k", "4",
             "--out", str(out)])
    pool = Pool.open(trained["pool"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(pool)
    for row in rows:
        assert len(row["demos"]) == 4 == len(set(row["demos"])) and row["id"] not in row["demos"]
        assert set(row["demos"]) <= set(pool.position)


def test_kshot_eval_with_lever_lm_on_the_okvqa_layout(trained, world, model_dir):  # noqa: F811
    from eval.kshot import KShotSettings
    from eval.runner import EvalConfig, evaluate

    data = trained["root"] / "data"
    vqav2_layout(data / "okvqa", "val2014", per_colour=1)
    settings = KShotSettings(pool=str(trained["pool"]), retriever=f"lever-lm:{trained['lever']}")
    results = evaluate(EvalConfig(model=str(model_dir), benches=["okvqa_val"], data_root=str(data),
                                  out=str(trained["root"] / "eval"), datastore=str(world["datastore"]),
                                  shots=[1, 3], kshot=settings))
    entry = results["kshot"]["okvqa_val"]
    assert entry["retriever"] == f"lever-lm:{trained['lever']}" and set(map(int, entry["shots"])) == {1, 3}
    records = [json.loads(line) for line in
               (trained["root"] / "eval" / "okvqa_val" / "3-shot" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(len(r["demos"]) == 3 and r["prompt"].count("<image>") == 4 for r in records)


def test_caption_pool_from_coco_karpathy(world, model_dir, tmp_path):  # noqa: F811
    from tests.icl.test_formats import karpathy_json

    path = karpathy_json(tmp_path)
    pool = tmp_path / "pool"
    run_cli(["pool", "build", "--format", "coco-karpathy", "--input", path,
             "--image-root", str(tmp_path / "coco"), "--out", str(pool), "--model", "tuna-tiny-clip"])
    run_cli(["lever-lm", "build-data", "--pool", str(pool), "--model", str(model_dir), "--datastore",
             str(world["datastore"]), "--anchors", "3", "--candidates", "2", "--beam", "2", "--length", "2",
             "--out", str(tmp_path / "dm"), "--device", "cpu"])
    rows = json.loads((tmp_path / "dm" / "manifest.json").read_text())
    assert rows["anchors"] == 3 and rows["sequences"] == 6
    from icl.lever_lm.data import diagnostics
    from icl.pool import Pool

    found = diagnostics(tmp_path / "dm", Pool.open(pool))  # captions carry no label: nothing to say about labels
    assert found["labelled_anchors"] == 0 and found["sequences_holding_anchor_label_pct"] is None
