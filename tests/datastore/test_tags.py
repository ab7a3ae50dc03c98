"""Tests for datastore/tags.py: rule parser, singularisation, emit/vocabulary/max_tags, registry, spaCy."""

from __future__ import annotations

import pickle
import random
import sys

import pytest
import spacy
from spacy.language import Language
from spacy.tokens import Doc

from datastore import stopwords, tags
from datastore.tags import (
    Mention, TagParser, TagParserConfig, build_tag_parser, list_tag_parsers, load_vocabulary,
    mentions_to_tags, normalize_tag, register_tag_parser, singularize, spacy_doc_mentions,
    spacy_doc_to_tags,
)


@pytest.fixture(scope="module")
def rule():
    return build_tag_parser()


# --- Rule parser: required examples ----------------------------------------------------------

@pytest.mark.parametrize("caption, expected", [
    ("a red striped cube next to two dogs", ["red striped cube", "cube", "dog"]),
    ("a photo of a small red blorp on the left and two blue zinnets",
     ["small red blorp", "blorp", "blue zinnet", "zinnet"]),
    ("a dog running on the beach", ["dog", "beach"]),
    # web (CC3M-style) captions
    ("actor attends the premiere of the film", ["actor", "premiere", "film"]),
    ("the view from the top of a mountain", ["mountain"]),
    ("person riding a bicycle down a street", ["person", "bicycle", "street"]),
    ("football player celebrates scoring a goal during the match",
     ["football player", "player", "goal", "match"]),
    ("stock photo of a woman wearing glasses and a black t-shirts",
     ["woman", "glasses", "black t-shirt", "t-shirt"]),
    ("the old abandoned house was built in 1900", ["old abandoned house", "house"]),
    ("a man dressed in black sits on a bench", ["man", "bench"]),
    ("close-up of autumn leaves on the grass", ["autumn leaf", "leaf", "grass"]),
    ("vector illustration of a cartoon bus on a white background", ["cartoon bus", "bus"]),
    ("a group of people walking in the city at night", ["people", "city", "night"]),
    ("a building with a clock tower", ["building", "clock tower", "tower"]),
    ("businessmen shaking hands in an office", ["businessman", "hand", "office"]),
    ("the sky is blue", ["sky"]),
    ("3d rendering of a modern living room", ["modern living room", "room"]),
    ("the bride and groom share a kiss at their wedding", ["bride", "groom", "kiss", "wedding"]),
    ("athlete competes in the women's 100m final", ["athlete", "woman", "100m final", "final"]),
])
def test_rule_examples(rule, caption, expected):
    assert rule(caption) == expected


@pytest.mark.parametrize("caption, expected", [
    ("A RED Cube!!! (next to) a Dog.", ["red cube", "cube", "dog"]),  # case and punctuation
    ("red cube; blue cube: green", ["red cube", "cube", "blue cube"]),  # punctuation splits
    ("the dog's toy is on the couch", ["dog", "toy", "couch"]),  # possessive ends a phrase
    ("the dog\u2019s toy", ["dog", "toy"]),  # curly apostrophe
    ("a very large dog", ["large dog", "dog"]),  # adverbs are skipped, not split on
    ("a beautifully decorated cake", ["decorated cake", "cake"]),
    ("a butterfly and a friendly family", ["butterfly", "friendly family", "family"]),  # -ly nouns
    ("dogs don't bark at cats", ["dog", "bark", "cat"]),  # contraction splits
    ("a wedding dress and a painting", ["wedding dress", "dress", "painting"]),  # -ing nouns kept
    ("a woman smiling at a man eating pizza", ["woman", "man", "pizza"]),  # -ing verbs split
])
def test_rule_chunking(rule, caption, expected):
    assert rule(caption) == expected


@pytest.mark.parametrize("caption", [
    "two", "3 several many", "a photo of an image", "on the left, in the middle, on the right",
    "a close-up view of the background", "", "   ", "!!!", "in 2019 at 10th",
])
def test_counts_boilerplate_and_positions_are_not_tags(rule, caption):
    assert rule(caption) == []


def test_counts_and_quantifiers_are_removed_from_phrases(rule):
    assert rule("3 dogs, several cats, many birds and a dozen eggs") == ["dog", "cat", "bird", "egg"]


def test_dedup_keeps_first_mention_order(rule):
    assert rule("a dog, a cat and another dog") == ["dog", "cat"]
    assert rule("a blorp, two red blorps and a red blorp") == ["blorp", "red blorp"]
    assert rule("a red blorp and a blorp") == ["red blorp", "blorp"]


# --- Synthetic-world captions ---------------------------------------------------------------

