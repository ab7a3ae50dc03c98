"""Synthetic world generator: determinism, layout, seen/novel separation, eval files, separability."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import inflect
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from datastore.synth.generate import SynthConfig, generate_world
from datastore.synth.scene import render_sample
from datastore.synth.world import NAMES, WorldCatalogue


def _config(out, **kw) -> SynthConfig:
    args = dict(out=str(out), seed=3, n_corpus=120, n_instruct=40, n_eval=40, shard_size=50, workers=2)
    return SynthConfig(**{**args, **kw})


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world") / "w"
    generate_world(_config(out))
    return out


def test_deterministic_and_independent_of_workers(world_dir, tmp_path):
    generate_world(_config(tmp_path / "again", workers=1))
    assert _digest(tmp_path / "again") == _digest(world_dir)
    generate_world(_config(tmp_path / "other", seed=4))
    other, same = _digest(tmp_path / "other"), _digest(world_dir)
    assert other["corpus/corpus-000000.tar"] != same["corpus/corpus-000000.tar"]


def test_same_bytes_in_another_process(world_dir, tmp_path):
    """Python's string hashing differs per process: nothing the generator writes may depend on it."""
    import os
    import subprocess
    import sys

    code = ("import sys; from datastore.synth.generate import SynthConfig, generate_world; "
            "generate_world(SynthConfig(out=sys.argv[1], seed=3, n_corpus=120, n_instruct=40, n_eval=40, "
            "shard_size=50, workers=1))")
    for hash_seed in ("1", "2"):
        out = tmp_path / f"hash{hash_seed}"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed})
        assert _digest(out) == _digest(world_dir)


def test_counts_and_corpus_shards(world_dir):
    info = json.loads((world_dir / "world.json").read_text())
    assert info["counts"]["corpus"] == 120 and info["counts"]["corpus_shards"] == 3
    samples = list(wds.WebDataset(str(world_dir / "corpus" / "corpus-{000000..000002}.tar"), shardshuffle=False))
    assert len(samples) == 120 and {"jpg", "txt", "json"} <= set(samples[0])
    assert [s["__key__"] for s in samples] == [f"c{i:09d}" for i in range(120)]
    for s in samples[:20]:
        image = Image.open(__import__("io").BytesIO(s["jpg"]))
        assert image.size == (96, 96) and image.mode == "RGB"
        caption, truth = s["txt"].decode(), json.loads(s["json"])
        assert truth["caption"] == caption and 1 <= len(truth["objects"]) <= 3
        for obj in truth["objects"]:
            assert obj["category"] in caption
    categories = {o["category"] for s in samples for o in json.loads(s["json"])["objects"]}
    assert categories == {c["name"] for c in info["categories"]}  # corpus covers every category


def test_world_layout_reads_what_the_generator_wrote(world_dir, tmp_path):
    from datastore.synth.layout import World

    world = World.open(world_dir)
    info = json.loads((world_dir / "world.json").read_text())
    assert world.corpus_shards() == [str(world_dir / "corpus" / f"corpus-{i:06d}.tar") for i in range(3)]
    assert world.names("novel") == [c["name"] for c in info["categories"] if c["novelty"] == "novel"]
    assert len(world.names()) == len(info["categories"]) and set(world.names("seen")).isdisjoint(world.names("novel"))
    captions = world.captions()
    assert len(captions) == 120 and world.captions(limit=7) == captions[:7]
    assert all(path.is_file() for path in [world.instruct_json, world.pretrain_json, *world.eval_question_files()])
    images = world.eval_images("open")
    assert images and all((world.images / image).is_file() for image in images)
    with pytest.raises(ValueError, match="not a tuna-synth output folder"):
        World.open(tmp_path)
    with pytest.raises(ValueError, match="no corpus shards"):
        World(tmp_path).corpus_shards()


def test_novel_names_never_in_instruction_data(world_dir):
    world = WorldCatalogue()
    novel = {c.name for c in world.novel}
    text = (world_dir / "llava" / "pretrain.json").read_text() + (world_dir / "llava" / "instruct.json").read_text()
    words = set(text.replace('"', " ").replace("\\n", " ").replace("?", " ").replace(",", " ").split())
    assert not {w.rstrip("s") for w in words} & novel and not words & novel
    instruct = json.loads((world_dir / "llava" / "instruct.json").read_text())
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in instruct)
    assert all(len(r["conversations"]) % 2 == 0 for r in instruct)
    from common.prompts import SHORT_ANSWER  # LLaVA-1.5's format prompt on every question

    assert all(t["value"].endswith("?\n" + SHORT_ANSWER) for r in instruct for t in r["conversations"][::2])
    assert all((world_dir / "images" / r["image"]).is_file() for r in instruct)
    novel_eval = [q["text"] for q in _jsonl(world_dir / "eval" / "pope" / "questions.jsonl") if q["novelty"] == "novel"]
    assert any(name in t for t in novel_eval for name in novel)


def test_instruction_existence_questions_are_balanced(world_dir):
    """One "Is there a ...?" question per image, answered Yes about as often as No: a 57 % "No" share once taught every model to answer "No" to every POPE question."""
    instruct = json.loads((world_dir / "llava" / "instruct.json").read_text())
    answers = []
    for r in instruct:
        turns = r["conversations"]
        existence = [(q["value"], a["value"]) for q, a in zip(turns[::2], turns[1::2]) if "Is there a" in q["value"]]
        assert len(existence) == 1 and existence[0][1] in ("Yes", "No")
        answers.append(existence[0][1])
    assert 0.35 <= answers.count("Yes") / len(answers) <= 0.65


def test_category_offset_gives_disjoint_world():
    a, b = WorldCatalogue(), WorldCatalogue(category_offset=24)
    assert not {c.name for c in a.categories} & {c.name for c in b.categories}
    assert not {(c.shape, c.pattern) for c in a.categories} & {(c.shape, c.pattern) for c in b.categories}
    with pytest.raises(ValueError, match="exceeds the catalogue"):
        WorldCatalogue(category_offset=100)


def test_names_pluralise_regularly_and_are_not_words():
    from open_clip.tokenizer import SimpleTokenizer

    engine, bpe = inflect.engine(), SimpleTokenizer()
    assert len(set(NAMES)) == len(NAMES) == 112
    for name in NAMES:
        assert name.isalpha() and name.islower()
        assert engine.singular_noun(name + "s") == name
        assert len(bpe.encode(name)) >= 2, f"{name} is a single CLIP BPE word, i.e. a common word"


def test_confusable_partners_stay_in_their_novelty_group():
    for world in (WorldCatalogue(), WorldCatalogue(n_seen=5, n_novel=5, category_offset=3)):
        for c in world.categories:
            partner = world.by_name(c.confusable_with)
            assert partner.novelty == c.novelty and partner.name != c.name
    default = WorldCatalogue()
    assert all(c.confusable_with == default.by_name(c.confusable_with).name for c in default.categories)
    pairs = {(c.shape, default.by_name(c.confusable_with).shape) for c in default.categories}
    assert all(a == b for a, b in pairs)  # default pairs: same shape, paired patterns


def test_eval_files(world_dir):
    world = WorldCatalogue()
    for task, answers in (("open", "answers"), ("pope", "annotations"), ("mc", "answers")):
        questions = _jsonl(world_dir / "eval" / task / "questions.jsonl")
        labels = _jsonl(world_dir / "eval" / task / f"{answers}.jsonl")
        assert [q["question_id"] for q in questions] == [a["question_id"] for a in labels]
        assert {q["novelty"] for q in questions} == {"seen", "novel"}
        assert all({"question_id", "image", "text", "category"} <= set(q) for q in questions)
    pope = list(zip(_jsonl(world_dir / "eval/pope/questions.jsonl"), _jsonl(world_dir / "eval/pope/annotations.jsonl")))
    for split in ("random", "popular", "adversarial"):
        labels = Counter(a["label"] for q, a in pope if q["category"] == split)
        assert labels["yes"] == labels["no"] > 0
    truth = {}
    for i in range(40):
        sample = render_sample(world, 3, "eval", i)
        truth[f"eval/{sample.key}.jpg"] = sample.scene
    hits = 0
    for q, a in pope:
        present = set(truth[q["image"]].counts())
        name = q["text"].removeprefix("Is there a ").removesuffix(" in the image?")
        assert (name in present) == (a["label"] == "yes")
        assert world.by_name(name).novelty == q["novelty"]
        if q["category"] == "adversarial" and a["label"] == "no":
            hits += any(world.by_name(p).confusable_with == name for p in present)
    assert hits > 0
    adversarial_no: dict[str, set[str]] = {}
    for q, a in pope:
        if q["category"] == "adversarial" and a["label"] == "no":
            adversarial_no.setdefault(q["image"], set()).add(q["text"].split()[3])
    for image, negatives in adversarial_no.items():
        present = truth[image].counts()
        partners = {world.by_name(p).confusable_with for p in present} - set(present)
        assert partners <= negatives, (image, partners, negatives)  # absent partners always asked
    for q, a in zip(_jsonl(world_dir / "eval/mc/questions.jsonl"), _jsonl(world_dir / "eval/mc/answers.jsonl")):
        answer = q["options"]["ABCD".index(a["answer"])]
        assert answer in truth[q["image"]].counts() and f"{a['answer']}. {answer}" in q["text"]
        assert len(set(q["options"])) == 4 and all(world.by_name(o).novelty == q["novelty"] for o in q["options"])
        assert world.by_name(answer).confusable_with in q["options"]
    letters = Counter(a["answer"] for a in _jsonl(world_dir / "eval/mc/answers.jsonl"))
    assert set(letters) == set("ABCD")


