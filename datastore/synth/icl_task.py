"""The synthetic in-context learning task: a labelled support set and queries where similarity can mislead.

Every category (seen and novel) has a *home look*: a colour and a background its support images (single
objects) mostly wear. A clean query is one object in its category's home look. A *distractor* query (a share
of them) asks "What is the object in the middle?" about an object standing between two objects of its
confusable partner (same shape, the other pattern of a confusable pattern pair), all three in the partner's
home look. Plain image similarity then ranks the partner's support images first and shows the model
demonstrations with the wrong name (with the quickstart's CLIP, 24 % of SIIR's demos have the query's label
on distractor queries, 99 % on clean ones; experiments/icl_retrieval.py); the ``oracle`` shows the right
ones. So the choice of demonstrations matters, and a learned retriever has room to win. (Colour and
background alone do not mislead a CLIP trained on the world's captions: 95 % of its demos stay right.)

```
ROOT/images/icl/{support,query}/KEY.jpg   support: single objects; queries: one object, or three (distractors)
ROOT/icl/support.json                      LLaVA JSON of the support set, every category (the eval pool)
ROOT/icl/support_seen.json                 the same, seen categories only (an in-context tuning pool: novel
                                           names stay out of training)
ROOT/icl/questions.jsonl, answers.jsonl    the ICL query set: identification, novelty, distractor flag
```
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from datastore.synth.scene import (
    Scene,
    SceneObject,
    _background,
    render_scene,
    sample_rng,
)
from datastore.synth.world import (
    COLOURS,
    POSITIONS,
    REFERENCE_IMAGE_SIZE,
    SIZES,
    Category,
    WorldCatalogue,
    secondary_shade,
)

ICL_DIR = "icl"
QUESTIONS = ("What is this object?", "What is the object in the image?", "Name the object in the picture.",
             "What kind of object is this?")
MIDDLE_QUESTION = "What is the object in the middle?"
HOME_LOOK_SHARE = 0.8  # support images in their category's home look; the rest in a random one


def _stable_int(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def home_look(category: Category, seed: int) -> tuple[str, dict]:
    """(colour name, background spec) of a category's support images: a pure function of name and seed."""
    colour = list(COLOURS)[_stable_int(seed, "colour", category.name) % len(COLOURS)]
    return _look(colour, np.random.default_rng(_stable_int(seed, "background", category.name)))


def _look(colour: str, rng: np.random.Generator) -> tuple[str, dict]:
    """``colour`` and a background that contrasts with it and with its pattern tone."""
    rgb = COLOURS[colour]
    return colour, _background([np.array(rgb), np.array(secondary_shade(rgb))], rng)


def single_object_scene(category: Category, colour: str, background: dict, image_size: int,
                        rng: np.random.Generator) -> Scene:
    """One medium-size object of ``category`` near the middle, in ``colour`` on ``background``."""
    scale = image_size / REFERENCE_IMAGE_SIZE
    side = round(SIZES["medium"] * scale) + int(rng.integers(-2, 3))
    x = int(rng.integers(max(0, image_size // 2 - side // 2 - 6), min(image_size - side, image_size // 2 - side // 2 + 6) + 1))
    y = int(rng.integers(0, image_size - side + 1))
    rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-12, 13, 3), 0, 255))
    return Scene([SceneObject(category, colour, rgb, "medium", side, "middle", x, y, 0)], background)


def _random_look(rng: np.random.Generator) -> tuple[str, dict]:
    return _look(str(rng.choice(list(COLOURS))), rng)


