"""Lever-LM: the model (save/load, generation), training on a planted D_M, and its use as a retriever.

The pool is a small image-folder pool (6 colour classes x 8 images, tiny CLIP): cheap to build and with labels
that the image features separate, so that a planted rule over features is learnable.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datastore.clip import ClipSpec

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
           "purple": (140, 30, 160), "grey": (128, 128, 128)}
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; with two, OpenMP's spinning makes each small op cost a time
    slice whenever the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from PIL import Image

    from datastore.index import IndexConfig
    from icl.pool import Pool, PoolConfig, build_pool

    root = tmp_path_factory.mktemp("lever")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / "images" / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.png")
    threads = torch.get_num_threads()
    build_pool(PoolConfig(format="image-folder", inputs=[str(root / "images")], out=str(root / "pool"),
                          clip=ClipSpec(model="tuna-tiny-clip"), index=IndexConfig(n_eval_queries=10)), progress=False)
    torch.set_num_threads(threads)  # faiss sets the OpenMP thread count that torch shares
    return Pool.open(root / "pool")


def prototypes(pool) -> dict[str, list[int]]:
    """The planted rule: each label's demos are its first two pool rows, in that prompt order."""
    rows: dict[str, list[int]] = {}
    for i, e in enumerate(pool.examples):
        rows.setdefault(e.label, []).append(i)
    return {label: r[:2] for label, r in rows.items()}


def write_dm(path: Path, pool, rows: list[dict], fingerprint: str | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({
        "pool": str(pool.root), "pool_fingerprint": fingerprint or pool.fingerprint,
        "settings": {"length": 2, "beam": 1}, "scorer": {"name": "planted"}, "anchors": len(rows)}))
    pq.write_table(pa.table({"anchor_id": [r["anchor_id"] for r in rows], "beam": [r.get("beam", 0) for r in rows],
                             "demo_ids": [r["demo_ids"] for r in rows],
                             "step_scores": [[0.0] * len(r["demo_ids"]) for r in rows],
                             "probability": [0.5] * len(rows)}), path / "sequences.parquet")
    return path


@pytest.fixture(scope="module")
def planted(pool, tmp_path_factory):
    """A D_M whose sequence for every non-prototype anchor is its label's two prototypes."""
    proto = prototypes(pool)
    chosen = {i for r in proto.values() for i in r}
    rows = [{"anchor_id": e.id, "demo_ids": [pool.examples[i].id for i in proto[e.label]]}
            for i, e in enumerate(pool.examples) if i not in chosen]
    return write_dm(tmp_path_factory.mktemp("dm") / "planted", pool, rows)


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    from icl.lever_lm.train import LeverLMTrainConfig, train_lever_lm

    config = LeverLMTrainConfig(data=[str(planted)], out=str(tmp_path_factory.mktemp("model") / "lever"), **TINY,
                                epochs=15, batch_size=8, lr=5e-3, dropout=0.0, val_share=0.25, seed=0)
    return config, train_lever_lm(config, progress=False)


def fake_pool(n: int = 12, d: int = 16, seed: int = 0, fingerprint: str = "f" * 64):
    rng = np.random.default_rng(seed)
    vectors = {k: rng.normal(size=(n, d)) for k in ("image", "question", "answer")}
    return SimpleNamespace(vectors={k: (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
                                    for k, v in vectors.items()},
                           fingerprint=fingerprint, root=Path("/nowhere/pool"))


def test_save_load_round_trip_keeps_logits_buffers_and_config(tmp_path):
    from icl.lever_lm.model import LeverLM

    torch.manual_seed(0)
    model = LeverLM.for_pool(fake_pool(), **TINY, adapter=True, max_positions=8).eval()
    with torch.no_grad():  # the adapter starts as the identity: make it matter for the round trip
        assert model.image_adapter.down.weight.abs().sum() == 0
        model.image_adapter.down.weight.normal_(std=0.1)
    model.save_pretrained(tmp_path)
    loaded = LeverLM.from_pretrained(tmp_path).eval()
    image, question = model.pool_image[:3] * 0.5, model.pool_question[:3]
    demos = torch.tensor([[1, 2, 3], [4, -100, -100], [-100, -100, -100]])
    torch.testing.assert_close(loaded(image, question, demos).logits, model(image, question, demos).logits,
                               rtol=1e-6, atol=1e-6)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and {"pool_image", "pool_question", "pool_answer"} <= set(after)
    assert all(torch.equal(before[key], after[key]) for key in before)
    for key in ("n_pool", "clip_dim", "hidden_size", "num_layers", "max_positions", "adapter", "pool_fingerprint",
                "pool_path"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key
    assert loaded.config.pool_fingerprint == "f" * 64 and loaded.config.n_pool == 12


def test_forward_targets_and_loss_cover_each_demo_and_the_eos():
    from icl.lever_lm.model import LeverLM

    model = LeverLM.for_pool(fake_pool(), **TINY, max_positions=8)
    out = model(model.pool_image[:2], model.pool_question[:2], torch.tensor([[5, 7], [3, -100]]), labels=True)
    eos = model.config.n_pool + 1
    assert out.targets.tolist() == [[-100, 5, 7, eos], [-100, 3, eos, -100]]
    assert out.logits.shape == (2, 4, model.config.n_pool + 2)
    expected = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), out.targets.flatten(), ignore_index=-100)
    assert out.loss.item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="right padding"):
        model(model.pool_image[:1], model.pool_question[:1], torch.tensor([[-100, 3]]))
    with pytest.raises(ValueError, match="positions"):
        model(model.pool_image[:1], model.pool_question[:1], torch.zeros(1, 7, dtype=torch.long))


