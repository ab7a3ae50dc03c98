"""A small image dataset in a layout the project has never seen, for the "bring your own data" test.

Nothing here uses the synthetic world's format (``datastore.synth``): the per-sample JSON says ``color``
and ``scale`` (not ``colour`` / ``size``), has ``items`` of ``label`` (not ``objects`` of ``category``) and
no ``group``; the category list carries ``split`` ("base" / "new") instead of ``novelty``; keys are
``img_NNNNN``. Some corpus samples are broken, as a crawled corpus has them. On disk::

    ROOT/shards/part-0000N.tar        webdataset: KEY.jpg, KEY.txt (caption), KEY.json ({"items": [...]})
    ROOT/meta/categories.json         [{"label", "shape", "color", "split"}]
    ROOT/names.txt                    the labels, one a line
    ROOT/llava/pretrain.json          LLaVA stage-1 data (image + caption), images under ROOT/images
    ROOT/llava/instruct.json          LLaVA instructions about "base" categories only
    ROOT/images/train/KEY.jpg
    ROOT/eval/custom/open.jsonl       custom_open questions (docs/eval.md), group = the category's split
    ROOT/eval/custom/yesno.jsonl      custom_yesno questions
    ROOT/eval/custom/img/KEY.jpg

``make_foreign_dataset`` returns a :class:`ForeignData` with the paths and what was planted (the corrupt
samples by the skip reason the datastore build gives them, and the eval question counts).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SHORT_ANSWER = "Answer the question using a single word or phrase."
# label, shape, color, split: every "new" category is in the corpus (so retrieval can name it) but never in
# the instruction data
CATEGORIES = [
    ("wobbet", "circle", "red", "base"), ("plonk", "square", "blue", "base"),
    ("zindle", "triangle", "green", "base"), ("quarp", "cross", "yellow", "base"),
    ("fennik", "circle", "purple", "base"), ("traddle", "square", "orange", "base"),
    ("glimmet", "triangle", "cyan", "new"), ("snorv", "cross", "pink", "new"),
]
RGB = {"red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 60), "yellow": (230, 210, 40),
       "purple": (140, 50, 180), "orange": (240, 140, 30), "cyan": (40, 200, 210), "pink": (240, 130, 190)}
SCALES = {"small": 0.3, "large": 0.55}


@dataclass
class ForeignData:
    root: Path
    shards: str  # brace pattern, as the docs quote it
    n_shards: int
    pretrain: Path
    instruct: Path
    images: Path
    eval_root: Path
    names: Path
    n_corpus: int  # samples written to the shards, broken ones included
    corrupt: dict[str, int] = field(default_factory=dict)  # datastore skip reason -> samples planted
    n_open: int = 0
    n_yesno: int = 0
    n_suffixed: int = 0  # open questions that already end with the short-answer instruction
    groups: dict[str, int] = field(default_factory=dict)  # open questions per group


def draw(label: str, rng: random.Random, size: int, scale: str) -> bytes:
    """JPEG bytes of one object of category ``label`` on a noisy grey background."""
    _, shape, color, _ = next(c for c in CATEGORIES if c[0] == label)
    grey = rng.randint(90, 160)
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    pen = ImageDraw.Draw(image)
    r = SCALES[scale] * size / 2 * rng.uniform(0.85, 1.15)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = tuple(max(0, min(255, v + rng.randint(-20, 20))) for v in RGB[color])
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        pen.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        pen.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _caption(label: str, color: str, scale: str, rng: random.Random) -> str:
    return rng.choice(["a {s} {c} {l}", "a photo of a {c} {l}", "one {l}, {c}, on grey", "the {l} is {s} and {c}"]
                      ).format(s=scale, c=color, l=label)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_foreign_dataset(root: Path, n_corpus: int = 160, n_shards: int = 2, n_train: int = 48, n_eval: int = 16,
                         size: int = 64, seed: int = 0) -> ForeignData:
    """Write the dataset under ``root`` (see the module docstring) and return what was written."""
    rng = random.Random(seed)
    root = Path(root)
    for sub in ("shards", "meta", "llava", "images/train", "eval/custom/img"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "meta" / "categories.json").write_text(json.dumps(
        [{"label": l, "shape": s, "color": c, "split": sp} for l, s, c, sp in CATEGORIES], indent=1))
    (root / "names.txt").write_text("".join(c[0] + "\n" for c in CATEGORIES))
    split = {c[0]: c[3] for c in CATEGORIES}
    color = {c[0]: c[2] for c in CATEGORIES}
    base = [c[0] for c in CATEGORIES if c[3] == "base"]
    new = [c[0] for c in CATEGORIES if c[3] == "new"]

    # corpus: every category; three broken samples, one per skip reason, in the middle of the shards
    broken = {n_corpus // 4: "undecodable_text", n_corpus // 2: "corrupt_image", 3 * n_corpus // 4: "missing_caption"}
    per_shard = -(-n_corpus // n_shards)
    corrupt: dict[str, int] = {}
    for s in range(n_shards):
        with tarfile.open(root / "shards" / f"part-{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(n_corpus, (s + 1) * per_shard)):
                label, scale = CATEGORIES[i % len(CATEGORIES)][0], rng.choice(list(SCALES))
                key = f"img_{i:05d}"
                jpg, txt = draw(label, rng, size, scale), _caption(label, color[label], scale, rng).encode()
                meta = {"items": [{"label": label, "color": color[label], "scale": scale}], "source": "foreign-gen"}
                reason = broken.get(i)
                if reason == "undecodable_text":
                    txt = b"a \xff\xfe " + label.encode()  # not UTF-8
                elif reason == "corrupt_image":
                    jpg = jpg[: len(jpg) // 3]  # truncated JPEG
                if reason:
                    corrupt[reason] = corrupt.get(reason, 0) + 1
                _add(tar, f"{key}.jpg", jpg)
                if reason != "missing_caption":
                    _add(tar, f"{key}.txt", txt)
                _add(tar, f"{key}.json", json.dumps(meta).encode())

    # LLaVA stage-1 and stage-2 data: base categories only, images of their own (not corpus copies)
    pretrain, instruct = [], []
    for i in range(n_train):
        label, scale = base[i % len(base)], rng.choice(list(SCALES))
        path = f"train/t{i:04d}.jpg"
        (root / "images" / path).write_bytes(draw(label, rng, size, scale))
        pretrain.append({"id": f"p{i}", "image": path, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": _caption(label, color[label], scale, rng)}]})
        other = rng.choice([b for b in base if b != label])
        instruct.append({"id": f"q{i}", "image": path, "conversations": [
            {"from": "human", "value": f"<image>\nWhat is this object?\n{SHORT_ANSWER}"},
            {"from": "gpt", "value": label},
            {"from": "human", "value": f"Is there a {other} in the image?\n{SHORT_ANSWER}"},
            {"from": "gpt", "value": "No"}]})
    (root / "llava" / "pretrain.json").write_text(json.dumps(pretrain, indent=1))
    (root / "llava" / "instruct.json").write_text(json.dumps(instruct, indent=1))

    # eval: half base, half new; open questions (two already end with the instruction) and yes/no ones
    opens, yesnos, groups = [], [], {}
    for i in range(n_eval):
        label = (base if i % 2 == 0 else new)[(i // 2) % len(base if i % 2 == 0 else new)]
        path = f"img/e{i:04d}.jpg"
        (root / "eval" / "custom" / path).write_bytes(draw(label, rng, size, rng.choice(list(SCALES))))
        question = "What is this object?" + (f" {SHORT_ANSWER}" if i < 2 else "")
        opens.append({"question_id": i, "image": path, "question": question, "answers": [label],
                      "group": split[label], "category": "naming"})
        groups[split[label]] = groups.get(split[label], 0) + 1
        asked = label if i % 4 < 2 else rng.choice([c[0] for c in CATEGORIES if c[0] != label])
        yesnos.append({"question_id": f"y{i}", "image": path, "question": f"Is there a {asked} in the image?",
                       "answer": "yes" if asked == label else "no", "group": split[label], "category": "existence"})
    (root / "eval" / "custom" / "open.jsonl").write_text("".join(json.dumps(q) + "\n" for q in opens))
    (root / "eval" / "custom" / "yesno.jsonl").write_text("".join(json.dumps(q) + "\n" for q in yesnos))

    return ForeignData(root=root, shards=str(root / "shards" / f"part-{{00000..{n_shards - 1:05d}}}.tar"),
                       n_shards=n_shards, pretrain=root / "llava" / "pretrain.json",
                       instruct=root / "llava" / "instruct.json", images=root / "images",
                       eval_root=root / "eval", names=root / "names.txt", n_corpus=n_corpus, corrupt=corrupt,
                       n_open=len(opens), n_yesno=len(yesnos), n_suffixed=2, groups=groups)