_PREFIXES = ["", "a photo of ", "an image of ", "a picture showing "]
_SIZES = ["", "small", "medium", "large"]
_COLOURS = "red orange yellow green blue purple pink brown black white gray".split()
_POSITIONS = ["", "on the left", "in the middle", "on the right"]
_NAMES = ["blorp", "zinnet", "quoffle", "dabbet", "mirrow", "tepple", "flimbo", "gruffit"]


def _synthetic_caption(rng: random.Random) -> tuple[str, list[str]]:
    """A caption of the synthetic grammar and its expected tags (emit='both')."""
    phrases, expected = [], []
    for name in rng.sample(_NAMES, rng.randint(1, 4)):
        count = rng.choice(["a", "two", "three"])
        attrs = [w for w in (rng.choice(_SIZES), rng.choice(_COLOURS + [""])) if w]
        det = ("an" if (attrs or [name])[0][0] in "aeiou" else "a") if count == "a" else count
        noun = name if count == "a" else name + "s"
        phrases.append(" ".join(w for w in [det, *attrs, noun, rng.choice(_POSITIONS)] if w))
        expected += [" ".join(attrs + [name]), name] if attrs else [name]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return rng.choice(_PREFIXES) + body, expected


def test_synthetic_grammar_matches_oracle(rule):
    rng = random.Random(7)
    for _ in range(500):
        caption, expected = _synthetic_caption(rng)
        assert rule(caption) == expected, caption


def test_synth_world_names_and_prefixes():
    from datastore.synth.scene import CAPTION_PREFIXES
    from datastore.synth.world import NAMES

    parser = build_tag_parser()
    for prefix in CAPTION_PREFIXES:
        for name in NAMES:
            caption = f"{prefix} two large red {name}s in the middle and an orange {name} on the left"
            assert parser(caption) == [f"large red {name}", name, f"orange {name}"], caption


# --- Singularisation ------------------------------------------------------------------------

@pytest.mark.parametrize("plural, singular", [
    ("dogs", "dog"), ("boxes", "box"), ("buses", "bus"), ("cities", "city"), ("leaves", "leaf"),
    ("knives", "knife"), ("children", "child"), ("women", "woman"), ("firemen", "fireman"),
    ("mice", "mouse"), ("teeth", "tooth"), ("potatoes", "potato"), ("dresses", "dress"),
    ("taxis", "taxi"), ("menus", "menu"), ("blorps", "blorp"), ("zinnets", "zinnet"),
    ("quoffles", "quoffle"), ("t-shirts", "t-shirt"), ("close-ups", "close-up"),
])
def test_singularize_plurals(plural, singular):
    assert singularize(plural) == singular


@pytest.mark.parametrize("word", [
    "glass", "bus", "grass", "species", "series", "news", "blorp", "zinnet", "quoffle", "cactus",
    "status", "virus", "analysis", "tennis", "iris", "gas", "canvas", "chaos", "lens", "jeans",
    "pants", "clothes", "glasses", "omen", "specimen", "kitchen", "chicken", "pizza", "data",
    "people", "fish", "sheep", "dog", "a", "3d", "x",
])
def test_singularize_leaves_non_plurals_alone(word):
    assert singularize(word) == word


def test_singularize_is_cached():
    singularize.cache_clear()
    singularize("zinnets")
    singularize("zinnets")
    info = singularize.cache_info()
    assert (info.hits, info.misses) == (1, 1)


# --- emit, vocabulary, max_tags, max_attributes ---------------------------------------------

@pytest.mark.parametrize("emit, expected", [
    ("both", ["small red blorp", "blorp", "zinnet", "green cube", "cube"]),
    ("phrases", ["small red blorp", "zinnet", "green cube"]),
    ("nouns", ["blorp", "zinnet", "cube"]),
])
def test_emit_modes(emit, expected):
    parser = build_tag_parser(TagParserConfig(emit=emit))
    assert parser("a small red blorp, two zinnets and a green cube") == expected


def test_vocabulary_rule_phrase_or_head(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("# comment\nBlorps\n\n  green cube \n")
    caption = "a small red blorp, two zinnets and a green cube and a blue cube"
    for source in (str(path), path, ["blorp", "green cubes"]):
        parser = build_tag_parser(TagParserConfig(vocabulary=source))
        # blorp: head in vocab → whole mention kept; zinnet: neither → dropped;
        # green cube: phrase in vocab; blue cube: phrase and head ("cube") absent → dropped.
        assert parser(caption) == ["small red blorp", "blorp", "green cube", "cube"]
    assert load_vocabulary(path) == frozenset({"blorp", "green cube"})


def test_vocabulary_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="has no entries"):
        build_tag_parser(TagParserConfig(vocabulary=str(empty)))
    with pytest.raises(ValueError, match="vocabulary: file .*missing.txt' does not exist"):
        TagParserConfig(vocabulary=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="vocabulary: got an empty iterable"):
        TagParserConfig(vocabulary=[])
    with pytest.raises(ValueError, match=r"vocabulary: got \[3\]"):
        TagParserConfig(vocabulary=["dog", 3])


