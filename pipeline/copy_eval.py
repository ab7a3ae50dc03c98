"""How well a text-only LLM copies: greedy exact-match answers to held-out generated copy prompts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pipeline.copy_text import END_OF_TURN, EVAL_TASKS, SYSTEM_TURN, CopyTextGenerator


@dataclass
class CopyAccuracy:
    """Greedy exact-match accuracy on held-out generated copy prompts (fresh names)."""

    accuracy: float
    n: int
    by_task: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)  # a few (prompt tail, answer, output)


def greedy_answers(model_dir: str | Path, users: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy first answers of the text-only LLM in ``model_dir`` to user messages (its chat template)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_TURN)]
    answers = []
    for user in users:
        prompt = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            gen_ids = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                     pad_token_id=tok.pad_token_id)
        answers.append(tok.decode(gen_ids[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers


def copy_accuracy(model_dir: str | Path, n: int = 200, seed: int = 12345, tasks: tuple[str, ...] = EVAL_TASKS,
                  known_words: Iterable[str] = (), names: Iterable[str] | None = None,
                  max_new_tokens: int = 16) -> CopyAccuracy:
    """Greedy-generate the first answer of ``n`` held-out ChatML copy prompts; exact match.

    Prompts come from :class:`CopyTextGenerator` with ``seed`` (use one the training never used) and
    cycle through ``tasks``; the prompt is rendered with the saved tokenizer's own chat template. Names
    are fresh random ones, or drawn from ``names`` (e.g. a world's novel categories, which training
    only saw in captions).
    """
    names = list(names or ())
    gen = CopyTextGenerator(seed, known_words, pool=names, pool_fraction=1.0 if names else 0.0)
    samples = [gen.sample(tasks[i % len(tasks)], chat=True) for i in range(n)]
    users = [s.prompt[len(SYSTEM_TURN):].split("<|im_start|>user\n", 1)[1].rsplit(END_OF_TURN, 1)[0]
             for s in samples]
    outputs = greedy_answers(model_dir, users, max_new_tokens)
    hits: dict[str, list[bool]] = {t: [] for t in tasks}
    examples = []
    for s, user, answer in zip(samples, users, outputs):
        task = s.task
        hits[task].append(answer == s.answer)
        if len(examples) < 8:
            examples.append({"task": task, "prompt": user, "answer": s.answer, "output": answer})
    flat = [h for v in hits.values() for h in v]
    return CopyAccuracy(sum(flat) / max(1, len(flat)), len(flat),
                        {t: sum(v) / len(v) for t, v in hits.items() if v}, examples)
