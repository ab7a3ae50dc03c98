"""In-context tuning in training (train/icl_tuning.py): k-shot training samples from a demonstration pool."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.train.conftest import common_args, launch, step_losses, tiny_processor
from train.data import BadSampleError, LlavaJsonDataset
from tuna.conversation import IGNORE_INDEX


@pytest.fixture(scope="module")
def processor(world):
    return tiny_processor(world, max_length=2048)


def _build_pool(out, **kwargs):
    from datastore.clip import ClipSpec
    from datastore.index import IndexConfig
    from icl.pool import Pool, PoolConfig, build_pool

    build_pool(PoolConfig(out=str(out), clip=ClipSpec(model="tuna-tiny-clip"), index=IndexConfig(n_eval_queries=10),
                          **kwargs), progress=False)
    return Pool.open(out)


@pytest.fixture(scope="module")
def llava_pool(world, tmp_path_factory):
    """A pool of the training JSON itself: every round of every instruct record, on the training images."""
    return _build_pool(tmp_path_factory.mktemp("icl") / "pool", format="llava", inputs=[world["instruct"]],
                       image_root=str(world["images"]))


def dataset(world, processor, pool, p=1.0, shots=(2,), seed=0, **kwargs):
    from train.icl_tuning import ICLSettings, ICLTuningDataset

    settings = ICLSettings(pool=str(pool.root), p=p, shots=shots, seed=seed, **kwargs)
    return ICLTuningDataset([world["instruct"]], str(world["images"]), processor, settings, pool=pool)


def labelled_spans(labels: torch.Tensor) -> list[list[int]]:
    spans: list[list[int]] = []
    for pos in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
        if spans and spans[-1][-1] == pos - 1:
            spans[-1].append(pos)
        else:
            spans.append([pos])
    return spans


def test_every_sample_gets_k_demos_off_its_own_image_and_only_its_answer_is_labelled(world, processor, llava_pool):
    data = dataset(world, processor, llava_pool, p=1.0, shots=(2,))
    records = data.records
    assert len(data.plan) == data.info.with_demos == len(records) and data.info.by_shots == {2: len(records)}
    # the pool holds the queries (same id) and their other rounds (same image): both excluded
    assert data.info.excluded["same_id"] > 0 and data.info.excluded["same_image"] > 0
    for i in range(len(data)):
        item = data[i]
        record = records[i]
        assert item["pixel_values"].shape[0] == 3 and item["n_images"] == 3, record["id"]
        assert all(item["tags"]), "demos on training images find their tags in the retrieval cache"
        spans = labelled_spans(item["labels"])
        assert len(spans) == 1, "only the query's answer is labelled"
        answer = processor.tokenizer.decode(item["input_ids"][spans[0]])
        assert answer.strip().startswith(record["conversations"][1]["value"].strip())
        demos = [data.demos[p] for p in data.plan[i]]
        assert len(demos) == 2
        own = str(world["images"] / record["image"])
        assert all(d.image != own and not d.id.startswith(record["id"] + ":") for d in demos)
        assert item["sample_id"] == record["id"]
    assert data.counts() == {"kshot_samples_encoded": len(records), "demos_encoded": 2 * len(records),
                             "demos_dropped_for_length": 0}
    lengths, plain = data.lengths(), LlavaJsonDataset([world["instruct"]], str(world["images"]), processor).lengths()
    assert all(n > 2 * processor.tokens_per_image for n in lengths) and lengths != plain


def test_p0_gives_exactly_the_plain_samples(world, processor, llava_pool):
    data = dataset(world, processor, llava_pool, p=0.0)
    plain = LlavaJsonDataset([world["instruct"]], str(world["images"]), processor)
    assert data.plan == {} and data.info.drawn == 0
    for i in range(0, len(plain), 4):
        a, b = data[i], plain[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
        assert a["tags"] == b["tags"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_draws_are_deterministic_near_p_and_k_comes_from_the_list(world, processor, llava_pool):
    from train.icl_tuning import draw_shots

    half = dataset(world, processor, llava_pool, p=0.5, shots=(1, 2), seed=3)
    again = dataset(world, processor, llava_pool, p=0.5, shots=(1, 2), seed=3)
    assert half.plan == again.plan and 10 <= len(half.plan) <= 30
    assert dataset(world, processor, llava_pool, p=0.5, shots=(1, 2), seed=4).plan != half.plan
    assert {len(v) for v in half.plan.values()} == {1, 2} and set(half.info.by_shots) == {1, 2}
    draws = [draw_shots(0, i, 0.5, (1, 2)) for i in range(2000)]
    assert 900 < sum(k > 0 for k in draws) < 1100 and {1, 2} <= set(draws)
    assert abs(draws.count(1) - draws.count(2)) < 150


def test_sequence_retrievers_give_each_sample_its_first_k_demos(world, processor, llava_pool, tmp_path):
    others = [e.id for e in llava_pool.examples if e.image != llava_pool.examples[0].image][:3]
    path = tmp_path / "golden.txt"
    path.write_text("\n".join(others) + "\n")
    data = dataset(world, processor, llava_pool, p=1.0, shots=(1, 3), seed=2, retriever=f"fixed:{path}")
    assert set(data.info.by_shots) == {1, 3}
    first = {i: [data.demos[p].id for p in plan] for i, plan in data.plan.items()}
    records = data.records
    for i, ids in first.items():
        usable = [d for d in others if not d.startswith(records[i]["id"] + ":")
                  and llava_pool.examples[llava_pool.position[d]].image != str(world["images"] / records[i]["image"])]
        assert ids == usable[:len(ids)], "a k-shot sample shows the sequence's first k demos, in its order"


def test_too_long_samples_drop_the_farthest_demo_and_count_it(world, processor, llava_pool):
    data = dataset(world, processor, llava_pool, p=1.0, shots=(2,), order="similar-last")
    item = data[0]
    spliced = len(item["input_ids"]) - 3 + 3 * processor.tokens_per_image
    short = dataset(world, dataclasses.replace(processor, max_length=spliced - 1), llava_pool, p=1.0, shots=(2,))
    kept = short[0]
    assert kept["pixel_values"].shape[0] == 2 and torch.equal(kept["pixel_values"][0], item["pixel_values"][1])
    assert short.counts()["demos_dropped_for_length"] == 1


def test_symlinked_image_folder_and_records_that_cannot_be_queries(world, processor, llava_pool, tmp_path):
    from train.icl_tuning import ICLSettings, ICLTuningDataset

    # the pool names the images through world["images"], the training run through a symlink to it
    (tmp_path / "link").symlink_to(world["images"], target_is_directory=True)
    records = json.loads(Path(world["instruct"]).read_text())[:3]
    records.append({"id": "text-only", "conversations": [{"from": "human", "value": "Say hi."},
                                                         {"from": "gpt", "value": "hi"}]})
    records.append(dict(records[0], id="two-images", image=[records[0]["image"], records[1]["image"]],
                        conversations=[{"from": "human", "value": "<image>\n<image>\nSame?"},
                                       {"from": "gpt", "value": "No"}]))
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    settings = ICLSettings(pool=str(llava_pool.root), p=1.0, shots=(2,), retriever="siir")
    data = ICLTuningDataset([str(path)], str(tmp_path / "link"), processor, settings, pool=llava_pool)
    assert sorted(data.plan) == [0, 1, 2] and data.info.ineligible == {"several images": 1, "text-only": 1}
    assert data.info.excluded["same_image"] > 0 and data.info.excluded["near_duplicate"] == 0
    for i in range(3):
        item = data[i]
        assert item["pixel_values"].shape[0] == 3 and all(item["tags"])
        assert all(data.demos[p].image != str(world["images"] / records[i]["image"]) for p in data.plan[i])
    assert data[3]["pixel_values"] is None and data[4]["pixel_values"].shape[0] == 2  # plain samples


def test_demo_tags_from_a_cache_without_the_demo_images(world, processor, tmp_path):
    # the synthetic eval images are not in the retrieval cache: their tags are missing unless demo tags are off
    pool = _build_pool(tmp_path / "synth", format="synth", inputs=[str(world["data_root"])])
    with pytest.raises(BadSampleError, match=r"no tags for image '.*eval.*': not in retrieval cache"):
        dataset(world, processor, pool, shots=(1,))[0]
    data = dataset(world, processor, pool, shots=(1,), demo_tags=False)
    item = data[0]
    assert item["tags"][0] == [] and item["tags"][1] and item["tag_scores"][0] is None


def test_flags_are_checked(world, tmp_path):
    from train.arguments import DataArguments

    base = {"data_path": [world["instruct"]]}
    with pytest.raises(ValueError, match="--icl_p 1.5: must be in"):
        DataArguments(**base, icl_p=1.5)
    for shots in ("0", "1,x", ""):
        with pytest.raises(ValueError, match="--icl_shots"):
            DataArguments(**base, icl_shots=shots)
    with pytest.raises(ValueError, match="no demonstration pool there"):
        DataArguments(**base, icl_pool=str(tmp_path))
    with pytest.raises(ValueError, match="--icl_order"):
        DataArguments(**base, icl_order="backwards")
    assert DataArguments(**base).icl_settings() is None


def test_training_run_with_in_context_tuning(world, llava_pool, tmp_path):
    out = tmp_path / "out"
    argv = common_args(world, out, icl_pool=llava_pool.root, icl_p=1, icl_shots=1, icl_retriever="sit",
                       max_steps=2, save_steps=100, dataloader_num_workers=1)
    run = launch(argv, deepspeed_config=None)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = run.stdout + run.stderr
    n = len(json.loads(Path(world["instruct"]).read_text()))
    assert "in-context tuning (pool" in logs and f"{n} of {n} samples get demonstrations" in logs
    assert "k-shot samples encoded" in logs
    counts = json.loads((out / "icl_counts.json").read_text())
    assert counts["plan"]["by_shots"] == {"1": n} and counts["settings"]["retriever"] == "sit"
    assert counts["encoded"]["kshot_samples_encoded"] >= 4  # counted in the DataLoader worker
    assert counts["encoded"]["demos_encoded"] == counts["encoded"]["kshot_samples_encoded"]
    assert sorted(step_losses(out)) == [1, 2] and all(torch.isfinite(torch.tensor(v)) for v in step_losses(out).values())


MHUB_ARGS = {"connector": "mhub", "ablation": "no_tags", "mhub_queries": 4, "mhub_hidden": 32, "mhub_layers": 2,
             "mhub_heads": 2, "mhub_max_text": 16, "stage": "pretrain", "retrieval_cache": None}


def test_mmict_script_zero2_two_ranks_exports_a_model_with_the_llm_unchanged(world, llava_pool, tmp_path):
    """scripts/train_mmict.sh (ZeRO-2, 2 ranks): the M-Hub trains, CLIP and the LLM stay frozen, and the exported
    model is a full one (tuna-eval reads it) whose LLM weights equal the source LLM's."""
    from transformers import AutoModelForCausalLM

    from tests.train.test_scripts import run_script
    from tuna.modeling_tuna import TunaForCausalLM

    hub = ["--mhub_queries", "4", "--mhub_hidden", "32", "--mhub_layers", "2", "--mhub_heads", "2"]
    run_script("train_mmict.sh", world, tmp_path / "mmict", extra=hub, DATA=world["instruct"],
               POOL=str(llava_pool.root), SHOTS="1,2")
    model = TunaForCausalLM.from_pretrained(tmp_path / "mmict")
    assert model.config.connector_type == "mhub" and model.config.ablation == "no_tags"
    source = AutoModelForCausalLM.from_pretrained(world["llm"]).state_dict()
    assert all(torch.equal(v, source[k]) for k, v in model.language_model.state_dict().items())
    counts = json.loads((tmp_path / "mmict" / "icl_counts.json").read_text())
    assert counts["settings"]["p"] == 1.0 and counts["encoded"]["kshot_samples_encoded"] >= 4
    assert sorted(step_losses(tmp_path / "mmict")) == [1, 2]


