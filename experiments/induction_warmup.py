"""Does an induction warm-up (random token runs said twice) give the quickstart's text LLM multi-token copying?

Question (issue 21, item 2): the datastore swap gains nothing because the 2-layer text LLM never copies a
name of several tokens (docs/experiments.md, section 12). A toy run of the same model shape on random
repeats alone shows the induction phase change after ~650 steps. Here: the quickstart's own text
pretraining, with and without the warm-up in front, then greedy copy accuracy on the swap world's
(multi-token) names and on fresh made-up names, per task.

    python experiments/induction_warmup.py --run RUN --out OUT --induction-steps 0 800
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from common.cli import HelpFormatter
from datastore.synth.layout import World
from pipeline.copy_eval import copy_accuracy
from pipeline.text_pretrain import TextPretrainConfig, known_words, pretrain_text_llm

TASKS = ("tags_single", "tags_attr", "echo", "repeat")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--run", required=True, help="a quickstart folder (llm/, world/, world_swap/)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--induction-steps", type=int, nargs="+", default=[0, 800])
    parser.add_argument("--steps", type=int, help="text steps after the warm-up (default: the run's)")
    parser.add_argument("--seed", type=int, help="default: the run's")
    parser.add_argument("--n", type=int, default=120, help="probe prompts per name set")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="other TextPretrainConfig changes, e.g. num_heads=8 num_kv_heads=8 threads=1")
    args = parser.parse_args()
    run, out = Path(args.run), Path(args.out)
    saved = json.loads((run / "llm" / "text_pretrain.json").read_text())["config"]
    captions = World.open(run / "world").captions()
    swap_names = World.open(run / "world_swap").names()
    rows = []
    for steps in args.induction_steps:
        changes = {"induction_steps": steps, **({"steps": args.steps} if args.steps else {}),
                   **({"seed": args.seed} if args.seed is not None else {}),
                   **{k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}}
        config = TextPretrainConfig(**{**saved, "task_weights": tuple(saved["task_weights"]),
                                       "forbidden": tuple(saved["forbidden"]), **changes})
        folder = out / f"induction{steps}_seed{config.seed}{''.join('_' + item for item in args.set)}"
        start = time.perf_counter()
        pretrain_text_llm(captions, folder, config)
        seconds = time.perf_counter() - start
        known = known_words(captions)
        swap = copy_accuracy(folder, n=args.n, tasks=TASKS, known_words=known, names=swap_names)
        fresh = copy_accuracy(folder, n=args.n, tasks=TASKS, known_words=known)
        record = json.loads((folder / "text_pretrain.json").read_text())
        row = {"induction_steps": steps, "seed": config.seed, "seconds": round(seconds, 1),
               "warmup_copy_rate": (record.get("induction") or {}).get("copy_rate"),
               "swap_names": asdict(swap), "fresh_names": asdict(fresh)}
        rows.append(row)
        print(f"induction {steps}: swap names {swap.accuracy:.1%} {swap.by_task}, fresh {fresh.accuracy:.1%} "
              f"{fresh.by_task}, {seconds:.0f}s", flush=True)
        (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
