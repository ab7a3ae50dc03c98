"""Training-step time and saved-activation memory of TUNA vs the no-tags (plain LLaVA) baseline, same run.

One TunaForCausalLM instance (random-init LLM built locally, random-init open_clip tower, nothing
downloaded) and one batch. Each variant is selected by switching ``config.ablation`` /
``config.weight_mode`` on that same instance; every round runs one step of each variant (rotating
order) so machine drift and other processes' load hit all variants alike. A step is forward +
backward (loss.backward()); the optimizer step is excluded. It includes the frozen CLIP forward, the
same for every variant, which is also timed alone so it can be subtracted ("excl. CLIP").
Variants:
  baseline      ablation "no_tags": patches + text only (plain LLaVA)
  len-matched   baseline with filler words in the question so each sample's length equals TUNA's: the
                cost of the extra tokens alone (only with --breakdown)
  tuna-scale    tags, weight_mode "scale" (weights multiply tag embeddings)
  tuna-bias     tags, weight_mode "scale_and_bias" (also adds log w to attention logits: 4D float mask)
Ratios against the baseline: "paired median" = median over rounds of step / baseline step of the same
round (the goal: tuna(--weight-mode) <= 1.15); "min" = ratio of the fastest steps (robust to load
from other processes). Activation memory is the bytes of the distinct tensor storages autograd saves
for backward (parameters excluded), via ``torch.autograd.graph.saved_tensors_hooks``; on CUDA also the
allocator's peak above the weights. Tag text embeddings are cached per tag string by the vision tower,
so after warm-up the CLIP text encoder is not in the step (as in a long run over a bounded tag vocabulary).
On CPU the default clock is this process's CPU time with one torch thread, so other jobs on a shared
machine do not inflate the steps (wall time there varied 2-3x between identical steps).

    python bench/bench_model_step.py                     # narrow ViT, LLaVA-1.5's 576 patches; Qwen2 512 x 4; batch 4
    python bench/bench_model_step.py --clip ViT-B-16     # 196 patches per image
    python bench/bench_model_step.py --weight-mode scale --no-breakdown
    python bench/bench_model_step.py --clip ViT-L-14 --llm-hidden 1024 --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from common.log import setup_logging

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "wooden", "small", "large", "striped"]
NOUNS = ["cat", "dog", "table", "car", "tree", "house", "person", "cup", "bicycle", "window", "street",
         "chair", "laptop", "bird", "boat", "flower", "kitchen", "horse", "sign", "bottle"]
VERBS = ["sits on", "stands near", "looks at", "is next to", "is under", "holds", "leans against"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
VOCAB_SIZE = 1000  # asked for; the synthetic lexicon yields ~500 (LM head ~3% of the LLM's FLOPs, ~2% in a 7B)
TUNA_NAMES = {"scale": "tuna-scale", "scale_and_bias": "tuna-bias", "bias": "tuna-biasonly"}
FILLER = " the"  # one token per repetition (checked): pads the length-matched baseline


@dataclass
class Variant:
    """One measured configuration of the shared model instance."""

    name: str
    ablation: str
    weight_mode: str
    batch: dict[str, Any]


def sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(COLOURS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"the {rng.choice(COLOURS)} {rng.choice(NOUNS)}.")


def corpus(n_lines: int, seed: int) -> list[str]:
    """Synthetic English lines (questions, answers, tags) to train the tokenizer on."""
    rng = random.Random(seed)
    lines = ["A chat between a curious user and an artificial intelligence assistant. The assistant gives "
             "helpful, detailed, and polite answers to the user's questions."]
    for _ in range(n_lines):
        lines.append(f"USER: What is the {rng.choice(NOUNS)} doing? ASSISTANT: {sentence(rng)} {sentence(rng)}")
        lines.append(" Tags: " + ", ".join(f"{rng.choice(COLOURS)} {rng.choice(NOUNS)}" for _ in range(5)) + ".")
    return lines


def make_samples(batch_size: int, n_tags: int, answer_words: int, image_size: list[int], seed: int
                 ) -> tuple[list[list[dict]], list[list[Any]], list[list[list[str]]]]:
    """Per sample: a one-round conversation, one random image and ``n_tags`` distinct tags.

    Answers vary by +-25% around ``answer_words`` so the batch is padded, as real batches are (an
    unpadded batch lets the baseline use SDPA's mask-free causal path, which TUNA's bias mask cannot).
    """
    import numpy as np
    from PIL import Image

    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    convs, images, tags = [], [], []
    for _ in range(batch_size):
        n_words = rng.randint(answer_words - answer_words // 4, answer_words + answer_words // 4)
        answer = []
        while len(" ".join(answer).split()) < n_words:
            answer.append(sentence(rng))
        question = f"What is the {rng.choice(NOUNS)} near the {rng.choice(NOUNS)} doing in this picture?"
        convs.append([{"from": "human", "value": question},
                      {"from": "gpt", "value": " ".join(" ".join(answer).split()[:n_words])}])
        pixels = np_rng.integers(0, 255, (image_size[0], image_size[1], 3), dtype=np.uint8)
        images.append([Image.fromarray(pixels)])
        pool = [f"{c} {n}" for c in COLOURS for n in NOUNS] + NOUNS
        tags.append([rng.sample(pool, n_tags)])
    return convs, images, tags


def build_model(args: argparse.Namespace, work: Path) -> tuple[Any, Any]:
    """Tokenizer + random-init LLM saved under ``work``, wrapped as a TunaForCausalLM in train mode."""
    from transformers import AutoTokenizer

    from datastore.clip import ClipSpec
    from pipeline.tiny import save_hf_tokenizer, save_tiny_llm, train_tokenizer
    from tuna.modeling_tuna import TunaForCausalLM

    tok_dir = save_hf_tokenizer(train_tokenizer(corpus(2000, args.seed), "bytelevel", VOCAB_SIZE),
                                work / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    heads = max(1, args.llm_hidden // 64)
    llm_dir = save_tiny_llm(work / "llm", vocab_size=len(tokenizer), model_type=args.llm_type,
                            hidden_size=args.llm_hidden, num_layers=args.llm_layers, num_heads=heads,
                            num_kv_heads=max(1, heads // 4), seed=args.seed)
    precision = PRECISIONS[args.dtype]
    clip = ClipSpec(model=args.clip, device=args.device, precision=precision)
    torch.manual_seed(args.seed)
    model = TunaForCausalLM.from_components(str(llm_dir), clip, tokenizer, dtype=DTYPES[args.dtype],
                                            template="vicuna_v1", max_tags=args.n_tags,
                                            weight_mode=args.weight_mode)
    model.to(args.device).train()
    model.set_llm_trainable(args.stage == 2)
    return model, tokenizer


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_variants(model: Any, tokenizer: Any, args: argparse.Namespace) -> list[Variant]:
    """The baseline / TUNA variants over one set of images, questions and tags."""
    from tuna.processing_tuna import TunaProcessor

    proc = TunaProcessor.from_model(model, tokenizer)
    size = model.vision.clip.identity["image_size"]
    convs, images, tags = make_samples(args.batch_size, args.n_tags, args.answer_words, size, args.seed)
    batch = to_device(proc(convs, images=images, tags=tags, padding_side="right"), args.device)
    modes = [args.weight_mode]
    if args.breakdown:
        modes = list(dict.fromkeys(["scale", "scale_and_bias", args.weight_mode]))
    variants = [Variant("baseline", "no_tags", args.weight_mode, batch)]
    if args.breakdown:
        tuna_lengths = real_lengths(model, variants[0], "none")
        extra = [t - b for t, b in zip(tuna_lengths, real_lengths(model, variants[0]))]
        matched = [[{"from": "human", "value": c[0]["value"] + FILLER * n}, c[1]] for c, n in zip(convs, extra)]
        padded = to_device(proc(matched, images=images, tags=tags, padding_side="right"), args.device)
        variants.append(Variant("len-matched", "no_tags", args.weight_mode, padded))
        if real_lengths(model, variants[1]) != tuna_lengths:
            raise RuntimeError("the length-matched baseline does not match TUNA's sequence lengths")
    variants += [Variant(TUNA_NAMES[m], "none", m, batch) for m in modes]
    return variants


def activate(model: Any, variant: Variant) -> None:
    model.config.ablation = variant.ablation
    model.config.weight_mode = variant.weight_mode


def real_lengths(model: Any, variant: Variant, ablation: str | None = None) -> list[int]:
    """Per sample, the LLM sequence length after splicing (patches + tag block + text, no padding)."""
    activate(model, variant)
    if ablation is not None:
        model.config.ablation = ablation
    with torch.no_grad():
        prepared = model.prepare_inputs(**variant.batch)
    return prepared.attention_mask.sum(-1).tolist()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(model: Any, variant: Variant, device: str, clock: Callable[[], float]) -> float:
    """Seconds for one forward + backward (gradients cleared first; no optimizer step)."""
    activate(model, variant)
    model.zero_grad(set_to_none=True)
    sync(device)
    start = clock()
    model(**variant.batch).loss.backward()
    sync(device)
    return clock() - start


def vision_forward(model: Any, variant: Variant, device: str, clock: Callable[[], float]) -> float:
    """Seconds for the frozen CLIP forward (no-grad) every variant runs inside its step."""
    sync(device)
    start = clock()
    model.vision(variant.batch["pixel_values"])
    sync(device)
    return clock() - start


def saved_activation_bytes(model: Any, variant: Variant) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (parameters excluded)."""
    activate(model, variant)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in model.vision.model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**variant.batch).loss
    del loss  # frees the graph and everything it saved
    return sum(storages.values())


