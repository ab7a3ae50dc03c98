"""Labelled examples (image, question, gold answers) from the layouts users already have, as one record type.

``read_examples(fmt, inputs, ...)`` yields :class:`Example` records for building demonstration pools. Layouts:

``llava``          ``inputs=[instruct.json, ...]``: a JSON list of ``{"id", "image", "conversations": [{"from":
                   "human", "value": "<image>\\nQ"}, {"from": "gpt", "value": "A"}, ...]}``; images at
                   ``image_root/image``. Each (human, gpt) round is one example, id ``"{id}:{round}"``.
``vqav2``          ``inputs=[questions.json, annotations.json]`` (VQAv2 / OK-VQA as distributed, either order):
                   ``{"data_subtype", "questions": [{"image_id", "question", "question_id"}]}`` and
                   ``{"annotations": [{"question_id", "answers": [{"answer"}], "multiple_choice_answer"}]}``;
                   images ``image_root/COCO_{data_subtype}_{image_id:012d}.jpg``, else any
                   ``*_{image_id:012d}.jpg`` / ``{image_id:012d}.jpg`` in ``image_root``. Id = question_id.
``coco-karpathy``  ``inputs=["dataset_coco.json[:SPLIT]"]``: ``{"images": [{"filepath", "filename", "split",
                   "cocoid", "sentences": [{"raw"}]}]}``; images at ``image_root/filepath/filename``. ``:SPLIT``
                   keeps images of that split (``:train`` also takes "restval"); no suffix keeps all. One
                   caption example per image, id = cocoid.
``image-folder``   ``inputs=[root, ...]``: ``root/CLASS/**/IMAGE`` (jpg, jpeg, png, webp, bmp); one
                   classification example per image, answer = class name with "_" as " ", id = path under root.
``webdataset``     ``inputs`` = shard patterns (brace expansion, globs, fsspec URLs): ``KEY.{jpg,jpeg,png,webp}``
                   plus ``KEY.json`` with ``question``/``q`` and ``answers``/``answer`` (and optional ``label``),
                   or a caption in ``KEY.txt``/``KEY.caption``. Images are written to ``extract_dir/KEY.jpg``.
``synth``          ``inputs=[world_root]``: a ``tuna-synth`` output folder; its open-ended eval questions
                   (``eval/open/questions.jsonl`` joined with ``answers.jsonl`` by question_id), images under
                   ``world_root/images``; task = the question category.
``synth-icl``      ``inputs=[world_root]``: the in-context learning task's query set (``icl/questions.jsonl`` +
                   ``answers.jsonl``, ``tuna-synth --icl-queries``); its support set is LLaVA JSON
                   (``--format llava --input ROOT/icl/support.json --image-root ROOT/images``).

``image_root`` defaults to the folder of the first input file (llava, vqav2, coco-karpathy). Argument errors
raise ValueError when ``read_examples`` is called; unreadable or malformed input files raise ValueError naming
the file while iterating. Bad individual records are skipped and counted by reason in ``skipped``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMATS = ("llava", "vqav2", "coco-karpathy", "image-folder", "webdataset", "synth", "synth-icl")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
KARPATHY_SPLITS = ("train", "val", "test", "restval")
IMAGE_MARKER = "<image>"
MAX_SKIP_EXAMPLES = 5


@dataclass(frozen=True)
class Example:
    """One labelled example of a demonstration pool.

    Attributes:
        id: unique within the pool.
        image: absolute path of the image file.
        question: prompt text, without the ``<image>`` marker.
        answers: one or more non-empty gold answers; ``answers[0]`` is shown when the example is a demonstration.
        task: "vqa", "caption", "classification" or a synthetic-world question category ("identification" ...).
        label: class / category for the oracle retriever (class name, synthetic object name, VQA answer) or None.
    """

    id: str
    image: str
    question: str
    answers: tuple[str, ...]
    task: str
    label: str | None = None


@dataclass
class Skipped:
    """Counts of skipped samples by reason, and up to five sample ids per reason (for the log)."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, sample_id: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_SKIP_EXAMPLES:
            shown.append(sample_id)
        logger.debug("skip %s: %s", sample_id, reason)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line per reason: ``reason: count (e.g. id, id)``."""
        return "\n".join(f"{reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})"
                         for reason, n in sorted(self.counts.items()))


def read_examples(fmt: str, inputs: list[str], image_root: str | None = None, extract_dir: str | None = None,
                  skipped: Skipped | None = None, caption_prompt: str = "Describe the image briefly.",
                  class_prompt: str = "What is in the image?") -> Iterator[Example]:
    """Examples of ``inputs`` in layout ``fmt`` (see the module docstring), lazily, in input order.

    Skipped records (and repeated ids, "duplicate id") are counted in ``skipped`` when given.

    Raises:
        ValueError: unknown ``fmt``, no inputs, a wrong number of inputs, webdataset without ``extract_dir``
            (at call time); a missing or malformed input file (while iterating, naming the file).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown example format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(i) for i in inputs]
    if not inputs:
        raise ValueError(f"format {fmt!r}: no inputs given")
    if fmt == "vqav2" and len(inputs) != 2:
        raise ValueError(f"format 'vqav2' takes [questions.json, annotations.json], got {len(inputs)} inputs")
    if fmt == "webdataset" and extract_dir is None:
        raise ValueError("format 'webdataset' needs extract_dir: images are written there so they have a path")
    skipped = skipped if skipped is not None else Skipped()
    root = image_root if image_root is not None else str(Path(_strip_split(inputs[0])[0]).parent)
    if fmt == "llava":
        examples = (e for path in inputs for e in _llava(path, root, skipped))
    elif fmt == "vqav2":
        examples = _vqav2(inputs, root, skipped)
    elif fmt == "coco-karpathy":
        examples = (e for spec in inputs for e in _karpathy(spec, root, caption_prompt, skipped))
    elif fmt == "image-folder":
        examples = (e for path in inputs for e in _image_folder(path, class_prompt))
    elif fmt == "webdataset":
        examples = _webdataset(inputs, extract_dir, caption_prompt, skipped)
    elif fmt == "synth":
        examples = (e for path in inputs for e in _synth(path, skipped))
    else:
        examples = (e for path in inputs for e in _synth(path, skipped, icl=True))
    return _unique(examples, skipped)


