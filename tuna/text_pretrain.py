"""Text-only pretraining of a tiny causal LM: the language + copy-from-context prior a real LLM brings.

A tiny LLM trained from scratch only on seen-category instructions memorises the seen names instead of
reading them from the retrieved tags. This stage gives it the missing prior before multimodal training:

* the caller's captions (world language; they may name any category, like a real LLM knowing words);
* generated reading-comprehension texts whose answers are copied from the context, with **random
  made-up names** drawn fresh per sample (copying is the only way to get them right): tag lists
  (``" Tags: small red kelbo, kelbo."`` then a question answered with one of the names), scene
  descriptions, lists and definitions, mostly as ChatML conversations, the format of stage 2.

``pretrain_text_llm`` trains a BPE tokenizer on that text, a random-init Qwen2 LM (``tuna.tiny``) with a
plain torch loop on the CPU, and saves both with ``save_pretrained``; ``copy_accuracy`` measures greedy
exact-match answers on held-out generated prompts with fresh names.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:
    from torch import Tensor

logger = logging.getLogger(__name__)

SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # tiny.CHATML_TEMPLATE's default
END_OF_TURN = "<|im_end|>"
TASKS = ("tags_single", "tags_attr", "scene", "list", "define", "tags_plain", "echo", "tags_place")
EVAL_TASKS = ("tags_single", "tags_attr", "scene", "list", "tags_place")


@dataclass
class TextPretrainConfig:
    """Tokenizer, model, data mix and optimisation of the text-only stage.

    Attributes:
        vocab_size: BPE vocabulary (special and chat tokens included).
        pre_tokenizer: ``tiny.train_tokenizer`` scheme; "bytelevel-words" splits spaces off words, so
            a name has the same tokens in a tag list (" drerik") and as an answer ("drerik").
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the Qwen2 LM.
        tie_word_embeddings: share input and output embeddings (fewer parameters, faster).
        max_length: packed row length in tokens (samples are never split across rows).
        steps, batch_size, lr, warmup_steps, min_lr_ratio, weight_decay: AdamW, linear warmup then
            cosine decay to ``lr * min_lr_ratio``.
        caption_fraction: share of samples drawn from the captions (the rest is generated copy text).
        chat_fraction: share of generated samples rendered as ChatML conversations.
        task_weights: relative frequency of each generated task, in the order of ``TASKS``.
        answer_weight, context_weight: loss weights of a generated text's answer tokens (copied names,
            end of turn; repeated mentions of a name count as answers) and of its other tokens
            (captions always weigh 1). First mentions of random names weigh 0: they cannot be
            predicted. Template text drowns the copy signal in a short run, hence context_weight 0.
        short_fraction, short_length: curriculum -- this share of the steps trains only on generated
            samples of at most ``short_length`` tokens (attention learns to find the name to copy much
            sooner in short contexts); captions join afterwards.
        tokenizer_samples: generated texts added to the captions for training the tokenizer.
        lexicon_size, lexicon_fraction: a fixed lexicon of made-up names (never a caption word) from
            which this share of the copy texts' names is drawn (the rest is fresh). The tokenizer is
            trained on the captions and on texts with these names, so world names and lexicon names
            are mostly single tokens, like the words of a real LLM's vocabulary: copying a name is
            then one attention lookup, which a tiny model learns in a CPU-minute budget (copying
            3-4 subword pieces needs induction heads that take far longer to form).
        caption_noun_fraction: share of names drawn from the captions' nouns (the single-word tags
            of the ``rule`` tag parser): copying is then trained on the LLM's own vocabulary too.
            These are words of the text corpus only; no eval image or question is used.
        forbidden: strings no generated text may contain (case-insensitive), e.g. eval questions.
        seed: everything (data, init, order) is a function of it and ``threads``.
        threads: torch intra-op threads while training.
        log_every: progress line every this many steps.
    """

    vocab_size: int = 3072
    pre_tokenizer: str = "bytelevel-words"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 384
    tie_word_embeddings: bool = True
    max_length: int = 160
    steps: int = 1500  # 600-700 steps leave the copy skill to the seed (docs/quickstart.md)
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    caption_fraction: float = 0.2
    chat_fraction: float = 0.75
    task_weights: tuple[float, ...] = (25, 20, 20, 15, 10, 10, 10, 15)
    answer_weight: float = 1.0
    context_weight: float = 0.0
    short_fraction: float = 0.4
    short_length: int = 48
    tokenizer_samples: int = 6000
    lexicon_size: int = 600
    lexicon_fraction: float = 0.6
    caption_noun_fraction: float = 0.3
    forbidden: tuple[str, ...] = ()
    seed: int = 0
    threads: int = 2
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_length", "short_length", "steps", "batch_size", "threads", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TextPretrainConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"TextPretrainConfig: hidden_size {self.hidden_size} must divide by num_heads "
                             f"{self.num_heads}, which must divide by num_kv_heads {self.num_kv_heads}")
        for name in ("caption_fraction", "chat_fraction", "min_lr_ratio", "short_fraction", "lexicon_fraction",
                     "caption_noun_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TextPretrainConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.lr <= 0 or self.answer_weight <= 0 or min(self.context_weight, self.weight_decay,
                                                         self.warmup_steps) < 0:
            raise ValueError("TextPretrainConfig: lr and answer_weight must be > 0, context_weight, weight_decay "
                             f"and warmup_steps >= 0 (got {self.lr}, {self.answer_weight}, {self.context_weight}, "
                             f"{self.weight_decay}, {self.warmup_steps})")
        if self.lexicon_size < 0 or self.lexicon_fraction + self.caption_noun_fraction > 1:
            raise ValueError(f"TextPretrainConfig: lexicon_size must be >= 0 and lexicon_fraction + "
                             f"caption_noun_fraction <= 1 (got {self.lexicon_size}, {self.lexicon_fraction}, "
                             f"{self.caption_noun_fraction})")
        self.task_weights = tuple(float(w) for w in self.task_weights)
        if len(self.task_weights) != len(TASKS) or min(self.task_weights) < 0 or not sum(self.task_weights):
            raise ValueError(f"TextPretrainConfig.task_weights must be {len(TASKS)} weights >= 0 (one per task "
                             f"{TASKS}), not all 0; got {self.task_weights!r}")
        if isinstance(self.forbidden, str):
            raise ValueError("TextPretrainConfig.forbidden must be a sequence of strings, not one string")
        self.forbidden = tuple(str(s) for s in self.forbidden if str(s))


# ---------------------------------------------------------------- generated copy texts

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


def llava_conversation(sample: CopyText) -> list[dict[str, str]]:
    """A chat copy text as LLaVA-format conversation turns (a text-only instruction sample).

    Raises:
        ValueError: ``sample`` is a plain (non-chat) text.
    """
    if not sample.turns:
        raise ValueError(f"a {sample.task} text rendered as plain Q/A text has no chat turns")
    return [turn for user, answer in sample.turns for turn in ({"from": "human", "value": user},
                                                                {"from": "gpt", "value": answer})]


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
                 task_weights: tuple[float, ...] = TextPretrainConfig.task_weights,
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

    def names(self, k: int) -> list[str]:
        """``k`` distinct fresh names, none a known word nor a prefix-plural of another."""
        out: list[str] = []
        while len(out) < k:
            draw = self.rng.random()
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
                    mentions = [m.span() for m in re.finditer(rf"\b{name}\b", out.text)]
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
        words in TUNA's tag block; name objects by place. (Measured, docs/quickstart.md: it helps TUNA
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

    def _tags_plain(self, chat: bool) -> CopyText:
        """Running text that restates the dominant tag's name."""
        r = self.rng
        o = self._objects(1)[0]
        tags = self._tag_phrases(o, r.randint(1, 4))
        context = "Tags: " + ", ".join(tags) + "."
        return self._finish("tags_plain", context, [(self._q(_IDENTIFY), o["name"])], chat)


