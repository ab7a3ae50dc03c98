"""Which copy skills has a text LLM learned? Greedy exact match on held-out generated copy prompts, per task.

Answered (docs/experiments.md, section 12): the quickstart's text LLM copies one-token world names (95 %
on ``tags_single``) but answers "is X in this tag list?" (``tags_exist``) at chance (43 %) and copies no
multi-token name (``repeat``: 0 %), even after 600 steps of ``repeat`` texts alone.

    python experiments/copy_probe.py --llm RUN/llm --tasks tags_exist repeat [--world RUN/world]

With ``--world`` the names are that world's category names (single tokens for its LLM); without, fresh
made-up names of several tokens each.
"""

from __future__ import annotations

import argparse

from common.cli import HelpFormatter
from pipeline.copy_eval import greedy_answers
from pipeline.copy_text import END_OF_TURN, SYSTEM_TURN, TASKS, CopyTextGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--llm", required=True, help="text LLM folder (save_pretrained, with its chat template)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["tags_exist", "repeat", "tags_single"])
    parser.add_argument("--world", help="tuna-synth folder whose category names the prompts use")
    parser.add_argument("--n", type=int, default=60, help="prompts per task")
    parser.add_argument("--seed", type=int, default=999, help="prompt seed (one training never used)")
    args = parser.parse_args()
    names = []
    if args.world:
        from datastore.synth.layout import World

        names = World.open(args.world).names()
    gen = CopyTextGenerator(args.seed, pool=names, pool_fraction=1.0 if names else 0.0)
    for task in args.tasks:
        samples = [gen.sample(task, chat=True) for _ in range(args.n)]
        users = [s.prompt[len(SYSTEM_TURN):].split("<|im_start|>user\n", 1)[1].rsplit(END_OF_TURN, 1)[0]
                 for s in samples]
        outputs = greedy_answers(args.llm, users, max_new_tokens=24)
        exact = sum(o == s.answer for o, s in zip(outputs, samples)) / len(samples)
        print(f"{task} ({'world' if names else 'fresh'} names): exact {exact:.0%} of {len(samples)}; e.g. "
              + "; ".join(f"{s.answer!r} -> {o!r}" for s, o in zip(samples[:3], outputs[:3])))


if __name__ == "__main__":
    main()
