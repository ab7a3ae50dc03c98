"""Conversation templates and exact-label tokenization of LLaVA-format conversations.

A conversation is rendered into prompt and target segments (templates: ``plain``, ``vicuna_v1``,
``chat_template``), each segment is tokenized on its own -- in the context of the segment before it, so
SentencePiece ``▁`` prefixes come out as in the whole text -- and the labels copy exactly the target
segments' ids. Every text run between ``<image>`` sentinels is then re-tokenized whole and must equal
the segment-wise ids, otherwise :class:`TokenizationError` is raised (never a silently shifted mask).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

from common.prompts import OPTION_LETTER, SHORT_ANSWER  # noqa: F401  (LLaVA-1.5's suffixes, with the templates)

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200  # sentinel id in input_ids; the model swaps it for visual tokens + tag block
IMAGE_MARKER = "<image>"
STYLES = ("plain", "separator", "chat_template")
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class TokenizationError(ValueError):
    """Segment-wise tokenization disagrees with tokenizing the same text whole (label mask unsafe)."""


class SequenceTooLongError(ValueError):
    """A tokenized sample is longer than ``max_length``; the caller decides whether to skip and count."""


@dataclass(frozen=True)
class Template:
    """How a conversation is laid out as text.

    Attributes:
        name: registry name.
        style: ``"plain"`` (``<image>`` markers + answer + ``sep``), ``"separator"`` (LLaVA v1 style:
            ``system + sep``, then per round ``"{user}: {q}{sep}{assistant}: {a}{sep2}"``) or
            ``"chat_template"`` (the tokenizer's own ``apply_chat_template``).
        system: default system prompt (a ``system`` turn in the conversation replaces it).
        roles: (user, assistant) role names for the ``separator`` style.
        sep: separator after the system prompt and the question (``separator``) / after the answer (``plain``).
        sep2: end of every assistant answer (``separator`` style); part of the target.
        end_of_turn: ``chat_template`` style only: the token closing an assistant turn (part of the
            target); ``None`` = the first special token the chat template puts after the answer.
    """

    name: str
    style: str
    system: str = ""
    roles: tuple[str, str] = ("USER", "ASSISTANT")
    sep: str = " "
    sep2: str = "</s>"
    end_of_turn: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Template.name must be a non-empty string, got {self.name!r}")
        if self.style not in STYLES:
            raise ValueError(f"Template.style must be one of {STYLES}, got {self.style!r}")
        if len(self.roles) != 2 or not all(isinstance(r, str) and r for r in self.roles):
            raise ValueError(f"Template.roles must be two non-empty strings, got {self.roles!r}")
        for field in ("system", "sep", "sep2"):
            if IMAGE_MARKER in getattr(self, field):
                raise ValueError(f"Template.{field} must not contain {IMAGE_MARKER!r}, got {getattr(self, field)!r}")
        if self.end_of_turn is not None and (self.style != "chat_template" or not self.end_of_turn):
            raise ValueError(f"Template.end_of_turn must be None or a non-empty string for style "
                             f"'chat_template', got {self.end_of_turn!r} with style {self.style!r}")


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                  "gives helpful, detailed, and polite answers to the user's questions.")
_TEMPLATES = {t.name: t for t in (
    Template(name="plain", style="plain", sep="\n"),
    Template(name="vicuna_v1", style="separator", system=_VICUNA_SYSTEM, sep=" ", sep2="</s>"),
    Template(name="chat_template", style="chat_template"),
)}


def list_templates() -> list[str]:
    """Names of the registered templates, sorted."""
    return sorted(_TEMPLATES)


def get_template(name: str) -> Template:
    """Look up a registered template.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in _TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; valid templates: {list_templates()}")
    return _TEMPLATES[name]


def _resolve(template: Template | str) -> Template:
    return template if isinstance(template, Template) else get_template(template)


class Segment(NamedTuple):
    """A piece of the rendered sequence; targets are learned, prompts may hold ``<image>`` markers."""

    text: str
    target: bool


Rounds = list[tuple[str, "str | None"]]  # (question, answer); answer None = generation prompt


def _normalize(conversations: Any, sample_id: str) -> tuple[str | None, Rounds]:
    """Validate LLaVA turns; return the system text (or None) and the (question, answer) rounds."""
    if isinstance(conversations, str):
        conversations = [{"from": "human", "value": conversations}]
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError(f"sample {sample_id!r}: empty conversation (expected a non-empty list of turns)")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"sample {sample_id!r}: turn {i} must be a dict with a string 'value', got {turn!r}")
        role = _ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(f"sample {sample_id!r}: turn {i} has role {turn.get('from')!r}; "
                             f"valid roles: {sorted(_ROLES)}")
        if role != "user" and IMAGE_MARKER in turn["value"]:
            raise ValueError(f"sample {sample_id!r}: turn {i} ({role}) contains {IMAGE_MARKER!r}; "
                             "image markers are only allowed in human turns")
        turns.append((role, turn["value"]))
    system = turns[0][1] if turns[0][0] == "system" else None
    offset = int(system is not None)
    body = turns[offset:]
    if not body:
        raise ValueError(f"sample {sample_id!r}: conversation has no human/gpt turns")
    for i, (role, _) in enumerate(body):
        expected = ("user", "assistant")[i % 2]
        if role != expected:
            raise ValueError(f"sample {sample_id!r}: turn {i + offset} is {role!r} but {expected!r} was "
                             "expected; turns must alternate human/gpt, starting with human "
                             "(after at most one leading system turn)")
    rounds = [(body[i][1], body[i + 1][1] if i + 1 < len(body) else None) for i in range(0, len(body), 2)]
    return system, rounds


