"""Stage-2 text replay: text-only copy conversations mixed into instruction tuning.

The counterpart of the ShareGPT text-only share of LLaVA-1.5's 665K mix (40K of 665K): without them a
few visual classes overwrite the LLM's language and copy prior during instruction tuning.
"""

from __future__ import annotations

import random
from typing import Any

from common.prompts import SHORT_ANSWER
from pipeline.copy_text import CopyText, CopyTextGenerator
from pipeline.text_pretrain import TextPretrainConfig, known_words, name_pools

REPLAY_TASKS = ("tags_single", "tags_attr", "scene", "list", "echo", "tags_place", "repeat", "tags_exist")


def llava_conversation(sample: CopyText) -> list[dict[str, str]]:
    """A chat copy text as LLaVA-format conversation turns (a text-only instruction sample).

    Raises:
        ValueError: ``sample`` is a plain (non-chat) text.
    """
    if not sample.turns:
        raise ValueError(f"a {sample.task} text rendered as plain Q/A text has no chat turns")
    return [turn for user, answer in sample.turns for turn in ({"from": "human", "value": user},
                                                                {"from": "gpt", "value": answer})]


def text_replay_records(captions: list[str], n: int, config: TextPretrainConfig | None = None, seed: int = 1,
                        suffix_share: float = 0.7, names: list[str] | None = None) -> list[dict[str, Any]]:
    """``n`` text-only LLaVA records (``{id, conversations}``) of copy conversations for instruction tuning.

    The counterpart of the ShareGPT text-only share of LLaVA-1.5's 665K mix: mixed into stage 2, they
    keep the LLM's language and copy prior (names from the same pools as :func:`pipeline.text_pretrain.pretrain_text_llm`:
    its lexicon, the caption nouns or ``names``, fresh names) from being overwritten by a few visual
    classes. No image, and nothing from an eval set. ``suffix_share`` of the questions end with
    LLaVA-1.5's short-answer prompt (the instruction data's format).
    """
    config = config or TextPretrainConfig()
    captions = [c.strip() for c in captions if c and c.strip()]
    known = known_words(captions, names)
    gen = CopyTextGenerator(config.seed * 2 + 100 + seed, known, config.forbidden, chat_fraction=1.0,
                            **name_pools(captions, config, known, names))
    rng = random.Random(seed)
    records = []
    for i in range(n):
        conversation = llava_conversation(gen.sample(REPLAY_TASKS[i % len(REPLAY_TASKS)], chat=True))
        for turn in conversation[::2]:
            if rng.random() < suffix_share:
                turn["value"] += "\n" + SHORT_ANSWER
        records.append({"id": f"text-{i:06d}", "conversations": conversation})
    return records
