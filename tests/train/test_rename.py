"""train/rename.py: per-sample name randomisation and its checks."""

from __future__ import annotations

import pytest

from train.rename import NameRandomiser

NAMES, POOL = ("pavik", "jadub", "tulbel"), tuple(f"name{i}" for i in range(40))


def test_draws_are_deterministic_distinct_and_at_rate_p():
    r = NameRandomiser(NAMES, POOL, p=0.3, seed=4)
    maps = [r(i) for i in range(2000)]
    assert maps == [NameRandomiser(NAMES, POOL, p=0.3, seed=4)(i) for i in range(2000)]
    renamed = [m for m in maps if m is not None]
    assert abs(len(renamed) / 2000 - 0.3) < 0.04
    for m in renamed:
        assert sorted(m) == sorted(NAMES) and len(set(m.values())) == 3 and set(m.values()) <= set(POOL)
    assert len({tuple(sorted(m.items())) for m in renamed}) > 500  # not one fixed renaming
    assert maps != [NameRandomiser(NAMES, POOL, p=0.3, seed=5)(i) for i in range(2000)]
    assert all(NameRandomiser(NAMES, POOL, p=0.0)(i) is None for i in range(100))
    assert all(NameRandomiser(NAMES, POOL, p=1.0)(i) is not None for i in range(100))


def test_bad_settings_and_word_lists_raise(tmp_path):
    with pytest.raises(ValueError, match="must be in"):
        NameRandomiser(NAMES, POOL, p=1.5)
    with pytest.raises(ValueError, match="pool of 2 names is smaller than the 3"):
        NameRandomiser(NAMES, ("a", "b"), p=0.5)
    names, pool = tmp_path / "names.txt", tmp_path / "pool.txt"
    names.write_text("pavik\n\njadub\n")
    pool.write_text("\n".join(POOL))
    assert NameRandomiser.from_files(names, pool, 1.0)(0).keys() == {"pavik", "jadub"}
    with pytest.raises(ValueError, match="cannot read the word list .*missing.txt"):
        NameRandomiser.from_files(tmp_path / "missing.txt", pool, 1.0)
    (tmp_path / "bad.txt").write_text("red pavik\n")
    with pytest.raises(ValueError, match="bad.txt.*not single words: \\['red pavik'\\]"):
        NameRandomiser.from_files(tmp_path / "bad.txt", pool, 1.0)


def test_train_flags_are_checked():
    from train.arguments import TagArguments

    with pytest.raises(ValueError, match="--rename_p needs --rename_names and --rename_pool"):
        TagArguments(rename_p=0.5, rename_names="names.txt")
    with pytest.raises(ValueError, match="--rename_p 2.0: must be in"):
        TagArguments(rename_p=2.0)
    assert TagArguments(rename_p=0.5, rename_names="a", rename_pool="b").rename_p == 0.5


def test_a_pool_of_the_names_themselves_permutes_them():
    r = NameRandomiser(NAMES, NAMES, p=1.0, seed=1)
    maps = [r(i) for i in range(200)]
    assert all(sorted(m.values()) == sorted(NAMES) for m in maps)
    assert sum(m == dict(zip(NAMES, NAMES)) for m in maps) < 200 / 6 + 15  # the identity: 1 in 6, not always
