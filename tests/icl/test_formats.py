"""icl.formats: every input layout read into Examples, with bad records skipped and counted by reason."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from icl.formats import FORMATS, Example, Skipped, read_examples


def write_image(path: Path, colour=(200, 30, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format=fmt)
    return path


def image_bytes(fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, format=fmt)
    return buf.getvalue()


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


# ---------------------------------------------------------------- generic
def test_skipped_counts_and_keeps_five_examples():
    s = Skipped()
    for i in range(7):
        s.add("image missing", f"x{i}")
    s.add("no answer", "y")
    assert s.counts == {"image missing": 7, "no answer": 1}
    assert s.examples["image missing"] == ["x0", "x1", "x2", "x3", "x4"]
    assert s.total == 8
    assert "image missing: 7" in s.summary()


def test_unknown_format_lists_formats():
    with pytest.raises(ValueError, match="llava, vqav2, coco-karpathy, image-folder, webdataset, synth"):
        read_examples("coco", ["x.json"])
    assert FORMATS == ("llava", "vqav2", "coco-karpathy", "image-folder", "webdataset", "synth", "synth-icl")


@pytest.mark.parametrize("fmt", ["llava", "coco-karpathy"])
def test_malformed_json_names_the_file(tmp_path, fmt):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"id": "a",')
    with pytest.raises(ValueError, match="broken.json"):
        list(read_examples(fmt, [str(bad)], image_root=str(tmp_path)))


def test_vqav2_malformed_annotations_names_the_file(tmp_path):
    q = write_json(tmp_path / "q.json", {"questions": []})
    (tmp_path / "ann.json").write_text("{oops")
    with pytest.raises(ValueError, match="ann.json"):
        list(read_examples("vqav2", [q, str(tmp_path / "ann.json")], image_root=str(tmp_path)))


# ---------------------------------------------------------------- llava
def test_llava_rounds_and_skips(tmp_path):
    img = write_image(tmp_path / "imgs" / "a.jpg")
    records = [
        {"id": "a", "image": "a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": " red "},
            {"from": "human", "value": "Is it round?\n<image>"}, {"from": "gpt", "value": "No"},
            {"from": "human", "value": "And now?"}, {"from": "gpt", "value": "  "}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "gone", "image": "missing.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
        {"id": "odd", "image": "a.jpg", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
        "not a record",
    ]
    path = write_json(tmp_path / "instruct.json", records)
    skipped = Skipped()
    examples = list(read_examples("llava", [path], image_root=str(tmp_path / "imgs"), skipped=skipped))
    assert examples == [
        Example("a:0", str(img.resolve()), "What colour is it?", ("red",), "vqa", "red"),
        Example("a:1", str(img.resolve()), "Is it round?", ("No",), "vqa", "No"),
    ]
    assert skipped.counts == {"no answer": 1, "no image": 1, "image missing": 1, "bad conversation": 1,
                              "bad record": 1}
    assert skipped.examples["no answer"] == ["a:2"]
    assert skipped.examples["image missing"] == ["gone"]
    assert skipped.examples["bad record"] == [f"{path}#4"]


def test_llava_duplicate_ids_across_files_are_skipped(tmp_path):
    write_image(tmp_path / "a.jpg")
    rec = [{"id": "a", "image": "a.jpg", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    first, second = write_json(tmp_path / "one.json", rec), write_json(tmp_path / "two.json", rec)
    skipped = Skipped()
    examples = list(read_examples("llava", [first, second], skipped=skipped))  # image_root: the json's folder
    assert [e.id for e in examples] == ["a:0"]
    assert skipped.counts == {"duplicate id": 1}


# ---------------------------------------------------------------- vqav2
def vqav2_files(tmp_path: Path) -> tuple[str, str, Path]:
    root = tmp_path / "val2014"
    official = write_image(root / "COCO_val2014_000000000042.jpg")
    write_image(root / "000000000007.jpg")  # only found by the folder lookup
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What colour is the bus?", "question_id": 420},
        {"image_id": 7, "question": "How many dogs?", "question_id": 70},
        {"image_id": 42, "question": "Unanswered?", "question_id": 421},
        {"image_id": 99, "question": "Where is it?", "question_id": 990},
        {"image_id": 42, "question": "Blank?", "question_id": 422},
    ]}
    human = ["red"] * 3 + ["blue"] * 5 + ["maroon", "red"]
    annotations = {"annotations": [
        {"question_id": 420, "image_id": 42, "multiple_choice_answer": "red",
         "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(human)]},
        {"question_id": 70, "image_id": 7, "answers": [{"answer": a} for a in ["2", "3", "3", "two"]]},
        {"question_id": 990, "image_id": 99, "multiple_choice_answer": "home", "answers": [{"answer": "home"}]},
        {"question_id": 422, "image_id": 42, "multiple_choice_answer": "", "answers": [{"answer": " "}]},
    ]}
    return write_json(tmp_path / "q.json", questions), write_json(tmp_path / "a.json", annotations), official


def test_vqav2_answers_images_and_skips(tmp_path):
    q, a, official = vqav2_files(tmp_path)
    skipped = Skipped()
    examples = list(read_examples("vqav2", [q, a], image_root=str(tmp_path / "val2014"), skipped=skipped))
    assert [e.id for e in examples] == ["420", "70"]
    bus, dogs = examples
    # multiple_choice_answer leads (with its repeats), then by frequency
    assert bus.answers == ("red", "red", "red", "red", "blue", "blue", "blue", "blue", "blue", "maroon")
    assert (bus.label, bus.task, bus.question) == ("red", "vqa", "What colour is the bus?")
    assert bus.image == os.path.abspath(official)
    assert dogs.answers == ("3", "3", "2", "two") and dogs.label == "3"
    assert dogs.image == os.path.abspath(tmp_path / "val2014" / "000000000007.jpg")
    assert skipped.counts == {"no annotation": 1, "image missing": 1, "no answer": 1}
    assert skipped.examples == {"no annotation": ["421"], "image missing": ["990"], "no answer": ["422"]}


def test_vqav2_files_in_either_order_and_two_inputs_required(tmp_path):
    q, a, _ = vqav2_files(tmp_path)
    assert [e.id for e in read_examples("vqav2", [a, q], image_root=str(tmp_path / "val2014"))] == ["420", "70"]
    with pytest.raises(ValueError, match="questions.json, annotations.json"):
        read_examples("vqav2", [q])


# ---------------------------------------------------------------- coco karpathy
def karpathy_json(tmp_path: Path) -> str:
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        write_image(tmp_path / "coco" / "val2014" / name)
    images = [
        {"filepath": "val2014", "filename": "a.jpg", "split": "train", "cocoid": 1,
         "sentences": [{"raw": " A red square. "}, {"raw": "Something red."}]},
        {"filepath": "val2014", "filename": "b.jpg", "split": "restval", "cocoid": 2, "sentences": [{"raw": "B."}]},
        {"filepath": "val2014", "filename": "c.jpg", "split": "test", "cocoid": 3, "sentences": [{"raw": "C."}]},
        {"filepath": "val2014", "filename": "d.jpg", "split": "test", "cocoid": 4, "sentences": [{"raw": "  "}]},
        {"filepath": "val2014", "filename": "gone.jpg", "split": "test", "cocoid": 5, "sentences": [{"raw": "E."}]},
    ]
    return write_json(tmp_path / "dataset_coco.json", {"images": images, "dataset": "coco"})


def test_karpathy_splits_and_captions(tmp_path):
    path = karpathy_json(tmp_path)
    root = str(tmp_path / "coco")
    train = list(read_examples("coco-karpathy", [f"{path}:train"], image_root=root, caption_prompt="Caption:"))
    assert [e.id for e in train] == ["1", "2"]  # restval counts as train
    assert train[0] == Example("1", str((tmp_path / "coco" / "val2014" / "a.jpg").resolve()), "Caption:",
                               ("A red square.", "Something red."), "caption", None)
    skipped = Skipped()
    test = list(read_examples("coco-karpathy", [f"{path}:test"], image_root=root, skipped=skipped))
    assert [e.id for e in test] == ["3"]
    assert test[0].question == "Describe the image briefly."
    assert skipped.counts == {"no answer": 1, "image missing": 1}
    assert skipped.examples == {"no answer": ["4"], "image missing": ["5"]}
    assert [e.id for e in read_examples("coco-karpathy", [path], image_root=root)] == ["1", "2", "3"]
    with pytest.raises(ValueError, match="unknown Karpathy split 'dev'"):
        list(read_examples("coco-karpathy", [f"{path}:dev"], image_root=root))


# ---------------------------------------------------------------- image folder
def test_image_folder(tmp_path):
    write_image(tmp_path / "golden_retriever" / "b.PNG", fmt="PNG")
    write_image(tmp_path / "golden_retriever" / "a.jpg")
    write_image(tmp_path / "cat" / "x.jpeg")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    examples = list(read_examples("image-folder", [str(tmp_path)], class_prompt="What animal is this?"))
    assert [e.id for e in examples] == ["cat/x.jpeg", "golden_retriever/a.jpg", "golden_retriever/b.PNG"]
    assert examples[1] == Example("golden_retriever/a.jpg", str((tmp_path / "golden_retriever" / "a.jpg").resolve()),
                                  "What animal is this?", ("golden retriever",), "classification", "golden_retriever")
    with pytest.raises(ValueError, match="no class sub-folders"):
        list(read_examples("image-folder", [str(tmp_path / "cat")]))


# ---------------------------------------------------------------- webdataset
def test_webdataset_extracts_images_and_skips_bad(tmp_path):
    import webdataset as wds

    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "s0", "jpg": image_bytes(), "json": json.dumps(
            {"question": "What colour?", "answers": [{"answer": "green"}, {"answer": "lime"}]}).encode()})
        sink.write({"__key__": "s1", "png": image_bytes("PNG"), "txt": b"  a  green   square "})
        sink.write({"__key__": "s2", "jpg": b"not an image", "txt": b"broken"})
        sink.write({"__key__": "s3", "jpg": image_bytes(), "json": json.dumps({"q": "Empty?", "answer": ""}).encode()})
        sink.write({"__key__": "s4", "txt": b"no picture"})
    out = tmp_path / "extracted"
    with pytest.raises(ValueError, match="extract_dir"):
        read_examples("webdataset", [str(shard)])
    skipped = Skipped()
    examples = list(read_examples("webdataset", [str(tmp_path / "shard-{000000..000000}.tar")],
                                  extract_dir=str(out), skipped=skipped))
    assert examples == [
        Example("s0", str((out / "s0.jpg").resolve()), "What colour?", ("green", "lime"), "vqa", "green"),
        Example("s1", str((out / "s1.jpg").resolve()), "Describe the image briefly.", ("a green square",),
                "caption", None),
    ]
    assert (out / "s0.jpg").read_bytes() == image_bytes()  # a JPEG member is kept byte for byte
    assert Image.open(out / "s1.jpg").format == "JPEG"  # others are re-encoded
    assert skipped.counts == {"bad image": 1, "no answer": 1, "no image": 1}
    assert skipped.examples == {"bad image": ["s2"], "no answer": ["s3"], "no image": ["s4"]}
    assert not (out / "s2.jpg").exists()
    with pytest.raises(ValueError, match="not found"):
        list(read_examples("webdataset", [str(tmp_path / "missing.tar")], extract_dir=str(out)))


# ---------------------------------------------------------------- synthetic world
@pytest.fixture(scope="module")
def synth_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "world"
    subprocess.run([sys.executable, "-m", "datastore.synth.cli", "--out", str(root), "--n-corpus", "20",
                    "--n-instruct", "8", "--n-eval", "4", "--image-size", "64", "--shard-size", "20"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_synth_open_questions(synth_world):
    open_dir = synth_world / "eval" / "open"
    questions, answers = read_jsonl(open_dir / "questions.jsonl"), read_jsonl(open_dir / "answers.jsonl")
    gold = {a["question_id"]: a for a in answers}
    skipped = Skipped()
    examples = list(read_examples("synth", [str(synth_world)], skipped=skipped))
    assert skipped.total == 0
    assert [e.id for e in examples] == [q["question_id"] for q in questions]
    for example, q in zip(examples, questions):
        assert example.question == q["text"] and example.task == q["category"]
        assert example.answers == tuple(gold[q["question_id"]]["answers"])
        assert example.image == str((synth_world / "images" / q["image"]).resolve())
        assert os.path.isfile(example.image)
        assert example.label == (example.answers[0] if q["category"] == "identification" else None)
    assert {"identification", "color"} <= {e.task for e in examples}


def test_synth_skips_and_malformed(synth_world, tmp_path):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(synth_world, world, ignore=shutil.ignore_patterns("corpus", "llava"))
    open_dir = world / "eval" / "open"
    questions, answers = read_jsonl(open_dir / "questions.jsonl"), read_jsonl(open_dir / "answers.jsonl")
    lost = [q["question_id"] for q in questions if q["image"] == questions[0]["image"]]
    blank = next(q["question_id"] for q in questions[:-1] if q["image"] != questions[0]["image"])
    for a in answers:
        if a["question_id"] == blank:
            a["answers"] = [" "]
    (world / "images" / questions[0]["image"]).unlink()
    (open_dir / "answers.jsonl").write_text("\n".join(json.dumps(a) for a in answers[:-1]) + "\n")
    skipped = Skipped()
    examples = list(read_examples("synth", [str(world)], skipped=skipped))
    assert len(lost) >= 2
    assert skipped.counts == {"image missing": len(lost), "no annotation": 1, "no answer": 1}
    assert skipped.examples["image missing"] == lost[:5]
    assert skipped.examples["no answer"] == [blank]
    assert skipped.examples["no annotation"] == [questions[-1]["question_id"]]
    assert len(examples) == len(questions) - skipped.total
    (open_dir / "answers.jsonl").write_text('{"question_id": "open-000000", "answers": [\n')
    with pytest.raises(ValueError, match="answers.jsonl:1"):
        list(read_examples("synth", [str(world)]))
    with pytest.raises(ValueError, match="not a tuna-synth output folder"):
        list(read_examples("synth", [str(tmp_path)]))
