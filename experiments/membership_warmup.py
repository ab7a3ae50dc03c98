"""Can the quickstart's 2-layer text LLM learn "is this name in the list?" (what POPE asks of TUNA)?

Question (issue 21, item 1): TUNA's POPE F1 stays near chance, and the text LLM answers its own
``tags_exist`` prompts at chance too (docs/experiments.md, section 19). Answering needs two steps: find
the asked name's earlier occurrence (a duplicate-token head) and carry that finding to the answer,
which POPE's template puts 15+ tokens later. Here, on random token lists (pipeline.induction's
``membership_batch``) after the usual induction warm-up, each phase in turn:

1. ``gap0``: the answer right after the asked token (the duplicate-token step alone);
2. ``filler``: the answer after a fixed filler (the tokens of " in the image?"), as in the real template;
3. ``random``: the answer after 0-4 random tokens.

It prints the held-out yes/no accuracy every 100 steps of each phase (50 % = chance).

    python experiments/membership_warmup.py --llm RUN/llm --seeds 0 3 --phases gap0 filler
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path

from common.cli import HelpFormatter

PHASES = ("gap0", "filler", "random")


def run(llm: Path, seed: int, phases: list[str], steps: int, rows: int, threads: int,
        changes: dict | None = None) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import pipeline.induction as induction
    from pipeline.text_pretrain import weighted_lm_loss

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(llm))
    torch.manual_seed(seed)
    # the LLM's shape (with ``changes``, e.g. num_hidden_layers=3), fresh weights
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(llm), **(changes or {})))
    special = set(tok.all_special_ids)
    token_ids = torch.tensor([i for i in range(len(tok)) if i not in special])

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    spec = induction.MembershipRows(mark=ids(" a")[-1], yes=ids("Yes")[0], no=ids("No")[0])
    gaps = {"gap0": {"max_gap": 0}, "filler": {"fillers": (tuple(ids(" in the image?")),)}, "random": {"max_gap": 4}}
    warm = functools.partial(induction.induction_warmup, model, token_ids, tok.eos_token_id, tok.bos_token_id,
                             loss_fn=weighted_lm_loss, batch_size=16, length=64, lr=3e-3, warmup_steps=30)
    result = {"seed": seed, "changes": changes or {}, "induction": warm(800, seed=seed, every=200).copy_rate[-1], "phases": {}}
    for n, phase in enumerate(phases, 1):
        done = warm(steps, seed=seed + n, every=100, membership=dataclasses.replace(spec, **gaps[phase]),
                    membership_rows=rows)
        result["phases"][phase] = {"membership": done.membership, "copy_rate": done.copy_rate[-1]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--llm", required=True, help="a text LLM folder (its tokenizer and model shape are used)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=["gap0", "filler"])
    parser.add_argument("--steps", type=int, default=500, help="steps per phase")
    parser.add_argument("--rows", type=int, default=16, help="membership rows added to each step's 16 repeat rows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--config", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="model config changes, e.g. num_hidden_layers=3")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    changes = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.config)}
    results = [run(Path(args.llm), seed, args.phases, args.steps, args.rows, args.threads, changes)
               for seed in args.seeds]
    for r in results:
        print(f"seed {r['seed']} {r['changes'] or ''}: induction copy rate {r['induction'][1]:.0%}; " + "; ".join(
            f"{phase} {p['membership'][-1][1]:.0%}" for phase, p in r["phases"].items()))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
