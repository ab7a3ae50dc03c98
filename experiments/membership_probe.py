"""Does an LLM answer "is X in this tag list?" on text, and does TUNA's stage 2 keep it? (issue 21, item 1)

Text-only prompts in the chat template: " Tags: a, b." with 1-4 of the given names, then a question about
a listed name (half of the time) or an unlisted one; the answer is read as the "Yes" vs "No" logit. Two
question forms: the text pretraining's own ("Can you see a X?") and POPE's ("Is there a X in the
image?" plus LLaVA's short-answer line). ``--model`` is a text LLM folder or a TUNA model folder (its
language model is probed). Answered in docs/experiments.md, section 22: p4's text LLM 73 %; its TUNA
after stage 2 67 % with the own form and chance (45-57 %) with POPE's.

    python experiments/membership_probe.py --model RUN/models/tuna-stage2 --names RUN/seen_names.txt
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from common.cli import HelpFormatter
from common.prompts import SHORT_ANSWER

FORMS = {"own": "Can you see a {n}?", "pope": "Is there a {n} in the image?\n" + SHORT_ANSWER}


def load_lm(model: Path):
    from transformers import AutoModelForCausalLM

    if json.loads((model / "config.json").read_text()).get("model_type") == "tuna":
        from tuna.modeling_tuna import TunaForCausalLM

        return TunaForCausalLM.from_pretrained(str(model)).language_model.eval()
    return AutoModelForCausalLM.from_pretrained(str(model)).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="text LLM or TUNA model folder")
    parser.add_argument("--names", required=True, type=Path, help="one name per line (e.g. RUN/seen_names.txt)")
    parser.add_argument("--n", type=int, default=100, help="prompts per question form")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    from pipeline.copy_text import render_chat

    names = [line.strip() for line in args.names.read_text().splitlines() if line.strip()]
    tok, lm = AutoTokenizer.from_pretrained(str(args.model)), load_lm(args.model)
    yes, no = (tok(w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
    for form, question in FORMS.items():
        rng, right, said = random.Random(args.seed), 0, 0
        for _ in range(args.n):
            listed = rng.sample(names, rng.randint(1, 4))
            present = rng.random() < 0.5
            asked = rng.choice(listed) if present else rng.choice([n for n in names if n not in listed])
            text, spans = render_chat([(f" Tags: {', '.join(listed)}.\n{question.format(n=asked)}", "")])
            text = text[:spans[0][0]]  # the prompt, up to the answer
            with torch.no_grad():
                logits = lm(input_ids=tok(text, add_special_tokens=False, return_tensors="pt").input_ids).logits[0, -1]
            said_yes = bool(logits[yes] > logits[no])
            said, right = said + said_yes, right + (said_yes == present)
        print(f"{args.model} {form}: accuracy {right / args.n:.0%}, says yes {said / args.n:.0%} ({args.n} prompts)")


if __name__ == "__main__":
    main()
