"""custom_open / custom_yesno: the documented JSONL layout, its errors, a run through tuna-eval; purity labels."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from datastore.purity import Labels, key_purity
from eval.benchmarks import BENCHMARKS, SHORT_ANSWER
from eval.cli import main


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def write_custom(root):
    """DATA_ROOT/custom/{open,yesno}.jsonl with seen/novel groups; one image outside the folder (absolute)."""
    (root / "custom" / "img").mkdir(parents=True)
    for name, colour in (("red", "red"), ("blue", "blue"), ("green", "green")):
        Image.new("RGB", (32, 32), colour).save(root / "custom" / "img" / f"{name}.png")
    outside = root / "elsewhere" / "grey.png"
    outside.parent.mkdir()
    Image.new("RGB", (32, 32), "grey").save(outside)
    write_jsonl(root / "custom" / "open.jsonl", [
        {"question_id": 1, "image": "img/red.png", "question": "What colour is it?", "answers": ["red"],
         "group": "seen", "category": "colour", "source": "kept as is"},
        {"question_id": "q2", "image": "img/blue.png", "question": f"What is it? {SHORT_ANSWER}",  # same line
         "answers": ["blue square", "square"], "group": "novel"},
        {"question_id": "q3", "image": str(outside), "question": f"What is it?\n{SHORT_ANSWER}",  # own line
         "answers": ["grey"], "group": "novel"},
        "",
        {"question_id": "q4", "image": "img/green.png", "question": "Colour?", "answers": ["green"]},
        {"question_id": "q5", "image": "img/green.png", "question": "Beyond --limit", "answers": ["green"]},
    ])
    write_jsonl(root / "custom" / "yesno.jsonl", [
        {"question_id": "y1", "image": "img/red.png", "question": "Is it red?", "answer": "Yes", "group": "seen",
         "category": "colour"},
        {"question_id": "y2", "image": "img/red.png", "question": "Is it blue?", "answers": ["no"], "group": "seen"},
        {"question_id": "y3", "image": "img/blue.png", "question": "Is there a kelbo?", "answer": "no",
         "group": "novel"},
    ])
    return root


def load(name, root):
    bench = BENCHMARKS[name]
    return bench.load(bench.resolve(root))


def test_loaders_read_the_documented_fields(tmp_path):
    root = write_custom(tmp_path)
    samples = load("custom_open", root)
    assert [s["question_id"] for s in samples] == [1, "q2", "q3", "q4", "q5"]
    assert samples[0] == {"question_id": 1, "image": "img/red.png", "text": "What colour is it?", "answers": ["red"],
                          "group": "seen", "category": "colour", "source": "kept as is"}
    # both forms of a trailing instruction end up on a line of their own, where the runner strips them
    assert samples[1]["text"] == samples[2]["text"] == f"What is it?\n{SHORT_ANSWER}"
    assert samples[3]["group"] == "ungrouped"
    yesno = load("custom_yesno", root)
    assert [(s["answer"], s["group"], s.get("split")) for s in yesno] == [
        ("yes", "seen", "colour"), ("no", "seen", None), ("no", "novel", None)]
    assert "answers" not in yesno[1]


@pytest.fixture(scope="module")
def model_dir(world, tmp_path_factory):
    from transformers import AutoTokenizer

    from datastore.clip import ClipSpec
    from tuna.modeling_tuna import TunaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(world["llm"])
    model = TunaForCausalLM.from_components(str(world["llm"]), ClipSpec(model="tuna-tiny-clip"), tokenizer,
                                            tag_hidden_dim=32, tag_num_heads=2, max_tags=4)
    out = tmp_path_factory.mktemp("custom_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_tuna_eval_runs_the_custom_benchmarks(world, model_dir, tmp_path):
    root, out = write_custom(tmp_path / "data"), tmp_path / "out"
    code = main(["--model", str(model_dir), "--bench", "custom_open,custom_yesno", "--data-root", str(root),
                 "--datastore", str(world["datastore"]), "--out", str(out), "--limit", "4", "--batch-size", "2"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())["benchmarks"]
    open_, yesno = results["custom_open"], results["custom_yesno"]
    assert open_["n"] == 4 and set(open_["groups"]["group"]) == {"seen", "novel", "ungrouped"}
    assert open_["main_metric"] == "accuracy" and isinstance(open_["metrics"]["accuracy"], float)
    assert open_["metrics"]["per_category"].keys() == {"colour", "all"}
    assert open_["prompt_suffix_stripped"] == 2
    assert yesno["n"] == 3 and set(yesno["groups"]["group"]) == {"seen", "novel"}
    for metrics in (yesno["metrics"], *yesno["groups"]["group"].values()):
        assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(metrics)
    assert yesno["main_metric"] == "f1" and set(yesno["metrics"]["per_split"]) == {"colour"}
    for name in ("custom_open", "custom_yesno"):
        records = [json.loads(x) for x in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert records and all(r["prompt"].count(SHORT_ANSWER) == 1 for r in records), name
        assert all(SHORT_ANSWER not in r["text"] for r in records), name
    assert "| custom_open group=novel |" in (out / "results.md").read_text()


GOOD = {"question_id": "a", "image": "img/red.png", "question": "Q?", "answers": ["red"]}


@pytest.mark.parametrize("bench, bad, message", [
    ("custom_open", '{"question_id": "b", ', "not valid JSON"),
    ("custom_open", {k: v for k, v in GOOD.items() if k != "image"} | {"question_id": "b"}, "missing field 'image'"),
    ("custom_open", GOOD, "question_id 'a' already used on line 1"),
    ("custom_open", GOOD | {"question_id": "b", "answers": "red"}, "answers must be a non-empty list"),
    ("custom_open", GOOD | {"question_id": "b", "prediction": "x"}, "'prediction' is set by the evaluation"),
    ("custom_open", GOOD | {"question_id": "b", "question": SHORT_ANSWER}, "only the instruction"),
    ("custom_yesno", GOOD | {"question_id": "b", "answers": ["maybe"]}, "needs answer \"yes\" or \"no\""),
    ("custom_yesno", GOOD | {"question_id": "b", "answers": ["yes", "no"]}, "needs answer \"yes\" or \"no\""),
])
def test_a_bad_line_names_file_and_line(tmp_path, bench, bad, message):
    write_custom(tmp_path)
    good = GOOD if bench == "custom_open" else GOOD | {"answers": ["yes"]}
    path = tmp_path / BENCHMARKS[bench].files["questions"]
    write_jsonl(path, [good, "", bad])
    with pytest.raises(ValueError, match=f"{path.name}:3: .*{message}"):
        load(bench, tmp_path)


def test_an_empty_file_is_an_error(tmp_path):
    write_custom(tmp_path)
    (tmp_path / "custom" / "open.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="open.jsonl: no questions"):
        load("custom_open", tmp_path)


# ---------------------------------------------------------------- purity against labels from a file
def test_purity_reads_labels_from_csv_and_jsonl(tmp_path):
    (tmp_path / "labels.csv").write_text("image,label,group\nq/a.png,cat,seen\nq/b.png,dog,novel\n"
                                         "q/b.png,ball,novel\nk1,cat,\nk2,dog,\nk3,ball,\n")
    write_jsonl(tmp_path / "labels.jsonl", [
        {"image": "q/a.png", "label": "cat", "group": "seen"}, {"image": "q/b.png", "labels": ["dog", "ball"],
                                                                 "group": "novel"},
        {"image": "k1", "labels": ["cat"]}, {"image": "k2", "label": "dog"}, {"image": "k3", "label": "ball"}])
    images, neighbours = ["q/a.png", "q/b.png"], [["k2", "k1"], ["k3", "k2"]]
    for name in ("labels.csv", "labels.jsonl"):
        labels = Labels.read(tmp_path / name)
        assert labels.labels["q/b.png"] == {"dog", "ball"}
        report = key_purity(images, neighbours, labels, ks=(1, 2))
        assert report["all"] == {"n": 2, "top1": 0.5, "top2": 0.75}, name
        assert report["seen"] == {"n": 1, "top1": 0.0, "top2": 0.5} and report["novel"]["top1"] == 1.0, name
        assert report["single"]["n"] == 1
    with pytest.raises(ValueError, match="1 of 4 image keys have no label"):
        key_purity(images, [["k2", "k9"], ["k3", "k1"]], Labels.read(tmp_path / "labels.csv"), ks=(1, 2))
    (tmp_path / "bad.jsonl").write_text('{"image": "x", "labels": []}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: needs an image key"):
        Labels.read(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text("path,label\nx,cat\n")
    with pytest.raises(ValueError, match="header with image,label"):
        Labels.read(tmp_path / "bad.csv")


def test_labels_from_a_file_reproduce_the_world_keys_purity(world, tmp_path):
    """The default source (synthetic-world keys) and the same labels written to a file give one report."""
    from datastore.cache import RetrievalCache, llava_image_ids
    from datastore.synth.layout import World

    cache, synth = RetrievalCache(world["cache"]), World.open(world["data_root"])
    images = llava_image_ids([world["instruct"]])[:12]
    neighbours = [cache[image].neighbours for image in images]
    expected = key_purity(images, neighbours, synth.categories, ks=(1, 3))
    keys = list(dict.fromkeys(images + [k for row in neighbours for k in row]))
    categories, novelty = synth.categories(keys)
    write_jsonl(tmp_path / "labels.jsonl", [{"image": k, "labels": sorted(c), "group": g}
                                            for k, c, g in zip(keys, categories, novelty)])
    assert key_purity(images, neighbours, Labels.read(tmp_path / "labels.jsonl"), ks=(1, 3)) == expected
    assert expected["all"]["n"] == 12 and "seen" in expected
