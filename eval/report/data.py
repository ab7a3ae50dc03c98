"""The report's data: runs and their results.json, samples joined across runs, marks, summary rows."""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from eval.report.images import Thumbnails

logger = logging.getLogger(__name__)


class ReportError(ValueError):
    """An input the report cannot use; the message is one line naming the file."""


@dataclass
class ReportConfig:
    """What one report shows (the ``tuna-eval report`` arguments).

    Attributes:
        runs: ``tuna-eval --out`` folders (results.json and ``<bench>/predictions.jsonl``).
        out: the HTML file to write.
        datastore: the datastore the runs retrieved from: neighbour thumbnails and captions (without it the
            neighbours' keys and similarities only).
        data_root: benchmark data root of the question images (default: each run's ``--data-root``).
        names: one column label per run (default: the folder names).
        group: ``KEY=VALUE``: only the samples whose field KEY has this value, e.g. ``novelty=novel``.
        thumb_size: longest thumbnail side in pixels.
        title: the page's title.
    """

    runs: list[str]
    out: str
    datastore: str | None = None
    data_root: str | None = None
    names: list[str] | None = None
    group: str | None = None
    thumb_size: int = 112
    title: str = "tuna-eval report"

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("give one or more run directories")
        if self.names is not None and len(self.names) != len(self.runs):
            raise ValueError(f"--names gives {len(self.names)} names for {len(self.runs)} run directories")
        if self.group is not None and "=" not in self.group:
            raise ValueError(f"--group {self.group!r}: expected KEY=VALUE, e.g. novelty=novel")
        if not 16 <= self.thumb_size <= 512:
            raise ValueError(f"--thumb-size {self.thumb_size}: expected 16 to 512 pixels")


@dataclass
class Column:
    """One run at one shot count: a column of answers."""

    label: str
    run: Path
    results: dict[str, Any]
    shots: int

    def entry(self, bench: str) -> dict[str, Any] | None:
        """results.json's entry (metrics, groups, main_metric) of ``bench`` at this shot count."""
        per_shot = self.results.get("kshot", {}).get(bench)
        if per_shot is not None:
            return per_shot["entries"].get(str(self.shots))
        return self.results["benchmarks"].get(bench)

    def records_file(self, bench: str) -> Path:
        return self.run / bench / (f"{self.shots}-shot" if self.shots else "") / "predictions.jsonl"


