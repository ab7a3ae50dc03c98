"""Does marking the listed tokens let a 2-layer LLM carry "is X in the list?" to an answer far away?

Question (issue 21, item 1): a 2-layer text LLM learns membership only when the answer comes right
after the asked token (docs/experiments.md, section 20). The answer position must find the asked
token and read whether it was found, and "found in the list" is known only after layer 1 when nothing
but a previous-token head tells list from question. A learned vector added to the embeddings of the
listed tokens (as a segment embedding would mark TUNA's tag block) tells them apart at the input, so a
layer-1 duplicate-token head could find the listed copy and layer 2 read it. Here, on random token
lists after the usual induction warm-up: membership rows only (``batch`` rows of ``length`` tokens),
phase after phase, with and without the marker, printing the held-out yes/no accuracy every 100 steps:

1. ``gap0``: the answer right after the asked token;
2. ``short``: after " in the image?";
3. ``pope``: after the rest of the instruction data's existence question as the chat shows it (38
   tokens with the quickstart's tokenizer), as POPE asks it.

    python experiments/membership_marker.py --llm RUN/llm --marker --phases gap0:300 short:300 pope:400
    python experiments/membership_marker.py --llm RUN/llm --layers 3 --phases gap0:300 short:300 pope:400

``--question-first`` asks the other way round: the question first, then the list, then the answer right
after it, as if TUNA put its tag block after the question instead of with the image. The asked token is
then earlier than its listed copy, and the answer position must find a listed token that repeats it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common.cli import HelpFormatter


def run(llm: Path, seed: int, phases: list[tuple[str, int]], marker: bool, layers: int | None, threads: int,
        question_first: bool = False, batch: int = 16, length: int = 96) -> list[tuple[str, int, float]]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import pipeline.induction as induction
    from pipeline.copy_text import exists_answer_gaps
    from pipeline.text_pretrain import weighted_lm_loss

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(llm))
    changes = {} if layers is None else {"num_hidden_layers": layers, "layer_types": ["full_attention"] * layers}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(llm), **changes))
    special = set(tok.all_special_ids)
    token_ids = torch.tensor([i for i in range(len(tok)) if i not in special])
    sep, bos = tok.eos_token_id, tok.bos_token_id

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    induction.induction_warmup(model, token_ids, sep, bos, 800, weighted_lm_loss, batch_size=16, length=64, lr=3e-3,
                               warmup_steps=30, seed=seed, every=400)
    mark, yes, no = ids(" a")[-1], ids("Yes")[0], ids("No")[0]
    fillers = {"gap0": [], "short": ids(" in the image?"), "pope": ids(exists_answer_gaps(short_answer=True)[-1])}

    def rows(filler: list[int], n_rows: int, g: torch.Generator) -> induction.MembershipBatch:
        """Packed ``list SEP mark asked filler answer`` segments (``mark asked filler SEP list answer`` with
        ``question_first``), with the listed tokens marked."""
        spec = induction.MembershipRows(mark=mark, yes=yes, no=no, fillers=(tuple(filler),),
                                        question_first=question_first)
        return induction.membership_batch(token_ids, n_rows, length, sep, bos, spec, g)

    vector = torch.nn.Parameter(torch.zeros(model.config.hidden_size))
    embed = model.get_input_embeddings()

    def logits(x, listed):
        e = embed(x) + (listed[..., None] * vector if marker else 0)
        return model(inputs_embeds=e).logits[:, :-1]

    params = list(model.parameters()) + ([vector] if marker else [])
    opt = torch.optim.AdamW(params, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    g, results, start = torch.Generator().manual_seed(seed + 1), [], time.perf_counter()
    for phase, steps in phases:
        held = rows(fillers[phase], 64, torch.Generator().manual_seed(seed + 99))
        for step in range(1, steps + 1):
            x, w, listed = rows(fillers[phase], batch, g)
            lg = logits(x, listed)
            loss = (torch.nn.functional.cross_entropy(lg.transpose(1, 2), x[:, 1:], reduction="none")
                    * w[:, 1:]).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % 100 == 0:
                with torch.no_grad():
                    lg = logits(held.ids, held.listed)
                said, truth, hw = lg[..., yes] > lg[..., no], held.ids[:, 1:] == yes, held.weights[:, 1:]
                acc = float(((said == truth).float() * hw).sum() / hw.sum())
                results.append((phase, step, acc))
                print(f"  {phase} step {step}: held-out accuracy {acc:.0%}  {time.perf_counter() - start:.0f}s",
                      flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--llm", required=True, help="a text LLM folder (its tokenizer and model shape are used)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--phases", nargs="+", default=["gap0:300", "short:300", "pope:400"], metavar="PHASE:STEPS",
                        help="gap0, short or pope, each with its steps")
    parser.add_argument("--marker", action="store_true", help="add the learned vector to the listed tokens")
    parser.add_argument("--layers", type=int, help="layers of the fresh model (default: the LLM's)")
    parser.add_argument("--question-first", action="store_true",
                        help="the question before the list, the answer right after it (a tag block after the "
                             "question)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    phases = [(p.split(":")[0], int(p.split(":")[1])) for p in args.phases]
    results = run(Path(args.llm), args.seed, phases, args.marker, args.layers, args.threads, args.question_first)
    last = {phase: acc for phase, _, acc in results}
    print(f"seed {args.seed}, marker {args.marker}, question first {args.question_first}, "
          f"layers {args.layers or 'as the LLM'}: "
          + "; ".join(f"{phase} {acc:.0%}" for phase, acc in last.items()))


if __name__ == "__main__":
    main()
