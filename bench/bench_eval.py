"""Evaluation throughput (batch size 1 vs 16) and where its wall time goes, on a tiny random-init TUNA model.

A synthetic world (tuna-synth), a tuna-tiny-clip datastore and a random Qwen2 LLM are built in a temp
directory; the same questions (the first ``n/len(benches)`` of each benchmark) are answered with
eval.runner.answer_batch (live datastore retrieval, no cache) at every batch size, with a freshly
loaded model per batch size, and the answers are checked to be identical.

Time shares come from timers wrapped (monkeypatched) around: TagSource.__call__ and TagSource.prefetch
(retrieval: query image encoding + faiss search; the runner prefetches each batch's new images), VisionTower.embed_tags + ImageAwareTagEncoder.forward +
TunaForCausalLM.tag_weights (tag encoding), VisionTower.forward (vision tower), TunaForCausalLM.generate
(generation). Timers are exclusive: nested time is charged to the innermost timer only (so
"generation" is the LLM prefill/decode and the splicing, without the vision tower and tag encoding it
calls). "other" = wall time - all timers (image loading, preprocessing, tokenization, collation, decoding).

    python bench/bench_eval.py                                       # 200 questions, batch 1 vs 16
    python bench/bench_eval.py --n-questions 96 --batch-sizes 1,4,16 --llm-hidden 512 --llm-layers 8
    python bench/bench_eval.py --clip tuna-narrow-336 --n-questions 64    # LLaVA-1.5's 576 patches per image
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from common.log import setup_logging

SYSTEM = "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT: Tags:"
PARTS = ("retrieval", "tag encoding", "vision tower", "generation", "other")


def clip_spec(name: str, root: Path):
    """ClipSpec of ``name``: an open_clip architecture or a bundled one (datastore/model_configs), random init."""
    from datastore.clip import ClipSpec

    return ClipSpec(model=name)


def build_world(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """Synthetic world, datastore (same CLIP as the model), tokenizer, random LLM and saved TUNA model dir.

    Returns:
        Paths: data_root, datastore, model.
    """
    from transformers import AutoTokenizer

    from datastore.build import BuildConfig, build
    from datastore.index import IndexConfig
    from datastore.reader import ReaderConfig
    from datastore.synth.layout import World
    from pipeline.tiny import save_hf_tokenizer, save_tiny_llm, train_tokenizer
    from tuna.modeling_tuna import TunaForCausalLM

    w = World(root / "world")
    subprocess.run([sys.executable, "-m", "datastore.synth.cli", "--out", str(w.root), "--seed", "0",
                    "--n-corpus", str(args.n_corpus), "--n-instruct", "48", "--n-eval", str(max(10, args.n_questions // 2)),
                    "--image-size", "64", "--shard-size", "200"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    spec = clip_spec(args.clip, root)
    build(BuildConfig(inputs=w.corpus_shards(), out=str(root / "ds"), clip=spec,
                      reader=ReaderConfig(batch_size=64, num_workers=0), index=IndexConfig(n_eval_queries=20)),
          show_progress=False)
    lines = [turn["value"] for rec in json.loads(w.instruct_json.read_text())
             for turn in rec["conversations"]] + [SYSTEM]
    lines += [json.loads(line)["text"] for line in w.eval_questions("open").read_text().splitlines()]
    tok_dir = root / "tokenizer"
    save_hf_tokenizer(train_tokenizer(lines, "bytelevel", vocab_size=600), tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    heads = max(2, args.llm_hidden // 64)
    save_tiny_llm(root / "llm", vocab_size=len(tokenizer), hidden_size=args.llm_hidden, num_layers=args.llm_layers,
                  num_heads=heads, num_kv_heads=max(1, heads // 2))
    model = TunaForCausalLM.from_components(str(root / "llm"), spec, tokenizer, max_tags=args.max_tags)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return {"data_root": w, "datastore": root / "ds", "model": root / "model"}


class Timers:
    """Exclusive wall time per part: a timer's nested timers' time is charged to them, not to it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []  # per open timer: [start, time spent in nested timers]

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        self._stack.append([time.perf_counter(), 0.0])
        try:
            yield
        finally:
            start, nested = self._stack.pop()
            spent = time.perf_counter() - start
            self.seconds[name] += spent - nested
            if self._stack:
                self._stack[-1][1] += spent


@contextmanager
def instrumented(timers: Timers) -> Iterator[None]:
    """Wrap the measured functions (class attributes) with ``timers`` for the duration of the block."""
    from tuna.modeling_tuna import TunaForCausalLM
    from tuna.tag_encoder import ImageAwareTagEncoder
    from tuna.tag_source import TagSource
    from tuna.vision import VisionTower

    targets = [(TagSource, "__call__", "retrieval"), (TagSource, "prefetch", "retrieval"),
               (VisionTower, "embed_tags", "tag encoding"),
               (ImageAwareTagEncoder, "forward", "tag encoding"), (TunaForCausalLM, "tag_weights", "tag encoding"),
               (VisionTower, "forward", "vision tower"), (TunaForCausalLM, "generate", "generation")]
    originals = [(cls, attr, cls.__dict__[attr]) for cls, attr, _ in targets]

    def wrap(fn: Callable, name: str) -> Callable:
        def timed(*a: Any, **kw: Any) -> Any:
            with timers.part(name):
                return fn(*a, **kw)
        return timed

    for cls, attr, name in targets:
        setattr(cls, attr, wrap(cls.__dict__[attr], name))
    try:
        yield
    finally:
        for cls, attr, fn in originals:
            setattr(cls, attr, fn)


