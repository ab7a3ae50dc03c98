"""DRUM on planted scores: the losses' gradients, the score cache, rounds that learn and resume, the retriever's
save / load, and every training scope."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from icl.scoring import SetScores


class TaskScorer:
    """s(z) = 0 when the demo asks the query's kind of question (its task), else -3: a signal the question head
    can learn and the untrained [image; question] similarity only partly follows."""

    def __init__(self) -> None:
        self.pairs = 0

    def loglik(self, query, candidate_sets, answer=None) -> SetScores:
        self.pairs += len(candidate_sets)
        values = [sum(0.0 if d.task == query.task else -3.0 for d in s) for s in candidate_sets]
        return SetScores.from_lists(values, [1] * len(values), [0] * len(values))


PLANTED = {"model": "planted-task-scorer"}


@pytest.fixture(scope="module")
def pool_dir(synth_pool_dir):
    return synth_pool_dir


def _config(pool_dir, out, **kw):
    from icl.drum.train import DrumConfig

    settings = {"rounds": 2, "candidates": 8, "queries": 0, "dev_queries": 12, "epochs": 5, "batch_size": 16,
                "device": "cpu"}
    return DrumConfig(pool=str(pool_dir), out=str(out), **{**settings, **kw})


@pytest.mark.parametrize("loss", ["kl", "listmle", "epr"])
def test_a_gradient_step_moves_the_best_scored_candidate_up(loss):
    from icl.drum.losses import LOSSES

    sim = torch.tensor([[0.30, 0.20, 0.10, 0.00, 0.50], [0.1, 0.4, 0.2, 0.0, 0.0]], requires_grad=True)
    scores = torch.tensor([[-5.0, -4.0, 0.0, -6.0, 0.0], [-1.0, -2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    kwargs = {"negatives": 2} if loss == "epr" else {}
    value = LOSSES[loss](sim, scores, mask, torch.tensor(0.1), **kwargs)
    value.backward()
    grad = sim.grad
    assert torch.isfinite(value) and value > 0
    assert grad[0, 2] < 0 and grad[0, 2] == grad[0, :4].min()  # the best (planted) candidate rises most
    assert grad[1, 2] < 0  # query 2's best: candidate 2 (0.0 > -1 > -2)
    assert torch.all(grad[~mask] == 0)  # padding is not a candidate
    with torch.no_grad():
        moved = sim - 0.5 * grad
    assert moved[0, :4].argmax() == 2 and moved[1, :3].argmax() == 2


def test_kl_is_zero_when_the_similarities_already_match_the_scores():
    from icl.drum.losses import kl_listwise

    scores = torch.tensor([[0.0, -1.0, -2.0]])
    value = kl_listwise(scores * 0.1, scores, torch.ones_like(scores, dtype=torch.bool), torch.tensor(0.1))
    assert value.abs() < 1e-6


def test_feedback_cache_reuses_scores_across_instances_and_keeps_models_apart(tmp_path):
    from icl.drum.feedback import FeedbackCache, model_key

    key_a, key_b = model_key({"model": "a"}, "pool"), model_key({"model": "b"}, "pool")
    assert key_a != key_b != model_key({"model": "a"}, "other-pool")
    cache = FeedbackCache(tmp_path, key_a)
    assert cache.missing([("q", "d1"), ("q", "d2"), ("q", "d1")]) == [("q", "d1"), ("q", "d2")]
    cache.add([("q", "d1", -1.5, -0.5, 3), ("q", "d2", -2.0, -1.0, 2)])
    FeedbackCache(tmp_path, key_b).add([("q", "d1", -9.0, -9.0, 1)])
    again = FeedbackCache(tmp_path, key_a)
    assert len(again) == 2 and again.score("q", "d1") == -1.5
    assert again.missing([("q", "d1"), ("q", "d3")]) == [("q", "d3")] and again.reused == 1
    assert FeedbackCache(tmp_path, key_b).score("q", "d1") == -9.0
    assert not list(tmp_path.glob(".*.tmp"))  # parts are renamed into place


@pytest.fixture(scope="module")
def run(pool_dir, tmp_path_factory):
    from icl.drum.train import train_drum

    out = tmp_path_factory.mktemp("drum") / "run"
    scorer = TaskScorer()
    history = train_drum(_config(pool_dir, out), scorer, PLANTED, progress=False)
    return {"out": out, "history": history, "pairs": scorer.pairs}


def test_rounds_learn_the_planted_signal(run):
    history = run["history"]
    assert [h["round"] for h in history] == [0, 1, 2]
    first, last = history[0], history[-1]
    # round 0 is the untrained embedder (= sit); training moves the dev queries' demos to the rewarded task
    assert last["dev_top1_score"] > first["dev_top1_score"]
    assert last["dev_4shot_loglik"] > first["dev_4shot_loglik"] + 1.0
    assert all(h["train_log"][-1]["loss"] < h["train_log"][0]["loss"] for h in history[:-1])
    assert "train_log" not in last and last["seconds"]["mine"] >= 0
    assert json.loads((run["out"] / "rounds.json").read_text()) == history
    for r in range(3):
        assert (run["out"] / f"round-{r}" / "drum_embedder.json").is_file()
        assert (run["out"] / f"round-{r}" / "metrics.json").is_file()


def test_later_rounds_reuse_cached_scores(run):
    history = run["history"]
    assert history[0]["scored"] == history[0]["pairs"]  # nothing cached at first
    assert all(h["scored"] < h["pairs"] for h in history[1:])  # lists overlap: the cache answers the rest
    # the cache holds every mined pair (plus the dev queries' top-1 demos, scored for the metrics)
    assert all(h["cache_size"] >= sum(g["scored"] for g in history[:i + 1]) for i, h in enumerate(history))


def test_resume_continues_at_the_next_round_and_refuses_other_settings(pool_dir, run, tmp_path):
    import shutil

    from icl.drum.train import train_drum

    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    (out / "round-2" / "metrics.json").unlink()  # as if stopped after training round 1, before evaluating 2
    scorer = TaskScorer()
    history = train_drum(_config(pool_dir, out), scorer, PLANTED, progress=False)
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[:2] == run["history"][:2]  # finished rounds are not redone
    assert history[2]["scored"] == 0  # and round 2's lists come from the cache
    shutil.rmtree(out / "round-2")  # stopped while training round 1: round 1 trains again, round 0 stays
    history = train_drum(_config(pool_dir, out), TaskScorer(), PLANTED, progress=False)
    assert [h["round"] for h in history] == [0, 1, 2] and history[0] == run["history"][0]
    scorer = TaskScorer()
    assert train_drum(_config(pool_dir, out), scorer, PLANTED, progress=False) == history  # finished: no work
    assert scorer.pairs == 0
    extended = train_drum(_config(pool_dir, out, rounds=3), TaskScorer(), PLANTED, progress=False)
    assert [h["round"] for h in extended] == [0, 1, 2, 3] and extended[:2] == history[:2]
    with pytest.raises(ValueError, match="config"):
        train_drum(_config(pool_dir, out, candidates=4), TaskScorer(), PLANTED, progress=False)
    with pytest.raises(ValueError, match="scorer"):
        train_drum(_config(pool_dir, out), TaskScorer(), {"model": "another"}, progress=False)


def test_saved_retriever_ranks_as_in_training_and_rounds_differ(pool_dir, run):
    from icl.drum.embedder import DrumEmbedder
    from icl.drum.retriever import DrumRetriever
    from icl.pool import Pool
    from icl.retrievers import make_retriever

    pool = Pool.open(pool_dir)
    queries = pool.examples[:10]
    loaded = make_retriever(f"drum:{run['out']}", pool)  # the run folder: its latest round
    assert loaded.embedder.config.scope == "head" and loaded.name == f"drum:{run['out']}"
    in_memory = DrumRetriever(pool, embedder=DrumEmbedder.load(run["out"] / "round-2"))
    ranked = loaded.retrieve(queries, 4)
    assert [[d for d, _ in r] for r in ranked] == [[d for d, _ in r] for r in in_memory.retrieve(queries, 4)]
    assert all(len(r) == 4 and q.id not in [d for d, _ in r] for q, r in zip(queries, ranked))
    untrained = make_retriever(f"drum:{run['out'] / 'round-0'}", pool).retrieve(queries, 4)
    sit = make_retriever("sit", pool).retrieve(queries, 4)
    assert [[d for d, _ in r] for r in untrained] == [[d for d, _ in r] for r in sit]  # round 0 is sit
    assert [[d for d, _ in r] for r in untrained] != [[d for d, _ in r] for r in ranked]


def test_retriever_refuses_a_pool_of_another_clip_and_a_folder_without_embedder(run, tmp_path):
    from icl.drum.retriever import embedder_folder
    from icl.pool import Pool
    from icl.retrievers import make_retriever

    with pytest.raises(ValueError, match="neither"):
        embedder_folder(tmp_path)
    pool = Pool.open(json.loads((run["out"] / "settings.json").read_text())["pool"])
    pool.manifest = {**pool.manifest, "clip": {**pool.manifest["clip"], "weights_sha256": "0" * 64}}
    with pytest.raises(ValueError, match="another CLIP"):
        make_retriever(f"drum:{run['out']}", pool)


@pytest.mark.parametrize("scope", ["projection", "lora", "full"])
def test_clip_scopes_train_save_and_load(pool_dir, tmp_path, scope):
    from icl.drum.embedder import DrumEmbedder
    from icl.drum.train import train_drum

    out = tmp_path / scope
    history = train_drum(_config(pool_dir, out, scope=scope, rounds=1, epochs=1, queries=16, dev_queries=4,
                                 candidates=4, lr=1e-3), TaskScorer(), PLANTED, progress=False)
    assert [h["round"] for h in history] == [0, 1]
    before, after = DrumEmbedder.load(out / "round-0"), DrumEmbedder.load(out / "round-1")
    trained = {n for n, p in after.named_parameters() if p.requires_grad}
    frozen = {n for n, p in after.named_parameters() if not p.requires_grad}
    if scope == "lora":
        assert trained and all("lora_" in n or n == "log_temperature" for n in trained)
    elif scope == "projection":
        assert trained == {"clip.text_projection", "clip.visual.proj", "log_temperature"}  # a ViT tower
        assert frozen
    else:
        assert not frozen
    changed = [n for n, p in after.named_parameters() if p.requires_grad and n != "log_temperature"
               and not torch.equal(p, dict(before.named_parameters())[n])]
    assert changed
    weights = (out / "round-1" / "drum_embedder.safetensors").stat().st_size
    assert (weights < 1_000_000) == (scope != "full")  # frozen CLIP weights are not saved again


def test_config_rejects_bad_settings(pool_dir, tmp_path):
    for bad in ({"scope": "everything"}, {"loss": "mse"}, {"candidates": 1}, {"lr": 0.0}, {"rounds": -1}):
        with pytest.raises(ValueError):
            _config(pool_dir, tmp_path, **bad)
    from icl.drum.train import split_queries

    with pytest.raises(ValueError, match="dev_queries"):
        split_queries(10, _config(pool_dir, tmp_path, dev_queries=10))
    train, dev = split_queries(30, _config(pool_dir, tmp_path, dev_queries=5, queries=10))
    assert len(train) == 10 and len(dev) == 5 and not set(train) & set(dev)
    assert np.array_equal(split_queries(30, _config(pool_dir, tmp_path, dev_queries=5, queries=10))[0], train)
