"""Generated reading-comprehension texts whose answers are copied from the text: the copy prior's data.

Each text names things with **random made-up names** drawn fresh per sample (or from a fixed lexicon, or
from the captions' nouns), so copying from the context is the only way to answer: tag lists
(``" Tags: small red kelbo, kelbo."`` then a question answered with one of the names), scene descriptions,
lists and definitions, mostly as ChatML conversations (the format of stage 2). Used by text pretraining
(:mod:`pipeline.text_pretrain`), the stage-2 text replay (:mod:`pipeline.text_replay`) and the copy
measurement (:mod:`pipeline.copy_eval`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable

from common.prompts import SHORT_ANSWER

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # tiny.CHATML_TEMPLATE's default
END_OF_TURN = "<|im_end|>"
TASKS = ("tags_single", "tags_attr", "scene", "list", "define", "tags_plain", "echo", "tags_place", "repeat",
         "tags_exist")
# relative frequency, in the order of TASKS
TASK_WEIGHTS = (25.0, 20.0, 20.0, 15.0, 10.0, 10.0, 10.0, 15.0, 20.0, 10.0)
EVAL_TASKS = ("tags_single", "tags_attr", "scene", "list", "tags_place")


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"  # what re's \w matches in a str pattern


def whole_word_spans(text: str, word: str) -> list[tuple[int, int]]:
    """Spans of ``word`` in ``text`` where it is a whole word: ``re.finditer(rf"\\b{word}\\b", text)`` for a
    word free of regex metacharacters, without compiling a pattern per word. The names are fresh per sample, so
    such patterns miss re's cache every time: compiling them was a third of the text data's time."""
    spans: list[tuple[int, int]] = []
    if not word:
        return spans
    first, last = _is_word_char(word[0]), _is_word_char(word[-1])
    start = 0
    while (i := text.find(word, start)) != -1:
        j = i + len(word)  # \b: a word character on exactly one side
        if (i > 0 and _is_word_char(text[i - 1])) != first and (j < len(text) and _is_word_char(text[j])) != last:
            spans.append((i, j))
            start = j
        else:
            start = i + 1
    return spans


# Syllable parts of made-up names (two syllables mostly, like "tulbel"); weights favour simple ones.
_ONSETS = ("b", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z") * 4 + (
    "bl", "br", "dr", "fl", "fr", "gl", "gr", "kl", "kr", "pl", "pr", "sk", "sn", "sp", "st", "tr", "qu", "sw")
_VOWELS = ("a", "e", "i", "o", "u") * 4 + ("oo", "ee", "ai", "ou", "y")
_CODAS = ("",) * 12 + ("b", "d", "g", "k", "l", "m", "n", "p", "r", "t", "v", "x", "z") * 2 + (
    "lb", "rk", "rn", "ff", "zz", "bb", "nk", "st", "rv", "lp", "nd")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey",
           "gold", "silver", "teal", "violet", "beige")
SIZES = ("small", "medium", "large", "tiny", "big", "huge")
PLACES = {"left": ("on the left", "at the left", "to the left"),
          "middle": ("in the middle", "in the centre", "at the center"),
          "right": ("on the right", "at the right", "to the right"),
          "top": ("at the top", "up top"), "bottom": ("at the bottom", "down below")}
ORDINALS = ("first", "second", "third")
NOUNS = ("thing", "item", "one", "shape", "figure")  # not "object": "What is this object" is a world template

# Question phrasings; none is a synthetic-world template (datastore/synth/questions.py).
_IDENTIFY = ("Name the thing in the picture.", "Which thing is shown here?", "What is pictured?",
             "What do you see here?", "Identify the thing in this picture.", "What is it called?",
             "Which kind of thing is this?", "Give the name of what is shown.", "Tell me what this is.",
             "What does the picture show?", "Name it.", "Which {noun} can be seen?", "What is this {noun} called?",
             "Say what is shown, in one word.", "Which {noun} appears here?")
_BY_ATTR = ("Which {noun} is {a}?", "Name the {a} {noun}.", "What is the {a} {noun} called?",
            "Which tag names the {a} {noun}?", "Give the name of the {a} {noun}.", "The {a} {noun} is which?",
            "Which one looks {a}?", "Tell me the name of the {a} {noun}.")
_BY_PLACE = ("Which {noun} is {p}?", "Name the {noun} {p}.", "What can be found {p}?", "What sits {p}?",
             "Tell me which {noun} is {p}.", "Which {noun} did they put {p}?")
_WHERE = ("Where is the {n}?", "Where does the {n} sit?", "In which place is the {n}?")
_EXISTS = ("Is there a {n} here?", "Is there a {n} in the picture?", "Can you see a {n}?",
           "Does the picture have a {n}?", "Is any {n} shown?", "Do you see a {n} here?")
# the instruction data's existence question (datastore.synth.questions): its gap to the answer is 38 tokens
# with the quickstart's tokenizer, where the chat questions' are 6-12
EXISTS_SHORT_ANSWER = "Is there a {n} in the image?\n" + SHORT_ANSWER


def exists_answer_gaps(short_answer: bool = False) -> list[str]:
    """What comes between the name and the answer in the chat ``tags_exist`` questions asked with " a {n}":
    the gaps the text pretraining's membership rows put between the asked token and "Yes"/"No"
    (pipeline.induction.MembershipRows). ``short_answer``: also the instruction data's existence question
    (LLaVA's VQA form, with the short-answer line, as POPE asks it)."""
    gaps = []
    for question in [t for t in _EXISTS if " a {n}" in t] + ([EXISTS_SHORT_ANSWER] if short_answer else []):
        text, spans = render_chat([(question.format(n="\0"), "Yes")])  # "\0" stands for the name
        gaps.append(text[text.index("\0") + 1:spans[0][0]])
    return list(dict.fromkeys(gaps))


_COLOUR_OF = ("Which colour does the {n} have?", "Tell me the colour of the {n}.", "The {n} has which colour?")


def _name(rng: random.Random) -> str:
    syllables = rng.choices((1, 2, 3), weights=(2, 7, 1))[0]
    name = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))
    return name if len(name) >= 4 else name + rng.choice(("b", "k", "n", "t")) + rng.choice(_VOWELS)


