"""``tuna ask``: answer + retrieved tags with weights, from a saved model directory."""

from __future__ import annotations

import json

import pytest

from datastore.store import Datastore
from tests.datastore.conftest import build_config, sample_image, write_shards
from tuna.cli import main
from tuna.configuration_tuna import ABLATION_POLICIES, ABLATIONS
from tuna.tag_source import TagSource


@pytest.fixture(scope="module")
def model_dir(make_model, tiny_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("ask") / "model"
    make_model().save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


def run(capsys, *argv):
    code = main(["ask", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_ask_with_given_tags_prints_answer_and_weights(model_dir, tmp_path, capsys):
    sample_image(3).save(tmp_path / "x.jpg")
    code, out, _ = run(capsys, "--model", model_dir, "--image", tmp_path / "x.jpg", "--question", "What is it?",
                       "--tags", "red blorp, cat", "--max-new-tokens", 4, "--json")
    assert code == 0
    record = json.loads(out)
    assert [t["tag"] for t in record["tags"]] == ["red blorp", "cat"]
    assert sum(t["weight"] for t in record["tags"]) == pytest.approx(2.0)  # "count" scaling: mean weight 1
    assert isinstance(record["answer"], str) and set(record["timings"]) == {"load_s", "retrieve_s", "generate_s"}
    code, out, _ = run(capsys, "--model", model_dir, "--image", tmp_path / "x.jpg", "--question", "What is it?",
                       "--tags", "red blorp, cat", "--max-new-tokens", 4)
    assert code == 0
    assert out.startswith("tags:\n") and "red blorp" in out and "\nanswer: " in out


@pytest.fixture(scope="module")
def datastore_dir(tmp_path_factory):
    from datastore.build import build

    root = tmp_path_factory.mktemp("ask_ds")
    build(build_config(write_shards(root / "in", n_shards=1, per_shard=20), root / "ds"), show_progress=False)
    return root / "ds"


def test_ask_retrieves_live_from_a_datastore(model_dir, datastore_dir, tmp_path, capsys):
    sample_image(7).save(tmp_path / "q.jpg")
    expected = Datastore.open(datastore_dir).retrieve_tags(images=[sample_image(7)], k_images=2, max_tags=10)[0]
    code, out, _ = run(capsys, "--model", model_dir, "--image", tmp_path / "q.jpg", "--question", "What?",
                       "--datastore", datastore_dir, "--k-images", 2, "--max-new-tokens", 2, "--json")
    assert code == 0
    assert [t["tag"] for t in json.loads(out)["tags"]] == expected.tags


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ask_reads_the_tags_of_each_ablation(ablation, model_dir, datastore_dir, tmp_path, capsys):
    image = tmp_path / "q.jpg"
    sample_image(7).save(image)
    store = Datastore.open(datastore_dir)
    real = store.retrieve_tags(images=[sample_image(7)], k_images=2, max_tags=10)[0].tags
    code, out, _ = run(capsys, "--model", model_dir, "--image", image, "--question", "What?", "--datastore",
                       datastore_dir, "--k-images", 2, "--max-new-tokens", 2, "--ablation", ablation, "--json")
    assert code == 0
    record = json.loads(out)
    tags, weights = [t["tag"] for t in record["tags"]], [t["weight"] for t in record["tags"]]
    assert record["ablation"] == ablation
    policy = ABLATION_POLICIES[ablation]
    if policy.tags == "none":
        assert tags == []
    elif policy.tags == "random":  # the seeded draw from the vocabulary, not what retrieval found
        drawn = TagSource(datastore=store, k_images=2, ablation="random_tags")(str(image), sample_image(7)).tags
        assert tags == drawn and tags != real and len(tags) == len(real)
    else:
        assert tags == real
    if policy.weighting == "uniform":
        assert weights == [1.0] * len(tags)
    elif policy.weighting == "none" or not tags:
        assert weights == [None] * len(tags)
    else:
        assert sum(weights) == pytest.approx(len(tags))  # adaptive, "count" scaling


def test_given_tags_follow_the_ablation(model_dir, tmp_path, capsys):
    image = tmp_path / "q.jpg"
    sample_image(7).save(image)
    base = ["--model", model_dir, "--image", image, "--question", "What?", "--max-new-tokens", 2, "--json",
            "--tags", "red kelbo,drerik"]
    code, out, _ = run(capsys, *base)
    assert code == 0 and [t["tag"] for t in json.loads(out)["tags"]] == ["red kelbo", "drerik"]
    code, out, _ = run(capsys, *base, "--ablation", "no_tags")  # the model reads none: none are shown
    assert code == 0 and json.loads(out)["tags"] == []
    code, out, err = run(capsys, *base, "--ablation", "random_tags")
    assert code == 1 and out == "" and "use one of the two" in err and err.count("\n") == 1


def test_ask_fails_with_one_line_reason(model_dir, tmp_path, capsys):
    code, out, err = run(capsys, "--model", model_dir, "--image", tmp_path / "missing.jpg", "--question", "Q?")
    assert code == 1 and out == ""
    assert err == f"tuna ask: error: image '{tmp_path / 'missing.jpg'}' is not a file\n"
