"""TUNA vs no-tags training throughput and ZeRO-2 vs ZeRO-3 peak memory under DeepSpeed, same data, same run.

Builds a synthetic world (datastore + retrieval cache with the 64 px ``tuna-tiny-clip``, a byte-level
tokenizer and a random-init Qwen2 LLM), then launches ``train/train.py`` under the DeepSpeed launcher
(``--nproc`` CPU processes, gloo) for every variant with the same data, seed and steps:

- ``tuna``     ZeRO-2, default ablation (tags from the retrieval cache);
- ``baseline`` ZeRO-2, ``--ablation no_tags`` (plain LLaVA, tags never read);
- ``tuna``     ZeRO-3 (memory comparison);
- ``reference`` ZeRO-2 and ZeRO-3: TUNA with a minimal LLM (hidden 64, 1 layer), so that
  "peak MB - reference" (TUNA rows) estimates the memory that the bigger LLM adds on top of the
  process baseline (Python, torch, DeepSpeed, CLIP, tag encoder, data). Skip with ``--no-reference``.
  The expected fp32 model states per rank (from the logged trainable parameter count) are printed too.

Throughput comes from the trainer's per-step logs (``logging_steps 1``): step time = samples in the step
/ ``samples_per_second``; medians exclude the first ``--warmup`` steps. The TUNA and baseline launches
alternate (ABBA order over ``--repeats``). "per LLM token" divides the step-time ratio by the ratio of
tokens per sample. Peak memory is the largest ``peak_memory_mb`` logged: the max over ranks of the
process's lifetime peak RSS on CPU (model loading included), ``max_memory_allocated`` on CUDA.

    python bench/bench_train.py                                  # Qwen2 256 x 4 layers, tiny CLIP, ~3.5 min
    python bench/bench_train.py --clip tuna-narrow-336 --batch-size 2 --steps 6 --repeats 1 --md out.md
    python bench/bench_train.py --llm-hidden 1024 --llm-layers 8 --steps 5 --repeats 1 --no-reference
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.processes import free_port

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT: Tags:"


@dataclass
class BenchConfig:
    """Sizes of the world, the model and the runs (see ``--help``)."""

    llm_hidden: int = 256
    llm_layers: int = 4
    llm_heads: int = 4
    steps: int = 12
    warmup: int = 2
    batch_size: int = 4
    nproc: int = 2
    n_corpus: int = 400
    image_size: int = 64
    clip: str = "tuna-tiny-clip"
    max_tags: int = 10
    repeats: int = 2
    reference: bool = True

    def __post_init__(self) -> None:
        positive = ("llm_hidden", "llm_layers", "llm_heads", "batch_size", "nproc", "n_corpus", "max_tags", "repeats")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.llm_hidden % self.llm_heads or (self.llm_hidden // self.llm_heads) % 2:
            raise ValueError(f"llm_hidden={self.llm_hidden}: must split into {self.llm_heads} heads of even width")
        if self.warmup < 0 or self.steps < self.warmup + 2:
            raise ValueError(f"steps={self.steps}, warmup={self.warmup}: need steps >= warmup + 2 and warmup >= 0")
        if not 64 <= self.image_size <= 128:
            raise ValueError(f"image_size={self.image_size}: allowed 64..128 (synthetic world)")

    @property
    def n_instruct(self) -> int:
        """Enough instruction images for one epoch of all steps (no epoch restart inside the timing)."""
        return max(48, self.steps * self.batch_size * self.nproc)


def _run(cmd: list[str], env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(REPO))
    if result.returncode != 0:
        raise RuntimeError(f"command failed ({result.returncode}): {' '.join(cmd[:4])} ...\n{result.stderr[-4000:]}")
    return result


def build_world(root: Path, cfg: BenchConfig) -> dict:
    """Synthetic world, datastore, retrieval cache of the instruction images, tokenizer and LLMs.

    Args:
        root: empty work directory.
        cfg: sizes.

    Returns:
        Paths: images, data (instruct.json), cache, tokenizer, llm (the measured size), ref_llm (minimal).
    """
    from transformers import AutoTokenizer

    from datastore.build import BuildConfig, build
    from datastore.cache import CacheConfig, build_cache
    from datastore.clip import ClipSpec
    from datastore.index import IndexConfig
    from datastore.reader import ReaderConfig
    from datastore.synth.layout import World
    from pipeline.tiny import save_hf_tokenizer, save_tiny_llm, train_tokenizer

    w = World(root / "world")
    _run([sys.executable, "-m", "datastore.synth.cli", "--out", str(w.root), "--seed", "0", "--n-corpus", str(cfg.n_corpus),
          "--n-instruct", str(cfg.n_instruct), "--n-eval", "10", "--image-size", str(cfg.image_size),
          "--shard-size", "200"])
    build(BuildConfig(inputs=w.corpus_shards(), out=str(root / "ds"),
                      clip=ClipSpec(model="tuna-tiny-clip"), reader=ReaderConfig(batch_size=64, num_workers=0),
                      index=IndexConfig(n_eval_queries=20)), show_progress=False)
    data = w.instruct_json
    build_cache(CacheConfig(datastore=str(root / "ds"), out=str(root / "cache.parquet"), llava_json=[str(data)],
                            image_folder=str(w.images), k_images=5, num_workers=0), show_progress=False)
    lines = [turn["value"] for rec in json.loads(data.read_text()) for turn in rec["conversations"]] + [SYSTEM]
    tok_dir = root / "tokenizer"
    save_hf_tokenizer(train_tokenizer(lines, "bytelevel", vocab_size=600), tok_dir)
    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    save_tiny_llm(root / "llm", vocab_size=vocab, hidden_size=cfg.llm_hidden, num_layers=cfg.llm_layers,
                  num_heads=cfg.llm_heads, num_kv_heads=max(1, cfg.llm_heads // 2))
    save_tiny_llm(root / "ref_llm", vocab_size=vocab, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    return {"images": w.images, "data": data, "cache": root / "cache.parquet", "tokenizer": tok_dir,
            "llm": root / "llm", "ref_llm": root / "ref_llm"}


def train_argv(world: dict, cfg: BenchConfig, out: Path, ablation: str, llm: str) -> list[str]:
    """train/train.py arguments of one measured run."""
    args = {
        "model_name_or_path": world[llm], "tokenizer_name_or_path": world["tokenizer"],
        "clip_pretrained": "none", "data_path": world["data"], "image_folder": world["images"],
        "retrieval_cache": world["cache"], "ablation": ablation, "max_tags": cfg.max_tags, "output_dir": out,
        "per_device_train_batch_size": cfg.batch_size, "max_steps": cfg.steps, "learning_rate": 1e-4,
        "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "use_cpu": "true", "seed": 0, "dataloader_num_workers": 0, "template": "vicuna_v1", "disable_tqdm": "true",
    }
    args["clip_model"] = cfg.clip
    return [item for key, value in args.items() for item in (f"--{key}", str(value))]


def launch(argv: list[str], zero: int, nproc: int) -> tuple[float, int]:
    """Run train/train.py under the deepspeed launcher with ds_configs/zero{zero}.json.

    Returns:
        Wall seconds of the launch and the trainable parameter count that train.py logs (0 if not found).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc), "--master_port",
           str(free_port()), str(REPO / "train" / "train.py"), "--deepspeed",
           str(REPO / "ds_configs" / f"zero{zero}.json"), *argv]
    start = time.perf_counter()
    result = _run(cmd, env=env)
    found = re.search(r"(\d+) trainable parameters", result.stdout + result.stderr)
    return time.perf_counter() - start, int(found.group(1)) if found else 0


