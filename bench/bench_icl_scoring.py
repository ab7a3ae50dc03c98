"""Answer-likelihood scoring of demonstration sets: scored candidate sets per second, batch 1 vs batched.

DRUM and Lever-LM score many candidate sets per query (64 candidates per anchor in Lever-LM's beam search),
so this throughput bounds how large a mined dataset can be. The baseline is batch 1, measured in the same
run on the same sets; batched scores must equal it (max |difference| is printed).

    python bench/bench_icl_scoring.py                        # tiny CLIP, LLM hidden 256 x 4 layers, K=2
    python bench/bench_icl_scoring.py --shots 4 --hidden 512 --candidates 64
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def setup(root: Path, hidden: int, layers: int):
    from transformers import AutoTokenizer

    from datastore.clip import ClipSpec
    from icl.formats import read_examples
    from pipeline.tiny import save_hf_tokenizer, save_tiny_llm, train_tokenizer
    from tuna.modeling_tuna import TunaForCausalLM
    from tuna.processing_tuna import TunaProcessor

    subprocess.run([sys.executable, "-m", "datastore.synth.cli", "--out", str(root / "w"), "--n-corpus", "10",
                    "--n-instruct", "10", "--n-eval", "40", "--image-size", "64", "--shard-size", "10"],
                   check=True, stdout=subprocess.DEVNULL)
    examples = list(read_examples("synth", [str(root / "w")]))
    lines = [f"{e.question} {e.answers[0]}" for e in examples] + ["USER: ASSISTANT: A chat between"]
    save_hf_tokenizer(train_tokenizer(lines, "bytelevel", vocab_size=800), root / "llm")
    tokenizer = AutoTokenizer.from_pretrained(root / "llm")
    save_tiny_llm(root / "llm", vocab_size=len(tokenizer), hidden_size=hidden, num_layers=layers)
    torch.manual_seed(0)
    model = TunaForCausalLM.from_components(str(root / "llm"), ClipSpec(model="tuna-tiny-clip"), tokenizer,
                                            tag_hidden_dim=32, tag_num_heads=2).eval()
    return model, TunaProcessor.from_model(model, tokenizer), examples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=2, help="demos per candidate set")
    parser.add_argument("--candidates", type=int, default=32, help="candidate sets per query")
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument("--batch-sizes", default="8,16,32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from icl.scoring import TunaScorer

    with tempfile.TemporaryDirectory() as tmp:
        model, processor, examples = setup(Path(tmp), args.hidden, args.layers)
        rng = np.random.default_rng(0)
        queries = examples[:args.queries]
        others = examples[args.queries:]
        sets = [[[others[i] for i in rng.choice(len(others), args.shots, replace=False)]
                 for _ in range(args.candidates)] for _ in queries]

        def run(batch_size: int) -> tuple[float, np.ndarray]:
            scorer = TunaScorer(model, processor, batch_size=batch_size)
            scorer.loglik(queries[0], sets[0][:batch_size])  # warm-up
            start = time.perf_counter()
            sums = np.concatenate([scorer.loglik(q, s).sum for q, s in zip(queries, sets)])
            return len(sums) / (time.perf_counter() - start), sums

        base_rate, base = run(1)
        print(f"candidate sets of {args.shots} demos + query, LLM hidden {args.hidden} x {args.layers} layers, "
              f"{args.threads} threads, {len(base)} sets")
        print("| batch | sets/s | vs batch 1 | max abs diff of log-lik |\n|---|---|---|---|")
        print(f"| 1 | {base_rate:.1f} | 1.00x | - |")
        for b in map(int, args.batch_sizes.split(",")):
            rate, sums = run(b)
            print(f"| {b} | {rate:.1f} | {rate / base_rate:.2f}x | {np.abs(sums - base).max():.2e} |")


if __name__ == "__main__":
    main()
