"""CLIP training on the synthetic corpus (tiny runs) and nearest-neighbour category purity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datastore.clip_train import ClipTrainConfig, names_text, phrase_text, train_clip
from datastore.purity import exact_neighbours, format_purity, neighbour_purity, purity_from_neighbours
from datastore.synth.layout import World

TINY = dict(image_size=64, steps=12, batch_size=32, warmup=3, lr=3e-3, workers=1, threads=1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """A 200-image, 64-px world in 2 shards."""
    out = tmp_path_factory.mktemp("clipworld") / "w"
    subprocess.run([sys.executable, "-m", "datastore.synth.cli", "--out", str(out), "--n-corpus", "200",
                    "--n-instruct", "8", "--n-eval", "12", "--image-size", "64", "--shard-size", "100",
                    "--workers", "1"], check=True, stdout=subprocess.DEVNULL)
    return out


def shards(world: Path) -> str:
    return str(world / "corpus" / "corpus-{000000..000001}.tar")


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    return train_clip(shards(synth), tmp_path_factory.mktemp("clip"), ClipTrainConfig(**TINY), progress=False)


def test_checkpoint_loads_with_saved_identity(trained):
    from common.files import sha256_file
    from datastore.clip import load_clip

    spec = trained.spec
    out = Path(spec.model_config).parent
    assert spec.model == "tuna-quickstart-clip-64px"  # the bundled config at another image size
    assert Path(spec.pretrained) == out / "tuna-quickstart-clip-64px.safetensors"
    assert json.loads(Path(spec.model_config).read_text())["vision_cfg"]["image_size"] == 64
    loaded = load_clip(spec)
    assert loaded.identity == trained.identity
    assert loaded.identity["checkpoint_sha256"] == sha256_file(spec.pretrained)
    assert loaded.identity["embed_dim"] == 128 and loaded.identity["image_size"] == [64, 64]
    record = json.loads((out / "train.json").read_text())
    assert record["steps"] == 12 and record["samples"] == 200 and len(record["losses"]) == 12
    assert record["identity"]["weights_sha256"] == loaded.identity["weights_sha256"]
    assert set(record["seconds"]) == {"read", "setup", "train", "save"}


def test_loss_decreases(trained):
    losses = trained.losses
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2


def test_deterministic_given_seed(synth, trained, tmp_path):
    again = train_clip(shards(synth), tmp_path / "a", ClipTrainConfig(**TINY), progress=False)
    assert again.identity["weights_sha256"] == trained.identity["weights_sha256"]
    assert again.losses == trained.losses
    other = train_clip(shards(synth), tmp_path / "b", ClipTrainConfig(**{**TINY, "seed": 1}), progress=False)
    assert other.identity["weights_sha256"] != trained.identity["weights_sha256"]


def test_caption_mode_and_vit_config(synth, tmp_path):
    config = ClipTrainConfig(**{**TINY, "model_config": "tuna-tiny-clip", "text_mode": "caption", "steps": 3,
                                "image_size": None, "max_samples": 50})
    result = train_clip(shards(synth), tmp_path, config, progress=False)
    assert result.spec.model == "tuna-tiny-clip" and result.steps == 3
    assert json.loads((tmp_path / "train.json").read_text())["samples"] == 50


def test_names_mode_needs_ground_truth(corpus, tmp_path):
    # the generic test shards' json members have no objects: names need them, captions do not
    with pytest.raises(ValueError, match=r"no usable samples in 1 shard\(s\): no 'objects' list in .json: \d+ "
                                         r"\(e\.g\. \S+\).*use --text-mode caption"):
        train_clip(corpus[:1], tmp_path, ClipTrainConfig(**TINY), progress=False)


def test_skip_reasons_name_the_missing_field_and_a_sample(tmp_path):
    """Only the fields the mode reads are required; what is missing is said with a sample key."""
    import io

    import webdataset as wds
    from PIL import Image

    from datastore.clip_train import load_corpus

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), "red").save(buf, format="JPEG")
        return buf.getvalue()

    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:  # another generator's schema: "color", no "group"
        sink.write({"__key__": "a1", "jpg": jpeg(), "txt": b"a red kelbo",
                    "json": json.dumps({"objects": [{"category": "kelbo", "color": "red", "size": "small"}]}).encode()})
        sink.write({"__key__": "a2", "jpg": jpeg(), "txt": b"\xff\xfe bad", "json": b"{}"})
        sink.write({"__key__": "a3", "jpg": b"not a jpeg", "txt": b"x", "json": b"{}"})
    names = load_corpus([str(tmp_path / "s.tar")], 32, "names", workers=1)
    assert names.keys == ["a1"] and names.objects == [[{"category": "kelbo"}]]  # names read category only
    with pytest.raises(ValueError, match=r"an object without 'colour': 1 \(e\.g\. a1\).*caption not UTF-8: 1 "
                                         r"\(e\.g\. a2\).*unreadable image: 1 \(e\.g\. a3\)"):
        load_corpus([str(tmp_path / "s.tar")], 32, "phrases", workers=1)


def test_bad_config_is_one_line_error():
    with pytest.raises(ValueError, match="text_mode='labels'"):
        ClipTrainConfig(text_mode="labels")
    with pytest.raises(ValueError, match="neither a JSON file nor a bundled config"):
        ClipTrainConfig(model_config="no-such-clip")


def test_texts_from_ground_truth():
    objects = [{"category": "drerik", "colour": "red", "size": "small", "group": 0},
               {"category": "drerik", "colour": "red", "size": "small", "group": 0},
               {"category": "brudub", "colour": "blue", "size": "large", "group": 1},
               {"category": "tulbel", "colour": "pink", "size": "medium", "group": 2}]
    assert names_text(objects) == "drerik, brudub and tulbel"
    assert names_text(objects[:1]) == "drerik"
    rng = np.random.default_rng(0)
    assert phrase_text(objects[:1], rng, attribute_p=1.0).endswith("small red drerik")
    texts = {phrase_text(objects, np.random.default_rng(s), attribute_p=0.5) for s in range(20)}
    assert len(texts) > 5 and all(t.count(" and ") == 1 for t in texts)
    assert all(name in t for t in texts for name in ("drerik", "brudub", "tulbel"))


def test_cli_train_clip(synth, tmp_path, capsys):
    from datastore.cli import main

    assert main(["train-clip", "--input", shards(synth), "--out", str(tmp_path), "--steps", "2", "--batch-size", "16",
                 "--image-size", "64", "--threads", "1", "--workers", "1", "--max-samples", "40"]) == 0
    out = capsys.readouterr().out
    assert "clip tuna-quickstart-clip-64px: 2 steps" in out
    assert (tmp_path / "tuna-quickstart-clip-64px.safetensors").is_file()
    assert main(["train-clip", "--input", str(tmp_path / "missing.tar"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"tuna-datastore train-clip: error: input shard not found: {tmp_path / 'missing.tar'}"
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ purity
def test_purity_hand_computed():
    queries = [{"a"}, {"a", "b"}, {"c"}]
    neighbours = [
        [{"a"}, {"b"}, {"a", "c"}],   # pure: 1, 0, 1
        [{"c"}, {"b", "d"}, {"e"}],   # pure: 0, 1, 0
        [{"c"}, {"c"}, {"d"}],        # pure: 1, 1, 0
    ]
    report = purity_from_neighbours(queries, neighbours, ["seen", "seen", "novel"], ks=(1, 3))
    assert report["all"] == {"n": 3, "top1": pytest.approx(2 / 3), "top3": pytest.approx((2 / 3 + 1 / 3 + 2 / 3) / 3)}
    assert report["single"] == {"n": 2, "top1": 1.0, "top3": pytest.approx((2 / 3 + 2 / 3) / 2)}
    assert report["seen"] == {"n": 2, "top1": 0.5, "top3": pytest.approx(0.5)}
    assert report["seen/single"] == {"n": 1, "top1": 1.0, "top3": pytest.approx(2 / 3)}
    assert report["novel"] == report["novel/single"] == {"n": 1, "top1": 1.0, "top3": pytest.approx(2 / 3)}
    table = format_purity(report)
    assert table.splitlines()[1].split() == ["all", "3", "66.7%", "55.6%"]


def test_purity_from_embeddings_and_exclusion():
    db = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)
    db_cats = [{"a"}, {"b"}, {"c"}, {"a"}]
    np.testing.assert_array_equal(exact_neighbours(db[:1], db, 2), [[0, 1]])
    report = neighbour_purity(db[:1], [{"a"}], db, db_cats, ks=(1, 2))
    assert report["all"] == {"n": 1, "top1": 1.0, "top2": 0.5}
    # leave-one-out: the query's own row is skipped, so its best neighbour is "b"
    report = neighbour_purity(db[:1], [{"a"}], db, db_cats, ks=(1,), exclude=[0])
    assert report["all"]["top1"] == 0.0
    with pytest.raises(ValueError, match="4 database embeddings but 3 category sets"):
        neighbour_purity(db[:1], [{"a"}], db, db_cats[:3])


def test_world_categories_match_ground_truth(synth):
    import tarfile

    with tarfile.open(synth / "corpus" / "corpus-000001.tar") as tar:
        records = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    cats, novelty = World.open(synth).categories([r["key"] for r in records])
    assert cats == [frozenset(o["category"] for o in r["objects"]) for r in records]
    assert novelty == [r["novelty"] for r in records]
    eval_cats, eval_novelty = World.open(synth).categories(["images/eval/e000000000.jpg", "e000000001"])
    assert eval_novelty == ["seen", "novel"]
    # every identification answer of the eval set names an object of its image
    read = lambda name: [json.loads(x) for x in (synth / "eval" / "open" / name).read_text().splitlines()]
    answers = {a["question_id"]: a["answers"][0] for a in read("answers.jsonl")}
    asked = [(q["image"], answers[q["question_id"]]) for q in read("questions.jsonl")
             if q["category"] == "identification"]
    image_cats, _ = World.open(synth).categories([image for image, _ in asked])
    assert len(asked) >= 10 and all(name in cats for (_, name), cats in zip(asked, image_cats))
    with pytest.raises(ValueError, match="not a synthetic-world key"):
        World.open(synth).categories(["x12"])


def test_training_pixels_match_inference_preprocess(synth, trained):
    """Training normalises decoded pixels exactly as open_clip's preprocess does at inference."""
    import torch
    from PIL import Image

    from datastore.clip import load_clip
    from datastore.clip_train import encode_corpus_images, load_corpus

    clip = load_clip(trained.spec)
    corpus = load_corpus([str(synth / "corpus" / "corpus-000000.tar")], 64, "phrases", workers=1,
                         max_samples=8)
    assert corpus.images.shape == (8, 64, 64, 3) and corpus.keys[0] == "c000000000"
    ours = encode_corpus_images(clip, corpus.images, batch_size=3)
    pixels = torch.stack([clip.preprocess(Image.fromarray(image)) for image in corpus.images])
    np.testing.assert_allclose(ours, clip.encode_images(pixels).numpy(), atol=1e-6)
    resized = load_corpus([str(synth / "corpus" / "corpus-000000.tar")], 48, "caption", workers=1,
                          max_samples=2)
    assert resized.images.shape == (2, 48, 48, 3) and resized.objects is None