def _render_plain(rounds: Rounds, template: Template, sample_id: str) -> list[Segment]:
    if len(rounds) != 1:
        raise ValueError(f"sample {sample_id!r}: template {template.name!r} takes exactly one human/gpt "
                         f"round, got {len(rounds)}")
    question, answer = rounds[0]
    segments = [Segment(IMAGE_MARKER * question.count(IMAGE_MARKER), False)]
    if answer is not None:
        segments.append(Segment(answer + template.sep, True))
    return segments


def _render_separator(system: str | None, rounds: Rounds, template: Template) -> list[Segment]:
    user, assistant = template.roles
    system = template.system if system is None else system
    prompt = system + template.sep if system else ""
    segments = []
    for question, answer in rounds:
        prompt += f"{user}: {question}{template.sep}{assistant}:"
        if answer is None:
            break
        segments += [Segment(prompt, False), Segment(f" {answer}{template.sep2}", True)]
        prompt = ""
    if prompt:
        segments.append(Segment(prompt, False))
    return segments


def _apply_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, sample_id: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"sample {sample_id!r}: template 'chat_template' needs a tokenizer with a chat "
                         "template, but this tokenizer has none")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors (e.g. raise_exception in the template) carry no common base
        raise ValueError(f"sample {sample_id!r}: the tokenizer's chat template failed: {exc}") from exc
    if not isinstance(text, str):
        raise ValueError(f"sample {sample_id!r}: apply_chat_template returned {type(text).__name__}, not str")
    return text


def _end_of_turn(rest: str, template: Template, tokenizer: Any, sample_id: str) -> int:
    """Index just past the end-of-turn token that closes an assistant answer in ``rest``."""
    candidates = [template.end_of_turn] if template.end_of_turn else [t for t in tokenizer.all_special_tokens if t]
    hits = sorted((rest.find(t), -len(t)) for t in candidates if t in rest)
    if not hits:
        raise ValueError(f"sample {sample_id!r}: no end-of-turn token among {candidates} follows the "
                         f"assistant answer in the chat template output ({rest[:40]!r}); set Template.end_of_turn")
    return hits[0][0] - hits[0][1]


def _render_chat(system: str | None, rounds: Rounds, template: Template, tokenizer: Any,
                 sample_id: str) -> list[Segment]:
    """Split the chat-template rendering into prompt and target segments via incremental renders."""
    if system is None and template.system:
        system = template.system
    messages = [] if system is None else [{"role": "system", "content": system}]
    segments, done, carry = [], "", ""
    for question, answer in rounds:
        messages.append({"role": "user", "content": question})
        head = _apply_chat(tokenizer, messages, True, sample_id)
        if not head.startswith(done):
            raise ValueError(f"sample {sample_id!r}: the chat template renders earlier turns differently once "
                             "more turns follow; it cannot be split into exact segments")
        prompt = carry + head[len(done):]
        if answer is None:
            return segments + [Segment(prompt, False)]
        messages.append({"role": "assistant", "content": answer})
        full = _apply_chat(tokenizer, messages, False, sample_id)
        if not full.startswith(head + answer):
            raise ValueError(f"sample {sample_id!r}: the chat template does not place the assistant answer "
                             "verbatim right after the generation prompt; cannot mask it exactly")
        rest = full[len(head) + len(answer):]
        cut = _end_of_turn(rest, template, tokenizer, sample_id)
        segments += [Segment(prompt, False), Segment(answer + rest[:cut], True)]
        done, carry = full, rest[cut:]
    return segments + ([Segment(carry, False)] if carry else [])