def _join(items: list[str], rng: random.Random) -> str:
    """"a, b and c" (or "a, b, c")."""
    if len(items) == 1:
        return items[0]
    return ", ".join(items) if rng.random() < 0.3 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass
class CopyText:
    """A generated training text.

    ``spans``: the answers' character ranges (end of turn included); ``fresh``: the first mention of
    each random name (unpredictable, never a loss target); ``copies``: its later mentions in the
    context (copies, trained like answers).
    """

    task: str
    text: str
    spans: list[tuple[int, int]]
    answer: str  # the first answer (what copy_accuracy checks)
    fresh: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, answer) of a chat text

    @property
    def prompt(self) -> str:
        """Text up to the first answer (a generation prompt)."""
        return self.text[:self.spans[0][0]]


def render_chat(turns: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text exactly as ``tiny.CHATML_TEMPLATE`` renders it, and the answers' spans."""
    text, spans = SYSTEM_TURN, []
    for user, answer in turns:
        text += f"<|im_start|>user\n{user}{END_OF_TURN}\n<|im_start|>assistant\n"
        spans.append((len(text), len(text) + len(answer) + len(END_OF_TURN)))
        text += answer + END_OF_TURN + "\n"
    return text, spans


def render_plain(context: str, turns: list[tuple[str, str]], rng: random.Random) -> tuple[str, list[tuple[int, int]]]:
    """``context`` then "Question: ... / Answer: ..." lines (answers after a space)."""
    q, a = rng.choice((("Question:", "Answer:"), ("Q:", "A:"), ("Ask:", "Reply:")))
    text, spans = context, []
    for user, answer in turns:
        text += f"\n{q} {user}\n{a}"
        spans.append((len(text), len(text) + 1 + len(answer)))
        text += " " + answer
    return text, spans


class CopyTextGenerator:
    """Reading-comprehension texts whose answers are copied from the text, with fresh random names.

    Args:
        seed: all texts are a function of it (and the call order).
        known_words: words that must never be drawn as names (e.g. every word of the captions).
        forbidden: strings no text may contain (case-insensitive); such texts are drawn again.
        chat_fraction: share rendered as ChatML conversations (the rest as plain Q/A text).
        pool, pool_fraction: draw this share of names from ``pool`` (the rest fresh).
        words, words_fraction: draw this share of names from ``words`` instead (e.g. the nouns of the
            captions: the tiny LLM's "known words", which a real LLM copies as easily as made-up ones).
    """

    def __init__(self, seed: int, known_words: Iterable[str] = (), forbidden: Iterable[str] = (),
                 chat_fraction: float = 0.75, pool: Iterable[str] = (), pool_fraction: float = 0.0,
                 task_weights: tuple[float, ...] = TASK_WEIGHTS,
                 words: Iterable[str] = (), words_fraction: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.pool = list(dict.fromkeys(pool))
        self.pool_fraction = pool_fraction if self.pool else 0.0
        self.words = list(dict.fromkeys(words))
        self.words_fraction = words_fraction if self.words else 0.0
        self.known = {w.lower() for w in known_words}
        forbidden = sorted({s.lower() for s in forbidden if s}, key=len, reverse=True)
        self._forbidden = re.compile("|".join(map(re.escape, forbidden)), re.IGNORECASE) if forbidden else None
        self.chat_fraction = chat_fraction
        self.weights = task_weights
        self.rejected = 0
        self._drawn: list[str] = []

    def names(self, k: int, fresh: bool = False) -> list[str]:
        """``k`` distinct names, none a known word nor a prefix-plural of another; drawn from the pools
        in their shares, or all freshly made up with ``fresh``."""
        out: list[str] = []
        while len(out) < k:
            draw = 1.0 if fresh else self.rng.random()
            if draw < self.pool_fraction + self.words_fraction:
                n = self.rng.choice(self.pool if draw < self.pool_fraction else self.words)
                if n not in out:
                    out.append(n)
                continue
            n = _name(self.rng)
            if n not in self.known and n.rstrip("s") not in self.known and all(n[:4] != o[:4] for o in out):
                out.append(n)
        self._drawn += out
        return out

    def sample(self, task: str | None = None, chat: bool | None = None) -> CopyText:
        """One text of ``task`` (random task when None), retried while it contains a forbidden string."""
        for _ in range(1000):
            self._drawn: list[str] = []
            t = task or self.rng.choices(TASKS, weights=self.weights)[0]
            as_chat = (self.rng.random() < self.chat_fraction) if chat is None else chat
            out = getattr(self, f"_{t}")(as_chat and t not in ("define", "tags_plain"))
            if self._forbidden is None or not self._forbidden.search(out.text):
                for name in self._drawn:
                    mentions = whole_word_spans(out.text, name)
                    out.fresh += mentions[:1]
                    out.copies += [m for m in mentions[1:] if not any(s <= m[0] < e for s, e in out.spans)]
                return out
            self.rejected += 1
        raise ValueError(f"1000 generated {task or 'copy'} texts in a row contain a forbidden string "
                         f"(last: {out.text[-80:]!r}); the forbidden list is too broad")

    # -- helpers
    def _q(self, templates: tuple[str, ...], **kw: str) -> str:
        return self.rng.choice(templates).format(noun=self.rng.choice(NOUNS), **kw)

    def _finish(self, task: str, context: str, qa: list[tuple[str, str]], chat: bool) -> CopyText:
        if chat:
            sep = self.rng.choice(("\n", "\n", " "))
            turns = [(context + sep + qa[0][0], qa[0][1])] + qa[1:]
            text, spans = render_chat(turns)
        else:
            text, spans, turns = *render_plain(context, qa, self.rng), []
        return CopyText(task, text, spans, qa[0][1], turns=turns)

    def _objects(self, k: int) -> list[dict[str, str]]:
        names = self.names(k)
        colours = self.rng.sample(COLOURS, k)
        sizes = self.rng.sample(SIZES, k)
        return [{"name": n, "colour": c, "size": s} for n, c, s in zip(names, colours, sizes)]

    def _tag_phrases(self, o: dict[str, str], n: int) -> list[str]:
        """``n`` retrieval-style tags of one object (attribute phrases vary, as neighbours differ)."""
        r = self.rng
        forms = [o["name"], f"{o['colour']} {o['name']}", f"{o['size']} {o['colour']} {o['name']}",
                 f"{r.choice(SIZES)} {r.choice(COLOURS)} {o['name']}", f"{r.choice(COLOURS)} {o['name']}",
                 f"{o['size']} {o['name']}"]
        return list(dict.fromkeys(r.choice(forms) for _ in range(n)))

    # -- tasks
    def _tags_single(self, chat: bool) -> CopyText:
        """Tag list dominated by one name (first and most frequent); identify it."""
        r = self.rng
        objs = self._objects(r.choice((1, 1, 2, 2, 3)))
        tags = self._tag_phrases(objs[0], r.randint(1, 4))
        rest = [t for o in objs[1:] for t in self._tag_phrases(o, r.randint(1, max(1, len(tags) - 1)))]
        rest = rest[:max(0, len(tags) - 1)]
        tail = tags[1:] + rest
        r.shuffle(tail)
        context = " Tags: " + ", ".join(tags[:1] + tail) + "."
        qa = [(self._q(_IDENTIFY), objs[0]["name"])]
        if len(objs) == 2 and any(objs[1]["name"] in t for t in rest) and r.random() < 0.5:
            qa.append((r.choice(("Which other name is listed?", "Which second name appears in the tags?")),
                       objs[1]["name"]))
        if r.random() < 0.3:
            qa.append((r.choice(("Repeat the first tag.", "Copy the first tag.")), tags[0]))
        return self._finish("tags_single", context, qa, chat)

    def _tags_attr(self, chat: bool) -> CopyText:
        """Several objects with distinct colours and sizes; name them by an attribute."""
        r = self.rng
        objs = self._objects(r.choice((2, 2, 2, 3)))
        sized = [r.random() < 0.4 for _ in objs]
        tags = [f"{o['size']} {o['colour']} {o['name']}" if z else f"{o['colour']} {o['name']}"
                for o, z in zip(objs, sized)] + [o["name"] for o in objs if r.random() < 0.3]
        r.shuffle(tags)
        context = " Tags: " + ", ".join(tags) + "."
        qa = []
        for o, z in r.sample(list(zip(objs, sized)), r.randint(1, len(objs))):
            qa.append((self._q(_BY_ATTR, a=o["size"] if z and r.random() < 0.3 else o["colour"]), o["name"]))
        return self._finish("tags_attr", context, qa, chat)

    def _tags_place(self, chat: bool) -> CopyText:
        """Tags led by where their object is ("left red kelbo"), as a tag's image-grounded token leads its
        words in TUNA's tag block; name objects by place. (Measured, docs/experiments.md, section 1: it helps TUNA
        read several-object tag blocks, but the image-grounded tokens do not come to imitate place words.)"""
        r = self.rng
        objs = self._objects(r.choice((2, 2, 3)))
        places = r.sample(("left", "middle", "right"), len(objs))
        tags = [f"{p} {t}" for o, p in zip(objs, places) for t in self._tag_phrases(o, r.randint(1, 2))]
        r.shuffle(tags)
        qa = [(self._q(_BY_PLACE, p=r.choice(PLACES[p])), o["name"])
              for o, p in r.sample(list(zip(objs, places)), r.randint(1, len(objs)))]
        return self._finish("tags_place", " Tags: " + ", ".join(tags) + ".", qa, chat)

    def _scene(self, chat: bool) -> CopyText:
        """A described scene; names by place, places and colours by name."""
        r = self.rng
        objs = self._objects(r.choice((1, 2, 2, 2, 3)))
        places = r.sample(list(PLACES), len(objs))
        phrases = [(o, r.choice(PLACES[p])) for o, p in zip(objs, places)]
        parts = []
        for o, p in phrases:
            desc = " ".join(w for w in (o["size"] if r.random() < 0.5 else "", o["colour"], o["name"]) if w)
            art = "an" if desc[0] in "aeiou" else "a"
            parts.append(f"{art} {desc} {p}" if r.random() < 0.7 else f"{p} {art} {desc}")
        lead = r.choice(("There is", "We see", "The picture has", "In this scene there is", "Here we have"))
        context = f"{lead} {_join(parts, r)}."
        qa = []
        for o, p in r.sample(phrases, len(phrases)):
            kind = r.random()
            if kind < 0.6 or not qa:
                qa.append((self._q(_BY_PLACE, p=p), o["name"]))
            elif kind < 0.8:
                qa.append((self._q(_WHERE, n=o["name"]), p))
            else:
                qa.append((self._q(_COLOUR_OF, n=o["name"]), o["colour"]))
        return self._finish("scene", context, qa, chat)

    def _list(self, chat: bool) -> CopyText:
        """A list of names; look items up by position or neighbour, or copy the whole list."""
        r = self.rng
        names = self.names(r.randint(2, 4))
        context = r.choice(("Here is a list: ", "List: ", "The names are ", "Items: ")) + ", ".join(names) + "."
        qa = []
        for _ in range(r.randint(1, 2)):
            k = r.randrange(len(names))
            kind = r.random()
            if kind < 0.4 and k < len(ORDINALS):
                qa.append((r.choice(("Which name comes {o}?", "What is the {o} item?", "Give the {o} name."))
                           .format(o=ORDINALS[k]), names[k]))
            elif kind < 0.7 and k + 1 < len(names):
                qa.append((r.choice(("Which name follows {n}?", "What comes right after {n}?")).format(n=names[k]),
                           names[k + 1]))
            elif kind < 0.85:
                qa.append((r.choice(("Which name is last?", "What is the final item?")), names[-1]))
            else:
                qa.append((r.choice(("Repeat the list.", "Copy all the names.")), ", ".join(names)))
        return self._finish("list", context, qa, chat)

    def _define(self, chat: bool) -> CopyText:
        """Definitions ("A kelbo is red.") and a question picking one by its property."""
        r = self.rng
        objs = self._objects(r.randint(2, 3))
        context = " ".join(r.choice(("A {n} is {c}.", "Every {n} is {c}.", "The {n} is {s} and {c}."))
                           .format(n=o["name"], c=o["colour"], s=o["size"]) for o in objs)
        o = r.choice(objs)
        return self._finish("define", context, [(self._q(_BY_ATTR, a=o["colour"]), o["name"])], chat)

    def _echo(self, chat: bool) -> CopyText:
        """Say a few names back verbatim (every answer token is a copy)."""
        r = self.rng
        names = ", ".join(self.names(r.randint(1, 3)))
        lead = r.choice(("Say these names back:", "Repeat after me:", "Echo the words:", "Copy this:"))
        return self._finish("echo", f"{lead} {names}.", [(r.choice(("Go.", "Now repeat them.", "Your turn.")),
                                                            names)], chat)

    def _repeat(self, chat: bool) -> CopyText:
        """Say back a run of made-up names (several subword tokens each), whole or from one of them on:
        every answer token after the first is predictable only by finding the token before it earlier in
        the text and copying what followed (an induction head), the skill that copies a multi-token
        name the tokenizer never saw whole -- as a swapped datastore's names are."""
        r = self.rng
        names = self.names(r.randint(2, 6), fresh=True)
        lead = r.choice(("Sequence:", "Words:", "Say back:", "Read:", "Here:"))
        start = r.randrange(len(names)) if r.random() < 0.5 else 0
        ask = (r.choice(("Repeat them.", "Say them again.", "Copy the words.")) if start == 0 else
               r.choice(("Continue from {n}.", "Repeat from {n} on.", "Say {n} and what follows.")).format(n=names[start]))
        return self._finish("repeat", f"{lead} {' '.join(names)}.", [(ask, " ".join(names[start:]))], chat)

    def _tags_exist(self, chat: bool) -> CopyText:
        """A tag list, then whether a name is in it: "Yes" as often as "No" (the absent name drawn like the
        listed ones), so yes/no questions about objects are answered by reading the tags."""
        r = self.rng
        objs = self._objects(r.choice((1, 1, 2, 3)))
        absent = self.names(1)[0]
        while any(absent == o["name"] for o in objs):
            absent = self.names(1)[0]
        tags = [t for o in objs for t in self._tag_phrases(o, r.randint(1, 3))]
        r.shuffle(tags)
        asked, answer = (r.choice(objs)["name"], "Yes") if r.random() < 0.5 else (absent, "No")
        return self._finish("tags_exist", " Tags: " + ", ".join(tags) + ".",
                            [(r.choice(_EXISTS).format(n=asked), answer)], chat)

    def _tags_plain(self, chat: bool) -> CopyText:
        """Running text that restates the dominant tag's name."""
        r = self.rng
        o = self._objects(1)[0]
        tags = self._tag_phrases(o, r.randint(1, 4))
        context = "Tags: " + ", ".join(tags) + "."
        return self._finish("tags_plain", context, [(self._q(_IDENTIFY), o["name"])], chat)


def make_lexicon(seed: int, n: int, known_words: Iterable[str] = ()) -> list[str]:
    """``n`` distinct made-up names (as :func:`_name` draws them), none a known word or its plural."""
    rng, known = random.Random(seed), {w.lower() for w in known_words}
    names: dict[str, None] = {}
    while len(names) < n:
        name = _name(rng)
        if name not in known and name.rstrip("s") not in known:
            names[name] = None
    return list(names)


def caption_nouns(captions: Iterable[str]) -> list[str]:
    """The captions' nouns: single-word tags of the ``rule`` tag parser, in first-seen order."""
    from datastore.tags import build_tag_parser

    parser = build_tag_parser("rule")
    return list(dict.fromkeys(t for tags in parser.parse_batch(captions) for t in tags if " " not in t))


def caption_words(captions: Iterable[str]) -> set[str]:
    """Lower-case words of the captions (names generated for copy texts avoid them)."""
    return {w for c in captions for w in re.findall(r"[a-z]+", c.lower())}
