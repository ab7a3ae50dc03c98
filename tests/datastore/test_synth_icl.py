"""The synthetic world's in-context learning task: support set, query set, distractors, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from datastore.synth.generate import SynthConfig, generate_world
from datastore.synth.icl_task import MIDDLE_QUESTION, home_look, query_sample
from datastore.synth.world import WorldCatalogue

PER_CATEGORY, QUERIES = 3, 40


def _config(out: Path, **kw) -> SynthConfig:
    return SynthConfig(**{"out": str(out), "seed": 5, "n_corpus": 10, "n_instruct": 4, "n_eval": 2, "shard_size": 10,
                          "workers": 1, "icl_support_per_category": PER_CATEGORY, "icl_queries": QUERIES, **kw})


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("icl_world") / "w"
    generate_world(_config(out))
    return out


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deterministic_and_absent_unless_asked(world_dir, tmp_path):
    generate_world(_config(tmp_path / "again"))
    assert _digest(tmp_path / "again") == _digest(world_dir)
    generate_world(_config(tmp_path / "plain", icl_support_per_category=0, icl_queries=0))
    args = json.loads((tmp_path / "plain" / "world.json").read_text())["args"]
    assert not (tmp_path / "plain" / "icl").exists() and not any(k.startswith("icl") for k in args)
    with pytest.raises(ValueError, match="needs both"):
        _config(tmp_path / "x", icl_queries=0)


def test_support_set_covers_every_category_and_keeps_novel_names_out_of_the_seen_file(world_dir):
    world = WorldCatalogue()
    support = json.loads((world_dir / "icl" / "support.json").read_text())
    seen_only = json.loads((world_dir / "icl" / "support_seen.json").read_text())
    names = [r["conversations"][1]["value"] for r in support]
    assert sorted(set(names)) == sorted(c.name for c in world.categories)
    assert all(names.count(c.name) == PER_CATEGORY for c in world.categories)
    novel = {c.name for c in world.novel}
    assert len(seen_only) == PER_CATEGORY * len(world.seen) and not novel & set((world_dir / "icl" / "support_seen.json")
                                                                                  .read_text().replace('"', " ").split())
    assert all((world_dir / "images" / r["image"]).is_file() for r in support)


def test_queries_alternate_novelty_and_distractors_stand_between_their_partners(world_dir):
    world = WorldCatalogue()
    questions, answers = _jsonl(world_dir / "icl" / "questions.jsonl"), _jsonl(world_dir / "icl" / "answers.jsonl")
    assert len(questions) == QUERIES and [q["novelty"] for q in questions[:4]] == ["seen", "novel", "seen", "novel"]
    distractors = [q for q in questions if q["distractor"]]
    assert 0.25 * QUERIES <= len(distractors) <= 0.75 * QUERIES
    for index, (q, a) in enumerate(zip(questions, answers)):
        _, category, distractor, scene, _ = query_sample(world, 5, index, 0.5, 96)
        assert a["answers"] == [category.name] and distractor == q["distractor"]
        if distractor:
            partner = world.by_name(category.confusable_with)
            assert q["text"] == MIDDLE_QUESTION
            assert [o.category.name for o in scene.objects] == [partner.name, category.name, partner.name]
            assert {o.colour for o in scene.objects} == {home_look(partner, 5)[0]}
        else:
            assert len(scene.objects) == 1 and scene.objects[0].colour == home_look(category, 5)[0]


def test_pool_and_query_readers(world_dir):
    from eval.benchmarks import get_benchmark
    from icl.formats import Skipped, read_examples

    skipped = Skipped()
    queries = list(read_examples("synth-icl", [str(world_dir)], skipped=skipped))
    assert len(queries) == QUERIES and skipped.total == 0
    assert all(q.label == q.answers[0] and q.task == "identification" for q in queries)
    support = list(read_examples("llava", [str(world_dir / "icl" / "support.json")],
                                 image_root=str(world_dir / "images")))
    assert len(support) == PER_CATEGORY * len(WorldCatalogue().categories) and all(e.label for e in support)
    bench = get_benchmark("synth_icl")
    samples = bench.load(bench.resolve(world_dir))
    assert len(samples) == QUERIES and {"novelty", "distractor"} <= set(samples[0])


def test_label_precision():
    from icl.formats import Example
    from icl.retrievers import label_precision

    class FakePool:
        examples = [Example("a", "a.jpg", "q", ("x",), "t", "x"), Example("b", "b.jpg", "q", ("y",), "t", "y")]
        position = {"a": 0, "b": 1}

    query = Example("q", "q.jpg", "q", ("x",), "t", "x")
    assert label_precision(FakePool(), [query], [[("a", 1.0), ("b", 0.5)]]) == 50.0
    assert label_precision(FakePool(), [Example("u", "u.jpg", "q", ("z",), "t")], [[("a", 1.0)]]) is None


def test_adding_the_task_to_a_world_gives_the_same_files(world_dir, tmp_path):
    from datastore.synth.icl_task import add_icl_task

    generate_world(_config(tmp_path / "w", icl_support_per_category=0, icl_queries=0))
    counts = add_icl_task(tmp_path / "w", PER_CATEGORY, QUERIES)
    assert counts["icl_queries"] == QUERIES
    for name in ("support.json", "questions.jsonl", "answers.jsonl"):
        assert (tmp_path / "w" / "icl" / name).read_bytes() == (world_dir / "icl" / name).read_bytes()
    assert _digest(tmp_path / "w" / "images" / "icl") == _digest(world_dir / "images" / "icl")
    assert json.loads((tmp_path / "w" / "icl" / "task.json").read_text())["icl_queries"] == QUERIES
