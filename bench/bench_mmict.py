"""Training-step time of MMICT (M-Hub connector) vs vanilla in-context tuning (LLaVA connector), same K, same run.

Two TunaForCausalLM instances around the same random-init LLM (saved once, loaded twice) and the same frozen
random-init CLIP; one batch of k-shot samples (K demonstrations + the query, one image each, the loss on the
query's answer only, as ``icl.prompts.encode_kshot`` builds them); tags off. A step is forward + backward +
AdamW over the trainable parameters (MMICT's recipe: CLIP and the LLM frozen; ``--llm-trainable`` trains the
LLM too). Rounds alternate the two variants so load on the machine hits both alike; the ratio is the median
over rounds of mmict / vanilla. The clock is this process's CPU time with one thread on CPU (``--clock``).

Why the hub can be cheaper: a demo image enters the LLM as its guide's length in tokens (question + answer,
~10-30) and the query as ``--mhub-queries`` tokens, instead of every patch (576 with LLaVA-1.5's tower); the
Q-Former's own cost grows with its width and depth.

    python bench/bench_mmict.py                          # narrow ViT, 576 patches; Qwen2 512 x 4; K = 4; batch 2
    python bench/bench_mmict.py --shots 8 --mhub-hidden 768 --mhub-layers 12
    python bench/bench_mmict.py --device cuda --dtype bfloat16 --clip ViT-L-14-336 --llm-hidden 4096 --llm-layers 32
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model_step import DTYPES, NOUNS, PRECISIONS, VOCAB_SIZE, corpus, sentence  # noqa: E402


def kshot_batch(proc, shots: int, batch_size: int, image_size: list[int], seed: int) -> dict:
    """``batch_size`` k-shot samples: ``shots`` demos (question + one-sentence answer) and a query each."""
    import numpy as np
    from PIL import Image

    from icl.formats import Example
    from icl.prompts import encode_kshot

    rng, np_rng = random.Random(seed), np.random.default_rng(seed)

    def example(i: int) -> Example:
        pixels = np_rng.integers(0, 255, (image_size[0], image_size[1], 3), dtype=np.uint8)
        question = f"What is the {rng.choice(NOUNS)} near the {rng.choice(NOUNS)} doing?"
        return Example(str(i), Image.fromarray(pixels), question, (sentence(rng),), "vqa", "")

    samples = []
    for b in range(batch_size):
        demos = [example(b * 100 + j) for j in range(shots)]
        sample = encode_kshot(proc, demos, example(b * 100 + 99))
        assert not sample.dropped, "raise the processor's max_length"
        samples.append(sample.encoded)
    return proc.collate(samples, "right")


def build_models(args: argparse.Namespace, work: Path) -> tuple[dict, object]:
    from transformers import AutoTokenizer

    from datastore.clip import ClipSpec, load_clip
    from pipeline.tiny import save_hf_tokenizer, save_tiny_llm, train_tokenizer
    from tuna.modeling_tuna import TunaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(save_hf_tokenizer(
        train_tokenizer(corpus(2000, args.seed), "bytelevel", VOCAB_SIZE), work / "tokenizer")))
    heads = max(1, args.llm_hidden // 64)
    llm = save_tiny_llm(work / "llm", vocab_size=len(tokenizer), hidden_size=args.llm_hidden,
                        num_layers=args.llm_layers, num_heads=heads, num_kv_heads=max(1, heads // 4), seed=args.seed)
    clip = load_clip(ClipSpec(model=args.clip, device=args.device, precision=PRECISIONS[args.dtype]))
    hub = {"num_queries": args.mhub_queries, "hidden_size": args.mhub_hidden, "num_layers": args.mhub_layers,
           "num_heads": max(1, args.mhub_hidden // 64), "max_text": 64}
    models = {}
    for name, connector in (("vanilla", {}), ("mmict", {"connector_type": "mhub", "mhub": hub})):
        torch.manual_seed(args.seed)
        model = TunaForCausalLM.from_components(str(llm), clip, tokenizer, dtype=DTYPES[args.dtype],
                                                template="vicuna_v1", ablation="no_tags", **connector)
        model.to(args.device).train()
        model.set_llm_trainable(args.llm_trainable)
        models[name] = model
    return models, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--clip", default="tuna-narrow-336", help="open_clip architecture, random init (see bench_model_step.py)")
    add("--llm-hidden", type=int, default=512)
    add("--llm-layers", type=int, default=4)
    add("--shots", type=int, default=4, help="demonstrations per sample (K)")
    add("--batch-size", type=int, default=2)
    add("--mhub-queries", type=int, default=32, help="BLIP-2: 32")
    add("--mhub-hidden", type=int, default=256, help="Q-Former width (BLIP-2: 768); heads = width / 64")
    add("--mhub-layers", type=int, default=4, help="Q-Former layers (BLIP-2: 12)")
    add("--llm-trainable", action="store_true", help="train the LLM too (default: frozen, MMICT's recipe)")
    add("--rounds", type=int, default=6, help="timed steps per variant (after one warm-up step)")
    add("--device", default="cpu")
    add("--dtype", default="float32", choices=list(DTYPES))
    add("--clock", default="auto", choices=["auto", "cpu", "wall"])
    add("--seed", type=int, default=0)
    args = parser.parse_args()
    clock_name = args.clock if args.clock != "auto" else ("wall" if args.device.startswith("cuda") else "cpu")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    if clock_name == "cpu":
        torch.set_num_threads(1)

    from tuna.processing_tuna import TunaProcessor

    with tempfile.TemporaryDirectory() as tmp:
        models, tokenizer = build_models(args, Path(tmp))
        first = next(iter(models.values()))
        proc = TunaProcessor.from_model(first, tokenizer, max_length=100_000)
        batch = kshot_batch(proc, args.shots, args.batch_size, first.vision.clip.identity["image_size"], args.seed)
        batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
                      for n, m in models.items()}
        times: dict[str, list[float]] = {n: [] for n in models}
        lengths = {}
        for round_ in range(args.rounds + 1):
            for name in (list(models) if round_ % 2 else list(models)[::-1]):
                model, optimizer = models[name], optimizers[name]
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = clock()
                out = model(**batch, loss_only=True)
                out.loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if round_:
                    times[name].append(clock() - start)
            if not round_:
                with torch.no_grad():
                    for name, model in models.items():
                        prepared = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                        batch["pixel_values"])
                        lengths[name] = int(prepared.attention_mask.sum(-1).max())
    trainable = {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()}
    ratios = [m / v for m, v in zip(times["mmict"], times["vanilla"])]
    print(f"K={args.shots}, batch {args.batch_size}, {args.clip}, LLM {args.llm_hidden}x{args.llm_layers} "
          f"({'trainable' if args.llm_trainable else 'frozen'}), hub {args.mhub_hidden}x{args.mhub_layers} with "
          f"{args.mhub_queries} queries, {args.device} {args.dtype}, {clock_name} clock, {args.rounds} rounds")
    for name in models:
        print(f"  {name:8s} step {statistics.median(times[name]) * 1000:8.1f} ms (median; min "
              f"{min(times[name]) * 1000:.1f})  LLM sequence {lengths[name]} tokens  trainable {trainable[name]:,}")
    print(f"  mmict / vanilla step time: {statistics.median(ratios):.2f} (paired median)")


if __name__ == "__main__":
    main()
