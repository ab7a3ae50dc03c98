"""Interleaved k-shot prompts: K demonstrations, then the query, as one multi-round conversation.

Each demonstration is a round of its own (``<image>`` + question, then its answer), so every template that
takes several rounds (LLaVA's ``vicuna_v1``, chat templates) lays it out as it lays out any dialogue. The
demos' answers are input: only the query's answer is labelled. Too long for ``max_length``: the demos
farthest from the query in the prompt are dropped first, and counted; the query is never truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from icl.formats import Example
from tuna.conversation import IGNORE_INDEX, IMAGE_MARKER, SequenceTooLongError


def kshot_conversation(demos: Sequence[Example], query: Example, with_answer: bool = True) -> list[dict]:
    """LLaVA turns: one human/gpt round per demo (prompt order), then the query's question (and answer)."""
    turns = []
    for demo in demos:
        turns += [{"from": "human", "value": f"{IMAGE_MARKER}\n{demo.question}"},
                  {"from": "gpt", "value": demo.answers[0]}]
    turns.append({"from": "human", "value": f"{IMAGE_MARKER}\n{query.question}"})
    if with_answer:
        turns.append({"from": "gpt", "value": query.answers[0]})
    return turns


def label_last_answer_only(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with every labelled span but the last set to IGNORE_INDEX (the demos' answers)."""
    labelled = (labels != IGNORE_INDEX).nonzero().flatten()
    if labelled.numel() == 0:
        return labels
    gaps = (labelled[1:] - labelled[:-1] > 1).nonzero().flatten()
    last_start = int(labelled[gaps[-1] + 1]) if gaps.numel() else int(labelled[0])
    out = labels.clone()
    out[:last_start] = IGNORE_INDEX
    return out


@dataclass
class KShotSample:
    """An encoded k-shot sample and the demos it kept (prompt order)."""

    encoded: dict[str, Any]
    demos: list[Example]
    dropped: int  # demos dropped to fit max_length


def encode_kshot(processor: Any, demos: Sequence[Example], query: Example, answer: str | None = None,
                 demo_tags: bool = True, query_tags: bool = True) -> KShotSample:
    """Encode demos (prompt order) + query with a :class:`tuna.processing_tuna.TunaProcessor`.

    Args:
        answer: the query answer to label (default ``query.answers[0]``); the scorer passes candidates.
        demo_tags / query_tags: read retrieved tags for the demos' / the query's images (the processor's
            tag source); off: an empty tag block for those images.

    Raises:
        SequenceTooLongError: the query alone exceeds the processor's ``max_length``.
    """
    query = query if answer is None else Example(query.id, query.image, query.question, (answer,), query.task,
                                                 query.label)
    demos = list(demos)
    dropped = 0
    while True:
        try:
            conversation = kshot_conversation(demos, query)
            images = [d.image for d in demos] + [query.image]
            tags = tags_to_read(len(demos), demo_tags, query_tags)
            encoded = processor.encode(conversation, images=images, tags=tags, sample_id=query.id)
            break
        except SequenceTooLongError:
            if not demos:
                raise
            demos, dropped = demos[1:], dropped + 1  # the first is the farthest from the query
    encoded["labels"] = label_last_answer_only(encoded["labels"])
    return KShotSample(encoded, demos, dropped)


def tags_to_read(n_demos: int, demo_tags: bool = True, query_tags: bool = True) -> list[list | None]:
    """``TunaProcessor.encode``'s ``tags`` for demos + query: None = read the tag source's tags, [] = an empty
    tag block (the image is not even looked up)."""
    return [None if on else [] for on in [demo_tags] * n_demos + [query_tags]]

