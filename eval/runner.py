"""Run benchmarks on a TUNA model: batched greedy answers, per-sample records, scores, results JSON/markdown.

Several processes (``torchrun``) split each benchmark's questions by index; rank 0 merges the per-rank
prediction files back into question order and scores them, so the results equal a one-process run
(greedy answers do not depend on the batch composition).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.distributed import barrier, dist_env
from eval.benchmarks import Benchmark, get_benchmark, strip_suffix
from eval.kshot import (DemoSource, KShotSettings, encode_kshot_prompt, kshot_table, query_example,
                        summary_columns)
from eval.validate import PreparedBenchmark, image_source, prepare_benchmarks

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16


@dataclass
class EvalConfig:
    """What to evaluate and how (the ``tuna-eval`` arguments)."""

    model: str
    benches: list[str]
    data_root: str
    out: str
    datastore: str | None = None
    retrieval_cache: str | None = None
    no_tags: bool = False
    ablation: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    limit: int | None = None
    k_images: int = 5
    min_tag_support: float = 0.0
    random_tags_vocab: str | None = None
    device: str = "cpu"
    judge_url: str | None = None
    judge_model: str | None = None
    shots: list[int] = field(default_factory=lambda: [0])
    kshot: KShotSettings | None = None
    on_bad_sample: str = "error"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.no_tags and self.ablation not in (None, "no_tags"):
            raise ValueError(f"--no-tags contradicts --ablation {self.ablation}")
        for name in self.benches:
            get_benchmark(name)
        if not self.shots or any(k < 0 for k in self.shots) or len(set(self.shots)) != len(self.shots):
            raise ValueError(f"shots={self.shots}: give distinct shot counts >= 0, e.g. 0,1,2,4,8")
        if any(self.shots) and self.kshot is None:
            raise ValueError(f"shots={self.shots}: k-shot evaluation needs --demo-pool")


def load_model(config: EvalConfig):
    """Model, tokenizer and processor (with its tag source) for the run's flags."""
    from tuna.processing_tuna import load_pretrained

    model, tokenizer, processor = load_pretrained(
        config.model, config.device, ablation="no_tags" if config.no_tags else config.ablation,
        retrieval_cache=config.retrieval_cache, datastore=config.datastore, k_images=config.k_images,
        min_support=config.min_tag_support, random_vocabulary=config.random_tags_vocab)
    if processor.tag_source is None:
        raise ValueError("tags need --datastore or --retrieval-cache (or --no-tags for the baseline)")
    return model, tokenizer, processor


def answer_batch(model, tokenizer, processor, bench: Benchmark, samples: list[dict], folder: Path,
                 shots: int = 0, demos: DemoSource | None = None) -> list[dict]:
    """Greedy answers for ``samples``; each record gets prompt, tags with weights and prediction (and, with
    ``shots`` > 0, the ``shots`` demonstrations from ``demos`` before each question)."""
    from icl.prompts import kshot_conversation
    from tuna.conversation import render_text

    questions = [s["text"] + ("\n" + bench.prompt_suffix if bench.prompt_suffix else "") for s in samples]
    images = [_image_of(s, folder) for s in samples]
    ids = [str(s["image"]) for s in samples]
    chosen: list[list] = [[] for _ in samples]
    if shots:
        queries = [query_example(s, q, folder) for s, q in zip(samples, questions)]
        chosen = demos.demos_for(queries, shots, bench.prompt_suffix)
    if processor.tag_source is not None:  # live retrieval: one datastore call for the batch's new images
        demo_paths = [d.image for row in chosen for d, _ in row]  # paths: only unknown ones get opened
        processor.tag_source.prefetch(ids + demo_paths, images + demo_paths)
    if shots:
        encoded = [encode_kshot_prompt(processor, [d for d, _ in row], q, demos.settings.demo_tags, i)
                   for row, q, i in zip(chosen, queries, ids)]
        prompts = [kshot_conversation([d for d, _ in row], q, with_answer=False) for row, q in zip(chosen, queries)]
    else:
        encoded = [processor.encode(q, images=[im], image_ids=[i], sample_id=str(s["question_id"]))
                   for q, im, i, s in zip(questions, images, ids, samples)]
        prompts = [q if "<image>" in q else "<image>\n" + q for q in questions]
    batch = processor.collate(encoded, padding_side="left")
    batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, tag_weights = model.generate(**batch, max_new_tokens=bench.max_new_tokens, pad_token_id=pad,
                                         return_tag_weights=True)
    stops = set(model.config.stop_token_ids) | {pad}
    weights = [[] if tag_weights is None else tag_weights[n, :len(t)].tolist() for n, t in enumerate(batch["tags"])]
    # tags are per image, the samples' images in a row: each record reports its question's (last) image
    last = [n - 1 for n in itertools.accumulate(len(e["tags"]) for e in encoded)]
    neighbours = [_neighbours(processor.tag_source, i, im) for i, im in zip(ids, images)]
    records = []
    for s, prompt, row, n, picked, near in zip(samples, prompts, tokens.tolist(), last, chosen, neighbours):
        tags, w = batch["tags"][n], weights[n]
        answer = tokenizer.decode([t for t in row if t not in stops], skip_special_tokens=True).strip()
        s = {k: v for k, v in s.items() if k != "image_bytes"}  # not written to the jsonl
        record = {**s, "prompt": render_text(prompt, model.config.template, tokenizer),
                  "tags": [{"tag": t, "weight": (w[i] if w else None)} for i, t in enumerate(tags)],
                  "prediction": answer, "neighbours": near}
        if shots:
            record.update(shots=shots, demos=[{"id": d.id, "score": round(score, 6)} for d, score in picked])
        records.append(record)
    return records


