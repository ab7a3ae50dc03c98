"""A tiny model through tuna-eval on a tiny fixture of every registered benchmark format (live retrieval)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from eval.benchmarks import BENCHMARKS
from eval.judge import NOT_SCORED
from eval.runner import EvalConfig, evaluate
from tests.eval import test_bench_llava_choice as choice
from tests.eval import test_bench_llava_vqa as vqa

LLAVA_FORMATS = ["pope", "gqa", "textvqa", "vqav2_val", "vizwiz_val", "scienceqa_img", "mme", "mmbench",
                 "mmbench_cn", "seed", "llava_wild", "mmvet", "coco_caption_val2014"]


def write_fixtures(root) -> None:
    """Every format's fixture under one data root (the writers of the loader tests, plus judged/caption ones)."""
    for writer in (vqa._pope, vqa._gqa, vqa._textvqa, vqa._vqav2, vqa._vizwiz, choice._scienceqa, choice._mme,
                   choice._seed):
        writer(root)
    choice._mmbench(root / "mmbench" / "mmbench_dev_20230712.tsv", choice._mmbench_rows())
    choice._mmbench(root / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv", choice._mmbench_rows())
    wild = root / "llava-bench-in-the-wild"
    (wild / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(wild / "images" / "001.jpg")
    (wild / "questions.jsonl").write_text(json.dumps({"question_id": 0, "image": "001.jpg", "text": "Describe it.",
                                                      "category": "detail"}) + "\n")
    (wild / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 0, "text": "A red square."}) + "\n")
    (wild / "context.jsonl").write_text(json.dumps({"image": "001.jpg", "caption": "red"}) + "\n")
    mmvet = root / "mm-vet"
    (mmvet / "images").mkdir(parents=True)
    Image.new("RGB", (16, 16), "blue").save(mmvet / "images" / "v1_0.png")
    (mmvet / "llava-mm-vet.jsonl").write_text(json.dumps({"question_id": "v1_0", "image": "v1_0.png",
                                                          "text": "What colour?"}) + "\n")
    (mmvet / "mm-vet.json").write_text(json.dumps({"v1_0": {"imagename": "v1_0.png", "question": "What colour?",
                                                            "answer": "blue", "capability": ["rec"]}}))
    coco = root / "coco"
    (coco / "val2014").mkdir(parents=True)
    (coco / "annotations").mkdir()
    Image.new("RGB", (16, 16), "green").save(coco / "val2014" / "c.jpg")
    (coco / "annotations" / "captions_val2014.json").write_text(json.dumps(
        {"images": [{"id": 7, "file_name": "c.jpg"}], "annotations": [{"image_id": 7, "caption": "a green square"}]}))
    for name in LLAVA_FORMATS:  # images some loader-only fixtures leave out
        bench = BENCHMARKS[name]
        (root / bench.image_folder).mkdir(parents=True, exist_ok=True)
        files = bench.resolve(root)
        for sample in bench.load(files):
            path = files["images"] / str(sample["image"])
            if sample.get("image_bytes") is None and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), "white").save(path)


def test_every_format_runs_end_to_end(world, tmp_path):
    from transformers import AutoTokenizer

    from datastore.clip import ClipSpec
    from tuna.modeling_tuna import TunaForCausalLM

    assert set(LLAVA_FORMATS) | {"synth_open", "synth_pope", "synth_mc", "synth_icl", "okvqa_val", "classification_val", "nocaps_val", "vqav2_testdev", "custom_open", "custom_yesno",
                                 "vizwiz_test"} == set(BENCHMARKS)
    tokenizer = AutoTokenizer.from_pretrained(world["llm"])
    model = TunaForCausalLM.from_components(str(world["llm"]), ClipSpec(model="tuna-tiny-clip"), tokenizer,
                                            tag_hidden_dim=32, tag_num_heads=2, max_tags=4)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    write_fixtures(tmp_path / "data")
    results = evaluate(EvalConfig(model=str(tmp_path / "model"), benches=LLAVA_FORMATS, data_root=str(tmp_path / "data"),
                                  out=str(tmp_path / "out"), datastore=str(world["datastore"]), batch_size=3))
    for name in LLAVA_FORMATS:
        entry = results["benchmarks"][name]
        records = [json.loads(x) for x in (tmp_path / "out" / name / "predictions.jsonl").read_text().splitlines()]
        assert records and all("prediction" in r and r["tags"] for r in records), name
        if name in ("llava_wild", "mmvet"):
            assert entry["metrics"]["status"] == NOT_SCORED
        else:
            assert isinstance(entry["metrics"][entry["main_metric"]], float), name
    assert not any("image_bytes" in r for r in
                   map(json.loads, (tmp_path / "out" / "mmbench" / "predictions.jsonl").read_text().splitlines()))
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| mmvet (total) | not scored: no judge |" in table and "| mme (total) |" in table


@pytest.mark.parametrize("name", ["gqa", "mmbench"])
def test_missing_format_file_is_a_one_line_error(name, tmp_path, capsys):
    from eval.cli import main

    code = main(["--model", str(tmp_path), "--bench", name, "--data-root", str(tmp_path), "--no-tags",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "file expected at" in err
