"""Scene sampling (objects, placement, background), captions and deterministic single-sample rendering."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from datastore.synth.world import (
    COLOURS, NOVELTIES, POSITIONS, REFERENCE_IMAGE_SIZE, SIZES, Category, WorldCatalogue,
    draw_sprite, make_background, secondary_shade, sprite,
)

# Independent RNG streams: corpus, instruction and eval images never share a generator.
STREAMS: dict[str, int] = {"corpus": 1, "instruct": 2, "eval": 3, "instruct_qa": 4, "eval_qa": 5,
                           "icl_support": 6, "icl_query": 7}
KEY_PREFIX = {"corpus": "c", "instruct": "i", "eval": "e"}
POSITION_PHRASES = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
COUNT_WORDS = {2: "two", 3: "three"}
CAPTION_PREFIXES = ("", "a photo of", "an image of", "a picture showing", "a rendering of",
                    "a close-up photo of")
# Ways to split k objects into same-category groups, with their probabilities.
_PARTITIONS = {1: [((1,), 1.0)], 2: [((1, 1), 0.8), ((2,), 0.2)],
               3: [((1, 1, 1), 0.6), ((2, 1), 0.3), ((3,), 0.1)]}
_MIN_CONTRAST = 110.0  # minimum RGB distance between background and any object tone


@dataclass
class SceneObject:
    """One rendered object: its category, attributes and where its sprite sits."""

    category: Category
    colour: str
    rgb: tuple[int, int, int]
    size: str
    side: int  # sprite side in pixels
    position: str  # "left" | "middle" | "right" column of the sprite centre
    x: int  # sprite top-left
    y: int
    group: int  # objects of one group share category, colour and size

    @property
    def bbox(self) -> list[int]:
        """Tight box [x0, y0, x1, y1] (exclusive end) of the visible shape."""
        x0, y0, x1, y1 = sprite(self.category.shape, self.category.pattern, self.side)[2]
        return [self.x + x0, self.y + y0, self.x + x1, self.y + y1]

    def to_json(self) -> dict:
        c = self.category
        return {"category": c.name, "shape": c.shape, "pattern": c.pattern, "novelty": c.novelty,
                "colour": self.colour, "size": self.size, "position": self.position,
                "bbox": self.bbox, "group": self.group}


@dataclass
class Scene:
    """Objects (sorted left to right) on a background spec."""

    objects: list[SceneObject]
    background: dict

    @property
    def novelty(self) -> str:
        kinds = {o.category.novelty for o in self.objects}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def counts(self) -> dict[str, int]:
        """Objects per category name, in order of first appearance from the left."""
        out: dict[str, int] = {}
        for o in self.objects:
            out[o.category.name] = out.get(o.category.name, 0) + 1
        return out

    def groups(self) -> list[list[SceneObject]]:
        """Objects grouped by ``group`` id, groups ordered by their leftmost object."""
        by_id: dict[int, list[SceneObject]] = {}
        for o in self.objects:
            by_id.setdefault(o.group, []).append(o)
        return list(by_id.values())

    def to_json(self) -> dict:
        return {"objects": [o.to_json() for o in self.objects], "background": self.background,
                "novelty": self.novelty}


@dataclass
class Sample:
    """A rendered image (H, W, 3) uint8 with its key, scene and caption."""

    key: str
    image: np.ndarray
    scene: Scene
    caption: str


def sample_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    """The generator of one sample: a function of (seed, stream, index) only, so any worker split agrees."""
    return np.random.default_rng([seed, STREAMS[stream], index])


def _place(sides: list[int], columns: list[int], size: int, rng: np.random.Generator) -> list[tuple[int, int]] | None:
    """Top-left corners with each sprite centre in its column and no overlaps, or None after 20 tries."""
    gap = 1
    for _ in range(20):
        placed: list[tuple[int, int, int]] = []
        for side, col in zip(sides, columns):
            lo = max(0, int(np.ceil(col * size / 3 - side / 2)))
            hi = min(size - side, int(np.ceil((col + 1) * size / 3 - side / 2)) - 1)
            x = int(rng.integers(lo, hi + 1))
            ys = np.arange(0, size - side + 1)
            ok = np.ones_like(ys, dtype=bool)
            for px, py, ps in placed:
                if x < px + ps + gap and px < x + side + gap:  # overlapping columns of pixels
                    ok &= (ys + side + gap <= py) | (ys >= py + ps + gap)
            if not ok.any():
                break
            placed.append((x, int(rng.choice(ys[ok])), side))
        if len(placed) == len(sides):
            return [(x, y) for x, y, _ in placed]
    return None


def _background(tones: list[np.ndarray], rng: np.random.Generator) -> dict:
    """A background spec whose colours stay at least _MIN_CONTRAST away from every object tone."""

    def contrasting() -> list[int]:
        best, best_dist = None, -1.0
        for _ in range(64):
            cand = rng.integers(0, 256, 3)
            dist = min(float(np.linalg.norm(cand - t)) for t in tones)
            if dist > best_dist:
                best, best_dist = cand, dist
            if dist >= _MIN_CONTRAST:
                break
        return [int(v) for v in best]

    kind = str(rng.choice(["solid", "gradient", "noise"], p=[0.4, 0.35, 0.25]))
    spec: dict = {"type": kind, "colours": [contrasting()]}
    if kind == "gradient":
        spec["colours"].append(contrasting())
        spec["direction"] = str(rng.choice(["horizontal", "vertical", "diagonal"]))
    if kind == "noise":
        spec["noise_seed"] = int(rng.integers(0, 2**31 - 1))
    return spec


def sample_scene(pool: Sequence[Category], image_size: int, rng: np.random.Generator,
                 first: Category | None = None) -> Scene:
    """Draw 1-3 objects of categories from ``pool`` in distinct columns, plus a contrasting background.

    Args:
        pool: categories allowed in this image (at least 2).
        image_size: image side in pixels (sprite sizes scale with it).
        rng: the sample's generator (consumed in a fixed order).
        first: category of the first group (defaults to a random pool member).

    Returns:
        The scene with objects sorted left to right.
    """
    scale = image_size / REFERENCE_IMAGE_SIZE
    n_objects = int(rng.choice([1, 2, 3], p=[0.35, 0.35, 0.30]))
    options = [(p, w) for p, w in _PARTITIONS[n_objects] if len(p) <= min(3, len(pool) // 2)]
    weights = np.array([w for _, w in options]) / sum(w for _, w in options)
    partition = options[int(rng.choice(len(options), p=weights))][0]
    others = [c for c in pool if first is None or c.name != first.name]
    picked = [others[i] for i in rng.permutation(len(others))[: len(partition)]]
    cats = ([first] + picked)[: len(partition)] if first is not None else picked
    jitter = max(1, round(2 * scale))
    specs = []  # (group, category, colour, size)
    for group, (cat, count) in enumerate(zip(cats, partition)):
        colour, size = str(rng.choice(list(COLOURS))), str(rng.choice(list(SIZES)))
        specs += [(group, cat, colour, size)] * count
    columns = [int(c) for c in rng.permutation(3)[:n_objects]]
    sides = [round(SIZES[s] * scale) + int(rng.integers(-jitter, jitter + 1)) for _, _, _, s in specs]
    corners = _place(sides, columns, image_size, rng)
    while corners is None:  # shrink the largest sprite until the layout fits
        biggest = int(np.argmax(sides))
        sides[biggest] = round(sides[biggest] * 0.85)
        corners = _place(sides, columns, image_size, rng)
    objects = []
    for (group, cat, colour, size), side, col, (x, y) in zip(specs, sides, columns, corners):
        base = np.array(COLOURS[colour])
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, 3), 0, 255))
        objects.append(SceneObject(cat, colour, rgb, size, side, POSITIONS[col], x, y, group))
    objects.sort(key=lambda o: POSITIONS.index(o.position))
    tones = [np.array(o.rgb) for o in objects] + [np.array(secondary_shade(o.rgb)) for o in objects]
    return Scene(objects, _background(tones, rng))


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
    """Pixels of a scene: (image_size, image_size, 3) uint8; a pure function of the scene."""
    canvas = make_background(scene.background, image_size)
    for o in scene.objects:
        draw_sprite(canvas, o.category.shape, o.category.pattern, o.side, o.x, o.y, o.rgb)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(objs: list[SceneObject], size: bool, colour: bool, position: bool) -> str:
    """``[a|an|two|three] [size] [colour] name[s] [position]`` for one group of objects."""
    head = objs[0]
    words = ([head.size] if size else []) + ([head.colour] if colour else [])
    words.append(head.category.name + ("s" if len(objs) > 1 else ""))
    det = COUNT_WORDS.get(len(objs)) or _article(words[0])
    phrase = " ".join([det] + words)
    if position and len(objs) == 1:
        phrase += " " + POSITION_PHRASES[head.position]
    return phrase


def join_phrases(phrases: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_scene(scene: Scene, rng: np.random.Generator) -> str:
    """A lowercase caption naming every object group with some attributes (never the background)."""
    groups = scene.groups()
    if rng.random() < 0.5:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    position_p = 0.6 if len(scene.objects) > 1 else 0.3
    phrases = [noun_phrase(g, size=rng.random() < 0.6, colour=rng.random() < 0.9,
                           position=rng.random() < position_p) for g in groups]
    prefix = str(rng.choice(CAPTION_PREFIXES))
    body = join_phrases(phrases)
    return f"{prefix} {body}" if prefix else body


def sample_pool(world: WorldCatalogue, stream: str, index: int) -> tuple[tuple[Category, ...], Category]:
    """(allowed categories, first category) of a sample: round-robin over the pool for coverage.

    Corpus images use every category; instruction images only seen ones; eval images alternate
    seen (even index) and novel (odd index) groups.
    """
    if stream == "corpus":
        pool, slot = world.categories, index
    elif stream == "instruct":
        pool, slot = world.seen, index
    elif stream == "eval":
        pool, slot = world.group(NOVELTIES[index % 2]), index // 2
    else:
        raise ValueError(f"stream={stream!r} not one of {tuple(KEY_PREFIX)}")
    return pool, pool[slot % len(pool)]


def render_sample(world: WorldCatalogue, seed: int, stream: str, index: int, image_size: int = 96) -> Sample:
    """Render sample ``index`` of a stream ("corpus", "instruct" or "eval") exactly as the generator does.

    Args:
        world: the world's categories.
        seed: generator seed.
        stream: which image set the sample belongs to.
        index: sample number within the stream.
        image_size: output side in pixels.

    Returns:
        The sample (key, pixels, scene, caption).

    Raises:
        ValueError: unknown stream.
    """
    pool, first = sample_pool(world, stream, index)
    rng = sample_rng(seed, stream, index)
    scene = sample_scene(pool, image_size, rng, first)
    caption = caption_scene(scene, rng)
    key = f"{KEY_PREFIX[stream]}{index:09d}"
    return Sample(key, render_scene(scene, image_size), scene, caption)