# ---------------------------------------------------------------- training


def make_lexicon(seed: int, n: int, known_words: Iterable[str] = ()) -> list[str]:
    """``n`` distinct made-up names (as :func:`_name` draws them), none a known word or its plural."""
    rng, known = random.Random(seed), {w.lower() for w in known_words}
    names: dict[str, None] = {}
    while len(names) < n:
        name = _name(rng)
        if name not in known and name.rstrip("s") not in known:
            names[name] = None
    return list(names)


def _tokenizer_lines(captions: list[str], lexicon: list[str], gen: CopyTextGenerator, n: int,
                     repeats: int = 8) -> list[str]:
    """The tokenizer's training text: the captions, ``n`` generated texts and each lexicon name
    ``repeats`` times, so caption words and lexicon names become whole tokens."""
    lines = list(captions) + [" ".join(lexicon)] * repeats
    for _ in range(n):
        text = gen.sample().text
        lines.append(text.replace("<|im_start|>", "\n").replace(END_OF_TURN, "\n"))
    return lines


def single_token_share(tokenizer: Any, words: Iterable[str]) -> float:
    """Share of ``words`` that the tokenizer keeps whole after a space (as in " Tags: kelbo")."""
    words = list(words)
    return sum(len(tokenizer.tokenize(" " + w)) <= 2 for w in words) / max(1, len(words))  # " " + word