def cuda_peak_bytes(model: Any, variant: Variant) -> int:
    """CUDA allocator peak during forward + backward, above what was allocated before the step."""
    activate(model, variant)
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model(**variant.batch).loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    model.zero_grad(set_to_none=True)
    return peak


def time_interleaved(model: Any, variants: list[Variant], args: argparse.Namespace
                     ) -> tuple[dict[str, list[float]], list[float]]:
    """Per variant its step times, and the CLIP-forward times, with the variant order rotated every step."""
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    vision: list[float] = []
    for step in range(args.warmup + args.steps):
        shift = step % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            seconds = train_step(model, variant, args.device, clock)
            if step >= args.warmup:
                times[variant.name].append(seconds)
        seconds = vision_forward(model, variants[0], args.device, clock)
        if step >= args.warmup:
            vision.append(seconds)
    model.zero_grad(set_to_none=True)
    return times, vision


def print_setup(model: Any, vision: list[float], args: argparse.Namespace) -> None:
    """Print what was measured: model shapes, batch, device and clock, and the CLIP forward's time."""
    cfg = model.config
    print(f"LLM {args.llm_type} hidden {args.llm_hidden} x {args.llm_layers} layers, "
          f"vocab {cfg.text_config.vocab_size}; CLIP {args.clip} ({cfg.num_image_tokens} patches/image); "
          f"batch {args.batch_size}, {args.n_tags} tags/image, answers ~{args.answer_words} words; "
          f"{args.device} {args.dtype}, {torch.get_num_threads()} threads; stage {args.stage}; "
          f"{args.clock} clock, {args.steps} timed steps per variant after {args.warmup} warm-up")
    print(f"frozen CLIP forward inside every step: median {statistics.median(vision) * 1e3:.1f} ms, "
          f"min {min(vision) * 1e3:.1f} ms")


