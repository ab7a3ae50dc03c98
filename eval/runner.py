"""Run benchmarks on a TUNA model: batched greedy answers, per-sample records, scores, results JSON/markdown.

Several processes (``torchrun``) split each benchmark's questions by index; rank 0 merges the per-rank
prediction files back into question order and scores them, so the results equal a one-process run
(greedy answers do not depend on the batch composition).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.distributed import barrier, dist_env
from eval.benchmarks import Benchmark, get_benchmark, strip_suffix

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
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.no_tags and self.ablation not in (None, "no_tags"):
            raise ValueError(f"--no-tags contradicts --ablation {self.ablation}")
        for name in self.benches:
            get_benchmark(name)


def load_model(config: EvalConfig):
    """Model, tokenizer and processor (with its tag source) for the run's flags."""
    from transformers import AutoTokenizer

    from tuna.modeling_tuna import TunaForCausalLM
    from tuna.processing_tuna import TunaProcessor
    from tuna.tag_source import TagSource

    model = TunaForCausalLM.from_pretrained(config.model).to(config.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    source = TagSource.for_model(model, ablation="no_tags" if config.no_tags else config.ablation,
                                 retrieval_cache=config.retrieval_cache, datastore=config.datastore,
                                 k_images=config.k_images, min_support=config.min_tag_support,
                                 random_vocabulary=config.random_tags_vocab)
    if source is None:
        raise ValueError("tags need --datastore or --retrieval-cache (or --no-tags for the baseline)")
    return model, tokenizer, TunaProcessor.from_model(model, tokenizer, tag_source=source)


def answer_batch(model, tokenizer, processor, bench: Benchmark, samples: list[dict], folder: Path) -> list[dict]:
    """Greedy answers for ``samples``; each record gets prompt, tags with weights and prediction."""
    from tuna.conversation import render_text

    questions = [s["text"] + ("\n" + bench.prompt_suffix if bench.prompt_suffix else "") for s in samples]
    images = [_image_of(s, folder) for s in samples]
    ids = [str(s["image"]) for s in samples]
    if processor.tag_source is not None:  # live retrieval: one datastore call for the batch's new images
        processor.tag_source.prefetch(ids, images)
    encoded = [processor.encode(q, images=[im], image_ids=[i], sample_id=str(s["question_id"]))
               for q, im, i, s in zip(questions, images, ids, samples)]
    batch = processor.collate(encoded, padding_side="left")
    batch = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, tag_weights = model.generate(**batch, max_new_tokens=bench.max_new_tokens, pad_token_id=pad,
                                         return_tag_weights=True)
    stops = set(model.config.stop_token_ids) | {pad}
    weights = [[] if tag_weights is None else tag_weights[n, :len(t)].tolist() for n, t in enumerate(batch["tags"])]
    records = []
    for s, q, row, tags, w in zip(samples, questions, tokens.tolist(), batch["tags"], weights):
        answer = tokenizer.decode([t for t in row if t not in stops], skip_special_tokens=True).strip()
        prompt = render_text(q if "<image>" in q else "<image>\n" + q, model.config.template, tokenizer)
        s = {k: v for k, v in s.items() if k != "image_bytes"}  # not written to the jsonl
        records.append({**s, "prompt": prompt, "tags": [{"tag": t, "weight": (w[i] if w else None)}
                                                        for i, t in enumerate(tags)], "prediction": answer})
    return records


def _image_of(sample: dict, folder: Path):
    """A sample's RGB image, opened once for retrieval and the model: from ``image_bytes`` (e.g. MMBench's
    base64 tsv) or the path under ``folder``; a one-line ValueError if it cannot be read."""
    import io

    from PIL import Image, UnidentifiedImageError

    inline = sample.get("image_bytes") is not None
    source = io.BytesIO(sample["image_bytes"]) if inline else folder / sample["image"]
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        where = "inline image" if inline else f"image {str(source)!r}"
        raise ValueError(f"question {sample['question_id']!r}: cannot read {where}: {exc}") from exc


def run_benchmark(model, tokenizer, processor, bench: Benchmark, config: EvalConfig) -> dict[str, Any] | None:
    """This rank's share of ``bench``; on rank 0 the merged, scored result (None elsewhere)."""
    from tqdm import tqdm

    rank, world, _ = dist_env()
    files = bench.resolve(config.data_root)
    samples = bench.load(files)[:config.limit]
    suffixed = drop_prompt_suffix(bench, samples)
    for i, s in enumerate(samples):
        s["index"] = i
    mine = samples[rank::world]
    out_dir = Path(config.out) / bench.name
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records = []
    steps = range(0, len(mine), config.batch_size)
    for k in tqdm(steps, desc=f"{bench.name} [rank {rank}]", disable=rank != 0):
        records += answer_batch(model, tokenizer, processor, bench, mine[k:k + config.batch_size], files["images"])
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
    return {**score_records(bench, merged, out_dir, seconds, _judge(config)), "prompt_suffix_stripped": suffixed}


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
    for name in config.benches:  # fail on a missing file before spending time on the model
        get_benchmark(name).resolve(config.data_root)
    model, tokenizer, processor = load_model(config)
    results = {"model": str(config.model), "flags": {k: v for k, v in asdict(config).items() if k != "extra"},
               "model_config": {k: getattr(model.config, k) for k in ("ablation", "weight_mode", "weight_scaling",
                                                                       "tag_temperature", "tag_score_prior", "max_tags",
                                                                       "template")},
               "clip_identity": model.config.clip_identity, "datastore": _datastore_identity(config),
               "benchmarks": {}}
    for name in config.benches:
        entry = run_benchmark(model, tokenizer, processor, get_benchmark(name), config)
        if entry is not None:
            results["benchmarks"][name] = entry
    if rank != 0:
        return None
    out = Path(config.out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown_table([results], [out.name]))
    return results


def _datastore_identity(config: EvalConfig) -> dict[str, Any] | None:
    if not config.datastore:
        return None
    manifest = json.loads((Path(config.datastore) / "manifest.json").read_text())
    return {"path": str(config.datastore), "clip": manifest.get("clip"), "counts": manifest.get("counts")}


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