def step_stats(out: Path, warmup: int, samples_per_step: int) -> dict:
    """Per-step throughput (after ``warmup`` steps) and the final peak memory from OUT/trainer_state.json."""
    logs = [e for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    if any(e["skipped_samples"] for e in logs):
        raise RuntimeError(f"{out}: samples were skipped; per-step sample counts would be wrong")
    timed = logs[warmup:]
    step_s = [samples_per_step / e["samples_per_second"] for e in timed]
    tokens = [e["tokens_per_second"] * s for e, s in zip(timed, step_s)]
    return {"step_s": step_s, "tokens": tokens, "peak_mb": max(e["peak_memory_mb"] for e in logs)}


def summarize(runs: list[dict], samples_per_step: int) -> dict:
    """Pool the timed steps of one variant's runs: medians, tokens/sample, peak MB (max over runs)."""
    step_s = [s for r in runs for s in r["step_s"]]
    tokens = [t for r in runs for t in r["tokens"]]
    median = statistics.median(step_s)
    return {"step_ms": 1000 * median, "samples_s": samples_per_step / median,
            "tokens_s": statistics.median(t / s for t, s in zip(tokens, step_s)),
            "tokens_sample": sum(tokens) / (samples_per_step * len(tokens)),
            "peak_mb": max(r["peak_mb"] for r in runs), "n_steps": len(step_s)}


def plan(cfg: BenchConfig) -> list[tuple[str, int, str, str]]:
    """(variant, ZeRO stage, ablation, llm) launches in order: TUNA/baseline alternate (ABBA), then memory runs."""
    pair = [("tuna", 2, "none", "llm"), ("baseline", 2, "no_tags", "llm")]
    runs = [job for i in range(cfg.repeats) for job in (pair if i % 2 == 0 else pair[::-1])]
    runs.append(("tuna", 3, "none", "llm"))
    if cfg.reference:
        runs += [("reference", 2, "none", "ref_llm"), ("reference", 3, "none", "ref_llm")]
    return runs


def table(results: dict, cfg: BenchConfig) -> list[str]:
    """Markdown table rows (header first)."""
    base = results[("baseline", 2)]["step_ms"]
    header = ["variant", "ZeRO stage", "tokens/sample", "samples/s", "tokens/s", "step ms median",
              "ratio vs baseline ZeRO-2", "peak MB per rank"]
    if cfg.reference:
        header.append("peak MB - reference")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (variant, zero), r in results.items():
        cells = [variant, str(zero), f"{r['tokens_sample']:.1f}", f"{r['samples_s']:.2f}", f"{r['tokens_s']:.0f}",
                 f"{r['step_ms']:.0f}", f"{r['step_ms'] / base:.3f}", f"{r['peak_mb']:.0f}"]
        if cfg.reference:
            ref = results.get(("reference", zero))
            # the reference is a TUNA run: the baseline does not even open the retrieval cache
            cells.append("-" if variant != "tuna" or ref is None else f"{r['peak_mb'] - ref['peak_mb']:+.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-hidden", type=int, default=d.llm_hidden, help="LLM hidden size (MLP is 2x)")
    p.add_argument("--llm-layers", type=int, default=d.llm_layers, help="LLM decoder layers")
    p.add_argument("--llm-heads", type=int, default=d.llm_heads, help="attention heads (KV heads: half)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per launch")
    p.add_argument("--warmup", type=int, default=d.warmup, help="first steps left out of the medians")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per rank per step")
    p.add_argument("--nproc", type=int, default=d.nproc, help="DeepSpeed processes (ranks)")
    p.add_argument("--n-corpus", type=int, default=d.n_corpus, help="datastore corpus images")
    p.add_argument("--image-size", type=int, default=d.image_size, help="synthetic image side, 64-128 px")
    p.add_argument("--clip", default=d.clip, help="open_clip architecture of the trained model (random init), or "
                   "'tuna-narrow-336' (a 4-layer, 256-wide ViT with LLaVA-1.5's 576 patches); the datastore and "
                   "retrieval cache always use tuna-tiny-clip (16 patches at 64 px)")
    p.add_argument("--max-tags", type=int, default=d.max_tags, help="tags read per image")
    p.add_argument("--repeats", type=int, default=d.repeats, help="TUNA/baseline launch pairs (ABBA order)")
    p.add_argument("--no-reference", action="store_true", help="skip the minimal-LLM memory reference runs")
    p.add_argument("--md", type=Path, help="also write the markdown table here")
    p.add_argument("--keep", type=Path, help="keep the world and run outputs in this (new) directory")
    a = p.parse_args(argv)
    cfg = BenchConfig(llm_hidden=a.llm_hidden, llm_layers=a.llm_layers, llm_heads=a.llm_heads, steps=a.steps,
                      warmup=a.warmup, batch_size=a.batch_size, nproc=a.nproc, n_corpus=a.n_corpus,
                      image_size=a.image_size, clip=a.clip, max_tags=a.max_tags, repeats=a.repeats,
                      reference=not a.no_reference)
    return cfg, a


def run_all(world: dict, cfg: BenchConfig, work: Path) -> tuple[dict, dict]:
    """Every launch of :func:`plan`; returns per-variant step stats and trainable parameters per LLM."""
    raw: dict[tuple[str, int], list[dict]] = {}
    params: dict[str, int] = {}
    for i, (variant, zero, ablation, llm) in enumerate(plan(cfg)):
        out = work / f"run{i}_{variant}_zero{zero}"
        seconds, trainable = launch(train_argv(world, cfg, out, ablation, llm), zero, cfg.nproc)
        if zero == 2 and ablation == "none":  # ZeRO-3 partitions weights at load: numel() no longer counts them
            params[llm] = trainable
        raw.setdefault((variant, zero), []).append(step_stats(out, cfg.warmup, cfg.batch_size * cfg.nproc))
        print(f"  {variant:9s} ZeRO-{zero}: launch {seconds:.0f} s", flush=True)
    return raw, params


def model_state_mb(params: int, nproc: int) -> tuple[float, float]:
    """Expected fp32 model states per rank (weights, fp32 master copy, grads, Adam m+v) under ZeRO-2 and ZeRO-3."""
    mb = 4 * params / 2**20
    return mb + 4 * mb / nproc, 5 * mb / nproc


def main(argv: list[str] | None = None) -> int:
    cfg, a = parse_args(argv)
    work = a.keep or Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        world = build_world(work, cfg)
        print(f"world built in {time.perf_counter() - start:.0f} s", flush=True)
        raw, params = run_all(world, cfg, work)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    results = {key: summarize(runs, cfg.batch_size * cfg.nproc) for key, runs in raw.items()}
    tuna, base = results[("tuna", 2)], results[("baseline", 2)]
    ratio = tuna["step_ms"] / base["step_ms"]
    per_token = ratio * base["tokens_sample"] / tuna["tokens_sample"]
    heading = (f"LLM qwen2 hidden {cfg.llm_hidden} x {cfg.llm_layers} layers; CLIP {cfg.clip}; {cfg.nproc} ranks x "
               f"batch {cfg.batch_size}; max_tags {cfg.max_tags}; {cfg.steps} steps per launch, medians over steps "
               f"{cfg.warmup + 1}..{cfg.steps} of {cfg.repeats} launch(es) per TUNA/baseline; total "
               f"{time.perf_counter() - start:.0f} s")
    notes = []
    for llm, count in params.items():
        z2, z3 = model_state_mb(count, cfg.nproc)
        name = "reference LLM" if llm == "ref_llm" else "measured LLM"
        notes.append(f"{name}: {count:,} trainable parameters; expected fp32 model states per rank "
                     f"(weights + master copy + grads + Adam m, v): ZeRO-2 {z2:.1f} MB, ZeRO-3 {z3:.1f} MB")
    verdict = (f"step-time ratio TUNA / baseline (ZeRO-2, median): {ratio:.3f}  "
               f"(goal <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'}); per LLM token: {per_token:.3f}")
    rows = table(results, cfg)
    print(heading, *notes, *rows, verdict, sep="\n")
    if a.md:
        a.md.write_text("\n".join([heading, *notes, "", *rows, "", f"`{verdict}`", ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