def report(model: Any, variants: list[Variant], times: dict[str, list[float]], vision: list[float],
           args: argparse.Namespace) -> None:
    """Print the setup and the results table (markdown), ratios against the baseline."""
    lengths = {v.name: real_lengths(model, v) for v in variants}
    memory = {v.name: saved_activation_bytes(model, v) for v in variants}
    cuda = {v.name: cuda_peak_bytes(model, v) for v in variants} if args.device.startswith("cuda") else {}
    base, clip = times["baseline"], min(vision)
    print_setup(model, vision, args)
    head = ("| variant | tokens/sample | step ms median | step ms min | ratio (paired median) | ratio (min) "
            "| ratio excl. CLIP (min) | tokens/s | saved act. MB | ratio |")
    head += " CUDA peak MB | ratio |" if cuda else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for v in variants:
        t, n = times[v.name], v.name
        paired = statistics.median(a / b for a, b in zip(t, base))
        row = (f"| {n} | {statistics.mean(lengths[n]):.1f} | {statistics.median(t) * 1e3:.0f} "
               f"| {min(t) * 1e3:.0f} | {paired:.3f} | {min(t) / min(base):.3f} "
               f"| {(min(t) - clip) / (min(base) - clip):.3f} | {sum(lengths[n]) / statistics.median(t):.0f} "
               f"| {memory[n] / 2**20:.1f} | {memory[n] / memory['baseline']:.3f} |")
        if cuda:
            row += f" {cuda[n] / 2**20:.1f} | {cuda[n] / cuda['baseline']:.3f} |"
        print(row)
    headline = TUNA_NAMES[args.weight_mode]
    ratio = statistics.median(a / b for a, b in zip(times[headline], base))
    print(f"step-time ratio {headline} / baseline (paired median): {ratio:.3f}  "
          f"(goal <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")