def test_small_groups_still_get_four_mc_options():
    from datastore.synth.questions import eval_questions

    world = WorldCatalogue(n_seen=4, n_novel=4)
    records = []
    for i in range(60):
        sample = render_sample(world, 0, "eval", i)
        records.append({"index": i, "key": sample.key, "image": f"eval/{sample.key}.jpg", "scene": sample.scene})
    for q in eval_questions(records, world, 0)["mc/questions.jsonl"]:
        assert len(set(q["options"])) == 4, q["options"]


def test_out_dir_must_be_empty(world_dir):
    with pytest.raises(ValueError, match="is not empty"):
        generate_world(_config(world_dir))


def test_overwrite_replaces_only_generator_outputs(tmp_path):
    out = tmp_path / "w"
    generate_world(_config(out, n_corpus=60, n_instruct=4, n_eval=4, workers=1))
    (out / "notes.txt").write_text("keep me")
    generate_world(_config(out, n_corpus=20, n_instruct=4, n_eval=4, workers=1, overwrite=True))
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in (out / "corpus").iterdir()) == ["corpus-000000.tar"]  # no stale shards


def test_config_and_cli_errors(tmp_path, capsys):
    from datastore.synth.cli import main

    with pytest.raises(ValueError, match="image_size=200"):
        _config(tmp_path, image_size=200)
    with pytest.raises(ValueError, match="n_novel=2"):
        _config(tmp_path, n_novel=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["--out", str(tmp_path / "full"), "--n-corpus", "5"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuna-synth: error:") and "not empty" in err and "\n" not in err


def _shape_feature(sample) -> np.ndarray:
    """Colour-free shape/pattern feature: gradient magnitude of the object's crop, 16x16."""
    x0, y0, x1, y1 = sample.scene.objects[0].bbox
    grey = sample.image[y0:y1, x0:x1].astype(np.float32).mean(axis=2)
    gy, gx = np.gradient(grey)
    crop = Image.fromarray(np.hypot(gx, gy)).resize((16, 16), Image.BILINEAR)
    feature = np.asarray(crop, dtype=np.float32).ravel()
    return feature / (np.linalg.norm(feature) + 1e-6)


def test_categories_are_visually_separable():
    """1-NN on colour-free crops of single-object corpus images is far above chance (1/24)."""
    world = WorldCatalogue()
    samples = [s for s in (render_sample(world, 0, "corpus", i) for i in range(1500)) if len(s.scene.objects) == 1]
    feats = np.stack([_shape_feature(s) for s in samples])
    labels = np.array([s.scene.objects[0].category.name for s in samples])
    sims = feats @ feats.T
    np.fill_diagonal(sims, -np.inf)
    accuracy = float((labels[sims.argmax(axis=1)] == labels).mean())
    assert len(samples) > 300 and accuracy > 0.9, accuracy  # measured: 0.985 on 548 images


def test_corpus_photo_size_writes_photo_sized_jpegs_and_keeps_default_worlds(world_dir, tmp_path):
    import io
    import tarfile

    from PIL import Image

    out = tmp_path / "photo"
    info = generate_world(_config(out, corpus_photo_size=448))
    assert info["args"]["corpus_photo_size"] == 448
    assert "corpus_photo_size" not in json.loads((world_dir / "world.json").read_text())["args"]
    with tarfile.open(out / "corpus" / "corpus-000000.tar") as tar:
        jpegs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    sizes = [Image.open(io.BytesIO(data)).size for data in jpegs]
    assert all(394 <= max(size) <= 502 and 0.74 <= size[0] / size[1] <= 1.34 for size in sizes)
    assert len(set(sizes)) > len(sizes) // 2  # sizes vary per image
    assert 10_000 < sum(map(len, jpegs)) / len(jpegs) < 200_000
    generate_world(_config(tmp_path / "again", corpus_photo_size=448, workers=1))
    assert _digest(tmp_path / "again")["corpus/corpus-000000.tar"] == _digest(out)["corpus/corpus-000000.tar"]
    with pytest.raises(ValueError, match="corpus_photo_size"):
        _config(tmp_path / "bad", corpus_photo_size=64)