def test_training_learns_the_planted_rule(pool, trained, planted):
    config, record = trained
    last = record["log"][-1]
    assert record["samples"] == {"train": 27, "val": 9} and record["anchors"] == {"train": 27, "val": 9}
    assert last["val_top1"] >= 0.8 > 10 / len(pool)  # chance is about 1 / 48
    assert last["train_loss"] < record["log"][0]["train_loss"]
    saved = json.loads((Path(config.out) / "training.json").read_text())
    assert saved["log"] == record["log"] and saved["data"][0]["scorer"] == {"name": "planted"}

    # held-out anchors: the retriever's demos, put back into prompt order, are the planted ones
    from icl.retrievers import make_retriever, order_demos

    train_anchors = _train_anchor_ids(pool, config)
    proto = prototypes(pool)
    held = [e for i, e in enumerate(pool.examples)
            if e.id not in train_anchors and i not in {r for p in proto.values() for r in p}]
    assert len(held) == 9
    ranked = make_retriever(f"lever-lm:{config.out}", pool, dedup_threshold=None).retrieve(held, k=2)
    planted_hits = [[d for d, _ in order_demos(r)] == [pool.examples[i].id for i in proto[q.label]]
                    for q, r in zip(held, ranked)]
    random = make_retriever("random", pool).retrieve(held, k=2)
    random_hits = [[d for d, _ in order_demos(r)] == [pool.examples[i].id for i in proto[q.label]]
                   for q, r in zip(held, random)]
    assert sum(planted_hits) >= 7 and sum(random_hits) <= 1


def _train_anchor_ids(pool, config) -> set[str]:
    from icl.lever_lm.train import load_training_data

    data = load_training_data(config)
    return {pool.examples[a].id for a, _ in data.train}


def test_generation_is_distinct_pool_ids_beyond_trained_lengths_and_batch_invariant(pool, trained):
    from icl.lever_lm.model import LeverLM

    config, _ = trained
    model = LeverLM.from_pretrained(config.out)
    image = torch.from_numpy(pool.vectors["image"][::5])
    question = torch.from_numpy(pool.vectors["question"][::5])
    batched = model.generate(image, question, k=6)  # trained on sequences of 2
    assert batched.ids.shape == (len(image), 6)
    for row in batched.ids.tolist():
        assert len(set(row)) == 6 and all(0 <= i < len(pool) for i in row)
    for q in range(len(image)):
        single = model.generate(image[q:q + 1], question[q:q + 1], k=6)
        assert single.ids[0].tolist() == batched.ids[q].tolist()
        torch.testing.assert_close(single.logprobs[0], batched.logprobs[q], atol=1e-5, rtol=1e-5)
    assert (batched.logprobs <= 0).all() and not batched.hit_excluded.any()
    with pytest.raises(ValueError, match="generates 0 to 62 demos"):
        model.generate(image, question, k=63)
    exclude = torch.ones(len(image), len(pool), dtype=torch.bool)
    exclude[:, :3] = False
    with pytest.raises(ValueError, match="allows only 3 pool ids"):
        model.generate(image, question, k=4, exclude=exclude)
    assert set(model.generate(image, question, k=3, exclude=exclude).ids.flatten().tolist()) <= {0, 1, 2}


