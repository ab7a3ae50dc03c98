"""Experiment: which ``weight_mode`` lets a model learn to use the adaptive tag weights?

Each sample shows an image with ``--n-tags`` made-up names in its tag block; the answer is the name with
the highest weight (softmax of random logits, the answer's logit raised by ``--margin``). Nothing but the
weights tells which tag is right, so a model that ignores them scores 1 / n_tags. A tiny random-init LLM
(through the real TunaForCausalLM, ``plain`` template) is trained from scratch for each mode with the
same data, seed and budget; accuracy = multiple-choice over the tags by answer log-likelihood
(``model.score``) on held-out samples. The weights are injected (the CLIP-derived weights of a
random-init tower carry no signal); everything else is the normal code path.

    python experiments/exp_weight_mode.py                  # ~3 min on 2 CPU cores
    python experiments/exp_weight_mode.py --steps 600 --modes scale bias
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONTROL = "uniform_weights"  # ablation: every tag weight 1 -> chance accuracy expected


def make_names(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ru", "te", "va", "zo", "pi", "ne", "su", "do", "fa", "gi", "ho", "bu", "xe"]
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 3))))
    return sorted(names)


def build(tmp: Path, names: list[str], mode: str, args, seed: int):
    from transformers import AutoTokenizer

    from datastore.clip import ClipSpec
    from pipeline.tiny import save_hf_tokenizer, save_tiny_llm, train_tokenizer
    from tuna.modeling_tuna import TunaForCausalLM

    if not (tmp / "tok").exists():
        lines = [" ".join(random.Random(i).sample(names, 8)) for i in range(2000)] + ["Tags: a, b."]
        save_hf_tokenizer(train_tokenizer(lines, "bytelevel", vocab_size=400), tmp / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp / "tok")
    save_tiny_llm(tmp / "llm", vocab_size=len(tokenizer), hidden_size=args.hidden, num_layers=args.layers, seed=seed)
    torch.manual_seed(seed)
    ablation = CONTROL if mode == CONTROL else "none"
    weight_mode = "scale_and_bias" if mode == CONTROL else mode
    model = TunaForCausalLM.from_components(str(tmp / "llm"), ClipSpec(model="tuna-tiny-clip"), tokenizer,
                                            template="plain", tag_hidden_dim=32, tag_num_heads=2,
                                            weight_mode=weight_mode, ablation=ablation, max_tags=args.n_tags)
    return model, tokenizer


def make_samples(names: list[str], n: int, args, rng: np.random.Generator) -> list[dict]:
    samples = []
    for _ in range(n):
        tags = [names[i] for i in rng.choice(len(names), args.n_tags, replace=False)]
        logits = rng.normal(size=args.n_tags)
        answer = int(rng.integers(args.n_tags))
        logits[answer] = logits.max() + args.margin
        weights = np.exp(logits) / np.exp(logits).sum() * args.n_tags  # "count" scaling
        samples.append({"tags": tags, "weights": weights.astype(np.float32), "answer": tags[answer]})
    return samples


def batches(model, tokenizer, samples, images, answers_for):
    """Training/scoring batches: one per list of (sample, candidate answer) pairs."""
    from tuna.processing_tuna import TunaProcessor

    proc = TunaProcessor.from_model(model, tokenizer)
    pairs = [(s, a) for s in samples for a in answers_for(s)]
    convs = [[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": a}] for _, a in pairs]
    batch = proc(convs, images=[[images[0]]] * len(pairs), tags=[[s["tags"]] for s, _ in pairs],
                 padding_side="right")
    weights = torch.tensor(np.stack([s["weights"] for s, _ in pairs]))
    return batch, weights


def inject(model, weights: torch.Tensor) -> None:
    """Make the model use ``weights`` (N, T) instead of its CLIP-derived ones (uniform for the control)."""
    control = model.config.ablation == CONTROL
    model.tag_weights = lambda image_embeds, tag_text, tag_mask: (tag_mask.float() if control else weights)


def run(mode: str, names: list[str], args, tmp: Path) -> dict:
    from PIL import Image

    model, tokenizer = build(tmp, names, mode, args, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    images = [Image.new("RGB", (64, 64), (120, 80, 40))]
    train = make_samples(names, args.steps * args.batch_size, args, rng)
    test = make_samples(names, args.n_test, args, rng)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        chunk = train[step * args.batch_size:(step + 1) * args.batch_size]
        batch, weights = batches(model, tokenizer, chunk, images, lambda s: [s["answer"]])
        inject(model, weights)
        loss = model(**batch).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    train_s = time.perf_counter() - start
    model.eval()
    correct = 0
    for i in range(0, len(test), 16):
        chunk = test[i:i + 16]
        batch, weights = batches(model, tokenizer, chunk, images, lambda s: s["tags"])
        inject(model, weights)
        scores = model.score(**batch).sum.view(len(chunk), args.n_tags)
        correct += sum(s["tags"][int(k)] == s["answer"] for s, k in zip(chunk, scores.argmax(-1)))
    return {"mode": mode, "loss": float(loss), "accuracy": correct / len(test), "train_s": train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["scale", "bias", "scale_and_bias", CONTROL],
                        help="weight modes to compare (uniform_weights = control without weight signal)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per mode")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--n-tags", type=int, default=5, help="tags per image")
    parser.add_argument("--margin", type=float, default=1.0, help="logit margin of the answer tag's weight")
    parser.add_argument("--hidden", type=int, default=64, help="LLM hidden size")
    parser.add_argument("--layers", type=int, default=2, help="LLM layers")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    parser.add_argument("--n-test", type=int, default=400, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0, help="same data and init for every mode")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    names = make_names(200, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            rows.append(run(mode, names, args, Path(tmp)))
            print(f"{mode:>16}: accuracy {rows[-1]['accuracy']:.3f}  final loss {rows[-1]['loss']:.3f}  "
                  f"({rows[-1]['train_s']:.0f} s)", flush=True)
    print(f"\nchance = {1 / args.n_tags:.3f}; {args.steps} steps x {args.batch_size}, margin {args.margin}, "
          f"LLM {args.layers}x{args.hidden}, seed {args.seed}")
    print("| weight_mode | MC accuracy | final train loss |\n|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['accuracy']:.3f} | {r['loss']:.3f} |")


if __name__ == "__main__":
    main()
