"""TUNA vs no-tags training throughput, MFU and ZeRO-2 vs ZeRO-3 peak memory under DeepSpeed, same data, same run.

Builds a synthetic world (datastore + retrieval cache with the 64 px ``tuna-tiny-clip``, a byte-level
tokenizer and the config of a random-init LLM: ``train/train.py --llm_random_init`` builds its weights in
the training process, on the GPU when there is one, so a 7B shape is never written to disk nor held by
this process), then launches ``train/train.py`` under the DeepSpeed launcher (``--nproc`` processes: gloo
on CPU, NCCL on CUDA) for every variant with the same data, seed and steps:

- ``tuna``     ZeRO-2, default ablation (tags from the retrieval cache);
- ``baseline`` ZeRO-2, ``--ablation no_tags`` (plain LLaVA, tags never read);
- ``tuna``     ZeRO-3 (memory comparison);
- ``reference`` ZeRO-2 and ZeRO-3: TUNA with a minimal LLM (hidden 64, 1 layer), so that
  "peak MB - reference" (TUNA rows) estimates the memory that the bigger LLM adds on top of the
  process baseline (Python, torch, DeepSpeed, CLIP, tag encoder, data). Skip with ``--no-reference``.
  The expected fp32 model states per rank (from the logged trainable parameter count) are printed too.

``--variants`` and ``--zero`` narrow the plan (e.g. ``--variants tuna --zero 2,3``: one launch per stage).

Throughput comes from the trainer's per-step logs (``logging_steps 1``): step time = samples in the step
/ ``samples_per_second``, the wall time between two step logs, so it includes the data, forward, backward
and the optimizer step; medians exclude the first ``--warmup`` steps. The TUNA and baseline launches
alternate (ABBA order over ``--repeats``). "per LLM token" divides the step-time ratio by the ratio of
tokens per sample. Peak memory is the largest ``peak_memory_mb`` logged: the max over ranks of the
process's lifetime peak RSS on CPU (model loading included), ``torch.cuda.max_memory_allocated`` on CUDA.

MFU (model FLOPs utilisation, CUDA only) = model FLOPs per step / (step seconds x ranks x peak FLOP/s of one
device, ``--peak-tflops``, by default read off the device name: H100/H200 989 bf16 dense). Model FLOPs per
sample (:func:`step_flops`), with T LLM positions per sample (text + patch tokens + tag block, the trainer's
token count), P vision tokens per image, N parameters of each part (matmul weights; embedding tables
excluded), L layers and d width:

- LLM, trainable (``--stage finetune``): 6 N T (forward 2, backward 4: activation and weight gradients);
- LLM, frozen (``--stage pretrain``, LLaVA's stage 1): 4 N T. It is on the backward path (the trainable
  connector feeds it) so activation gradients are computed (2 N T), but frozen weights need no weight
  gradients;
- LLM attention (scores and weighted sum, no parameters): 12 L d T^2 (forward 4, backward 8; the causal
  mask is not discounted, as in PaLM's MFU);
- CLIP vision tower, frozen and before every trainable part: forward only, 2 N_vit P + 4 L_v d_v P^2;
- connector (and tag encoder), trainable: 6 N P.

The optimizer's own arithmetic is not counted as model FLOPs but its time is in the step (that is what
"MFU including the optimizer step" means here).

    python bench/bench_train.py                                  # Qwen2 256 x 4 layers, tiny CLIP, CPU, ~3.5 min
    python bench/bench_train.py --clip tuna-narrow-336 --batch-size 2 --steps 6 --repeats 1 --md out.md
    python bench/bench_train.py --llm-hidden 1024 --llm-layers 8 --steps 5 --repeats 1 --no-reference
    python bench/bench_train.py --device cuda --dtype bf16 --llm-shape llama-7b --clip ViT-L-14-336 \
        --stage pretrain --variants tuna --zero 2,3 --batch-size 4 --steps 8 --warmup 3 --repeats 1 \
        --no-reference --json out.json
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


# --llm-shape presets: (model type, hidden, layers, heads, KV heads, MLP width)
LLM_SHAPES = {"llama-7b": ("llama", 4096, 32, 32, 32, 11008), "llama-13b": ("llama", 5120, 40, 40, 40, 13824)}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0}  # bf16/fp16 dense
DTYPES = ("fp32", "bf16", "fp16")
STAGES = ("finetune", "pretrain")


@dataclass
class BenchConfig:
    """Sizes of the world, the model and the runs (see ``--help``)."""

    llm_hidden: int = 256
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 0  # 0: half the heads
    llm_intermediate: int = 0  # 0: twice the hidden size
    llm_type: str = "qwen2"
    device: str = "cpu"
    dtype: str = "fp32"
    stage: str = "finetune"
    variants: tuple[str, ...] = ("tuna", "baseline")
    zero: tuple[int, ...] = (2, 3)
    peak_tflops: float = 0.0  # 0: from the device name
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
        if self.dtype not in DTYPES or self.stage not in STAGES:
            raise ValueError(f"dtype={self.dtype!r}, stage={self.stage!r}: expected one of {DTYPES} and {STAGES}")
        if self.device == "cpu" and self.dtype != "fp32":
            raise ValueError(f"dtype={self.dtype}: CPU runs train in fp32")
        if not set(self.variants) <= {"tuna", "baseline"} or not self.variants:
            raise ValueError(f"variants={self.variants}: choose from tuna, baseline")
        if not set(self.zero) <= {2, 3} or not self.zero:
            raise ValueError(f"zero={self.zero}: choose from 2, 3")
        if self.llm_heads % self.kv_heads:
            raise ValueError(f"llm_kv_heads={self.kv_heads} must divide llm_heads={self.llm_heads}")

    @property
    def kv_heads(self) -> int:
        return self.llm_kv_heads or max(1, self.llm_heads // 2)

    @property
    def intermediate(self) -> int:
        return self.llm_intermediate or 2 * self.llm_hidden

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
    from pipeline.tiny import save_hf_tokenizer, tiny_llm_config, train_tokenizer

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
    # configs only: train.py --llm_random_init builds the weights (a 7B shape never exists in this process)
    tiny_llm_config(vocab, cfg.llm_type, cfg.llm_hidden, cfg.llm_layers, cfg.llm_heads, cfg.kv_heads,
                    cfg.intermediate).save_pretrained(root / "llm")
    tiny_llm_config(vocab, cfg.llm_type, 64, 1, 2, 1).save_pretrained(root / "ref_llm")
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
        "seed": 0, "dataloader_num_workers": 0, "template": "vicuna_v1", "disable_tqdm": "true",
        "llm_random_init": "true", "stage": cfg.stage, "clip_precision": cfg.dtype,
    }
    if cfg.device == "cpu":
        args["use_cpu"] = "true"
    elif cfg.dtype != "fp32":
        args[cfg.dtype] = "true"
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
    """(variant, ZeRO stage, ablation, llm) launches in order: TUNA/baseline alternate (ABBA) at the first ZeRO
    stage of ``cfg.zero``, then TUNA at the other stage, then the memory references."""
    ablations = {"tuna": "none", "baseline": "no_tags"}
    first = cfg.zero[0]
    pair = [(v, first, ablations[v], "llm") for v in ("tuna", "baseline") if v in cfg.variants]
    runs = [job for i in range(cfg.repeats) for job in (pair if i % 2 == 0 else pair[::-1])]
    runs += [("tuna", zero, "none", "llm") for zero in cfg.zero[1:]]
    if cfg.reference:
        runs += [("reference", zero, "none", "ref_llm") for zero in cfg.zero]
    return runs


# ------------------------------------------------------------------------------------------ FLOPs and MFU
@dataclass
class FlopShape:
    """What :func:`step_flops` needs of the model (parameter counts exclude embedding tables)."""

    llm_params: int
    llm_layers: int
    llm_hidden: int
    vit_params: int = 0
    vit_layers: int = 0
    vit_width: int = 0
    vit_tokens: int = 0  # per image, class token included
    trainable_side_params: int = 0  # connector + tag encoder


def step_flops(shape: FlopShape, llm_tokens_per_sample: float, samples: int, llm_trainable: bool) -> float:
    """Model FLOPs of one optimizer step over ``samples`` samples (one image each); see the module docstring.

    Frozen parameters on the backward path cost 4 FLOPs per parameter and token (forward 2 + activation
    gradients 2): they need no weight gradients. Trainable ones cost 6. The frozen vision tower sits before
    every trainable part, so it runs forward only (2).
    """
    t = llm_tokens_per_sample
    llm = (6 if llm_trainable else 4) * shape.llm_params * t + 12 * shape.llm_layers * shape.llm_hidden * t * t
    p = shape.vit_tokens
    vit = 2 * shape.vit_params * p + 4 * shape.vit_layers * shape.vit_width * p * p
    side = 6 * shape.trainable_side_params * max(p - 1, 0)
    return samples * (llm + vit + side)


def llm_matmul_params(cfg: BenchConfig) -> int:
    """The LLM's parameters minus its input embedding table, counted on the meta device (nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.tiny import tiny_llm_config

    config = tiny_llm_config(1000, cfg.llm_type, cfg.llm_hidden, cfg.llm_layers, cfg.llm_heads, cfg.kv_heads,
                             cfg.intermediate)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def vit_shape(clip: str) -> tuple[int, int, int, int] | None:
    """(parameters, layers, width, tokens per image) of an open_clip ViT tower from its config, or None
    (not a ViT: convolutional towers are left out of the FLOP count)."""
    import open_clip

    from datastore.clip import register_builtin_configs

    register_builtin_configs()
    vision = (open_clip.get_model_config(clip) or {}).get("vision_cfg", {})
    if "timm_model_name" in vision or "layers" not in vision or not isinstance(vision["layers"], int):
        return None
    width, layers, patch = vision["width"], vision["layers"], vision["patch_size"]
    size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
    ratio = vision.get("mlp_ratio", 4.0)
    params = layers * (4 + 2 * ratio) * width * width + 3 * patch * patch * width
    return int(params), layers, width, (size // patch) ** 2 + 1


def peak_tflops(cfg: BenchConfig, device_name: str | None = None) -> float | None:
    """Peak dense TFLOP/s of one device: ``cfg.peak_tflops``, else the bf16/fp16 peak of a known GPU
    (``device_name``, default: this machine's GPU); None on CPU, in fp32, or for an unknown GPU."""
    if cfg.peak_tflops:
        return cfg.peak_tflops
    if cfg.device == "cpu" or cfg.dtype == "fp32":
        return None
    if device_name is None:
        import torch

        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def add_mfu(results: dict, cfg: BenchConfig, trainable: dict[str, int]) -> float | None:
    """Add "tflops" (achieved per device) and "mfu" to each measured (non-reference) result; returns the peak."""
    peak = peak_tflops(cfg)
    vit = vit_shape(cfg.clip)
    shape = FlopShape(llm_matmul_params(cfg), cfg.llm_layers, cfg.llm_hidden)
    if vit:
        shape.vit_params, shape.vit_layers, shape.vit_width, shape.vit_tokens = vit
    llm_trainable = cfg.stage == "finetune"
    if llm_trainable:  # the logged count is LLM + connector + tag encoder (ZeRO-2 launches)
        shape.trainable_side_params = max(trainable.get("llm", 0) - shape.llm_params, 0)
    else:
        shape.trainable_side_params = trainable.get("llm", 0)
    for (variant, _), r in results.items():
        if variant == "reference":
            continue
        flops = step_flops(shape, r["tokens_sample"], cfg.batch_size, llm_trainable)  # per rank
        r["tflops"] = flops / (r["step_ms"] / 1000) / 1e12
        r["mfu"] = r["tflops"] / peak if peak else None
    return peak


def table(results: dict, cfg: BenchConfig) -> list[str]:
    """Markdown table rows (header first)."""
    base = results.get(("baseline", cfg.zero[0]), {}).get("step_ms")
    header = ["variant", "ZeRO stage", "tokens/sample", "samples/s", "tokens/s", "step ms median"]
    header += [f"ratio vs baseline ZeRO-{cfg.zero[0]}"] if base else []
    header += ["TFLOP/s per device", "MFU", "peak MB per rank"]
    if cfg.reference:
        header.append("peak MB - reference")
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (variant, zero), r in results.items():
        cells = [variant, str(zero), f"{r['tokens_sample']:.1f}", f"{r['samples_s']:.2f}", f"{r['tokens_s']:.0f}",
                 f"{r['step_ms']:.0f}"]
        cells += [f"{r['step_ms'] / base:.3f}"] if base else []
        cells += [f"{r['tflops']:.3g}" if r.get("tflops") is not None else "-",
                  f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-", f"{r['peak_mb']:.0f}"]
        if cfg.reference:
            ref = results.get(("reference", zero))
            # the reference is a TUNA run: the baseline does not even open the retrieval cache
            cells.append("-" if variant != "tuna" or ref is None else f"{r['peak_mb'] - ref['peak_mb']:+.0f}")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x for x in text.split(",") if x)


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, argparse.Namespace]:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-hidden", type=int, default=d.llm_hidden, help="LLM hidden size")
    p.add_argument("--llm-layers", type=int, default=d.llm_layers, help="LLM decoder layers")
    p.add_argument("--llm-heads", type=int, default=d.llm_heads, help="attention heads")
    p.add_argument("--llm-kv-heads", type=int, default=0, help="KV heads (0: half the heads)")
    p.add_argument("--llm-intermediate", type=int, default=0, help="MLP width (0: twice the hidden size)")
    p.add_argument("--llm-type", default=d.llm_type, help="transformers model type: qwen2, llama, mistral ...")
    p.add_argument("--llm-shape", choices=sorted(LLM_SHAPES),
                   help="preset LLM shape (type, hidden, layers, heads, KV heads, MLP), e.g. llama-7b; "
                        "overrides the --llm-* sizes")
    p.add_argument("--device", default=d.device, choices=["cpu", "cuda"], help="cpu (gloo) or cuda (NCCL)")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="training precision (CUDA: bf16 or fp16)")
    p.add_argument("--stage", default=d.stage, choices=STAGES,
                   help="finetune: LLM trainable; pretrain: LLM frozen, connector + tag encoder train (LLaVA stage 1)")
    p.add_argument("--variants", default=",".join(d.variants), help="comma-separated: tuna, baseline")
    p.add_argument("--zero", default=",".join(map(str, d.zero)),
                   help="ZeRO stages, comma-separated; TUNA/baseline alternate at the first")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak dense TFLOP/s of one device for the MFU (0: from the device name)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per launch")
    p.add_argument("--warmup", type=int, default=d.warmup, help="first steps left out of the medians")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per rank per step")
    p.add_argument("--nproc", type=int, help="DeepSpeed processes (ranks); default 2 on CPU, 1 on CUDA")
    p.add_argument("--n-corpus", type=int, default=d.n_corpus, help="datastore corpus images")
    p.add_argument("--image-size", type=int, default=d.image_size, help="synthetic image side, 64-128 px")
    p.add_argument("--clip", default=d.clip, help="open_clip architecture of the trained model (random init), or "
                   "'tuna-narrow-336' (a 4-layer, 256-wide ViT with LLaVA-1.5's 576 patches); the datastore and "
                   "retrieval cache always use tuna-tiny-clip (16 patches at 64 px)")
    p.add_argument("--max-tags", type=int, default=d.max_tags, help="tags read per image")
    p.add_argument("--repeats", type=int, default=d.repeats, help="TUNA/baseline launch pairs (ABBA order)")
    p.add_argument("--no-reference", action="store_true", help="skip the minimal-LLM memory reference runs")
    p.add_argument("--md", type=Path, help="also write the markdown table here")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--keep", type=Path, help="keep the world and run outputs in this (new) directory")
    a = p.parse_args(argv)
    llm_type, hidden, layers, heads, kv, mlp = LLM_SHAPES[a.llm_shape] if a.llm_shape else (
        a.llm_type, a.llm_hidden, a.llm_layers, a.llm_heads, a.llm_kv_heads, a.llm_intermediate)
    cfg = BenchConfig(llm_hidden=hidden, llm_layers=layers, llm_heads=heads, llm_kv_heads=kv, llm_intermediate=mlp,
                      llm_type=llm_type, device=a.device, dtype=a.dtype, stage=a.stage, variants=_names(a.variants),
                      zero=_ints(a.zero), peak_tflops=a.peak_tflops, steps=a.steps, warmup=a.warmup,
                      batch_size=a.batch_size, nproc=a.nproc or (1 if a.device == "cuda" else 2),
                      n_corpus=a.n_corpus, image_size=a.image_size, clip=a.clip, max_tags=a.max_tags,
                      repeats=a.repeats, reference=not a.no_reference)
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
    peak = add_mfu(results, cfg, params)
    heading = (f"LLM {cfg.llm_type} hidden {cfg.llm_hidden} x {cfg.llm_layers} layers (MLP {cfg.intermediate}, "
               f"{cfg.llm_heads}/{cfg.kv_heads} heads), stage {cfg.stage}; CLIP {cfg.clip}; {cfg.device} {cfg.dtype}; "
               f"{cfg.nproc} ranks x batch {cfg.batch_size}; max_tags {cfg.max_tags}; {cfg.steps} steps per launch, "
               f"medians over steps {cfg.warmup + 1}..{cfg.steps} of {cfg.repeats} launch(es) per TUNA/baseline; "
               f"total {time.perf_counter() - start:.0f} s")
    notes = []
    for llm, count in params.items():
        z2, z3 = model_state_mb(count, cfg.nproc)
        name = "reference LLM" if llm == "ref_llm" else "measured LLM"
        notes.append(f"{name}: {count:,} trainable parameters; expected fp32 model states per rank "
                     f"(weights + master copy + grads + Adam m, v): ZeRO-2 {z2:.1f} MB, ZeRO-3 {z3:.1f} MB")
    if peak:
        notes.append(f"MFU against {peak:.0f} TFLOP/s per device ({cfg.dtype} dense peak); FLOPs per "
                     f"bench/bench_train.py's docstring (LLM {'trainable: 6' if cfg.stage == 'finetune' else 'frozen: 4'}"
                     " x N x tokens)")
    verdict = None
    tuna, base = results.get(("tuna", cfg.zero[0])), results.get(("baseline", cfg.zero[0]))
    if tuna and base:
        ratio = tuna["step_ms"] / base["step_ms"]
        per_token = ratio * base["tokens_sample"] / tuna["tokens_sample"]
        verdict = (f"step-time ratio TUNA / baseline (ZeRO-{cfg.zero[0]}, median): {ratio:.3f}  "
                   f"(goal <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'}); per LLM token: {per_token:.3f}")
    rows = table(results, cfg)
    print(heading, *notes, *rows, *([verdict] if verdict else []), sep="\n")
    if a.md:
        a.md.write_text("\n".join([heading, *notes, "", *rows, "", *([f"`{verdict}`", ""] if verdict else [])]))
    if a.json:
        a.json.write_text(json.dumps({
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()},
            "peak_tflops": peak, "trainable_params": params, "verdict": verdict,
            "results": [{"variant": v, "zero": z, **r} for (v, z), r in results.items()]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