def check_filler(tokenizer: Any) -> None:
    """The length-matched baseline needs ``FILLER`` to be one token however often it repeats."""
    if len(tokenizer.encode(FILLER * 7, add_special_tokens=False)) != 7:
        raise RuntimeError(f"filler {FILLER!r} is not one token per repetition with this tokenizer")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--clip", default="tuna-narrow-336", help="open_clip architecture, random init (ViT-B-16: 196 patches at 224 px; "
        "ViT-L-14: 256; ViT-L-14-336: 576 as in LLaVA-1.5, slow on CPU; tuna-tiny-clip: 16) or "
        "'tuna-narrow-336': a 4-layer, 256-wide ViT with LLaVA-1.5's 576 patches, cheap on CPU")
    add("--llm-type", default="qwen2", choices=["qwen2", "llama"], help="random-init LLM architecture")
    add("--llm-hidden", type=int, default=512, help="LLM hidden size (heads = hidden/64, KV heads = heads/4; "
        "MLP width 2x hidden)")
    add("--llm-layers", type=int, default=4, help="LLM decoder layers")
    add("--batch-size", type=int, default=4, help="samples per step (one image each)")
    add("--n-tags", type=int, default=10, help="tags per image (also the model's max_tags)")
    add("--answer-words", type=int, default=40, help="mean words per answer (the labelled tokens; +-25%% per sample)")
    add("--weight-mode", default="scale_and_bias", choices=["scale", "scale_and_bias", "bias"],
        help="the TUNA weight mode of the headline (goal) ratio; 'bias' modes use a 4D float attention mask")
    add("--breakdown", action=argparse.BooleanOptionalAction, default=True,
        help="also time the length-matched baseline and both tuna-scale and tuna-bias (--no-breakdown: "
             "only baseline and --weight-mode; half the run time)")
    add("--stage", type=int, default=2, choices=[1, 2], help="1: LLM frozen (connector + tag encoder train); "
        "2: LLM trains too")
    add("--steps", type=int, default=8, help="timed steps per variant (median reported)")
    add("--warmup", type=int, default=1, help="untimed steps per variant first (>= 1 also fills the "
        "tag-embedding cache)")
    add("--device", default="cpu", help="torch device: cpu or cuda")
    add("--dtype", default="float32", choices=list(DTYPES), help="LLM, connector, tag encoder and CLIP dtype")
    add("--clock", default="auto", choices=["auto", "cpu", "wall"],
        help="cpu: CPU seconds of this process (time.process_time), not inflated by other processes' load "
             "on a shared machine (exact with --threads 1); wall: elapsed time; auto: cpu on CPU, wall on CUDA")
    add("--threads", type=int, default=1, help="torch CPU threads (1 keeps the CPU clock free of "
        "thread-spinning time)")
    add("--seed", type=int, default=0, help="seed for the weights, text, images and tags")
    args = parser.parse_args()
    for name in ("llm_hidden", "llm_layers", "batch_size", "n_tags", "answer_words", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.clock == "auto":
        args.clock = "wall" if args.device.startswith("cuda") else "cpu"
    if args.clock == "cpu" and args.device.startswith("cuda"):
        parser.error("--clock cpu cannot time CUDA work; use --clock wall")
    return args


def main() -> None:
    args = parse_args()
    setup_logging(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    work = Path(tempfile.mkdtemp(prefix="bench_model_step_"))
    try:
        model, tokenizer = build_model(args, work)
        check_filler(tokenizer)
        variants = build_variants(model, tokenizer, args)
        times, vision = time_interleaved(model, variants, args)
        report(model, variants, times, vision, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