def _render(conversations: Any, template: Template, tokenizer: Any, sample_id: str,
            want_answer: bool | None = None) -> list[Segment]:
    """Segments of the sequence; ``want_answer`` requires the last turn to be gpt (True) / human (False)."""
    system, rounds = _normalize(conversations, sample_id)
    has_answer = rounds[-1][1] is not None
    if want_answer is True and not has_answer:
        raise ValueError(f"sample {sample_id!r}: conversation ends with a human turn; training needs a gpt answer")
    if want_answer is False and has_answer:
        raise ValueError(f"sample {sample_id!r}: the last turn must be human for a generation prompt")
    if template.style == "plain":
        return _render_plain(rounds, template, sample_id)
    if template.style == "separator":
        return _render_separator(system, rounds, template)
    if tokenizer is None:
        raise ValueError(f"template {template.name!r} needs a tokenizer to render text")
    return _render_chat(system, rounds, template, tokenizer, sample_id)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _bos_prefix(tokenizer: Any, template: Template) -> list[int]:
    """``[bos]`` if the tokenizer itself starts encodings with BOS (Llama: yes, Qwen2/GPT-2: no)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if template.style == "chat_template" or bos is None:
        return []  # chat templates render their own BOS text when the model uses one
    probe = tokenizer.encode("a", add_special_tokens=True)
    return [bos] if len(probe) and probe[0] == bos else []


def encode_after(context: str | None, text: str, tokenizer: Any, sample_id: str) -> list[int]:
    """Token ids of ``text`` as it tokenizes right after ``context`` (None: at the start of a text run).

    Tokenizing in context keeps SentencePiece-style dummy-prefix spaces (``▁``) exactly as in the
    whole text; the context must tokenize identically with and without ``text`` after it.
    """
    if context is None:
        return _encode(tokenizer, text)
    ctx, both = _encode(tokenizer, context), _encode(tokenizer, context + text)
    if both[:len(ctx)] != ctx:
        raise TokenizationError(
            f"sample {sample_id!r}: segment {text[:40]!r} merges with the text before it: the preceding "
            f"segment is {len(ctx)} tokens alone but its tokens change when followed by this segment "
            f"({len(both)} tokens together); a segment boundary falls inside a token")
    return both[len(ctx):]


def verify_segments(pieces: list[tuple[str, list[int]]], tokenizer: Any, sample_id: str = "?") -> None:
    """Check that consecutive text pieces, tokenized piece by piece, equal their text tokenized whole.

    Args:
        pieces: (text, token ids) of consecutive pieces of one text run (no image marker between them).
        tokenizer: the HF tokenizer.
        sample_id: named in the error.

    Raises:
        TokenizationError: the two tokenizations differ (message: sample id and both token counts).
    """
    built = [i for _, ids in pieces for i in ids]
    whole = _encode(tokenizer, "".join(text for text, _ in pieces))
    if built != whole:
        at = next((k for k, (a, b) in enumerate(zip(built, whole)) if a != b), min(len(built), len(whole)))
        raise TokenizationError(
            f"sample {sample_id!r}: segment-wise tokenization gives {len(built)} tokens but the same text "
            f"tokenized whole gives {len(whole)} tokens (first difference at token {at}); "
            "the label mask would not match the text")


def _tokenize(segments: list[Segment], prefix: list[int], tokenizer: Any,
              sample_id: str) -> tuple[list[int], list[int], int]:
    """input_ids, labels and image count, segment by segment; each text run is verified."""
    input_ids, labels, run, n_images = list(prefix), [IGNORE_INDEX] * len(prefix), [], 0
    for seg in segments:
        for k, piece in enumerate([seg.text] if seg.target else seg.text.split(IMAGE_MARKER)):
            if k > 0:  # an image marker preceded this piece: close the text run
                verify_segments(run, tokenizer, sample_id)
                run, n_images = [], n_images + 1
                input_ids.append(IMAGE_TOKEN_INDEX)
                labels.append(IGNORE_INDEX)
            if not piece:
                continue
            ids = encode_after(run[-1][0] if run else None, piece, tokenizer, sample_id)
            run.append((piece, ids))
            input_ids += ids
            labels += ids if seg.target else [IGNORE_INDEX] * len(ids)
    verify_segments(run, tokenizer, sample_id)
    return input_ids, labels, n_images


def tokenize_conversation(conversations: list[dict], tokenizer: Any, template: Template | str,
                          max_length: int | None = None, sample_id: str = "?",
                          tokens_per_image: int = 1) -> dict:
    """Tokenize a LLaVA conversation into ``input_ids`` and exactly masked ``labels``.

    Args:
        conversations: turns ``{"from": "human"|"gpt"|"system"|"user"|"assistant", "value": str}``,
            alternating human/gpt and ending with gpt; ``<image>`` markers anywhere in human turns.
        tokenizer: an HF tokenizer (e.g. from ``AutoTokenizer.from_pretrained``).
        template: a :class:`Template` or a registered name (see :func:`list_templates`).
        max_length: if given, longer sequences raise :class:`SequenceTooLongError`.
        sample_id: named in every error.
        tokens_per_image: positions each image sentinel expands to in the model (visual tokens + tag
            block), used only for the ``max_length`` check.

    Returns:
        ``{"input_ids": LongTensor (L,), "labels": LongTensor (L,), "n_images": int}``; each ``<image>``
        becomes ``IMAGE_TOKEN_INDEX`` in input_ids; labels are ``IGNORE_INDEX`` except answer tokens.

    Raises:
        ValueError: malformed conversation, unknown template, or no target tokens.
        TokenizationError: segment-wise tokenization inconsistent with the text.
        SequenceTooLongError: longer than ``max_length``.
    """
    import torch

    template = _resolve(template)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be None or >= 1, got {max_length!r}")
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image!r}")
    segments = _render(conversations, template, tokenizer, sample_id, want_answer=True)
    input_ids, labels, n_images = _tokenize(segments, _bos_prefix(tokenizer, template), tokenizer, sample_id)
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"sample {sample_id!r}: no target tokens (the answers tokenize to nothing); "
                         "the sample would contribute zero loss")
    length = len(input_ids) + n_images * (tokens_per_image - 1)
    if max_length is not None and length > max_length:
        raise SequenceTooLongError(f"sample {sample_id!r}: sequence length {length} exceeds "
                                   f"max_length {max_length}")
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long), "n_images": n_images}


def build_generation_prompt(conversations_or_question: list[dict] | str, tokenizer: Any,
                            template: Template | str, sample_id: str = "?") -> dict:
    """Tokenize an inference prompt, token-identical to training up to where the answer starts.

    Args:
        conversations_or_question: a conversation whose last turn is human, or a question string
            (with ``<image>`` markers).
        tokenizer: the HF tokenizer.
        template: a :class:`Template` or a registered name.
        sample_id: named in errors.

    Returns:
        ``{"input_ids": LongTensor (L,), "n_images": int}``.

    Raises:
        ValueError: malformed conversation (e.g. ending with a gpt turn) or unknown template.
        TokenizationError: segment-wise tokenization inconsistent with the text.
    """
    import torch

    template = _resolve(template)
    segments = _render(conversations_or_question, template, tokenizer, sample_id, want_answer=False)
    input_ids, _, n_images = _tokenize(segments, _bos_prefix(tokenizer, template), tokenizer, sample_id)
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "n_images": n_images}


def render_text(conversations: list[dict] | str, template: Template | str, tokenizer: Any = None) -> str:
    """The sequence as text, with ``<image>`` markers, for logging and debugging.

    Ends after the last answer, or at the generation prompt when the last turn is human. A BOS the
    tokenizer prepends is not included; ``plain`` keeps only the human turn's ``<image>`` markers.

    Args:
        conversations: LLaVA turns or a question string.
        template: a :class:`Template` or a registered name.
        tokenizer: required for the ``chat_template`` style only.

    Raises:
        ValueError: malformed conversation, unknown template, or missing tokenizer for chat templates.
    """
    segments = _render(conversations, _resolve(template), tokenizer, "?")
    return "".join(seg.text for seg in segments)


def stop_token_ids(tokenizer: Any, template: Template | str) -> list[int]:
    """Token ids that end an answer under ``template``: the tokenizer's EOS plus the template's end of turn.

    ``separator`` templates end answers with ``sep2`` (``</s>`` for vicuna_v1), chat templates with the
    special token found after a rendered answer (``<|im_end|>`` for ChatML); multi-token ends are not
    stop tokens (generation then stops at EOS or the length limit).
    """
    template = _resolve(template)
    ends = []
    if template.style == "separator":
        ends.append(template.sep2.strip())
    elif template.style == "chat_template":
        messages = [{"role": "user", "content": "q"}]
        head = _apply_chat(tokenizer, messages, True, "stop tokens")
        full = _apply_chat(tokenizer, messages + [{"role": "assistant", "content": "a"}], False, "stop tokens")
        rest = full[len(head) + 1:]
        ends.append(rest[:_end_of_turn(rest, template, tokenizer, "stop tokens")].strip())
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for end in ends:
        encoded = _encode(tokenizer, end) if end else []
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids
