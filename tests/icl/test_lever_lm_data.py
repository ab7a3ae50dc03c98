"""Lever-LM's D_M: beam search on a planted scorer, build-data's files, resume, rank split and diagnostics."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from icl.formats import Example
from icl.scoring import SetScores


class PlantedScorer:
    """P(y | S, x) = 0.1 + the sum of per-demo values + a bonus for one ordered pair: greedy search misses
    the best sequence, a beam of 2 finds it."""

    batch_size = 4

    def __init__(self, values: dict[str, float], bonus: tuple[tuple[str, str], float] | None = None) -> None:
        self.values, self.bonus, self.sets = values, bonus, 0

    def probability(self, demos) -> float:
        ids = tuple(d.id for d in demos)
        p = 0.1 + sum(self.values.get(i, 0.0) for i in ids)
        if self.bonus and ids == self.bonus[0]:
            p += self.bonus[1]
        return p

    def loglik(self, query, candidate_sets, answer=None) -> SetScores:
        self.sets += len(candidate_sets)
        logs = [float(np.log(self.probability(s))) for s in candidate_sets]
        return SetScores.from_lists(logs, [1] * len(logs), [0] * len(logs))


def _example(i) -> Example:
    return Example(id=f"c{i}", image=f"/img/{i}.jpg", question="q?", answers=("a",), task="vqa", label=None)


def test_beam_search_finds_the_planted_best_sequence_that_greedy_misses():
    from icl.lever_lm.beam import beam_search

    candidates = [_example(i) for i in range(5)]
    scorer = PlantedScorer({"c0": 0.30, "c1": 0.25, "c2": 0.05, "c3": 0.10}, bonus=(("c1", "c3"), 0.5))
    query = Example("q", "/img/q.jpg", "q?", ("a",), "vqa", None)
    best = max(itertools.permutations(candidates, 2), key=scorer.probability)
    assert [d.id for d in best] == ["c1", "c3"]

    greedy = beam_search(scorer, query, candidates, beam=1, length=2)
    assert [candidates[i].id for i in greedy.sequences[0].demos] == ["c0", "c1"]
    scorer.sets = 0
    result = beam_search(scorer, query, candidates, beam=2, length=2)
    top = result.sequences[0]
    assert [candidates[i].id for i in top.demos] == ["c1", "c3"]
    assert top.probability == pytest.approx(scorer.probability(best))
    # InfoScores telescope: the steps add up to P(S) - P(no demos), and step 1 ranks single demos
    assert sum(top.step_scores) == pytest.approx(top.probability - result.base_probability)
    assert result.first_step_scores.argmax() == 0
    assert [len(s.demos) for s in result.sequences] == [2, 2]
    assert result.sets_scored == 1 + 5 + 2 * 4 == scorer.sets
    with pytest.raises(ValueError, match="length"):
        beam_search(scorer, query, candidates[:1], beam=2, length=2)


@pytest.fixture(scope="module")
def pool_dir(synth_pool_dir):
    return synth_pool_dir


def _label_scorer(pool_dir) -> PlantedScorer:
    """Demos are worth more the more their label is common in the pool: a deterministic planted signal."""
    from icl.pool import Pool

    pool = Pool.open(pool_dir)
    return PlantedScorer({e.id: 0.01 * (i % 7) for i, e in enumerate(pool.examples)})


def test_build_data_writes_sequences_resumes_and_refuses_other_settings(pool_dir, tmp_path):
    import pyarrow.parquet as pq

    from icl.lever_lm.data import BuildDataConfig, build_data, read_dm

    config = BuildDataConfig(pool=str(pool_dir), out=str(tmp_path / "dm"), anchors=6, candidates=4, beam=2,
                             length=2, block=2)
    scorer = _label_scorer(pool_dir)
    manifest = build_data(config, scorer, {"model": "planted"}, progress=False)
    assert manifest["anchors"] == 6 and manifest["sequences"] == 12
    assert manifest["sets_scored"] == scorer.sets == 6 * (1 + 4 + 2 * 3)
    assert manifest["forward_passes"] == 6 * (1 + 1 + 2)  # batches of 4: 1 + ceil(4/4) + ceil(6/4)
    _, sequences, anchors = read_dm(tmp_path / "dm")
    for row in sequences:
        assert len(row["demo_ids"]) == 2 and len(set(row["demo_ids"])) == 2 and row["anchor_id"] not in row["demo_ids"]
        anchor = next(a for a in anchors if a["anchor_id"] == row["anchor_id"])
        assert set(row["demo_ids"]) <= set(anchor["candidates"])
        assert row["probability"] == pytest.approx(scorer.probability(
            [Example(d, "", "", ("",), "", None) for d in row["demo_ids"]]))
    before = pq.read_table(tmp_path / "dm" / "sequences.parquet").to_pylist()

    (tmp_path / "dm" / "parts" / "part-00001.parquet").unlink()  # a block lost to a kill
    again = _label_scorer(pool_dir)
    build_data(config, again, {"model": "planted"}, progress=False)
    assert again.sets == 2 * (1 + 4 + 2 * 3)  # only the missing block's two anchors were scored
    assert pq.read_table(tmp_path / "dm" / "sequences.parquet").to_pylist() == before

    with pytest.raises(ValueError, match="other settings"):
        build_data(BuildDataConfig(**{**config.__dict__, "beam": 3}), again, {"model": "planted"}, progress=False)
    with pytest.raises(ValueError, match="other settings"):
        build_data(config, again, {"model": "another"}, progress=False)


def test_ranks_split_the_blocks_and_rank_zero_merges(pool_dir, tmp_path, monkeypatch):
    from icl.lever_lm.data import BuildDataConfig, build_data

    config = BuildDataConfig(pool=str(pool_dir), out=str(tmp_path / "dm"), anchors=5, candidates=3, beam=1,
                             length=1, block=2, sampling="siir")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    rank1 = _label_scorer(pool_dir)
    assert build_data(config, rank1, {"model": "planted"}, progress=False) is None
    parts = sorted(p.name for p in (tmp_path / "dm" / "parts").iterdir())
    assert parts == ["part-00001.parquet"] and rank1.sets == 2 * (1 + 3)
    monkeypatch.setenv("RANK", "0")
    rank0 = _label_scorer(pool_dir)
    manifest = build_data(config, rank0, {"model": "planted"}, progress=False)
    assert rank0.sets == 3 * (1 + 3) and manifest["anchors"] == 5 and manifest["sequences"] == 5


def test_config_and_diagnostics(pool_dir, tmp_path):
    from icl.lever_lm.data import BuildDataConfig, build_data, diagnostics, read_dm
    from icl.pool import Pool

    with pytest.raises(ValueError, match="sampling"):
        BuildDataConfig(pool="p", out="o", sampling="oracle")
    with pytest.raises(ValueError, match="length"):
        BuildDataConfig(pool="p", out="o", candidates=2, length=3)
    pool = Pool.open(pool_dir)
    label = {e.id: e.label for e in pool.examples}

    class SameLabel(PlantedScorer):  # demos with the anchor's label help, others do not
        def loglik(self, query, candidate_sets, answer=None):
            self.sets += len(candidate_sets)
            p = [0.1 + 0.3 * sum(label[d.id] == query.label for d in s) for s in candidate_sets]
            return SetScores.from_lists(list(np.log(p)), [1] * len(p), [0] * len(p))

    # labels are rare here (identification questions, 1-3 per name): random candidates over most of the pool
    config = BuildDataConfig(pool=str(pool_dir), out=str(tmp_path / "dm"), anchors=len(pool), candidates=40,
                             beam=2, length=2, sampling="random")
    build_data(config, SameLabel({}), {"model": "planted"}, progress=False)
    found = diagnostics(tmp_path / "dm", pool)
    _, _, anchors = read_dm(tmp_path / "dm")
    anchors = [a for a in anchors if label[a["anchor_id"]] is not None]  # unlabelled anchors say nothing
    assert found["labelled_anchors"] == len(anchors) > 0
    assert found["sequences_holding_anchor_label_pct"] >= found["candidates_with_anchor_label_pct"]
    assert found["infoscore_percentile_of_anchor_label_candidates"] > 50
    reachable = np.mean([any(label[c] == label[a["anchor_id"]] for c in a["candidates"]) for a in anchors])
    assert 0 < reachable and found["best_sequences_holding_anchor_label_pct"] == pytest.approx(100 * reachable, abs=0.05)
    json.dumps(found)