def test_mmict_zero3_two_ranks_trains_the_hub_only(world, llava_pool, tmp_path):
    """MMICT's M-Hub with k-shot samples under ZeRO-3 with 2 ranks, stage pretrain: the hub's weights move, the
    saved stage-1 file holds them (a mid-run checkpoint too: it used to hang there), and it loads into a fresh
    model."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, set_seed

    from datastore.clip import ClipSpec
    from tuna.modeling_tuna import TRAINABLE_FILE, TunaForCausalLM

    out = tmp_path / "mmict"
    argv = common_args(world, out, icl_pool=llava_pool.root, icl_p=1, icl_shots="1,2", max_steps=3, save_steps=2,
                       **MHUB_ARGS)
    run = launch(argv, deepspeed_config="zero3.json")
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(step_losses(out)) == [1, 2, 3] and (out / "checkpoint-2" / TRAINABLE_FILE).is_file()
    trained = load_file(str(out / TRAINABLE_FILE))
    set_seed(0)  # train.py's initialisation
    initial = TunaForCausalLM.from_components(
        str(world["llm"]), ClipSpec(model="tuna-tiny-clip"), AutoTokenizer.from_pretrained(world["llm"]),
        tag_hidden_dim=32, tag_num_heads=2, max_tags=5, connector_type="mhub", ablation="no_tags",
        mhub={"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_text": 16})
    before = initial.trainable_state_dict()
    assert set(before) == set(trained)
    for key in ("connector.query_tokens", "connector.proj.weight", "connector.qformer.encoder.layer.0.crossattention"
                ".attention.query.weight"):
        assert not torch.equal(before[key], trained[key]), key
    initial.load_trainable(out / TRAINABLE_FILE)