def _encode(tok: Any, texts: list[str], samples: list[CopyText | None], answer_weight: float,
            context_weight: float, eos: int) -> list[tuple[list[int], list[float]]]:
    """Token ids (+ EOS) and per-token loss weights: answers and repeated name mentions ``answer_weight``,
    first mentions 0, the rest ``context_weight``; a None sample (a caption) weighs 1 throughout."""
    import numpy as np

    out = []
    for enc, text, sample in zip(tok.encode_batch(texts, add_special_tokens=False), texts, samples):
        if sample is None:
            out.append((enc.ids + [eos], [1.0] * (len(enc.ids) + 1)))
            continue
        char_w = np.full(len(text) + 1, context_weight)
        for spans, weight in ((sample.fresh, 0.0), (sample.copies, answer_weight), (sample.spans, answer_weight)):
            for start, end in spans:
                char_w[start:end] = weight
        starts = np.fromiter((start for start, _ in enc.offsets), dtype=np.int64, count=len(enc.ids))
        out.append((enc.ids + [eos], char_w[starts].tolist() + [context_weight]))
    return out


def _pack(samples: Iterator[tuple[list[int], list[float]]], n_rows: int, length: int, pad: int,
          buffer: int = 64):
    """Pack whole samples into ``n_rows`` rows of ``length`` tokens: ids, weights, position ids, dropped.

    Best fit from a buffer of pending samples (bucketed by length): each row takes the longest pending
    sample that still fits until none does -- far fuller rows than first-come packing. Position ids
    restart at every sample (and at the padding), which makes HF models attend within samples only.
    """
    import torch

    ids, weights, positions = [], [], []
    buckets: dict[int, list[tuple[list[int], list[float]]]] = {}
    n_pending, dropped = 0, 0
    for _ in range(n_rows):
        row_ids, row_w, row_pos = [], [], []
        while True:
            while n_pending < buffer:
                sample = next(samples)
                if len(sample[0]) > length:
                    dropped += 1
                    continue
                buckets.setdefault(len(sample[0]), []).append(sample)
                n_pending += 1
            fit = next((n for n in range(length - len(row_ids), 0, -1) if buckets.get(n)), None)
            if fit is None:
                break
            sample_ids, sample_w = buckets[fit].pop(0)
            n_pending -= 1
            row_ids += sample_ids
            row_w += sample_w
            row_pos += range(len(sample_ids))
        ids.append(row_ids + [pad] * (length - len(row_ids)))
        weights.append(row_w + [0.0] * (length - len(row_w)))
        positions.append(row_pos + list(range(length - len(row_pos))))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights), torch.tensor(positions), dropped


