"""Experiment: how reliably the text pretraining gives the tiny LLM its copy prior, per seed and length.

For each seed and step count, the quickstart's text-only LLM is pretrained again on a finished
quickstart's world captions (``tuna.quickstart.stage_llm``'s settings, only ``seed`` and ``steps``
changed), then measured two ways, neither of which touches an image:

* copy accuracy on 300 held-out generated copy prompts whose names are the world's novel categories
  (``tuna.text_pretrain.copy_accuracy``);
* the text-only reference of the quickstart's report: the LLM answering TUNA's identification questions
  with TUNA's eval tag blocks as text (``tuna.quickstart.text_llm_reference``), seen / novel.

    python bench/exp_copy_prior.py --quickstart runs/qs --seeds 0 1 2 3 --steps 600 1500   # ~2 min per cell

Writes ``QUICKSTART/copy_prior/seed-S-steps-N/`` (the LLM and its predictions) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(root: Path, seed: int, steps: int) -> dict[str, float]:
    """Pretrain one LLM into ``root/copy_prior/seed-S-steps-N`` and measure its copy prior (percentages)."""
    from tuna.quickstart import (Paths, _identification_records, _mean, llm_pretrain_config, recorded_config,
                                 text_llm_reference)
    from tuna.text_pretrain import copy_accuracy, pretrain_text_llm, read_world_captions, world_novel_names

    paths = Paths(root)
    out = paths.root / "copy_prior" / f"seed-{seed}-steps-{steps}"
    llm = out / "llm"
    start = time.perf_counter()
    llm_config = llm_pretrain_config(recorded_config(root), seed=seed, steps=steps)
    pretrain_text_llm(read_world_captions(paths.world), llm, llm_config, progress=False)
    seconds = time.perf_counter() - start
    copy = copy_accuracy(llm, n=300, names=world_novel_names(paths.world))
    reference = _identification_records(text_llm_reference(paths, llm=llm, out=out / "eval"))
    return {"copy": 100 * copy.accuracy, "seconds": seconds,
            **{nov: _mean([r["score"] for r in reference if r["novelty"] == nov]) for nov in ("seen", "novel")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, type=Path, help="a finished `tuna quickstart --out` directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="text-pretraining seeds")
    parser.add_argument("--steps", type=int, nargs="+", default=[600, 1500], help="text-pretraining step counts")
    args = parser.parse_args()
    from exp_retrain_tuna import not_finished  # bench/ is this script's directory, so on sys.path

    root = args.quickstart.resolve()
    if problem := not_finished(root):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    lines = ["| seed | steps | train s | copy accuracy, novel names | tag blocks as text: seen | novel |",
             "|---|---|---|---|---|---|"]
    for seed in args.seeds:
        for steps in args.steps:
            m = measure(root, seed, steps)
            lines.append(f"| {seed} | {steps} | {m['seconds']:.0f} | {m['copy']:.1f} | {m['seen']:.1f} | "
                         f"{m['novel']:.1f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
