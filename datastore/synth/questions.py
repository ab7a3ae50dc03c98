"""Questions about rendered scenes: LLaVA pretrain/instruct conversations and eval question files.

Instruction data only ever names seen categories (instruction images contain only seen objects and
negatives are drawn from seen names); eval images are all-seen or all-novel and every question
carries that ``novelty``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

# LLaVA-1.5's short-answer prompt: its VQA-style instruction data appends it to every question turn
from common.prompts import SHORT_ANSWER
from datastore.synth.scene import POSITION_PHRASES, Scene, SceneObject, join_phrases, noun_phrase, sample_rng
from datastore.synth.world import Category, WorldCatalogue

PRETRAIN_PROMPTS = (
    "Describe the image briefly.", "What is in this picture?", "Write a short caption for the image.",
    "Give a brief description of the image.", "Summarize the visual content of the image.",
)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
LETTERS = "ABCD"
POPE_SPLITS = ("random", "popular", "adversarial")


def _ref(scene: Scene, obj: SceneObject) -> str:
    """How a question points at an object: "this object" alone, else by its column."""
    return "this object" if len(scene.objects) == 1 else f"the object {POSITION_PHRASES[obj.position]}"


def _what_is(scene: Scene, obj: SceneObject) -> str:
    ref = _ref(scene, obj)
    return f"What is {ref}?"


def _qa_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Candidate (question, short answer) pairs about a seen-only scene, existence questions aside."""
    objs = scene.objects
    pairs = [("What objects are in the image?",
              join_phrases([noun_phrase(g, size=False, colour=True, position=False) for g in scene.groups()]))]
    for o in objs:
        pairs.append((_what_is(scene, o), o.category.name))
        pairs.append((f"What colour is {_ref(scene, o)}?", o.colour))
        pairs.append((f"What size is {_ref(scene, o)}?", o.size))
    for name, n in scene.counts().items():
        pairs.append((f"How many {name}s are there?", str(n)))
    return pairs


def _existence_pairs(scene: Scene, world: WorldCatalogue, rng: np.random.Generator) -> list[tuple[str, str]]:
    """As many "No" as "Yes" existence questions (POPE's format), the negatives confusable partners first,
    then random absent seen names. Unbalanced (57 % "No") they taught every model to answer "No" to all."""
    present = list(scene.counts())  # scene order: a set's order changes with PYTHONHASHSEED (and so would the data)
    partners = [world.by_name(n).confusable_with for n in present]
    tricky = list(dict.fromkeys(p for p in partners if p and p not in present))
    absent = [c.name for c in world.seen if c.name not in present and c.name not in tricky]
    others = [absent[i] for i in rng.permutation(len(absent))]
    negatives = (tricky + others)[:len(present)]
    return [(f"Is there a {name} in the image?", "Yes") for name in present[:len(negatives)]] + [
        (f"Is there a {name} in the image?", "No") for name in negatives]


def pretrain_record(record: dict[str, Any], seed: int) -> dict[str, Any]:
    """LLaVA connector-pretraining sample: caption request → the image's caption."""
    rng = sample_rng(seed, "instruct_qa", record["index"])
    prompt = PRETRAIN_PROMPTS[int(rng.integers(len(PRETRAIN_PROMPTS)))]
    return {"id": record["key"], "image": record["image"],
            "conversations": [{"from": "human", "value": f"<image>\n{prompt}"},
                              {"from": "gpt", "value": record["caption"]}]}


def instruct_record(record: dict[str, Any], world: WorldCatalogue, seed: int) -> dict[str, Any]:
    """LLaVA multi-turn instruction sample with 3-5 questions about the image (seen names only), one of
    them an existence question, each followed by LLaVA-1.5's short-answer prompt on a new line."""
    rng = sample_rng(seed, "instruct_qa", record["index"])
    rng.integers(len(PRETRAIN_PROMPTS))  # keep this stream aligned with pretrain_record's draw
    pairs = _qa_pairs(record["scene"])
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[: int(rng.integers(2, 5))]]
    # one existence question per image (yes or no, balanced), as LLaVA's mix holds POPE-style yes/no questions
    existence = _existence_pairs(record["scene"], world, rng)
    chosen.insert(int(rng.integers(len(chosen) + 1)), existence[int(rng.integers(len(existence)))])
    return {"id": record["key"], "image": record["image"], "conversations": short_answer_turns(chosen)}


