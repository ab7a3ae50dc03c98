"""filter_by_support: a similarity-weighted majority vote over the neighbours, per entity (a tag's last word)."""

from __future__ import annotations

import pytest

from datastore.store import RetrievedTags, _aggregate, entity_of, filter_by_support


def retrieved(rows, sims):
    return _aggregate(rows, sims, [f"n{i}" for i in range(len(rows))], "sum")


def test_entity_is_the_last_word():
    assert entity_of("small red kelbo") == "kelbo" and entity_of("kelbo") == "kelbo"


def test_majority_entities_keep_all_their_tags_and_order():
    # kelbo: 4 of 5 neighbours; drerik: 2 of 5; snunal: 1 of 5 (equal similarities)
    rows = [["red kelbo", "kelbo", "drerik"], ["kelbo", "blue drerik", "drerik"], ["kelbo"], ["small kelbo", "kelbo"],
            ["snunal"]]
    found = retrieved(rows, [0.9] * 5)
    kept = filter_by_support(found, 0.5)
    assert kept.tags == [t for t in found.tags if entity_of(t) == "kelbo"]
    assert kept.tags[0] == "kelbo" and set(kept.tags) == {"kelbo", "red kelbo", "small kelbo"}
    assert kept.scores == [found.scores[found.tags.index(t)] for t in kept.tags]
    assert kept.neighbours == found.neighbours and kept.neighbour_scores == found.neighbour_scores
    assert set(filter_by_support(found, 0.4).tags) == {t for t in found.tags if entity_of(t) != "snunal"}
    assert filter_by_support(found, 0.0) is found
    assert filter_by_support(found, 0.81).tags == []  # kelbo has 0.8 of the similarity mass


def test_support_is_weighted_by_similarity():
    # two close neighbours name "kelbo", three far ones "drerik": kelbo has 2 x 0.9 / (1.8 + 3 x 0.3) = 0.67
    found = retrieved([["kelbo"], ["kelbo"], ["drerik"], ["drerik"], ["drerik"]], [0.9, 0.9, 0.3, 0.3, 0.3])
    assert filter_by_support(found, 0.5).tags == ["kelbo"]


def test_entity_support_without_a_bare_tag_uses_its_best_phrase():
    found = retrieved([["red kelbo"], ["red kelbo"], ["blue kelbo"]], [1.0, 1.0, 1.0])
    assert filter_by_support(found, 0.6).tags == ["red kelbo", "blue kelbo"]  # support 2/3, from "red kelbo"


def test_bad_support_and_empty_results():
    empty = RetrievedTags([], [], [], [])
    assert filter_by_support(empty, 0.5) is empty
    with pytest.raises(ValueError, match="min_support=1.5: must be in"):
        filter_by_support(empty, 1.5)
