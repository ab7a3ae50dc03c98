"""Synthetic world catalogue (named shape+pattern categories, colours, sizes) and numpy sprite rendering."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

# Shapes and patterns of the global catalogue, in their fixed order.
SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "diamond", "star", "cross", "heart", "crescent",
    "arrow", "ring", "semicircle", "hourglass", "hexagon", "tee",
)
# Patterns come in confusable pairs: (0, 1), (2, 3), (4, 5), (6, 7).
PATTERNS: tuple[str, ...] = (
    "solid", "two-tone", "horizontal stripes", "vertical stripes",
    "dots", "checks", "rising stripes", "falling stripes",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 130, 20), "yellow": (240, 220, 30),
    "green": (40, 170, 60), "blue": (35, 80, 220), "purple": (130, 50, 180),
    "pink": (245, 120, 190), "brown": (130, 80, 35), "black": (20, 20, 20),
    "white": (245, 245, 245),
}
# Sprite side in pixels at the reference image size of 96 px (scaled with the image size).
SIZES: dict[str, int] = {"small": 20, "medium": 30, "large": 42}
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
REFERENCE_IMAGE_SIZE = 96

# Fixed made-up nouns (two syllables, regular "-s" plural), one per catalogue entry.
NAMES: tuple[str, ...] = (
    "tulbel", "jadub", "privit", "grekib", "stimun", "brudub", "dundit", "drerik", "snunal",
    "pavik", "kooror", "bloomik", "zutag", "trarek", "skoozzel", "quorkop", "bropern", "spolem",
    "woodag", "flootem", "blibbop", "snidal", "wevor", "frenkon", "kleffik", "bramop", "krutern",
    "froomad", "doobop", "groobbon", "klapip", "gurkik", "brevag", "drodip", "gruffit", "benem",
    "skelib", "krimek", "skadib", "jobbor", "skundog", "pookag", "stoozel", "noorvon", "jazzel",
    "drunon", "drapet", "kroopub", "boorvern", "prekub", "voomub", "quilbop", "jedern", "plarek",
    "stalbub", "jirkad", "gindel", "wimop", "wumek", "wuffib", "gloonkog", "trulun", "zoorvern",
    "vunkog", "flenkit", "plooffun", "zirkop", "skindit", "zalbop", "worvel", "pligad", "joogit",
    "gandip", "prarvop", "pevik", "jarkal", "snebbern", "palbik", "tarel", "pirkop", "bluffad",
    "jagib", "drilbik", "volbit", "tuvor", "gritem", "blalbet", "spirval", "nudik", "kuzzet",
    "zwizzor", "pezog", "prunel", "filern", "mivub", "nilop", "mooffem", "triffop", "kliffit",
    "bamal", "daffek", "zimog", "jezad", "vuvag", "jorvern", "bobor", "feffon", "winkip", "puzzog",
    "kurkag", "krepal", "quevad",
)
CATALOGUE_SIZE = len(SHAPES) * len(PATTERNS)
NOVELTIES = ("seen", "novel")


@dataclass(frozen=True)
class Category:
    """One visual family (shape + pattern) with its made-up noun."""

    index: int  # position in the global catalogue
    name: str
    shape: str
    pattern: str
    novelty: str  # "seen" | "novel" within a world; "" for bare catalogue entries
    confusable_with: str | None  # name of the deliberately similar category

    def to_json(self) -> dict:
        return asdict(self)


def catalogue_entry(index: int) -> Category:
    """Global catalogue entry ``index`` (0 <= index < CATALOGUE_SIZE).

    Consecutive entries (2k, 2k+1) share a shape and use the two patterns of one confusable
    pattern pair; pair k cycles through the shapes fastest, so any window of entries mixes shapes.

    Raises:
        ValueError: index outside the catalogue.
    """
    if not 0 <= index < CATALOGUE_SIZE:
        raise ValueError(f"catalogue index {index} outside [0, {CATALOGUE_SIZE})")
    pair, member = divmod(index, 2)
    lap, shape = divmod(pair, len(SHAPES))
    pattern_pair = (shape + lap) % (len(PATTERNS) // 2)  # bijection pair -> (shape, pattern pair)
    partner = NAMES[index ^ 1]
    return Category(index, NAMES[index], SHAPES[shape], PATTERNS[2 * pattern_pair + member], "", partner)


def _similarity(a: Category, b: Category) -> int:
    """How confusable two categories are: catalogue partners > same shape > same pattern."""
    if a.confusable_with == b.name:
        return 3
    if a.shape == b.shape:
        return 2
    return 1 if PATTERNS.index(a.pattern) // 2 == PATTERNS.index(b.pattern) // 2 else 0


def _pair_within(group: list[Category]) -> dict[str, str | None]:
    """Greedy most-similar pairing inside one novelty group (odd one out gets a one-way partner)."""
    partner: dict[str, str | None] = {}
    unpaired = list(group)
    while unpaired:
        first = unpaired.pop(0)
        pool = unpaired or [c for c in group if c.name != first.name]
        if not pool:
            partner[first.name] = None
            break
        best = max(pool, key=lambda c: _similarity(first, c))  # max keeps the first on ties
        partner[first.name] = best.name
        if best in unpaired:
            unpaired.remove(best)
            partner[best.name] = first.name
    return partner


class WorldCatalogue:
    """The categories of one world: ``n_seen`` then ``n_novel`` catalogue entries from ``category_offset``.

    Args:
        n_seen: categories allowed in instruction data.
        n_novel: categories that only appear in the datastore corpus and in novel eval images.
        category_offset: first catalogue index used (worlds with disjoint ranges share no category).

    Raises:
        ValueError: a group smaller than 4 or a range past the catalogue end.
    """

    def __init__(self, n_seen: int = 16, n_novel: int = 8, category_offset: int = 0) -> None:
        for field, value in (("n_seen", n_seen), ("n_novel", n_novel)):
            if value < 4:
                raise ValueError(f"{field}={value} too small: need at least 4 categories per group")
        if category_offset < 0 or category_offset + n_seen + n_novel > CATALOGUE_SIZE:
            raise ValueError(
                f"category_offset={category_offset} with n_seen+n_novel={n_seen + n_novel} exceeds the "
                f"catalogue of {CATALOGUE_SIZE} categories (need offset + n_seen + n_novel <= {CATALOGUE_SIZE})"
            )
        entries = [catalogue_entry(category_offset + i) for i in range(n_seen + n_novel)]
        groups = {"seen": entries[:n_seen], "novel": entries[n_seen:]}
        categories: list[Category] = []
        for novelty, group in groups.items():
            partner = _pair_within(group)
            for entry in group:
                categories.append(Category(entry.index, entry.name, entry.shape, entry.pattern,
                                           novelty, partner[entry.name]))
        self.categories: tuple[Category, ...] = tuple(categories)
        self._by_name = {c.name: c for c in self.categories}

    def group(self, novelty: str) -> tuple[Category, ...]:
        """Categories of one novelty group ("seen" or "novel")."""
        if novelty not in NOVELTIES:
            raise ValueError(f"novelty={novelty!r} not one of {NOVELTIES}")
        return tuple(c for c in self.categories if c.novelty == novelty)

    @property
    def seen(self) -> tuple[Category, ...]:
        return self.group("seen")

    @property
    def novel(self) -> tuple[Category, ...]:
        return self.group("novel")

    def by_name(self, name: str) -> Category:
        if name not in self._by_name:
            raise ValueError(f"unknown category {name!r}; this world has {sorted(self._by_name)}")
        return self._by_name[name]

    def to_json(self) -> list[dict]:
        return [c.to_json() for c in self.categories]


# ----------------------------------------------------------------------------------------------
# Rendering primitives: cached sprite alpha masks and pattern textures, backgrounds, compositing.

_SUPERSAMPLE = 4


def _shape_polygons(shape: str) -> list[tuple[str, list[tuple[float, float]] | tuple[float, ...], int]]:
    """Drawing ops (kind, points-or-box, fill 255/0) in normalised [-1, 1] coordinates, y down."""
    if shape == "circle":
        return [("ellipse", (-1, -1, 1, 1), 255)]
    if shape == "square":
        return [("polygon", [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)], 255)]
    if shape == "triangle":
        return [("polygon", [(0, -1), (1, 0.85), (-1, 0.85)], 255)]
    if shape == "diamond":
        return [("polygon", [(0, -1), (1, 0), (0, 1), (-1, 0)], 255)]
    if shape in ("star", "hexagon"):
        n, inner = (5, 0.45) if shape == "star" else (6, 1.0)
        angles = -np.pi / 2 + np.arange(2 * n) * np.pi / n
        radii = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
        return [("polygon", list(zip(radii * np.cos(angles), radii * np.sin(angles))), 255)]
    if shape == "cross":
        a = 0.33
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
               (-1, -a), (-a, -a)]
        return [("polygon", pts, 255)]
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [("polygon", list(zip(x / 16.5, (y + 2.5) / 15)), 255)]
    if shape == "crescent":
        return [("ellipse", (-1, -1, 1, 1), 255), ("ellipse", (-0.45, -0.85, 1.25, 0.85), 0)]
    if shape == "arrow":
        pts = [(-1, -0.3), (0.1, -0.3), (0.1, -0.85), (1, 0), (0.1, 0.85), (0.1, 0.3), (-1, 0.3)]
        return [("polygon", pts, 255)]
    if shape == "ring":
        return [("ellipse", (-1, -1, 1, 1), 255), ("ellipse", (-0.5, -0.5, 0.5, 0.5), 0)]
    if shape == "semicircle":
        return [("pieslice", (-1, -0.5, 1, 1.5), 255)]
    if shape == "hourglass":
        pts = [(-0.85, -1), (0.85, -1), (0.12, 0), (0.85, 1), (-0.85, 1), (-0.12, 0)]
        return [("polygon", pts, 255)]
    if shape == "tee":
        pts = [(-1, -1), (1, -1), (1, -0.45), (0.3, -0.45), (0.3, 1), (-0.3, 1), (-0.3, -0.45), (-1, -0.45)]
        return [("polygon", pts, 255)]
    raise ValueError(f"unknown shape {shape!r}; known shapes: {SHAPES}")


def shape_mask(shape: str, side: int) -> np.ndarray:
    """Anti-aliased alpha mask, float32 (side, side) in [0, 1], drawn supersampled with PIL."""
    big = side * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return ((x + 1) / 2 * (big - 1), (y + 1) / 2 * (big - 1))

    for kind, geometry, fill in _shape_polygons(shape):
        if kind == "polygon":
            draw.polygon([to_px(x, y) for x, y in geometry], fill=fill)
        else:
            box = [*to_px(geometry[0], geometry[1]), *to_px(geometry[2], geometry[3])]
            if kind == "ellipse":
                draw.ellipse(box, fill=fill)
            else:  # pieslice: the upper half of the box's ellipse
                draw.pieslice(box, 180, 360, fill=fill)
    small = canvas.resize((side, side), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def pattern_texture(pattern: str, side: int) -> np.ndarray:
    """Secondary-shade weight, float32 (side, side) in {0, 1}; 1 marks the pattern's second tone."""
    period = max(6, round(side / 4))
    half = period / 2
    i, j = np.mgrid[0:side, 0:side].astype(np.float32)
    if pattern == "solid":
        tex = np.zeros_like(i)
    elif pattern == "two-tone":
        tex = i >= side / 2
    elif pattern == "horizontal stripes":
        tex = (i // half) % 2 == 1
    elif pattern == "vertical stripes":
        tex = (j // half) % 2 == 1
    elif pattern == "checks":
        tex = ((i // half) + (j // half)) % 2 == 1
    elif pattern == "dots":
        di, dj = (i % period) - half + 0.5, (j % period) - half + 0.5
        tex = di**2 + dj**2 <= (0.34 * period) ** 2
    elif pattern in ("rising stripes", "falling stripes"):
        diag = (i + j) if pattern == "rising stripes" else (i - j + side)
        tex = (diag // (half * 1.41)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known patterns: {PATTERNS}")
    return np.asarray(tex, dtype=np.float32)


@lru_cache(maxsize=8192)
def sprite(shape: str, pattern: str, side: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Cached (alpha (side, side, 1), texture (side, side, 1), tight box (x0, y0, x1, y1)) of a sprite."""
    alpha = shape_mask(shape, side)
    tex = pattern_texture(pattern, side)
    rows, cols = np.nonzero(alpha >= 0.5)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return alpha[..., None], tex[..., None], box


def secondary_shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Pattern tone: the colour mixed 55% toward black (light colours) or white (dark colours)."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    target = 0.0 if luma >= 128 else 255.0
    return tuple(int(round(c + 0.55 * (target - c))) for c in rgb)  # type: ignore[return-value]


def draw_sprite(canvas: np.ndarray, shape: str, pattern: str, side: int, x: int, y: int,
                rgb: tuple[int, int, int]) -> None:
    """Alpha-blend a sprite in place onto ``canvas`` (H, W, 3) float32 with its top-left at (x, y)."""
    alpha, tex, _ = sprite(shape, pattern, side)
    primary = np.asarray(rgb, dtype=np.float32)
    second = np.asarray(secondary_shade(rgb), dtype=np.float32)
    colour = primary + tex * (second - primary)  # (side, side, 3)
    region = canvas[y:y + side, x:x + side]
    region += alpha * (colour - region)


def make_background(spec: dict, size: int) -> np.ndarray:
    """Background canvas, float32 (size, size, 3), from a spec with keys type/colours/direction/noise_seed.

    Raises:
        ValueError: unknown background type.
    """
    first = np.asarray(spec["colours"][0], dtype=np.float32)
    if spec["type"] == "solid":
        return np.broadcast_to(first, (size, size, 3)).copy()
    if spec["type"] == "gradient":
        second = np.asarray(spec["colours"][1], dtype=np.float32)
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        i, j = ramp[:, None], ramp[None, :]
        weight = {"horizontal": j + 0 * i, "vertical": i + 0 * j, "diagonal": (i + j) / 2}[spec["direction"]]
        return first + weight[..., None] * (second - first)
    if spec["type"] == "noise":
        noise = np.random.default_rng(spec["noise_seed"]).standard_normal((size, size, 1), dtype=np.float32)
        return first + 14.0 * noise
    raise ValueError(f"unknown background type {spec['type']!r}; known: solid, gradient, noise")