def _unique(examples: Iterable[Example], skipped: Skipped) -> Iterator[Example]:
    # pools are keyed by id (retrieval caches, exclusion of the query itself), so a repeat must not pass
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            skipped.add("duplicate id", example.id)
            continue
        seen.add(example.id)
        yield example


# ---------------------------------------------------------------- shared helpers
def _load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: malformed JSON: {exc}") from exc


def _load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"{path}:{line_no}: malformed JSON line: {exc}") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object per line")  # noqa: TRY004 (bad input file)
        rows.append(row)
    return rows


def _text(value: Any) -> str:
    """A stripped string, or "" for anything that is not a string."""
    return value.strip() if isinstance(value, str) else ""


def _answers(values: Iterable[Any]) -> tuple[str, ...]:
    return tuple(a for a in (_text(v) for v in values) if a)


def _abspath(root: str | Path, *parts: str) -> str:
    return os.path.abspath(os.path.join(str(root), *parts))


# ---------------------------------------------------------------- llava
HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")


def _llava(path: str, image_root: str, skipped: Skipped) -> Iterator[Example]:
    records = _load_json(path)
    if not isinstance(records, list):
        raise ValueError(  # noqa: TRY004 (a wrong-shaped input file is bad data, like malformed JSON)
            f"{path}: expected a JSON list of LLaVA records, got {type(records).__name__}")
    for index, record in enumerate(records):
        rid = str(record.get("id", "")).strip() if isinstance(record, dict) and record.get("id") is not None else ""
        if not rid:  # ids name the examples; a record without one cannot be told apart
            skipped.add("bad record", f"{path}#{index}")
            continue
        image = _text(record.get("image"))
        if not image:  # text-only records (and multi-image lists) cannot be image demonstrations
            skipped.add("no image", rid)
            continue
        image_path = _abspath(image_root, image)
        if not os.path.isfile(image_path):
            skipped.add("image missing", rid)
            continue
        yield from _llava_rounds(rid, image_path, record.get("conversations"), skipped)