def load_columns(config: ReportConfig) -> list[Column]:
    """A column per run and shot count; ReportError names a folder without a usable results.json."""
    names = config.names or [Path(r).name or str(r) for r in config.runs]
    names = [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]
    columns = []
    for run, name in zip(config.runs, names):
        path = Path(run) / "results.json"
        if not path.is_file():
            raise ReportError(f"{path}: not found; is {run} a tuna-eval --out folder?")
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ReportError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(results, dict) or not isinstance(results.get("benchmarks"), dict):
            raise ReportError(f"{path}: no 'benchmarks' object, so not a tuna-eval results.json")
        if results.get("complete") is False:  # written after each benchmark: a run that stopped part-way
            logger.warning("%s: the run did not finish; the report shows its finished benchmarks", path)
        shots = (results.get("flags") or {}).get("shots") or [0]
        columns += [Column(name if list(shots) == [0] else f"{name} {k}-shot", Path(run), results, int(k))
                    for k in shots]
    return columns


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ReportError(f"{path}: not found (its run's results.json lists this benchmark)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ReportError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return records


def summary_rows(columns: list[Column], benches: list[str]) -> list[dict[str, Any]]:
    """Per benchmark and per group value, each column's main metric exactly as results.json has it."""
    rows: dict[tuple[str, str | None], dict[str, Any]] = {}
    for c, column in enumerate(columns):
        for bench in benches:
            entry = column.entry(bench)
            if entry is None:
                continue
            metric, metrics = entry["main_metric"], entry["metrics"]
            cells = {None: (metrics.get(metric, metrics.get("status")), entry.get("n"))}
            for key, values in (entry.get("groups") or {}).items():
                cells.update({f"{key}={value}": (m.get(metric), m.get("n")) for value, m in values.items()})
            for group, (value, n) in cells.items():
                row = rows.setdefault((bench, group), {"bench": bench, "group": group, "metric": metric,
                                                       "values": [None] * len(columns), "n": [None] * len(columns)})
                row["values"][c], row["n"][c] = value, n
    return list(rows.values())


def gold_text(record: dict[str, Any]) -> str:
    """The gold answer(s) as one line: accepted answers (with counts for human answers), letter, references."""
    if isinstance(record.get("answers"), list):
        counts = Counter(str(a) for a in record["answers"])
        return " / ".join(a if n == 1 else f"{a} ×{n}" for a, n in counts.most_common())
    for key in ("answer", "label"):
        if record.get(key) is not None:
            return str(record[key])
    if isinstance(record.get("references"), list):
        return " | ".join(str(r) for r in record["references"][:5])
    return ""


def options_text(record: dict[str, Any]) -> str | None:
    options = record.get("options")
    if isinstance(options, dict):
        return "   ".join(f"{k}. {v}" for k, v in options.items())
    if isinstance(options, list):
        return "   ".join(f"{chr(65 + i)}. {v}" for i, v in enumerate(options))
    return None


def mark(score: Any, unit_scale: bool) -> str | None:
    """right (1), wrong (0), partial (between, e.g. VQA accuracy); None when unscored or not on a 0-1 scale."""
    if not unit_scale or not isinstance(score, (int, float)) or not math.isfinite(score):
        return None
    return "right" if score >= 1 else "wrong" if score <= 0 else "partial"


def datastore_entries(root: str, keys: set[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """key -> (shard, caption) of the datastore images among ``keys``, and the shards' image extensions."""
    import pyarrow.parquet as pq

    from datastore.store import DatastoreError, read_manifest

    try:
        manifest = read_manifest(root)
    except DatastoreError as exc:
        raise ReportError(f"--datastore: {exc}") from None
    found: dict[str, tuple[str, str]] = {}
    for part in manifest["parts"]:
        table = pq.read_table(Path(root) / part["metadata"], columns=["key", "caption"])
        for key, caption in zip(table.column("key").to_pylist(), table.column("caption").to_pylist()):
            if key in keys:
                found[key] = (part["shard"], caption)
    exts = str((manifest.get("reader") or {}).get("image_key", "jpg;jpeg;png;webp")).split(";")
    return found, exts


def pool_examples(column: Column) -> dict[str, dict[str, Any]]:
    """id -> example (image, question, answers) of the k-shot run's demonstration pool ({} if unreadable)."""
    import pyarrow.parquet as pq

    from icl.pool import EXAMPLES

    pool = (column.results.get("demo_pool") or {}).get("path")
    path = Path(str(pool)) / EXAMPLES
    try:
        rows = pq.read_table(path, columns=["id", "image", "question", "answers"]).to_pylist()
    except (OSError, ValueError) as exc:
        logger.warning("%s: demonstrations shown by id only: %s", column.label, exc)
        return {}
    return {r["id"]: r for r in rows}


def image_folder(column: Column, bench: str, data_root: str | None) -> Path | None:
    """Where ``bench``'s relative image paths start, as tuna-eval resolves them (None: unknown benchmark)."""
    from eval.benchmarks import get_benchmark

    root = data_root or (column.results.get("flags") or {}).get("data_root")
    try:
        return Path(root) / get_benchmark(bench).image_folder if root else None
    except (KeyError, ValueError):
        return None


def answer_entry(record: dict[str, Any], thumbs: Thumbnails, pool: dict[str, dict[str, Any]]) -> dict[str, Any]:
    demos = []
    for demo in record.get("demos") or []:
        example = pool.get(demo["id"], {})
        demos.append({"id": demo["id"], "score": demo.get("score"), "question": example.get("question"),
                      "answer": (example.get("answers") or [None])[0],
                      "image": thumbs.ref("file", example["image"]) if example.get("image") else None})
    return {"prediction": str(record.get("prediction", "")), "score": record.get("score"), "mark": None,
            "tags": [[t.get("tag"), t.get("weight")] for t in record.get("tags") or []],
            "neighbours": [{"id": n["id"], "similarity": n.get("similarity")} for n in record.get("neighbours") or []],
            "demos": demos}


def collect(config: ReportConfig, progress: bool = True) -> tuple[dict[str, Any], Thumbnails]:
    """The page's data (samples joined across runs by benchmark and question id) and its thumbnails."""
    columns = load_columns(config)
    benches = list(dict.fromkeys(b for c in columns for b in c.results["benchmarks"]))
    only = config.group.split("=", 1) if config.group else None
    thumbs, samples = Thumbnails(config.thumb_size), {}
    for c, column in enumerate(columns):
        pool = pool_examples(column) if column.shots else {}
        for bench in [b for b in benches if column.entry(b) is not None]:
            group_keys = list(column.entry(bench).get("groups") or {})
            folder, seen = image_folder(column, bench, config.data_root), Counter()
            for record in read_records(column.records_file(bench)):
                qid = str(record.get("question_id"))
                seen[qid] += 1  # a question id may repeat (e.g. MMBench's rotations): the n-th joins the n-th
                if only and str(record.get(only[0])) != only[1]:
                    continue
                sample = samples.get((bench, qid, seen[qid]))
                if sample is None:
                    image = record.get("image")
                    sample = samples[(bench, qid, seen[qid])] = {
                        "bench": bench, "id": qid, "question": str(record.get("text", "")),
                        "gold": gold_text(record), "options": options_text(record),
                        "groups": [f"{k}={record.get(k)}" for k in group_keys],
                        "image": None if image is None else thumbs.ref(
                            "file", str(folder / str(image) if folder else Path(str(image)))),
                        "answers": [None] * len(columns)}
                sample["answers"][c] = answer_entry(record, thumbs, pool)
    if only and not samples:
        raise ReportError(f"--group {config.group}: no sample of {', '.join(config.runs)} has {only[0]} = {only[1]!r}")
    samples = list(samples.values())
    _mark(samples)
    exts = _neighbour_images(samples, thumbs, config.datastore)
    data = {"title": config.title, "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "group": config.group, "datastore": config.datastore, "benches": benches,
            "columns": [{"label": c.label, "run": str(c.run), "shots": c.shots, "model": c.results.get("model"),
                         "tags": _tag_flags(c.results)} for c in columns],
            "summary": summary_rows(columns, benches), "samples": samples}
    data["images"] = thumbs.make(exts, progress)
    data["missing_images"] = len(thumbs.missing)
    return _finite(data), thumbs


def _mark(samples: list[dict[str, Any]]) -> None:
    """Set each answer's mark; a benchmark with any score above 1 (CIDEr ×100) is not on a 0-1 scale."""
    scores = [(s["bench"], a["score"]) for s in samples for a in s["answers"] if a is not None]
    off_scale = {b for b, v in scores if isinstance(v, (int, float)) and v > 1}
    for sample in samples:
        for answer in (a for a in sample["answers"] if a is not None):
            answer["mark"] = mark(answer["score"], sample["bench"] not in off_scale)


def _neighbour_images(samples: list[dict[str, Any]], thumbs: Thumbnails, datastore: str | None) -> list[str]:
    """With a datastore: each neighbour's thumbnail and caption. Returns the shards' image extensions."""
    neighbours = [n for s in samples for a in s["answers"] if a is not None for n in a["neighbours"]]
    if datastore is None or not neighbours:
        return []
    entries, exts = datastore_entries(datastore, {n["id"] for n in neighbours})
    for n in neighbours:
        shard, caption = entries.get(n["id"], ("", None))
        n["caption"] = caption
        n["image"] = thumbs.ref(shard, n["id"]) if shard else None
    unknown = len({n["id"] for n in neighbours} - set(entries))
    if unknown:
        logger.warning("%d neighbour keys are not in the datastore %s (another datastore?)", unknown, datastore)
    return exts


def _tag_flags(results: dict[str, Any]) -> str:
    flags = results.get("flags") or {}
    if flags.get("no_tags"):
        return "no tags"
    parts = [f"ablation {flags['ablation']}" if flags.get("ablation") else "retrieved tags"]
    parts += [f"cache {Path(flags['retrieval_cache']).name}"] if flags.get("retrieval_cache") else []
    parts += [f"datastore {flags['datastore']}"] if flags.get("datastore") else []
    return ", ".join(parts)


def _finite(value: Any) -> Any:
    """``value`` with NaN / infinity as None: JSON has neither, and the page's JSON.parse rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