def support_sample(world: WorldCatalogue, seed: int, index: int, per_category: int, image_size: int
                   ) -> tuple[str, Category, Scene, np.ndarray]:
    category = world.categories[index // per_category]
    rng = sample_rng(seed, "icl_support", index)
    colour, background = home_look(category, seed) if rng.random() < HOME_LOOK_SHARE else _random_look(rng)
    scene = single_object_scene(category, colour, background, image_size, rng)
    return f"s{index:09d}", category, scene, render_scene(scene, image_size)


def query_sample(world: WorldCatalogue, seed: int, index: int, distractor_share: float, image_size: int
                 ) -> tuple[str, Category, bool, Scene, np.ndarray]:
    """Query ``index``: seen (even) / novel (odd) categories round-robin. A clean query is one object in its
    category's home look; a distractor query puts it in the middle between two objects of its confusable
    partner, all three in the partner's home look, and asks about the middle one."""
    group = world.group("seen" if index % 2 == 0 else "novel")
    category = group[(index // 2) % len(group)]
    rng = sample_rng(seed, "icl_query", index)
    distractor = bool(rng.random() < distractor_share) and category.confusable_with is not None
    if not distractor:
        colour, background = home_look(category, seed)
        scene = single_object_scene(category, colour, background, image_size, rng)
        return f"q{index:09d}", category, False, scene, render_scene(scene, image_size)
    partner = world.by_name(category.confusable_with)
    colour, background = home_look(partner, seed)
    side = round(SIZES["medium"] * image_size / REFERENCE_IMAGE_SIZE)
    objects = []
    for column, cat in enumerate((partner, category, partner)):
        lo = max(0, column * image_size // 3 + (image_size // 3 - side) // 2 - 2)
        x = int(rng.integers(lo, min(image_size - side, lo + 4) + 1))
        y = int(rng.integers(0, image_size - side + 1))
        rgb = tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-12, 13, 3), 0, 255))
        objects.append(SceneObject(cat, colour, rgb, "medium", side, POSITIONS[column], x, y, column))
    scene = Scene(objects, background)
    return f"q{index:09d}", category, True, scene, render_scene(scene, image_size)


def question_text(seed: int, key: str) -> str:
    return QUESTIONS[_stable_int(seed, "question", key) % len(QUESTIONS)]


def write_icl_task(out: Path, world: WorldCatalogue, seed: int, per_category: int, n_queries: int,
                   distractor_share: float, image_size: int, save_jpeg) -> dict[str, int]:
    """Render and write the support set and the query set under ``out``; returns counts for world.json."""
    images = out / "images" / ICL_DIR
    for sub in ("support", "query"):
        (images / sub).mkdir(parents=True, exist_ok=True)
    (out / ICL_DIR).mkdir(parents=True, exist_ok=True)
    support, support_seen = [], []
    for index in range(per_category * len(world.categories)):
        key, category, _, pixels = support_sample(world, seed, index, per_category, image_size)
        rel = f"{ICL_DIR}/support/{key}.jpg"
        (out / "images" / rel).write_bytes(save_jpeg(pixels))
        record = {"id": key, "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\n{question_text(seed, key)}"},
            {"from": "gpt", "value": category.name}]}
        support.append(record)
        if category.novelty == "seen":
            support_seen.append(record)
    questions, answers = [], []
    for index in range(n_queries):
        key, category, distractor, _, pixels = query_sample(world, seed, index, distractor_share, image_size)
        rel = f"{ICL_DIR}/query/{key}.jpg"
        (out / "images" / rel).write_bytes(save_jpeg(pixels))
        meta = {"question_id": f"icl-{index:06d}", "category": "identification", "novelty": category.novelty,
                "distractor": distractor}
        text = MIDDLE_QUESTION if distractor else question_text(seed, key)
        questions.append({**meta, "image": rel, "text": text})
        answers.append({**meta, "answers": [category.name]})
    (out / ICL_DIR / "support.json").write_text(json.dumps(support, indent=1) + "\n")
    (out / ICL_DIR / "support_seen.json").write_text(json.dumps(support_seen, indent=1) + "\n")
    for name, rows in (("questions.jsonl", questions), ("answers.jsonl", answers)):
        (out / ICL_DIR / name).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return {"icl_support": len(support), "icl_support_seen": len(support_seen), "icl_queries": len(questions),
            "icl_distractors": sum(q["distractor"] for q in questions)}


def add_icl_task(root: str | Path, per_category: int, n_queries: int, distractor_share: float = 0.5) -> dict[str, int]:
    """Write the ICL task into an existing world at ``root`` (same seed, categories and image settings as its
    ``world.json``; its other files are untouched); the task's arguments go to ``icl/task.json``."""
    from datastore.synth.generate import jpeg_bytes  # generate imports this module
    from datastore.synth.layout import World

    args = World.open(root).args
    world = WorldCatalogue(args["n_seen"], args["n_novel"], args.get("category_offset", 0))
    counts = write_icl_task(Path(root), world, args["seed"], per_category, n_queries, distractor_share,
                            args["image_size"], lambda pixels: jpeg_bytes(pixels, args.get("jpeg_quality", 90)))
    task = {"icl_support_per_category": per_category, "icl_queries": n_queries,
            "icl_distractor_share": distractor_share, "counts": counts}
    (Path(root) / ICL_DIR / "task.json").write_text(json.dumps(task, indent=1, sort_keys=True) + "\n")
    return counts
