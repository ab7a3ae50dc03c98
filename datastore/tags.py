"""Caption → tags parsers: object phrases with their attributes, for the retrieval datastore."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from typing import Any, Callable, Iterable, NamedTuple

from datastore import stopwords as sw

logger = logging.getLogger(__name__)

EMIT_MODES = ("phrases", "nouns", "both")
_CACHE_SIZE = 1 << 17

# A word (letters/digits, inner ' or - allowed), or one punctuation character (a phrase break).
_TOKEN_RE = re.compile(r"([^\W_]+(?:['-][^\W_]+)*)|[^\w\s]|_")
_WORD_RE = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_NUMBER_RE = re.compile(r"\d+(?:st|nd|rd|th|s)?")
_CONTRACTIONS = ("n't", "'re", "'m", "'ve", "'ll", "'d")
_BREAK_WORDS = (
    sw.DETERMINERS | sw.QUANTIFIERS | sw.PREPOSITIONS | sw.CONJUNCTIONS | sw.AUXILIARIES | sw.VERBS
)
_EXCLUDED_HEADS = sw.BOILERPLATE_HEADS | sw.POSITIONAL_HEADS | _BREAK_WORDS


class Mention(NamedTuple):
    """One object mention: its attribute words (in caption order) and its singular head noun."""

    attributes: tuple[str, ...]
    head: str


@dataclass
class TagParserConfig:
    """Which parser to build and how its mentions become tags (recorded in the manifest)."""

    name: str = "rule"  # registry key, see list_tag_parsers()
    emit: str = "both"  # "phrases", "nouns" or "both"
    vocabulary: str | tuple[str, ...] | None = None  # path to a one-tag-per-line file, or tags
    max_tags: int | None = None  # keep the first N tags of a caption
    max_attributes: int | None = None  # keep the N attributes nearest the head
    model: str = "en_core_web_sm"  # spaCy pipeline name or directory (spacy parser only)
    batch_size: int = 256  # captions per nlp.pipe batch (spacy parser only)

    def __post_init__(self) -> None:
        if self.name not in _REGISTRY:
            raise ValueError(f"name: unknown tag parser {self.name!r}; valid: {list_tag_parsers()}")
        if self.emit not in EMIT_MODES:
            raise ValueError(f"emit: got {self.emit!r}; allowed: {list(EMIT_MODES)}")
        for field, optional in (("max_tags", True), ("max_attributes", True), ("batch_size", False)):
            value = getattr(self, field)
            if (value is not None or not optional) and (
                    isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{field}: got {value!r}; allowed: a positive integer"
                                 + (" or None" if optional else ""))
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model: got {self.model!r}; allowed: a non-empty spaCy model name or path")
        self.vocabulary = _check_vocabulary(self.vocabulary)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields (an in-memory vocabulary becomes a list)."""
        data = asdict(self)
        if isinstance(self.vocabulary, tuple):
            data["vocabulary"] = list(self.vocabulary)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TagParserConfig":
        """Build a config from a dict, rejecting unknown keys.

        Raises:
            ValueError: an unknown key or an invalid value.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TagParserConfig keys {unknown}; valid: {sorted(known)}")
        return cls(**data)


def _check_vocabulary(value: Any) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isfile(path):
            raise ValueError(f"vocabulary: file {path!r} does not exist")
        return path
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise ValueError(f"vocabulary: got {type(value).__name__}; allowed: a file path, "
                         "an iterable of strings or None")
    entries = tuple(value)
    bad = [e for e in entries if not isinstance(e, str)]
    if bad or not entries:
        raise ValueError(f"vocabulary: got {bad[:3] if bad else 'an empty iterable'}; "
                         "allowed: a non-empty iterable of strings")
    return entries


# --- Registry -----------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[[TagParserConfig], "TagParser"]] = {}


def register_tag_parser(name: str) -> Callable[[Callable], Callable]:
    """Decorator registering a parser class (or factory taking a TagParserConfig) under ``name``.

    Raises:
        ValueError: ``name`` is already registered.
    """
    def decorate(factory: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"tag parser {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return decorate


def list_tag_parsers() -> list[str]:
    """Sorted names of the registered tag parsers."""
    return sorted(_REGISTRY)


def build_tag_parser(config: TagParserConfig | str | None = None) -> "TagParser":
    """Build the parser that ``config`` names.

    Args:
        config: a TagParserConfig, a parser name (other fields default) or None (rule parser).
    Returns:
        A ready TagParser.
    Raises:
        ValueError: unknown parser name or invalid config; RuntimeError: missing dependency.
    """
    if config is None or isinstance(config, str):
        config = TagParserConfig() if config is None else TagParserConfig(name=config)
    if config.name not in _REGISTRY:
        raise ValueError(f"unknown tag parser {config.name!r}; valid: {list_tag_parsers()}")
    parser = _REGISTRY[config.name](config)
    logger.info("tag parser %s v%s (emit=%s)", parser.name, parser.version, config.emit)
    return parser


# --- Normalisation shared by all parsers -------------------------------------------------

@lru_cache(maxsize=1)
def _inflect_engine() -> Any:
    import inflect

    return inflect.engine()


@lru_cache(maxsize=_CACHE_SIZE)
def singularize(word: str) -> str:
    """Singular form of a lowercase noun; words that are not plural come back unchanged.

    Uses inflect, guarded against its mistakes on singulars ("glass", "bus", "species",
    made-up names like "blorp"); for hyphenated words only the last part changes ("t-shirts").
    """
    if "-" in word:
        prefix, _, last = word.rpartition("-")
        return f"{prefix}-{singularize(last)}" if last else word
    if len(word) < 3 or not word.isalpha() or word in sw.INVARIANT_NOUNS:
        return word
    if not word.endswith("s"):
        # Only known irregular plurals ("children", "firemen") change; made-up names never do.
        if word not in sw.IRREGULAR_PLURALS and (not word.endswith("men") or word in sw.MEN_SINGULARS):
            return word
    elif word.endswith(("ss", "sis")) or (word.endswith("us") and word not in sw.US_PLURALS):
        return word
    result = _inflect_engine().singular_noun(word)  # slow (~80 us): singularize() is cached
    return result if isinstance(result, str) and len(result) >= 2 else word


def normalize_tag(text: str) -> str:
    """Canonical form of a tag: lowercase words joined by spaces, last word singularised."""
    words = _WORD_RE.findall(text.lower().replace("\u2019", "'"))
    return " ".join(words[:-1] + [singularize(words[-1])]) if words else ""


def load_vocabulary(source: str | Iterable[str]) -> frozenset[str]:
    """Normalised vocabulary from a file (one tag per line, ``#`` comments) or an iterable.

    Raises:
        ValueError: no entries after normalisation.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(source, encoding="utf-8") as handle:
            lines = [line for line in handle if not line.lstrip().startswith("#")]
    else:
        lines = list(source)
    vocab = frozenset(tag for tag in map(normalize_tag, lines) if tag)
    if not vocab:
        raise ValueError(f"vocabulary {source!r} has no entries")
    return vocab


def mentions_to_tags(mentions: Iterable[Mention], config: TagParserConfig,
                     vocabulary: frozenset[str] | None = None) -> list[str]:
    """Turn mentions into the deduplicated tag list of one caption.

    Rules: attributes are cut to the ``max_attributes`` nearest the head; with a vocabulary a
    mention is kept only if its phrase or its head is in it; each kept mention emits per
    ``config.emit``; duplicates are dropped keeping first positions; ``max_tags`` truncates.
    """
    tags: dict[str, None] = {}
    for attributes, head in mentions:
        if config.max_attributes is not None:
            attributes = attributes[-config.max_attributes:]
        phrase = " ".join((*attributes, head))
        if vocabulary is not None and phrase not in vocabulary and head not in vocabulary:
            continue
        if config.emit != "nouns":
            tags[phrase] = None
        if config.emit != "phrases":
            tags[head] = None
    out = list(tags)
    return out if config.max_tags is None else out[: config.max_tags]


class TagParser:
    """Base class: subclasses set ``name``/``version`` and implement ``mentions(caption)``."""

    name: str = ""
    version: str = ""

    def __init__(self, config: TagParserConfig) -> None:
        self.config = config
        self.vocabulary = None if config.vocabulary is None else load_vocabulary(config.vocabulary)

    def mentions(self, caption: str) -> list[Mention]:
        """The object mentions of one caption, in caption order (implemented by subclasses)."""
        raise NotImplementedError

    def __call__(self, caption: str) -> list[str]:
        """Tags of one caption, in order of first mention."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be str, got {type(caption).__name__}")
        return mentions_to_tags(self.mentions(caption), self.config, self.vocabulary)

    def parse_batch(self, captions: Iterable[str]) -> list[list[str]]:
        """Tags of each caption."""
        return [self(caption) for caption in captions]

    def describe(self) -> dict[str, Any]:
        """Name, version and config for the datastore manifest (vocabulary summarised)."""
        config = self.config.to_dict()
        if self.vocabulary is not None:
            digest = hashlib.sha256("\n".join(sorted(self.vocabulary)).encode()).hexdigest()
            path = self.config.vocabulary if isinstance(self.config.vocabulary, str) else None
            config["vocabulary"] = {"path": path, "entries": len(self.vocabulary), "sha256": digest}
        return {"name": self.name, "version": self.version, "config": config}


# --- Rule parser ----------------------------------------------------------------------------

@lru_cache(maxsize=_CACHE_SIZE)
def _token_plan(token: str) -> tuple[bool, str | None, bool]:
    """(end the phrase before, word to append or None, end the phrase after) for one token."""
    if token.endswith("'s"):  # possessive: "the dog's toy" → "dog" | "toy"
        before, word, _ = _token_plan(token[:-2])
        return before, word, True
    if "'" in token and token.endswith(_CONTRACTIONS):
        return True, None, False
    if token in sw.ADVERBS or (len(token) >= 6 and token.endswith("ly") and token not in sw.LY_KEEP):
        return False, None, False
    if token in _BREAK_WORDS or _NUMBER_RE.fullmatch(token):
        return True, None, False
    if len(token) >= 6 and token.endswith("ing") and token not in sw.ING_NOUNS:
        return True, None, False
    return False, token, False


@lru_cache(maxsize=_CACHE_SIZE)
def _cannot_be_head(word: str) -> bool:
    """Adjectives, trailing participles ("a man dressed ...") and words with digits ("3d") do not
    head a phrase."""
    if word in sw.NON_HEAD_ADJECTIVES or (len(word) >= 5 and word.endswith("ous")):
        return True
    if any(ch.isdigit() for ch in word):
        return True
    return (len(word) >= 5 and word.endswith("ed") and not word.endswith("eed")
            and word not in sw.ED_NOUNS)


def _close_chunk(chunk: list[str], out: list[Mention]) -> None:
    while chunk and _cannot_be_head(chunk[-1]):
        chunk.pop()
    if chunk:
        head = singularize(chunk[-1])
        if head not in _EXCLUDED_HEADS and chunk[-1] not in _EXCLUDED_HEADS:
            out.append(Mention(tuple(chunk[:-1]), head))


@register_tag_parser("rule")
class RuleTagParser(TagParser):
    """Offline, dependency-free chunker: words between break words form a phrase whose last
    word is the head noun (see docs/tags.md for the rules)."""

    name = "rule"
    version = "1"

    def mentions(self, caption: str) -> list[Mention]:
        out: list[Mention] = []
        chunk: list[str] = []
        for token in _TOKEN_RE.findall(caption.lower().replace("\u2019", "'")):
            # an empty token is punctuation: it ends the phrase
            before, word, after = _token_plan(token) if token else (True, None, False)
            if before and chunk:
                _close_chunk(chunk, out)
                chunk = []
            if word is not None:
                chunk.append(word)
            if after and chunk:
                _close_chunk(chunk, out)
                chunk = []
        _close_chunk(chunk, out)
        return out


# --- spaCy parser ---------------------------------------------------------------------------

_SPACY_ATTRIBUTE_DEPS = frozenset({"amod", "compound"})
_SPACY_SKIP_POS = frozenset({"PRON", "DET", "NUM", "PUNCT"})


def spacy_doc_mentions(doc: Any) -> list[Mention]:
    """Mentions of a parsed ``spacy.tokens.Doc``: one per noun chunk, the lemmatised root as head
    and its adjectival/compound modifiers (amod, compound) as attributes.

    Raises:
        ValueError: the Doc has no dependency parse (noun chunks need one).
    """
    if not doc.has_annotation("DEP"):
        raise ValueError("spaCy Doc has no dependency parse; use a pipeline with a parser")
    out: list[Mention] = []
    for chunk in doc.noun_chunks:
        root = chunk.root
        head_words = _WORD_RE.findall((root.lemma_ or root.text).lower())
        if root.pos_ in _SPACY_SKIP_POS or len(head_words) != 1:
            continue
        head = head_words[0] if root.lemma_ else singularize(head_words[0])
        if head in _EXCLUDED_HEADS or _NUMBER_RE.fullmatch(head):
            continue
        attributes = tuple(
            token.lower_ for token in chunk
            if token.i != root.i and token.dep_ in _SPACY_ATTRIBUTE_DEPS
            and token.pos_ not in _SPACY_SKIP_POS and _token_plan(token.lower_) == (False, token.lower_, False)
        )
        out.append(Mention(attributes, head))
    return out


def spacy_doc_to_tags(doc: Any, config: TagParserConfig | None = None,
                      vocabulary: frozenset[str] | None = None) -> list[str]:
    """Tags of a parsed spaCy Doc under ``config`` (default TagParserConfig(name="spacy"))."""
    config = config if config is not None else TagParserConfig(name="spacy")
    return mentions_to_tags(spacy_doc_mentions(doc), config, vocabulary)


def load_spacy_pipeline(model: str) -> Any:
    """Load a spaCy pipeline by package name or directory, without NER.

    Raises:
        RuntimeError: spaCy or the model is not installed (the message says what to install).
    """
    try:
        import spacy
    except ImportError as err:
        raise RuntimeError("the 'spacy' tag parser needs spaCy: pip install spacy "
                           "(or pip install 'tuna[spacy]'), or use TagParserConfig(name='rule')") from err
    try:
        return spacy.load(model, exclude=["ner"])
    except OSError as err:
        raise RuntimeError(
            f"spaCy model {model!r} is not installed: run `python -m spacy download {model}` "
            "(or set TagParserConfig.model to an installed pipeline or a pipeline directory)"
        ) from err


@register_tag_parser("spacy")
class SpacyTagParser(TagParser):
    """Noun chunks of a spaCy pipeline (``config.model``) as mentions."""

    name = "spacy"
    version = "1"

    def __init__(self, config: TagParserConfig) -> None:
        super().__init__(config)
        self.nlp = load_spacy_pipeline(config.model)

    def mentions(self, caption: str) -> list[Mention]:
        return spacy_doc_mentions(self.nlp(caption))

    def parse_batch(self, captions: Iterable[str]) -> list[list[str]]:
        """Tags of each caption, parsed with ``nlp.pipe`` in batches of ``config.batch_size``."""
        docs = self.nlp.pipe(list(captions), batch_size=self.config.batch_size)
        return [mentions_to_tags(spacy_doc_mentions(doc), self.config, self.vocabulary) for doc in docs]