def name_pools(captions: list[str], config: TextPretrainConfig, known: set[str] | None = None) -> dict[str, Any]:
    """The :class:`CopyTextGenerator` name arguments of ``config``: its lexicon and the caption nouns."""
    known = caption_words(captions) if known is None else known
    return {"pool": make_lexicon(config.seed * 2 + 3, config.lexicon_size, known),
            "pool_fraction": config.lexicon_fraction, "words": caption_nouns(captions),
            "words_fraction": config.caption_noun_fraction}


REPLAY_TASKS = ("tags_single", "tags_attr", "scene", "list", "echo", "tags_place")


def text_replay_records(captions: list[str], n: int, config: TextPretrainConfig | None = None, seed: int = 1,
                        suffix_share: float = 0.7) -> list[dict[str, Any]]:
    """``n`` text-only LLaVA records (``{id, conversations}``) of copy conversations for instruction tuning.

    The counterpart of the ShareGPT text-only share of LLaVA-1.5's 665K mix: mixed into stage 2, they
    keep the LLM's language and copy prior (names from the same pools as :func:`pretrain_text_llm`:
    its lexicon, the caption nouns, fresh names) from being overwritten by a few visual classes. No
    image, and nothing from an eval set. ``suffix_share`` of the questions end with LLaVA-1.5's
    short-answer prompt (the instruction data's format).
    """
    from datastore.synth.questions import SHORT_ANSWER_PROMPT

    config = config or TextPretrainConfig()
    captions = [c.strip() for c in captions if c and c.strip()]
    known = caption_words(captions)
    gen = CopyTextGenerator(config.seed * 2 + 100 + seed, known, config.forbidden, chat_fraction=1.0,
                            **name_pools(captions, config, known))
    rng = random.Random(seed)
    records = []
    for i in range(n):
        conversation = llava_conversation(gen.sample(REPLAY_TASKS[i % len(REPLAY_TASKS)], chat=True))
        for turn in conversation[::2]:
            if rng.random() < suffix_share:
                turn["value"] += "\n" + SHORT_ANSWER_PROMPT
        records.append({"id": f"text-{i:06d}", "conversations": conversation})
    return records


def caption_nouns(captions: Iterable[str]) -> list[str]:
    """The captions' nouns: single-word tags of the ``rule`` tag parser, in first-seen order."""
    from datastore.tags import build_tag_parser

    parser = build_tag_parser("rule")
    return list(dict.fromkeys(t for tags in parser.parse_batch(captions) for t in tags if " " not in t))


def caption_words(captions: Iterable[str]) -> set[str]:
    """Lower-case words of the captions (names generated for copy texts avoid them)."""
    return {w for c in captions for w in re.findall(r"[a-z]+", c.lower())}


def weighted_lm_loss(model: Any, ids: Tensor, positions: Tensor, weights: Tensor) -> Tensor:
    """Next-token cross-entropy of packed rows ``ids`` (B, L), weighted per target token by ``weights``
    (B, L; position t weighs the prediction of token t) and divided by the weights' sum. The LM head runs
    only where a weight is non-zero (with ``context_weight`` 0, the answers): the same loss as over the full
    (B, L, V) logits, at a fraction of the LM head's cost."""
    import torch.nn.functional as F

    hidden = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[:, :-1]
    w = weights[:, 1:].reshape(-1)
    kept = w > 0
    logits = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[kept]).float()
    ce = F.cross_entropy(logits, ids[:, 1:].reshape(-1)[kept], reduction="none")
    return (ce * w[kept]).sum() / w.sum()