def short_answer_turns(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """LLaVA turns for (question, answer) pairs about one image: the image before the first question, each
    question followed by LLaVA-1.5's short-answer prompt on a new line."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + f"{question}\n{SHORT_ANSWER}"})
        turns.append({"from": "gpt", "value": answer})
    return turns


def _group_stats(records: list[dict]) -> dict[str, tuple[Counter, Counter]]:
    """Per novelty group: category frequency and pairwise co-occurrence over the eval images."""
    stats: dict[str, tuple[Counter, Counter]] = {}
    for r in records:
        freq, co = stats.setdefault(r["scene"].novelty, (Counter(), Counter()))
        names = list(r["scene"].counts())
        freq.update(names)
        co.update((a, b) for a in names for b in names if a != b)
    return stats


def _negatives(split: str, present: list[str], group: tuple[Category, ...], stats, rng, n: int) -> list[str]:
    """``n`` absent names of the image's group for one POPE split."""
    freq, co = stats
    absent = [c.name for c in group if c.name not in present]
    popular = sorted(absent, key=lambda name: (-freq[name], name))
    if split == "random":
        return [absent[i] for i in rng.permutation(len(absent))[:n]]
    if split == "popular":
        return popular[:n]
    by_name = {c.name: c for c in group}
    partners = [by_name[p].confusable_with for p in present]
    picks = list(dict.fromkeys(p for p in partners if p in absent))
    co_ranked = sorted(absent, key=lambda name: (-sum(co[(p, name)] for p in present), -freq[name], name))
    return list(dict.fromkeys(picks + co_ranked))[:n]


def _mc(scene: Scene, obj: SceneObject, group: tuple[Category, ...], slot: int, rng) -> tuple[list[str], str]:
    """Four options (right name at position ``slot``, its confusable partner always among the distractors).

    The other distractors prefer names absent from the image; in small groups present names fill up.
    """
    present = set(scene.counts())
    partner = obj.category.confusable_with
    absent = [c.name for c in group if c.name not in present and c.name != partner]
    shown = [c.name for c in group if c.name in present and c.name not in (obj.category.name, partner)]
    distractors = [partner] if partner else []
    distractors += [absent[i] for i in rng.permutation(len(absent))] + shown
    distractors = distractors[:3]
    distractors = [distractors[i] for i in rng.permutation(len(distractors))]
    options = distractors[:slot] + [obj.category.name] + distractors[slot:]
    return options, LETTERS[slot]


def eval_questions(records: list[dict], world: WorldCatalogue, seed: int) -> dict[str, list[dict]]:
    """All eval files (relative path → rows) for the rendered eval images."""
    files: dict[str, list[dict]] = {f"{t}/{f}": [] for t, f in (
        ("open", "questions.jsonl"), ("open", "answers.jsonl"), ("pope", "questions.jsonl"),
        ("pope", "annotations.jsonl"), ("mc", "questions.jsonl"), ("mc", "answers.jsonl"))}
    stats = _group_stats(records)
    counter = Counter()
    for r in records:
        scene, novelty = r["scene"], r["scene"].novelty
        rng = sample_rng(seed, "eval_qa", r["index"])

        def add(task: str, question: dict, answer: dict) -> None:
            qid = f"{task}-{counter[task]:06d}"
            counter[task] += 1
            base = {"question_id": qid, "novelty": novelty}
            files[f"{task}/questions.jsonl"].append({**base, "image": r["image"], **question})
            answer_file = "annotations.jsonl" if task == "pope" else "answers.jsonl"
            files[f"{task}/{answer_file}"].append({**base, **answer})

        _open_questions(scene, rng, add)
        _pope_questions(scene, world.group(novelty), stats[novelty], rng, add)
        for g in scene.groups():
            options, letter = _mc(scene, g[0], world.group(novelty), counter["mc"] % 4, rng)
            text = _what_is(scene, g[0]) + "".join(f"\n{LETTERS[i]}. {o}" for i, o in enumerate(options))
            add("mc", {"text": text, "options": options, "category": "identification"},
                {"answer": letter, "options": options})
    return files


def _open_questions(scene: Scene, rng, add) -> None:
    for o in scene.objects:
        add("open", {"text": _what_is(scene, o), "category": "identification"},
            {"answers": [o.category.name], "category": "identification"})
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    add("open", {"text": f"What colour is {_ref(scene, o)}?", "category": "color"},
        {"answers": [o.colour], "category": "color"})
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    add("open", {"text": f"What size is {_ref(scene, o)}?", "category": "size"},
        {"answers": [o.size], "category": "size"})
    name, n = list(scene.counts().items())[int(rng.integers(len(scene.counts())))]
    add("open", {"text": f"How many {name}s are there?", "category": "count"},
        {"answers": [str(n), NUMBER_WORDS[n]], "category": "count"})


def _pope_questions(scene: Scene, group, stats, rng, add) -> None:
    present = list(scene.counts())
    for split in POPE_SPLITS:
        negatives = _negatives(split, present, group, stats, rng, len(present))
        for name, label in [(p, "yes") for p in present] + [(n, "no") for n in negatives]:
            add("pope", {"text": f"Is there a {name} in the image?", "category": split},
                {"label": label, "category": split})
