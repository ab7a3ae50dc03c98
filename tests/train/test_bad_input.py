"""Bad training input: an error naming the sample by default, or skipped and counted."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.train.conftest import common_args, launch, log_history, tiny_processor
from train.data import (
    BadSampleError,
    LlavaJsonDataset,
    ModalityLengthGroupedSampler,
    TrainCollator,
)


@pytest.fixture(scope="module")
def processor(world):
    return tiny_processor(world, max_length=400)


@pytest.fixture()
def bad_data(world, tmp_path):
    """The instruct set with a missing image (id bad-missing), an unreadable one and a text-only sample."""
    images = tmp_path / "images"
    shutil.copytree(world["images"], images)
    records = json.loads(open(world["instruct"]).read())[:6]
    (images / records[2]["image"]).write_bytes(b"not a jpeg")
    records[2]["id"] = "bad-unreadable"
    records[4]["id"], records[4]["image"] = "bad-missing", "instruct/nowhere.jpg"
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."},
                                                         {"from": "gpt", "value": "hi"}]})
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return path, images


def test_error_policy_names_the_sample(bad_data, processor):
    path, images = bad_data
    dataset = LlavaJsonDataset([str(path)], str(images), processor)
    assert dataset[0]["skipped"] == []
    with pytest.raises(BadSampleError, match=r"index 2\).*sample 'bad-unreadable': cannot read image"):
        dataset[2]
    with pytest.raises(BadSampleError, match=r"sample 'bad-missing': cannot read image .*nowhere.jpg"):
        dataset[4]


def test_skip_policy_replaces_and_counts(bad_data, processor):
    path, images = bad_data
    dataset = LlavaJsonDataset([str(path)], str(images), processor, on_bad_sample="skip")
    item = dataset[2]
    assert item["sample_id"] == dataset.records[3]["id"]
    assert [s["id"] for s in item["skipped"]] == ["bad-unreadable"]
    batch = TrainCollator(processor)([dataset[i] for i in range(7)])
    assert sorted(s["id"] for s in batch["skipped"]) == ["bad-missing", "bad-unreadable"]
    assert batch["input_ids"].shape[0] == 7 and batch["pixel_values"].shape[0] == 6  # text-only has none


def test_missing_tags_and_over_long_samples(world, processor, tmp_path):
    records = json.loads(open(world["instruct"]).read())[:2]
    long = dict(records[1], id="too-long")
    long["conversations"] = [dict(t) for t in long["conversations"]]
    long["conversations"][-1]["value"] = "word " * 500
    path = tmp_path / "x.json"
    path.write_text(json.dumps([records[0], long]))
    dataset = LlavaJsonDataset([str(path)], str(world["images"]), processor)
    with pytest.raises(BadSampleError, match="sample 'too-long': sequence length .* exceeds max_length 400"):
        dataset[1]
    shutil.copy(world["images"] / records[0]["image"], tmp_path / "new.jpg")
    unknown = dict(records[0], id="no-tags", image="new.jpg")
    path.write_text(json.dumps([unknown]))
    with pytest.raises(BadSampleError, match="no tags for image 'new.jpg': not in retrieval cache"):
        LlavaJsonDataset([str(path)], str(tmp_path), processor)[0]


def test_modality_grouped_batches_are_single_modality_and_deterministic():
    lengths = [10, -5, 12, -7, 30, -3, 8, 9, -4, 11]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=1, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(10)) and order == list(ModalityLengthGroupedSampler(lengths, 2, 1, 3))
    for k in range(0, 10, 2):
        signs = {lengths[i] > 0 for i in order[k:k + 2]}
        assert len(signs) == 1


def test_training_run_stops_with_the_sample_named_or_counts_skips(world, bad_data, tmp_path):
    path, images = bad_data
    argv = common_args(world, tmp_path / "err", data_path=path, image_folder=images, max_steps=4, save_steps=100,
                       dataloader_num_workers=1)
    run = launch(argv, deepspeed_config=None)
    assert run.returncode == 1
    # raised in a DataLoader worker: one line naming the sample, the worker's traceback only behind -v
    assert re.match(r"train: error: bad training sample \(index [24]\): .*sample 'bad-(unreadable|missing)'",
                    run.stderr.strip().splitlines()[-1])
    assert "Traceback" not in run.stderr
    argv = common_args(world, tmp_path / "skip", data_path=path, image_folder=images, max_steps=4, save_steps=100,
                       on_bad_sample="skip", per_device_train_batch_size=7, dataloader_num_workers=1)
    run = launch(argv, deepspeed_config=None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [e["skipped_samples"] for e in log_history(tmp_path / "skip") if "loss" in e][-1] == 8
    lines = (tmp_path / "skip" / "skipped_samples.rank0.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {json.loads(x)["id"] for x in lines} == {"bad-missing", "bad-unreadable"}


def test_webdataset_samples_caption_pairs_live_tags_and_skips(world, processor, tmp_path):
    from datastore.store import Datastore
    from tests.datastore.conftest import write_shards
    from train.data import WebDatasetSamples
    from tuna.tag_source import TagSource

    shards = write_shards(tmp_path / "wds", n_shards=1, per_shard=6, bad={2: "garbage_jpeg", 4: "missing_caption"})
    import dataclasses

    processor = dataclasses.replace(processor, tag_source=TagSource(datastore=Datastore.open(world["datastore"]),
                                                                    k_images=2, max_tags=5))
    items = list(WebDatasetSamples(shards, processor, on_bad_sample="skip"))
    assert [i["sample_id"] for i in items] == ["s000000", "s000001", "s000003", "s000005"]
    assert [s["id"] for s in items[2]["skipped"]] == ["s000002"]
    assert [s["id"] for s in items[3]["skipped"]] == ["s000004"]
    assert all(i["tags"][0] and i["pixel_values"].shape[0] == 1 and i["labels"].ne(-100).any() for i in items)
    with pytest.raises(BadSampleError, match=r"bad training sample 's000002' in .*shard-000000.tar"):
        list(WebDatasetSamples(shards, processor))


MALFORMED = {  # id -> record fields: every shape of a broken LLaVA sample (issue 27, item 5)
    "conv-string": {"conversations": "hello"},
    "conv-null": {"conversations": None},
    "conv-empty": {"conversations": []},
    "conv-dict": {"conversations": {"from": "human", "value": "<image>\nWhat is it?"}},
    "turns-not-dicts": {"conversations": ["<image>\nWhat is it?", "a cat"]},
    "turn-no-from": {"conversations": [{"value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]},
    "turn-no-value": {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a cat"}]},
    "value-not-str": {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": 7}]},
    "from-not-str": {"conversations": [{"from": ["human"], "value": "<image>\nWhat is it?"},
                                       {"from": "gpt", "value": "a cat"}]},
    "no-conversations": {},
    "image-not-str": {"image": 7},
    "image-dict": {"image": {"path": "x.jpg"}},
    "image-list-non-str": {"image": [None]},
    "image-empty": {"image": "  "},
}


@pytest.fixture()
def malformed_data(world, tmp_path):
    """Two good samples, then every malformed shape (the good first sample's image and conversation unless
    overridden), then a non-dict record and a good text-only sample."""
    good = json.loads(open(world["instruct"]).read())[:2]
    records = list(good)
    for sample_id, fields in MALFORMED.items():
        records.append({**good[0], "id": sample_id, **fields})
    del records[2 + list(MALFORMED).index("no-conversations")]["conversations"]
    records.append("just a string")
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."},
                                                         {"from": "gpt", "value": "hi"}]})
    path = tmp_path / "malformed.json"
    path.write_text(json.dumps(records))
    return path


def test_every_malformed_sample_shape_is_a_counted_skip(malformed_data, world, processor):
    dataset = LlavaJsonDataset([str(malformed_data)], str(world["images"]), processor, on_bad_sample="skip")
    n = len(dataset)
    assert n == 2 + len(MALFORMED) + 2
    assert len(dataset.lengths()) == n  # the modality sampler reads every record before any is encoded
    list(ModalityLengthGroupedSampler(dataset.lengths(), batch_size=2))
    item = dataset[2]  # the first malformed one: skipped up to the non-dict record, then the text-only sample
    assert item["sample_id"] == "text-only"
    assert [s["id"] for s in item["skipped"]] == [*MALFORMED, str(n - 2)]
    assert all(s["reason"].startswith("BadSampleError: ") and "\n" not in s["reason"] for s in item["skipped"])
    batch = TrainCollator(processor)([dataset[0], dataset[1], item])
    assert len(batch["skipped"]) == len(MALFORMED) + 1 and batch["input_ids"].shape[0] == 3


@pytest.mark.parametrize("sample_id", list(MALFORMED))
def test_every_malformed_sample_shape_is_a_one_line_error_naming_it(malformed_data, world, processor, sample_id):
    dataset = LlavaJsonDataset([str(malformed_data)], str(world["images"]), processor)
    index = 2 + list(MALFORMED).index(sample_id)
    with pytest.raises(BadSampleError, match=rf"^bad training sample \(index {index}\): .*sample '{sample_id}': ") as info:
        dataset[index]
    assert "\n" not in str(info.value)


def test_a_record_that_is_not_an_object_is_a_one_line_error(malformed_data, world, processor):
    dataset = LlavaJsonDataset([str(malformed_data)], str(world["images"]), processor)
    index = len(dataset) - 2
    with pytest.raises(BadSampleError, match=rf"^bad training sample \(index {index}\): .*expected a JSON object"):
        dataset[index]


def test_webdataset_conversations_of_the_wrong_shape_are_skipped(world, processor, tmp_path):
    import dataclasses

    import webdataset as wds

    from datastore.store import Datastore
    from tests.datastore.conftest import sample_jpeg
    from train.data import WebDatasetSamples
    from tuna.tag_source import TagSource

    conversations = {"conv-string": "hello", "turns-not-dicts": ["<image>", "a cat"],
                     "turn-no-value": [{"from": "human"}, {"from": "gpt", "value": "a cat"}],
                     "good": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]}
    shard = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i, (key, conversation) in enumerate(conversations.items()):
            sink.write({"__key__": key, "jpg": sample_jpeg(i), "txt": "a caption",
                        "json": json.dumps({"conversations": conversation})})
    processor = dataclasses.replace(processor, tag_source=TagSource(datastore=Datastore.open(world["datastore"]),
                                                                    k_images=2, max_tags=5))
    items = list(WebDatasetSamples([str(shard)], processor, on_bad_sample="skip"))
    assert [i["sample_id"] for i in items] == ["good"]
    assert [s["id"] for s in items[0]["skipped"]] == ["conv-string", "turns-not-dicts", "turn-no-value"]
    with pytest.raises(BadSampleError, match=r"^bad training sample 'conv-string' in .*shard-000000.tar: ") as info:
        list(WebDatasetSamples([str(shard)], processor))
    assert "\n" not in str(info.value)


def test_model_folder_without_config_json_is_a_one_line_error(world, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(world["llm"], broken)
    (broken / "config.json").unlink()
    run = launch(common_args(world, tmp_path / "out", model_name_or_path=broken), deepspeed_config=None)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith(f"train: error: {broken}: no config.json")


def test_a_run_failing_after_init_leaves_no_shm_allreduce_buffer(world, tmp_path):
    """Issue 27 item 8: a 2-rank DeepSpeed run stopping at a bad sample leaves none of its /dev/shm buffers.

    One sample is bad, so one rank fails while the other waits in the step's allreduce; the launcher then
    SIGTERMs that one, which runs no cleanup: only unlinking right after init covers every rank.
    """
    from pathlib import Path

    from tests.train.conftest import free_port

    images = tmp_path / "images"
    shutil.copytree(world["images"], images)
    records = json.loads(open(world["instruct"]).read())[:8]
    (images / records[5]["image"]).write_bytes(b"not a jpeg")
    records[5]["id"] = "bad-unreadable"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    port = free_port()
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    argv = common_args(world, tmp_path / "err", data_path=path, image_folder=images, max_steps=4, save_steps=100,
                       per_device_train_batch_size=1)
    run = launch(argv, master_port=port)
    assert run.returncode != 0
    assert "train: error: bad training sample" in run.stderr, run.stderr[-3000:]
    after = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    assert not [p for p in after - before if f"_{port}_" in p.name], sorted(after - before)