def _llava_rounds(rid: str, image_path: str, turns: Any, skipped: Skipped) -> Iterator[Example]:
    if not isinstance(turns, list) or not turns:
        skipped.add("bad conversation", rid)
        return
    for round_no in range((len(turns) + 1) // 2):
        example_id = f"{rid}:{round_no}"
        pair = turns[2 * round_no: 2 * round_no + 2]
        if len(pair) != 2 or not all(isinstance(t, dict) for t in pair) \
                or pair[0].get("from") not in HUMAN_ROLES or pair[1].get("from") not in GPT_ROLES:
            skipped.add("bad conversation", example_id)
            continue
        question = _text(_text(pair[0].get("value")).replace(IMAGE_MARKER, ""))
        answer = _text(pair[1].get("value"))
        if not question:
            skipped.add("no question", example_id)
        elif not answer:
            skipped.add("no answer", example_id)
        else:
            yield Example(example_id, image_path, question, (answer,), "vqa", answer)


# ---------------------------------------------------------------- vqav2 / ok-vqa
COCO_ID_FILE = re.compile(r"(?:^|_)(\d{12})\.jpg$", re.IGNORECASE)


def _vqav2(inputs: list[str], image_root: str, skipped: Skipped) -> Iterator[Example]:
    loaded = {path: _load_json(path) for path in inputs}
    questions_file = _pick_file(loaded, "questions")
    annotations_file = _pick_file(loaded, "annotations")
    annotations = {}
    for ann in loaded[annotations_file]["annotations"]:
        if isinstance(ann, dict) and "question_id" in ann:
            annotations[str(ann["question_id"])] = ann
    images = _CocoImages(image_root, loaded[questions_file].get("data_subtype"))
    for index, q in enumerate(loaded[questions_file]["questions"]):
        if not isinstance(q, dict) or "question_id" not in q or not _text(q.get("question")):
            skipped.add("bad record", f"{questions_file}#{index}")
            continue
        qid = str(q["question_id"])
        ann = annotations.get(qid)
        if ann is None:
            skipped.add("no annotation", qid)
            continue
        answers = _vqa_answers(ann)
        if not answers:
            skipped.add("no answer", qid)
            continue
        image = images.find(q.get("image_id", ann.get("image_id")))
        if image is None:
            skipped.add("image missing", qid)
            continue
        yield Example(qid, image, _text(q["question"]), answers, "vqa", answers[0])


def _pick_file(loaded: dict[str, Any], key: str) -> str:
    """The one input file whose top-level object has a ``key`` list (the two files may come in any order)."""
    found = [p for p, data in loaded.items() if isinstance(data, dict) and isinstance(data.get(key), list)]
    if len(found) != 1:
        raise ValueError(f"vqav2 inputs {list(loaded)}: expected exactly one file with a {key!r} list, "
                         f"found {len(found)}")
    return found[0]


def _vqa_answers(ann: dict[str, Any]) -> tuple[str, ...]:
    """All human answers, most common first (ties: first given); the official multiple-choice answer leads."""
    raw = ann.get("answers")
    humans = _answers(a.get("answer") if isinstance(a, dict) else a for a in raw) if isinstance(raw, list) else ()
    counts = Counter(humans)
    first = {a: i for i, a in reversed(list(enumerate(humans)))}
    ordered = sorted(humans, key=lambda a: (-counts[a], first[a]))
    best = _text(ann.get("multiple_choice_answer"))
    if best:  # kept with duplicates so VQA accuracy (matches / 3) stays computable from the tuple
        ordered = [best] * max(counts[best], 1) + [a for a in ordered if a != best]
    return tuple(ordered)


class _CocoImages:
    """Finds a COCO image by id: the official name first, else one listing of the folder, built on demand."""

    def __init__(self, root: str, subtype: Any) -> None:
        self.root, self.subtype = root, subtype if isinstance(subtype, str) and subtype else None
        self._by_id: dict[int, str] | None = None

    def find(self, image_id: Any) -> str | None:
        try:
            image_id = int(image_id)
        except (TypeError, ValueError):
            return None
        if self.subtype:
            path = _abspath(self.root, f"COCO_{self.subtype}_{image_id:012d}.jpg")
            if os.path.isfile(path):
                return path
        if self._by_id is None:
            self._by_id = self._index()
        return self._by_id.get(image_id)

    def _index(self) -> dict[int, str]:
        by_id: dict[int, str] = {}
        if os.path.isdir(self.root):
            for name in sorted(os.listdir(self.root)):
                match = COCO_ID_FILE.search(name)
                if match:
                    by_id.setdefault(int(match.group(1)), _abspath(self.root, name))
        return by_id


# ---------------------------------------------------------------- coco karpathy
def _strip_split(spec: str) -> tuple[str, str | None]:
    """``"dataset_coco.json:train"`` -> (path, "train"); a suffix with a path separator is part of the path."""
    path, sep, split = spec.rpartition(":")
    if sep and split and "/" not in split and "\\" not in split and path:
        return path, split
    return spec, None


def _karpathy(spec: str, image_root: str, prompt: str, skipped: Skipped) -> Iterator[Example]:
    path, split = _strip_split(spec)
    if split is not None and split not in KARPATHY_SPLITS:
        raise ValueError(f"{spec}: unknown Karpathy split {split!r}: expected one of {KARPATHY_SPLITS}")
    wanted = {split, "restval"} if split == "train" else {split}
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: expected a Karpathy split JSON with an 'images' list")  # noqa: TRY004
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _text(image.get("filename")):
            skipped.add("bad record", f"{path}#{index}")
            continue
        if split is not None and image.get("split") not in wanted:
            continue  # not skipped: the user chose another split
        image_id = str(image.get("cocoid", Path(image["filename"]).stem))
        sentences = image.get("sentences")
        captions = _answers(s.get("raw") for s in sentences if isinstance(s, dict)) \
            if isinstance(sentences, list) else ()
        image_path = _abspath(image_root, _text(image.get("filepath")), image["filename"].strip())
        if not captions:
            skipped.add("no answer", image_id)
        elif not os.path.isfile(image_path):
            skipped.add("image missing", image_id)
        else:
            yield Example(image_id, image_path, prompt, captions, "caption", None)


# ---------------------------------------------------------------- image folder
def _image_folder(root: str, prompt: str) -> Iterator[Example]:
    base = Path(root)
    if not base.is_dir():
        raise ValueError(f"{root}: image folder not found")
    classes = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (expected ROOT/CLASS/IMAGE)")
    for class_dir in classes:
        answer = class_dir.name.replace("_", " ").strip()
        for path in sorted(class_dir.rglob("*")):
            # non-image files (README, .DS_Store) are not samples, so they are not counted as skipped
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                yield Example(path.relative_to(base).as_posix(), str(path.resolve()), prompt, (answer,),
                              "classification", class_dir.name)


# ---------------------------------------------------------------- webdataset
WDS_IMAGE_KEYS = "jpg;jpeg;png;webp"
WDS_CAPTION_KEYS = ("txt", "caption")


def _webdataset(patterns: list[str], extract_dir: str, prompt: str, skipped: Skipped) -> Iterator[Example]:
    # imported here: datastore.reader imports torch, which only this format needs
    from datastore.reader import ShardError, expand_shards, iter_raw_samples

    try:
        shards = expand_shards(patterns)
    except ShardError as exc:
        raise ValueError(str(exc)) from exc
    out = Path(extract_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    for shard in shards:
        try:
            for sample in iter_raw_samples(shard):
                example = _wds_example(sample, out, prompt, seen, skipped)
                if example is not None:
                    yield example
        except ShardError as exc:
            raise ValueError(str(exc)) from exc


def _wds_example(sample: dict[str, Any], out: Path, prompt: str, seen: set[str],
                 skipped: Skipped) -> Example | None:
    from datastore.reader import decode_image

    key = str(sample.get("__key__", ""))
    meta: dict[str, Any] = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta = None
        if not isinstance(meta, dict):
            skipped.add("bad json", key)
            return None
    question = _text(meta.get("question")) or _text(meta.get("q"))
    answers = _wds_answers(meta, sample)
    if not answers:
        skipped.add("no answer", key)
        return None
    if key in seen:  # checked before writing: a repeated key would overwrite the first sample's image
        skipped.add("duplicate id", key)
        return None
    image, reason = decode_image(sample, WDS_IMAGE_KEYS)
    if image is None:
        skipped.add("no image" if reason == "missing_image" else "bad image", key)
        return None
    seen.add(key)
    path = out / (key.replace("/", "_").replace("\\", "_") + ".jpg")
    raw_jpeg = sample.get("jpg", sample.get("jpeg"))
    if raw_jpeg is not None:
        path.write_bytes(raw_jpeg)  # already a JPEG that decodes: keep it byte for byte
    else:
        image.save(path, format="JPEG", quality=95)
    label = _text(meta.get("label")) or (answers[0] if question else None)
    return Example(key, str(path.resolve()), question or prompt, answers, "vqa" if question else "caption", label)


def _wds_answers(meta: dict[str, Any], sample: dict[str, Any]) -> tuple[str, ...]:
    """The json's ``answers`` (strings or VQA-style ``{"answer"}`` dicts) / ``answer``, else the caption."""
    raw = meta.get("answers", meta.get("answer"))
    if raw is not None:
        values = raw if isinstance(raw, list) else [raw]
        return _answers(v.get("answer") if isinstance(v, dict) else v for v in values)
    for ext in WDS_CAPTION_KEYS:
        if ext in sample:
            try:
                return _answers([" ".join(sample[ext].decode("utf-8").split())])
            except UnicodeDecodeError:
                return ()
    return ()


# ---------------------------------------------------------------- synthetic world
def _synth(root: str, skipped: Skipped, icl: bool = False) -> Iterator[Example]:
    """The open-ended eval questions, or (``icl``) the in-context learning task's query set."""
    from datastore.synth.icl_task import ICL_DIR
    from datastore.synth.layout import World

    world = World.open(root)
    questions_file = world.root / ICL_DIR / "questions.jsonl" if icl else world.eval_questions("open")
    if icl and not questions_file.is_file():
        raise ValueError(f"{questions_file} not found: generate the world with tuna-synth --icl-queries N "
                         "--icl-support-per-category M")
    answers_file = questions_file.parent / "answers.jsonl"
    answers = {str(row.get("question_id")): row for row in _load_jsonl(answers_file)}
    for index, q in enumerate(_load_jsonl(questions_file)):
        qid = str(q.get("question_id", f"{questions_file}#{index}"))
        text, image, category = _text(q.get("text")), _text(q.get("image")), _text(q.get("category"))
        if "question_id" not in q or not text or not image or not category:
            skipped.add("bad record", qid)
            continue
        if qid not in answers:
            skipped.add("no annotation", qid)
            continue
        raw = answers[qid].get("answers")
        gold = _answers(raw) if isinstance(raw, list) else ()
        image_path = _abspath(world.images, image)
        if not gold:
            skipped.add("no answer", qid)
        elif not os.path.isfile(image_path):
            skipped.add("image missing", qid)
        else:
            yield Example(qid, image_path, text, gold, category, gold[0] if category == "identification" else None)