def run_once(paths: dict[str, Path], benches: list[str], per_bench: int, batch_size: int,
             out: Path) -> tuple[dict[str, list[str]], float, int, dict[str, float]]:
    """A fresh model answers ``per_bench`` questions of each benchmark at ``batch_size``.

    Returns:
        predictions per benchmark, wall seconds (answering only), questions answered, exclusive seconds per part.
    """
    from eval.benchmarks import get_benchmark
    from eval.runner import EvalConfig, answer_batch, load_model

    config = EvalConfig(model=str(paths["model"]), benches=benches, data_root=str(paths["data_root"]), out=str(out),
                        datastore=str(paths["datastore"]), batch_size=batch_size)
    model, tokenizer, processor = load_model(config)
    work = []
    for name in benches:
        bench = get_benchmark(name)
        files = bench.resolve(config.data_root)
        work.append((bench, files["images"], bench.load(files)[:per_bench]))
    timers, answers, n = Timers(), {}, 0
    with instrumented(timers):
        start = time.perf_counter()
        for bench, folder, samples in work:
            records = []
            for k in range(0, len(samples), batch_size):
                records += answer_batch(model, tokenizer, processor, bench, samples[k:k + batch_size], folder)
            answers[bench.name] = [r["prediction"] for r in records]
            n += len(records)
        wall = time.perf_counter() - start
    shares = dict(timers.seconds)
    shares["other"] = wall - sum(shares.values())
    return answers, wall, n, shares


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-questions", type=int, default=200, help="questions in all, split evenly over --benches")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated eval batch sizes")
    p.add_argument("--benches", default="synth_open,synth_pope", help="comma-separated synthetic benchmarks")
    p.add_argument("--llm-hidden", type=int, default=256, help="Qwen2 hidden size (heads: hidden/64)")
    p.add_argument("--llm-layers", type=int, default=4, help="Qwen2 decoder layers")
    p.add_argument("--clip", default="tuna-tiny-clip", help="open_clip architecture (random init) of the model "
                   "and the datastore, or 'tuna-narrow-336' (4-layer 256-wide ViT, 576 patches)")
    p.add_argument("--n-corpus", type=int, default=400, help="datastore corpus images")
    p.add_argument("--max-tags", type=int, default=10, help="tags per image")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--md", type=Path, help="also write the markdown table here")
    a = p.parse_args(argv)
    a.batch_sizes = [int(x) for x in a.batch_sizes.split(",") if x.strip()]
    a.benches = [x.strip() for x in a.benches.split(",") if x.strip()]
    for name in ("n_questions", "llm_hidden", "llm_layers", "n_corpus", "max_tags", "threads"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(a, name)}: must be >= 1")
    if not a.batch_sizes or min(a.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes={a.batch_sizes}: need positive integers")
    if not a.benches or any(not b.startswith("synth_") for b in a.benches):
        raise ValueError(f"--benches={a.benches}: allowed synth_open, synth_pope, synth_mc")
    if a.n_questions < len(a.benches):
        raise ValueError(f"--n-questions={a.n_questions}: need at least one per benchmark ({len(a.benches)})")
    return a


def table(results: dict[int, dict[str, Any]], base: int) -> list[str]:
    """Markdown rows: batch size, samples/s, speed-up vs ``base``, seconds and share per part."""
    lines = ["| batch size | questions | wall s | samples/s | speed-up vs bs " + str(base) + " | "
             + " | ".join(PARTS) + " |", "|---" * (5 + len(PARTS)) + "|"]
    for bs, r in results.items():
        cells = [f"{r['shares'].get(p, 0.0):.1f} s ({100 * r['shares'].get(p, 0.0) / r['wall']:.0f}%)"
                 for p in PARTS]
        lines.append(f"| {bs} | {r['n']} | {r['wall']:.1f} | {r['n'] / r['wall']:.2f} | "
                     f"{r['rate'] / results[base]['rate']:.2f} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    t0 = time.perf_counter()
    try:
        paths = build_world(work, args)
        per_bench = args.n_questions // len(args.benches)
        run_once(paths, args.benches, 2, 1, work / "warmup")  # first-call costs (imports, allocator, faiss)
        results: dict[int, dict[str, Any]] = {}
        for bs in args.batch_sizes:
            answers, wall, n, shares = run_once(paths, args.benches, per_bench, bs, work / f"bs{bs}")
            results[bs] = {"answers": answers, "wall": wall, "n": n, "shares": shares, "rate": n / wall}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = results[args.batch_sizes[0]]["answers"]
    identical = all(r["answers"] == first for r in results.values())
    heads = max(2, args.llm_hidden // 64)
    print(f"LLM qwen2 hidden {args.llm_hidden} x {args.llm_layers} layers ({heads} heads); CLIP {args.clip}; "
          f"benches {','.join(args.benches)}; {per_bench} questions each; live datastore retrieval "
          f"({args.n_corpus} images, k=5, max_tags {args.max_tags}); {args.threads} torch threads; "
          f"total {time.perf_counter() - t0:.0f} s")
    lines = table(results, args.batch_sizes[0])
    print("\n".join(lines))
    if len(args.batch_sizes) > 1:
        lo, hi = args.batch_sizes[0], args.batch_sizes[-1]
        print(f"samples/s ratio bs {hi} / bs {lo}: {results[hi]['rate'] / results[lo]['rate']:.2f}")
    print(f"identical answers: {identical}")
    if args.md:
        args.md.write_text("\n".join(lines) + "\n")
    if not identical:
        raise RuntimeError("answers differ between batch sizes " + str(args.batch_sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