def pretrain_text_llm(captions: list[str], out_dir: str | Path, config: TextPretrainConfig | None = None,
                      progress: bool = True) -> Path:
    """Train tokenizer + tiny Qwen2 LM on captions and generated copy texts; save both to ``out_dir``.

    Args:
        captions: world text (any category names allowed); may be empty.
        out_dir: written with ``save_pretrained`` (tokenizer with the ChatML chat template, model,
            ``text_pretrain.json`` with the config, losses and timings).
        config: sizes and schedule (default :class:`TextPretrainConfig`).
        progress: print a line every ``config.log_every`` steps and the timings at the end.

    Returns:
        ``out_dir`` as a Path; ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datastore.utils import warmup_cosine_lr
    from tuna.tiny import save_hf_tokenizer, tiny_llm_config, train_tokenizer

    config = config or TextPretrainConfig()
    captions = [c.strip() for c in captions if c and c.strip()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # Tokenizer: captions + generated texts (own seed stream, not the training stream).
    known = caption_words(captions)
    names = name_pools(captions, config, known)
    lexicon = names["pool"]
    gen = CopyTextGenerator(config.seed * 2 + 1, known, config.forbidden, config.chat_fraction,
                            task_weights=config.task_weights, **names)
    tok = train_tokenizer(_tokenizer_lines(captions, lexicon, gen, config.tokenizer_samples),
                          config.pre_tokenizer, config.vocab_size)
    save_hf_tokenizer(tok, out)
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    vocab = len(hf_tok)
    whole = {"caption_words": single_token_share(hf_tok, known), "lexicon": single_token_share(hf_tok, lexicon)}
    timings["tokenizer_s"] = time.perf_counter() - t0

    # Data: a stream of caption / generated samples packed into steps * batch rows.
    t1 = time.perf_counter()
    rng = random.Random(config.seed)
    gen = CopyTextGenerator(config.seed * 2 + 2, known, config.forbidden, config.chat_fraction,
                            task_weights=config.task_weights, **names)
    eos, pad = hf_tok.eos_token_id, hf_tok.pad_token_id
    counts = {"captions": 0, **{t: 0 for t in TASKS}}

    cap_order: list[str] = []

    def stream(caption_fraction: float, max_chars: int | None = None) -> Iterator[tuple[list[int], list[float]]]:
        nonlocal cap_order
        while True:
            texts, spans = [], []
            for _ in range(512):
                if captions and rng.random() < caption_fraction:
                    if not cap_order:
                        cap_order = rng.sample(captions, len(captions))
                    texts.append(cap_order.pop())
                    spans.append(None)
                    counts["captions"] += 1
                else:
                    s = gen.sample()
                    if max_chars is not None and len(s.text) > max_chars:
                        continue  # surely too long for the short phase (~3 characters per token)
                    texts.append(s.text)
                    spans.append(s)
                    counts[s.task] += 1
            yield from _encode(tok, texts, spans, config.answer_weight, config.context_weight, eos)

    # Curriculum: the first steps see only short samples (copy heads form far faster in short contexts).
    n_rows = config.steps * config.batch_size
    n_short = int(config.short_fraction * config.steps) * config.batch_size
    short = _pack((x for x in stream(0.0, 4 * config.short_length) if len(x[0]) <= config.short_length), n_short,
                  config.max_length, pad)
    rest = _pack(stream(config.caption_fraction), n_rows - n_short, config.max_length, pad)
    data, weights, positions = (torch.cat([a, b]) for a, b in zip(short[:3], rest[:3]))
    dropped = rest[3]
    fill = float((data != pad).float().mean())
    timings["data_s"] = time.perf_counter() - t1
    say(f"text pretrain: vocab {vocab} (single tokens: {whole['caption_words']:.0%} of caption words, "
        f"{whole['lexicon']:.0%} of the {len(lexicon)} lexicon names), {n_rows} rows x {config.max_length} tokens ({fill:.0%} filled, "
        f"{dropped} too long), samples {counts}, {gen.rejected} forbidden texts redrawn, "
        f"tokenizer {timings['tokenizer_s']:.1f}s, data {timings['data_s']:.1f}s")

    # Model: tiny random-init Qwen2 (tuna.tiny), trained in a plain loop.
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        cfg = tiny_llm_config(vocab, "qwen2", config.hidden_size, config.num_layers, config.num_heads,
                              config.num_kv_heads, config.intermediate_size,
                              tie_word_embeddings=config.tie_word_embeddings, bos_token_id=hf_tok.bos_token_id,
                              eos_token_id=eos, pad_token_id=pad)
        model = AutoModelForCausalLM.from_config(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                weight_decay=config.weight_decay)
        model.train()
        losses, t2, window = [], time.perf_counter(), time.perf_counter()
        for step in range(config.steps):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine_lr(step, config.steps, config.warmup_steps, config.lr,
                                               config.min_lr_ratio)
            rows = slice(step * config.batch_size, (step + 1) * config.batch_size)
            ids, w = data[rows], weights[rows]
            loss = weighted_lm_loss(model, ids, positions[rows], w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                k = (step % config.log_every) + 1
                per_step = (time.perf_counter() - window) / k
                elapsed = time.perf_counter() - t2
                say(f"  step {step + 1}/{config.steps}  loss {sum(losses[-k:]) / k:.3f}  "
                    f"{per_step * 1000:.0f} ms/step  {elapsed:.0f}s elapsed, "
                    f"~{per_step * (config.steps - step - 1):.0f}s left")
                window = time.perf_counter()
        timings["train_s"] = time.perf_counter() - t2
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.eos_token_id = [eos, hf_tok.convert_tokens_to_ids(END_OF_TURN)]
    model.generation_config.pad_token_id = pad
    model.save_pretrained(str(out))
    timings["total_s"] = time.perf_counter() - t0
    record = {"config": asdict(config), "vocab": vocab, "single_token_share": whole, "params": n_params,
              "samples": counts,
              "rows": n_rows, "fill": fill, "dropped": dropped, "losses": losses, "timings": timings}
    (out / "text_pretrain.json").write_text(json.dumps(record, indent=1))
    say(f"text pretrain: {n_params / 1e6:.2f}M params, train {timings['train_s']:.1f}s "
        f"({timings['train_s'] / config.steps * 1000:.0f} ms/step), total {timings['total_s']:.1f}s -> {out}")
    return out


# ---------------------------------------------------------------- measurement


@dataclass
class CopyAccuracy:
    """Greedy exact-match accuracy on held-out generated copy prompts (fresh names)."""

    accuracy: float
    n: int
    by_task: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)  # a few (prompt tail, answer, output)


def greedy_answers(model_dir: str | Path, users: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy first answers of the text-only LLM in ``model_dir`` to user messages (its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN)]
    answers = []
    for user in users:
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            gen_ids = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(gen_ids[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def copy_accuracy(model_dir: str | Path, n: int = 200, seed: int = 12345, tasks: tuple[str, ...] = EVAL_TASKS,
                  known_words: Iterable[str] = (), names: Iterable[str] | None = None,
                  max_new_tokens: int = 16) -> CopyAccuracy:
    """Greedy-generate the first answer of ``n`` held-out ChatML copy prompts; exact match.

    Prompts come from :class:`CopyTextGenerator` with ``seed`` (use one the training never used) and
    cycle through ``tasks``; the prompt is rendered with the saved tokenizer's own chat template. Names
    are fresh random ones, or drawn from ``names`` (e.g. a world's novel categories, which training
    only saw in captions).
    """
    names = list(names or ())
    gen = CopyTextGenerator(seed, known_words, pool=names, pool_fraction=1.0 if names else 0.0)
    samples = [gen.sample(tasks[i % len(tasks)], chat=True) for i in range(n)]
    users = [s.prompt[len(SYSTEM_TURN):].split("<|im_start|>user\n", 1)[1].rsplit(END_OF_TURN, 1)[0]
             for s in samples]
    outputs = greedy_answers(model_dir, users, max_new_tokens)
    hits: dict[str, list[bool]] = {t: [] for t in tasks}
    examples = []
    for s, user, answer in zip(samples, users, outputs):
        task = s.task
        hits[task].append(answer == s.answer)
        if len(examples) < 8:
            examples.append({"task": task, "prompt": user, "answer": s.answer, "output": answer})
    flat = [h for v in hits.values() for h in v]
    return CopyAccuracy(sum(flat) / max(1, len(flat)), len(flat),
                        {t: sum(v) / len(v) for t, v in hits.items() if v}, examples)


# ---------------------------------------------------------------- command line


def world_novel_names(world: str | Path) -> list[str]:
    """The novel category names of a synthetic world (its ``world.json``)."""
    categories = json.loads((Path(world) / "world.json").read_text())["categories"]
    return [c["name"] for c in categories if c["novelty"] == "novel"]


def read_world_captions(world: str | Path, limit: int | None = None) -> list[str]:
    """Captions (``*.txt`` members) of a synthetic world's ``corpus/*.tar`` shards."""
    import tarfile

    captions: list[str] = []
    shards = sorted(Path(world).glob("corpus/*.tar"))
    if not shards:
        raise ValueError(f"no corpus/*.tar shards under {world}")
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    captions.append(tar.extractfile(member).read().decode("utf-8"))
                    if limit is not None and len(captions) >= limit:
                        return captions
    return captions