def _neighbours(tag_source, image_id: str, image) -> list[dict]:
    """The datastore neighbours (``id`` = datastore key, cosine ``similarity``) the tags of ``image_id`` came
    from; [] without retrieved tags (no tags, random tags). The tag source remembers the lookup the prompt
    made (cache or live result), so this retrieves nothing again."""
    if tag_source is None:
        return []
    found = tag_source(image_id, image)
    return [{"id": key, "similarity": round(float(sim), 6)}
            for key, sim in zip(found.neighbours, found.neighbour_scores) if math.isfinite(sim)]


def _image_of(sample: dict, folder: Path):
    """A sample's RGB image, opened once for retrieval and the model: from ``image_bytes`` (e.g. MMBench's
    base64 tsv) or the path under ``folder``; a one-line ValueError if it cannot be read."""
    from PIL import UnidentifiedImageError

    from datastore.reader import OversizedImage, open_image

    source, what = image_source(sample, folder)
    try:
        with open_image(source) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, OversizedImage) as exc:
        raise ValueError(f"question {sample['question_id']!r}: cannot read {what}: {exc}") from exc


def run_benchmark(model, tokenizer, processor, prepared: PreparedBenchmark, config: EvalConfig, shots: int = 0,
                  demos: DemoSource | None = None) -> dict[str, Any] | None:
    """This rank's share of a checked benchmark (``shots`` demonstrations from ``demos`` before each question);
    on rank 0 the merged, scored result (None elsewhere)."""
    from tqdm import tqdm

    rank, world, _ = dist_env()
    bench, files = prepared.bench, prepared.files
    samples = [dict(s) for s in prepared.samples]  # each shot count starts from the questions as loaded
    suffixed = drop_prompt_suffix(bench, samples)
    for i, s in enumerate(samples):
        s["index"] = i
    mine = samples[rank::world]
    out_dir = Path(config.out) / bench.name / (f"{shots}-shot" if shots else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records = []
    steps = range(0, len(mine), config.batch_size)
    desc = f"{bench.name}{f' {shots}-shot' if shots else ''} [rank {rank}]"
    for k in tqdm(steps, desc=desc, disable=rank != 0):
        records += answer_batch(model, tokenizer, processor, bench, mine[k:k + config.batch_size], files["images"],
                                shots, demos)
    seconds = time.perf_counter() - start
    shard = out_dir / f"predictions.rank{rank}.jsonl"
    shard.write_text("".join(json.dumps(r) + "\n" for r in records))
    barrier()
    if rank != 0:
        return None
    merged = []
    for r in range(world):
        part = out_dir / f"predictions.rank{r}.jsonl"
        merged += [json.loads(line) for line in part.read_text().splitlines()]
        part.unlink()
    merged.sort(key=lambda r: r["index"])
    return {**score_records(bench, merged, out_dir, seconds, _judge(config)), "prompt_suffix_stripped": suffixed,
            "skipped": prepared.skip_report()}


def drop_prompt_suffix(bench: Benchmark, samples: list[dict]) -> int:
    """Strip the benchmark's prompt suffix from questions that already end with it (the runner appends it,
    and a doubled instruction silently breaks a small model); warn about it, and about questions that
    still hold the instruction elsewhere. Returns how many were stripped."""
    if not bench.prompt_suffix:
        return 0
    stripped = 0
    for s in samples:
        text = strip_suffix(s["text"], bench.prompt_suffix)
        stripped += text != s["text"].strip()
        s["text"] = text
    inside = sum(bench.prompt_suffix in s["text"] for s in samples)
    if stripped:
        logger.warning("%s: %d of %d questions already end with the prompt suffix %r; it is appended once, not "
                       "twice", bench.name, stripped, len(samples), bench.prompt_suffix)
    if inside:
        logger.warning("%s: %d questions hold the prompt suffix %r inside their text; with the appended one "
                       "the model reads it twice", bench.name, inside, bench.prompt_suffix)
    return stripped


def _judge(config: EvalConfig):
    from eval.judge import Judge, JudgeConfig

    if not config.judge_url:
        return None
    return Judge(JudgeConfig(url=config.judge_url, model=config.judge_model or ""))


def score_records(bench: Benchmark, records: list[dict], out_dir: Path, seconds: float,
                  judge: Any = None) -> dict[str, Any]:
    """Scores (overall and per group value), per-sample jsonl; returns the benchmark's result entry."""
    scores, metrics = bench.score(records, judge) if bench.judged else bench.score(records)
    groups: dict[str, dict[str, Any]] = {}
    for key in () if bench.judged else bench.group_by:
        for value in sorted({str(r.get(key)) for r in records}):
            subset = [r for r in records if str(r.get(key)) == value]
            groups.setdefault(key, {})[value] = bench.score(subset)[1]
    if bench.submission is not None:
        (out_dir / "submission.json").write_text(json.dumps(bench.submission(records)))
        metrics["submission"] = str(out_dir / "submission.json")
    with open(out_dir / "predictions.jsonl", "w") as f:
        for record, score in zip(records, scores):
            f.write(json.dumps({**record, "score": score}) + "\n")
    return {"metrics": metrics, "groups": groups, "n": len(records), "main_metric": bench.main_metric,
            "prompt_suffix": bench.prompt_suffix, "example_prompt": records[0]["prompt"] if records else None,
            "seconds": round(seconds, 2)}


def evaluate(config: EvalConfig) -> dict[str, Any] | None:
    """Run every benchmark of ``config``; rank 0 writes results.json + results.md and returns the results."""
    rank = dist_env()[0]
    # every file, question and image checked before any time is spent on the model
    prepared = prepare_benchmarks(config.benches, config.data_root, config.limit, config.on_bad_sample)
    model, tokenizer, processor = load_model(config)
    out = Path(config.out)
    results = {"complete": False, "model": str(config.model),
               "flags": {k: v for k, v in asdict(config).items() if k != "extra"},
               "model_config": {k: getattr(model.config, k) for k in ("ablation", "weight_mode", "weight_scaling",
                                                                       "tag_temperature", "tag_score_prior", "max_tags",
                                                                       "template")},
               "clip_identity": model.config.clip_identity, "datastore": _datastore_identity(config),
               "retrieval_cache": _cache_identity(processor.tag_source), "benchmarks": {}}
    demos = DemoSource(config.kshot) if any(config.shots) else None
    if demos is not None:
        results["demo_pool"] = {"path": config.kshot.pool, "n": len(demos.pool), "retriever": config.kshot.retriever,
                                "order": config.kshot.order, "demo_tags": config.kshot.demo_tags}
    for item in prepared:
        bench, name = item.bench, item.bench.name
        by_shot = {k: run_benchmark(model, tokenizer, processor, item, config, k, demos) for k in config.shots}
        if rank != 0:
            continue
        results["benchmarks"][name] = by_shot[config.shots[0]]
        if demos is not None:
            main = {k: e["metrics"].get(bench.main_metric) for k, e in by_shot.items()}
            results.setdefault("kshot", {})[name] = {
                "retriever": config.kshot.retriever, "main_metric": bench.main_metric, "shots": main,
                **summary_columns(main), "entries": by_shot, "excluded": demos.retriever.excluded.to_dict()}
        # written after every benchmark: a later failure keeps the finished ones ("complete": false)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if rank != 0:
        return None
    results["complete"] = True
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table([results], [out.name]) + kshot_table([results], [out.name]))
    return results