def test_exclusions_are_never_returned_and_counted_when_the_model_wanted_them(pool, trained):
    from icl.formats import Example
    from icl.retrievers import make_retriever

    config, _ = trained
    name = f"lever-lm:{config.out}"
    proto = prototypes(pool)["red"]
    first, second = (pool.examples[i] for i in proto)
    # unrestricted, the first red prototype as query gets the red prototypes (itself included)
    free = make_retriever(name, pool, exclude_self=False, dedup_threshold=None).retrieve([first], k=2)[0]
    assert {d for d, _ in free} == {first.id, second.id}

    retriever = make_retriever(name, pool, dedup_threshold=None)
    demos = retriever.retrieve([first], k=2)[0]
    assert first.id not in {d for d, _ in demos} and len(demos) == 2
    assert retriever.excluded.same_id >= 1 and retriever.excluded.same_image == 0

    # another question on the second prototype's image: that image is excluded as the query's own
    twin = Example(id="twin", image=second.image, question=second.question, answers=second.answers, task="vqa")
    row = pool.position[second.id]
    vectors = {k: v[row:row + 1] for k, v in pool.vectors.items()}
    demos = retriever.retrieve([twin], k=2, vectors=vectors)[0]
    assert second.id not in {d for d, _ in demos} and retriever.excluded.same_image >= 1

    # a copy of the first prototype's image under another path: a near duplicate
    copy = Example(id="copy", image="/elsewhere/copy.png", question=first.question, answers=first.answers,
                   task="vqa")
    row = pool.position[first.id]
    retriever = make_retriever(name, pool, dedup_threshold=0.9999)
    demos = retriever.retrieve([copy], k=3, vectors={k: v[row:row + 1] for k, v in pool.vectors.items()})[0]
    assert first.id not in {d for d, _ in demos} and len(demos) == 3
    assert retriever.excluded.near_duplicate >= 1 and retriever.excluded.same_id == 0

    # k beyond what the exclusions leave: as many as possible
    everything = make_retriever(name, pool, dedup_threshold=-1.0).retrieve([copy], k=2, vectors=vectors)[0]
    assert everything == []


def test_make_retriever_loads_the_model_and_refuses_another_pool(pool, trained, tmp_path):
    from icl.lever_lm.model import LeverLM
    from icl.lever_lm.retriever import LeverLMRetriever
    from icl.retrievers import make_retriever

    config, _ = trained
    retriever = make_retriever(f"lever-lm:{config.out}", pool, seed=3)
    assert isinstance(retriever, LeverLMRetriever) and retriever.name == f"lever-lm:{config.out}"
    ranked = retriever.retrieve(pool.examples[:4], k=3)
    assert [len(r) for r in ranked] == [3, 3, 3, 3]
    assert all(s <= 0 for r in ranked for _, s in r)
    with pytest.raises(ValueError, match="k=-1"):
        retriever.retrieve(pool.examples[:1], k=-1)

    LeverLM.for_pool(fake_pool(n=len(pool), d=pool.vectors["image"].shape[1]), **TINY).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"trained on another pool than {pool.root} \\(fingerprints differ\\)"):
        make_retriever(f"lever-lm:{tmp_path}", pool)


def test_training_refuses_other_pools_and_unknown_ids(pool, planted, tmp_path):
    from icl.lever_lm.train import LeverLMTrainConfig, train_lever_lm

    other = write_dm(tmp_path / "other", pool, [{"anchor_id": pool.examples[5].id, "demo_ids": []}],
                     fingerprint="0" * 64)
    with pytest.raises(ValueError, match=f"D_M {other} was mined on another pool"):
        train_lever_lm(LeverLMTrainConfig(data=[str(planted), str(other)], out=str(tmp_path / "m"), **TINY))
    unknown = write_dm(tmp_path / "unknown", pool, [{"anchor_id": "nope/0.png", "demo_ids": [pool.examples[0].id]}])
    with pytest.raises(ValueError, match="id 'nope/0.png' is not in pool"):
        train_lever_lm(LeverLMTrainConfig(data=[str(unknown)], out=str(tmp_path / "m"), **TINY))
    assert not (tmp_path / "m").exists()  # refused before anything is written
    for bad, match in (({"val_share": 1.0}, "val_share"), ({"num_heads": 5}, "multiple of num_heads"),
                       ({"data": []}, "at least one")):
        with pytest.raises(ValueError, match=match):
            LeverLMTrainConfig(**{"data": [str(planted)], "out": "x", **bad})


def test_training_is_deterministic_and_the_cli_trains(planted, tmp_path, capsys):
    from icl.lever_lm.train import LeverLMTrainConfig, main, train_lever_lm

    runs = [train_lever_lm(LeverLMTrainConfig(data=[str(planted)], out=str(tmp_path / name), **TINY, epochs=2,
                                              batch_size=8, lr=3e-3, seed=1), progress=False)
            for name in ("a", "b")]
    assert runs[0]["log"] == runs[1]["log"]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert all(torch.equal(a[key], b[key]) for key in a)

    assert main(["--data", str(planted), "--out", str(tmp_path / "cli"), "--hidden-size", "16", "--num-heads", "2",
                 "--epochs", "1", "--val-share", "0.2"]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file() and "lever-lm" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--data", "--adapter", "--val-share", "--warmup-ratio"))