def main(argv: list[str] | None = None) -> int:
    """``python -m tuna.text_pretrain --world W --out DIR [--steps N ...]``: pretrain, then measure."""
    parser = argparse.ArgumentParser(prog="python -m tuna.text_pretrain", description=main.__doc__)
    parser.add_argument("--world", help="tuna-synth output folder whose corpus captions to train on")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-eval", type=int, default=200)
    for f, default in asdict(TextPretrainConfig()).items():
        if f not in ("forbidden", "task_weights"):
            kind = type(default)
            parser.add_argument(f"--{f.replace('_', '-')}", type=(lambda v: v.lower() in ("1", "true", "yes"))
                                if kind is bool else kind, default=default)
    parser.add_argument("--task-weights", type=lambda v: tuple(float(x) for x in v.split(",")),
                        default=TextPretrainConfig.task_weights, help=f"comma-separated, one per task {TASKS}")
    args = parser.parse_args(argv)
    try:
        config = TextPretrainConfig(**{k: getattr(args, k) for k in asdict(TextPretrainConfig()) if k != "forbidden"})
        captions = read_world_captions(args.world) if args.world else []
        out = pretrain_text_llm(captions, args.out, config)
        t = time.perf_counter()
        acc = copy_accuracy(out, n=args.n_eval, known_words=caption_words(captions))
    except ValueError as exc:
        print(f"text_pretrain: error: {exc}", file=sys.stderr)
        return 1
    by_task = ", ".join(f"{k} {v:.0%}" for k, v in acc.by_task.items())
    print(f"copy accuracy {acc.accuracy:.1%} on {acc.n} fresh-name prompts ({by_task}) "
          f"in {time.perf_counter() - t:.1f}s")
    for e in acc.examples[:4]:
        print(f"  {e['task']}: {e['prompt']!r} -> {e['output']!r} (want {e['answer']!r})")
    if args.world:
        acc = copy_accuracy(out, n=args.n_eval, names=world_novel_names(args.world))
        by_task = ", ".join(f"{k} {v:.0%}" for k, v in acc.by_task.items())
        print(f"copy accuracy {acc.accuracy:.1%} on {acc.n} prompts with the world's novel names ({by_task})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