def _datastore_identity(config: EvalConfig) -> dict[str, Any] | None:
    if not config.datastore:
        return None
    manifest = json.loads((Path(config.datastore) / "manifest.json").read_text())
    return {"path": str(config.datastore), "clip": manifest.get("clip"), "counts": manifest.get("counts")}


def _cache_identity(tag_source) -> dict[str, Any] | None:
    """The retrieval cache the tags came from (file, rows, CLIP, source datastore); None when none was read."""
    cache = getattr(tag_source, "cache", None)
    return None if cache is None else cache.identity()


def markdown_table(runs: list[dict[str, Any]], names: list[str]) -> str:
    """Benchmarks (and their groups) × runs, each cell the benchmark's main metric."""
    rows: dict[str, list[str]] = {}
    for i, run in enumerate(runs):
        for bench, entry in run["benchmarks"].items():
            metric = entry["main_metric"]
            cells = {f"{bench} ({metric})": entry["metrics"].get(metric, entry["metrics"].get("status"))}
            for key, values in entry["groups"].items():
                for value, metrics in values.items():
                    cells[f"{bench} {key}={value}"] = metrics.get(metric)
            for label, value in cells.items():
                text = value if isinstance(value, str) else "-" if value is None else f"{value:.1f}"
                rows.setdefault(label, ["-"] * len(runs))[i] = text
    lines = ["| benchmark | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows.items()]
    return "\n".join(lines) + "\n"
