"""Experiment: how reliably the text pretraining gives the tiny LLM its copy prior, per seed and length.

For each seed and step count, the quickstart's text-only LLM is pretrained again on a finished
quickstart's world captions (``pipeline.quickstart.stage_llm``'s settings, only ``seed`` and ``steps``
changed), then measured two ways, neither of which touches an image:

* copy accuracy on 300 held-out generated copy prompts whose names are the world's novel categories
  (``pipeline.copy_eval.copy_accuracy``);
* the text-only reference of the quickstart's report: the LLM answering TUNA's identification questions
  with TUNA's eval tag blocks as text (``pipeline.quickstart.text_llm_reference``), seen / novel.

    python experiments/exp_copy_prior.py --quickstart runs/qs --seeds 0 1 2 3 --steps 600 1500   # ~2 min per cell

Writes ``QUICKSTART/copy_prior/seed-S-steps-N/`` (the LLM and its predictions) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def measure(root: Path, seed: int, steps: int) -> dict[str, float]:
    """Pretrain one LLM into ``root/copy_prior/seed-S-steps-N`` and measure its copy prior (percentages)."""
    from datastore.synth.layout import World
    from pipeline.copy_eval import copy_accuracy
    from pipeline.quickstart import Paths, llm_pretrain_config, recorded_config, text_llm_reference
    from pipeline.report import identification_records, percent
    from pipeline.text_pretrain import pretrain_text_llm

    paths = Paths(root)
    world = World.open(paths.world)
    out = paths.root / "copy_prior" / f"seed-{seed}-steps-{steps}"
    llm = out / "llm"
    start = time.perf_counter()
    llm_config = llm_pretrain_config(recorded_config(root), seed=seed, steps=steps)
    pretrain_text_llm(world.captions(), llm, llm_config, progress=False)
    seconds = time.perf_counter() - start
    copy = copy_accuracy(llm, n=300, names=world.names("novel"))
    reference = identification_records(text_llm_reference(paths, llm=llm, out=out / "eval"))
    return {"copy": 100 * copy.accuracy, "seconds": seconds,
            **{nov: percent([r["score"] for r in reference if r["novelty"] == nov]) for nov in ("seen", "novel")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, type=Path, help="a finished `tuna quickstart --out` directory")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="text-pretraining seeds")
    parser.add_argument("--steps", type=int, nargs="+", default=[600, 1500], help="text-pretraining step counts")
    args = parser.parse_args()
    from exp_retrain_tuna import not_finished  # experiments/: this script's own folder

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