def test_normalize_tag():
    assert normalize_tag("  Red  Striped CUBES! ") == "red striped cube"
    assert normalize_tag("...") == ""


def test_max_tags_and_max_attributes():
    caption = "a big red striped cube, a dog and a cat"
    assert build_tag_parser(TagParserConfig(max_tags=3))(caption) == ["big red striped cube", "cube", "dog"]
    parser = build_tag_parser(TagParserConfig(max_attributes=2))
    assert parser(caption) == ["red striped cube", "cube", "dog", "cat"]


def test_mentions_to_tags_directly():
    mentions = [Mention(("red",), "cube"), Mention((), "cube"), Mention(("red",), "cube")]
    assert mentions_to_tags(mentions, TagParserConfig()) == ["red cube", "cube"]
    assert mentions_to_tags(mentions, TagParserConfig(emit="nouns")) == ["cube"]


def test_parse_batch_and_type_error(rule):
    captions = ["a red cube", "two dogs", ""]
    assert rule.parse_batch(captions) == [rule(c) for c in captions] == [["red cube", "cube"], ["dog"], []]
    with pytest.raises(TypeError, match="caption must be str, got NoneType"):
        rule(None)


def test_parser_pickles_for_dataloader_workers():
    parser = build_tag_parser(TagParserConfig(vocabulary=["dog"], emit="nouns"))
    clone = pickle.loads(pickle.dumps(parser.parse_batch))
    assert clone(["two dogs and a cat", "a cat"]) == [["dog"], []]


# --- Config, registry, describe -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"emit": "words"}, r"emit: got 'words'; allowed: \['phrases', 'nouns', 'both'\]"),
    ({"max_tags": 0}, "max_tags: got 0; allowed: a positive integer or None"),
    ({"max_tags": True}, "max_tags: got True"),
    ({"max_attributes": "2"}, "max_attributes: got '2'"),
    ({"batch_size": None}, "batch_size: got None; allowed: a positive integer$"),
    ({"model": ""}, "model: got ''"),
    ({"vocabulary": 5}, "vocabulary: got int"),
    ({"name": "scene-graph"}, r"name: unknown tag parser 'scene-graph'; valid: \['rule', 'spacy'"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TagParserConfig(**kwargs)


def test_config_dict_round_trip():
    config = TagParserConfig(emit="nouns", vocabulary=("dog", "cat"), max_tags=4)
    data = config.to_dict()
    assert data["vocabulary"] == ["dog", "cat"]
    assert TagParserConfig.from_dict(data) == config
    with pytest.raises(ValueError, match=r"unknown TagParserConfig keys \['lang'\]"):
        TagParserConfig.from_dict({"name": "rule", "lang": "en"})


def test_registry_lists_and_rejects_unknown(monkeypatch):
    assert {"rule", "spacy"} <= set(list_tag_parsers())
    config = TagParserConfig()
    monkeypatch.setattr(config, "name", "nope")
    with pytest.raises(ValueError, match=r"unknown tag parser 'nope'; valid: \['rule', 'spacy'\]"):
        build_tag_parser(config)
    with pytest.raises(ValueError, match="'rule' is already registered"):
        register_tag_parser("rule")(tags.RuleTagParser)


def test_registry_plugs_in_a_parser(monkeypatch):
    monkeypatch.setattr(tags, "_REGISTRY", dict(tags._REGISTRY))

    @register_tag_parser("upper-words")
    class WordParser(TagParser):
        name, version = "upper-words", "0.1"

        def mentions(self, caption):
            return [Mention((), w) for w in caption.split() if w.isupper()]

    assert "upper-words" in list_tag_parsers()
    parser = build_tag_parser("upper-words")
    assert parser("a DOG and a CAT and a DOG") == ["DOG", "CAT"]
    assert parser.describe()["version"] == "0.1"


def test_describe(tmp_path):
    parser = build_tag_parser(TagParserConfig(emit="phrases"))
    assert parser.describe() == {"name": "rule", "version": parser.version,
                                 "config": TagParserConfig(emit="phrases").to_dict()}
    path = tmp_path / "v.txt"
    path.write_text("dog\ncats\n")
    from_file = build_tag_parser(TagParserConfig(vocabulary=str(path))).describe()["config"]["vocabulary"]
    from_list = build_tag_parser(TagParserConfig(vocabulary=["cat", "Dog"])).describe()["config"]["vocabulary"]
    assert from_file["path"] == str(path) and from_list["path"] is None
    assert from_file["entries"] == from_list["entries"] == 2
    assert from_file["sha256"] == from_list["sha256"] and len(from_file["sha256"]) == 64


def test_word_lists_are_consistent():
    assert not stopwords.ING_NOUNS & stopwords.VERBS
    assert not stopwords.INVARIANT_NOUNS & stopwords.VERBS
    assert "leaves" not in stopwords.VERBS and {"sits", "attends", "holds"} <= stopwords.VERBS


# --- spaCy ----------------------------------------------------------------------------------

def _doc(words, pos, deps, heads, lemmas):
    return Doc(spacy.blank("en").vocab, words=words, pos=pos, deps=deps, heads=heads, lemmas=lemmas)


def test_spacy_doc_to_tags_by_hand():
    doc = _doc(
        words=["A", "red", "striped", "cube", "next", "to", "two", "dogs"],
        pos=["DET", "ADJ", "ADJ", "NOUN", "ADV", "ADP", "NUM", "NOUN"],
        deps=["det", "amod", "amod", "ROOT", "advmod", "prep", "nummod", "pobj"],
        heads=[3, 3, 3, 3, 3, 4, 7, 5],
        lemmas=["a", "red", "striped", "cube", "next", "to", "two", "dog"],
    )
    assert spacy_doc_mentions(doc) == [Mention(("red", "striped"), "cube"), Mention((), "dog")]
    assert spacy_doc_to_tags(doc) == ["red striped cube", "cube", "dog"]
    assert spacy_doc_to_tags(doc, TagParserConfig(name="spacy", emit="nouns")) == ["cube", "dog"]


def test_spacy_doc_compounds_pronouns_boilerplate():
    # "A photo of the tennis players holding their rackets"
    doc = _doc(
        words=["A", "photo", "of", "the", "tennis", "players", "holding", "their", "rackets"],
        pos=["DET", "NOUN", "ADP", "DET", "NOUN", "NOUN", "VERB", "PRON", "NOUN"],
        deps=["det", "ROOT", "prep", "det", "compound", "pobj", "acl", "poss", "dobj"],
        heads=[1, 1, 1, 5, 5, 2, 5, 8, 6],
        lemmas=["a", "photo", "of", "the", "tennis", "player", "hold", "their", "racket"],
    )
    assert spacy_doc_to_tags(doc) == ["tennis player", "player", "racket"]
    he = _doc(["He", "smiles"], ["PRON", "VERB"], ["nsubj", "ROOT"], [1, 1], ["he", "smile"])
    assert spacy_doc_to_tags(he) == []


def test_spacy_doc_without_parse_and_without_lemmas():
    with pytest.raises(ValueError, match="no dependency parse"):
        spacy_doc_mentions(Doc(spacy.blank("en").vocab, words=["two", "dogs"]))
    doc = Doc(spacy.blank("en").vocab, words=["blue", "zinnets"], pos=["ADJ", "NOUN"],
              deps=["amod", "ROOT"], heads=[1, 1])
    assert spacy_doc_to_tags(doc) == ["blue zinnet", "zinnet"]  # no lemma → rule singulariser


def test_spacy_missing_model_error():
    with pytest.raises(RuntimeError, match=r"spaCy model 'en_core_web_sm' is not installed: "
                                           r"run `python -m spacy download en_core_web_sm`"):
        build_tag_parser("spacy")


def test_spacy_missing_package_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)
    with pytest.raises(RuntimeError, match="needs spaCy: pip install spacy"):
        build_tag_parser("spacy")


@Language.component("tuna_test_last_word_head")
def _last_word_head(doc):
    """Toy 'parser': the last word is the noun root, every other word an adjective on it."""
    for token in doc:
        token.head = doc[len(doc) - 1]
        is_root = token.i == len(doc) - 1
        token.dep_, token.pos_ = ("ROOT", "NOUN") if is_root else ("amod", "ADJ")
        token.lemma_ = token.lower_.removesuffix("s") if is_root else token.lower_
    return doc


def test_spacy_parser_end_to_end_with_local_pipeline(tmp_path):
    nlp = spacy.blank("en")
    nlp.add_pipe("tuna_test_last_word_head")
    nlp.to_disk(tmp_path / "pipe")
    parser = build_tag_parser(TagParserConfig(name="spacy", model=str(tmp_path / "pipe"), batch_size=2))
    assert parser.name == "spacy" and parser.describe()["config"]["model"] == str(tmp_path / "pipe")
    assert parser("big red blorps") == ["big red blorp", "blorp"]
    assert parser.parse_batch(["big red blorps", "Tiny zinnets", "photos"]) == [
        ["big red blorp", "blorp"], ["tiny zinnet", "zinnet"], []]
