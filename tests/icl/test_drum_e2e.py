"""DRUM end to end on tiny real models: trained with a Qwen2-VL scorer and used to evaluate a Llama-based TUNA
(transfer across architectures) on the VQA and classification layouts, a caption pool, and two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.eval.test_runner import model_dir  # noqa: F401  (module fixture: a saved tiny TUNA model)
from tests.icl.test_hf_scorer import checkpoint  # noqa: F401  (module fixture: a saved tiny Qwen2-VL)
from tests.icl.test_lever_lm_e2e import COLOURS, run_cli, vqav2_layout

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--rounds", "1", "--candidates", "3", "--dev-queries", "2", "--dev-shots", "2", "--epochs", "2",
         "--batch-size", "4", "--embedder-device", "cpu", "--device", "cpu"]


@pytest.fixture(scope="module")
def vqa(tmp_path_factory, checkpoint):  # noqa: F811
    root = tmp_path_factory.mktemp("drum_e2e")
    q, a, images = vqav2_layout(root / "vqav2", "train2014", per_colour=3)
    pool = root / "pool"
    run_cli(["pool", "build", "--format", "vqav2", "--input", str(q), str(a), "--image-root", str(images),
             "--out", str(pool), "--model", "tuna-tiny-clip"])
    run = root / "drum-qwen2vl"
    run_cli(["drum", "train", "--pool", str(pool), "--out", str(run), "--hf-model", str(checkpoint), *SMALL])
    return {"root": root, "pool": pool, "run": run}


def test_training_with_an_hf_model_records_it_and_its_rounds(vqa, checkpoint):  # noqa: F811
    settings = json.loads((vqa["run"] / "settings.json").read_text())
    assert settings["scorer"]["backend"] == "hf" and settings["scorer"]["model"] == str(Path(checkpoint).resolve())
    rounds = json.loads((vqa["run"] / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["pairs"] == 10 * 3 and rounds[0]["scored"] == 30 and rounds[0]["pairs_per_second"] > 0
    assert rounds[0]["dev_2shot_loglik"] < 0 and rounds[0]["dev_top1_same_label"] is not None


def test_transfer_to_a_tuna_model_on_the_vqa_and_classification_layouts(vqa, world, model_dir):  # noqa: F811
    from eval.kshot import KShotSettings
    from eval.runner import EvalConfig, evaluate

    data = vqa["root"] / "data"
    vqav2_layout(data / "okvqa", "val2014", per_colour=1)
    for name, rgb in COLOURS.items():  # classification/val/CLASS/IMAGE
        (data / "classification" / "val" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), rgb).save(data / "classification" / "val" / name / "0.png")
    retriever = f"drum:{vqa['run']}"
    out = vqa["root"] / "eval"
    results = evaluate(EvalConfig(model=str(model_dir), benches=["okvqa_val", "classification_val"],
                                  data_root=str(data), out=str(out), datastore=str(world["datastore"]),
                                  shots=[1, 2], kshot=KShotSettings(pool=str(vqa["pool"]), retriever=retriever)))
    for bench in ("okvqa_val", "classification_val"):
        assert results["kshot"][bench]["retriever"] == retriever
        records = [json.loads(line) for line in (out / bench / "2-shot" / "predictions.jsonl").read_text().splitlines()]
        assert len(records) == 4 and all(len(r["demos"]) == 2 and r["prompt"].count("<image>") == 3 for r in records)


def test_caption_pool_with_a_tuna_scorer(world, model_dir, tmp_path):  # noqa: F811
    from tests.icl.test_formats import karpathy_json

    path = karpathy_json(tmp_path)
    pool = tmp_path / "pool"
    run_cli(["pool", "build", "--format", "coco-karpathy", "--input", path, "--image-root", str(tmp_path / "coco"),
             "--out", str(pool), "--model", "tuna-tiny-clip"])
    run = tmp_path / "drum"
    run_cli(["drum", "train", "--pool", str(pool), "--out", str(run), "--model", str(model_dir), "--datastore",
             str(world["datastore"]), *SMALL[:4], "--dev-queries", "1", *SMALL[6:]])
    out = tmp_path / "demos.jsonl"
    run_cli(["retrieve", "--pool", str(pool), "--retriever", f"drum:{run}", "-k", "2", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(len(r["demos"]) == 2 and r["id"] not in r["demos"] for r in rows)
    rounds = json.loads((run / "rounds.json").read_text())
    assert rounds[0]["dev_top1_same_label"] is None  # captions carry no label


def test_two_processes_split_the_queries(vqa, world, model_dir, tmp_path):  # noqa: F811
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "drum-2proc"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "icl.cli", "drum", "train", "--pool", str(vqa["pool"]), "--out", str(run), "--model",
           str(model_dir), "--datastore", str(world["datastore"]), *SMALL]
    result = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1] and rounds[0]["processes"] == 2
    assert rounds[0]["cache_size"] == 10 * 3  # both ranks' scores, each pair once
    assert len(list((run / "feedback").glob("part-*.parquet"))) >= 2  # one part per rank at least
    assert (run / "round-1" / "drum_embedder.safetensors").is_file()
