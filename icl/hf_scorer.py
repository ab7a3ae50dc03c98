"""Answer-likelihood scoring with a Hugging Face image-text-to-text model that takes interleaved images.

:class:`HFScorer` is the :class:`icl.scoring.Scorer` backend for the models DRUM / Lever-LM users score
demonstration sets with (Qwen2-VL, Idefics3 / SmolVLM and other ``AutoModelForImageTextToText`` checkpoints
whose processor has a chat template). A k-shot prompt is one chat conversation, rendered by
``processor.apply_chat_template``::

    user:       [image] demo_1.question      assistant: demo_1.answers[0]
    ...
    user:       [image] demo_K.question      assistant: demo_K.answers[0]
    user:       [image] query.question       assistant: ANSWER   <- only these tokens are scored

Images are read with PIL from ``Example.image`` and passed to the processor in prompt order, so image
placeholders expand exactly as the model sees them.

Answer span. For each candidate set three texts are rendered: the conversation up to the query's user turn
with the generation prompt (``prefix``), the full conversation with the answer (``full``), and ``full`` cut
right after the answer's last character (``prefix + answer``). The answer must follow ``prefix`` in ``full``
after at most whitespace. All are encoded by the processor (with images); the model input is the encoding of
``prefix + answer`` and the scored tokens are those after the ``prefix`` tokens, i.e. the last tokens of the
input. Checked per sample: the ``prefix`` tokens are a prefix of the input, the input is a prefix of the
``full`` encoding (the answer is tokenized as in the whole conversation), and the span decodes back to the
answer (up to surrounding whitespace); any failure raises ValueError naming the query id. Leading
whitespace-only tokens (a separator a template puts after its generation prompt) are not scored.

End-of-turn tokens after the answer (``<|im_end|>``, ``<end_of_utterance>`` ...) are excluded: they are not
scored and not even fed (a causal model's answer log-probabilities do not depend on later tokens), so
``n_tokens`` is the answer's token count alone.

Over-long prompts are not truncated by this backend: ``dropped`` is always 0 and a prompt beyond the model's
context is passed on as is (choose K for the model's context length).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from icl.formats import Example
from icl.scoring import SetScores


@dataclass
class _Sample:
    text: str          # prefix + answer: what the model is fed
    prefix_ids: list[int]
    full_ids: list[int]
    images: list[Any]
    add_special_tokens: bool


@dataclass
class HFScorer:
    """Scores demonstration sets with a Hugging Face image-text-to-text model (AutoModelForImageTextToText +
    AutoProcessor) that takes interleaved images.

    Attributes:
        model: the model (eval mode); its forward takes the processor's outputs and returns ``logits``.
        processor: its processor, with a chat template that renders ``{"type": "image"}`` content items.
        batch_size: candidate sets per forward pass (right-padded by the processor).
    """

    model: Any
    processor: Any
    batch_size: int = 4

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: Any = None, batch_size: int = 4) -> HFScorer:
        """Load model and processor from a local folder or hub id (``AutoModelForImageTextToText`` /
        ``AutoProcessor``), move the model to ``device`` (in ``dtype`` when given) and put it in eval mode."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        kwargs = {} if dtype is None else {"dtype": dtype}
        model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs).to(device).eval()
        processor = AutoProcessor.from_pretrained(str(path))
        return cls(model=model, processor=processor, batch_size=batch_size)

    # ------------------------------------------------------------------ scoring
    def loglik(self, query: Example, candidate_sets: Sequence[Sequence[Example]], answer: str | None = None
               ) -> SetScores:
        """log P(answer | S, query) for every S (prompt order); ``answer`` defaults to ``query.answers[0]``.

        Raises:
            ValueError: an empty answer; an image that is missing or unreadable (naming the example id); an
                answer span that cannot be located or does not decode back to the answer (naming the query id).
        """
        import torch

        answer = query.answers[0] if answer is None else answer
        if not answer.strip():
            raise ValueError(f"query {query.id!r}: empty answer to score")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        images: dict[str, Any] = {}  # one load per example per call (the query is in every set)
        sums: list[float] = []
        counts: list[int] = []
        for start in range(0, len(candidate_sets), self.batch_size):
            samples = [self._sample(list(demos), query, answer, images)
                       for demos in candidate_sets[start:start + self.batch_size]]
            with torch.inference_mode():
                batch_sums, batch_counts = self._score_batch(samples, query, answer)
            sums += batch_sums
            counts += batch_counts
        return SetScores.from_lists(sums, counts, [0] * len(sums))

    def _sample(self, demos: list[Example], query: Example, answer: str, cache: dict[str, Any]) -> _Sample:
        images = [_load_image(e, cache) for e in [*demos, query]]
        turns = []
        for demo in demos:
            turns += [_user_turn(demo.question), _assistant_turn(demo.answers[0])]
        turns.append(_user_turn(query.question))
        prefix = self.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        full = self.processor.apply_chat_template([*turns, _assistant_turn(answer)], tokenize=False)
        if not full.startswith(prefix):
            raise ValueError(f"query {query.id!r}: the chat template does not render the generation prompt as the "
                             "start of the assistant turn; cannot locate the answer span")
        end = _answer_end(full[len(prefix):], answer)
        if end is None:
            raise ValueError(f"query {query.id!r}: answer {answer!r} not found right after the generation prompt "
                             f"in the rendered prompt (got {full[len(prefix):][:80]!r})")
        bos = getattr(self.processor.tokenizer, "bos_token", None)
        # as processor.apply_chat_template(tokenize=True): a template that renders BOS gets no second one
        add_special = not (bos and full.startswith(bos))
        return _Sample(text=full[:len(prefix) + end], prefix_ids=self._encode(prefix, images, add_special),
                       full_ids=self._encode(full, images, add_special), images=images,
                       add_special_tokens=add_special)

    def _encode(self, text: str, images: list[Any], add_special_tokens: bool) -> list[int]:
        out = self.processor(text=[text], images=[images], return_tensors="pt",
                             add_special_tokens=add_special_tokens)
        return out["input_ids"][0].tolist()

    def _score_batch(self, samples: list[_Sample], query: Example, answer: str) -> tuple[list[float], list[int]]:
        import torch

        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token is None:  # padding needs one; never scored (right padding, after the answer)
            tokenizer.pad_token = tokenizer.eos_token
        add_special = {s.add_special_tokens for s in samples}
        if len(add_special) != 1:
            raise ValueError(f"query {query.id!r}: candidate prompts disagree on a leading BOS token")
        batch = self.processor(text=[s.text for s in samples], images=[s.images for s in samples],
                               padding=True, padding_side="right", return_tensors="pt",
                               add_special_tokens=add_special.pop())
        ids, mask = batch["input_ids"], batch["attention_mask"]
        spans = []  # (first answer position, end) per row
        for row, sample in enumerate(samples):
            length = int(mask[row].sum())
            if bool(mask[row, length:].any()) or not bool(mask[row, :length].all()):
                raise ValueError("the processor did not right-pad the batch")
            tokens = ids[row, :length].tolist()
            spans.append(self._answer_span(tokens, sample, query, answer))
        positions = sorted({p for first, end in spans for p in range(first - 1, end - 1)})
        index = {p: i for i, p in enumerate(positions)}
        device, dtype = _device_dtype(self.model)
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                  if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if _takes_logits_to_keep(self.model):  # logits only where an answer token is predicted
            logits = self.model(**inputs, logits_to_keep=torch.tensor(positions, device=device)).logits
        else:
            logits = self.model(**inputs).logits[:, positions]
        logprobs = logits.float().log_softmax(-1)
        sums, counts = [], []
        for row, (first, end) in enumerate(spans):
            cols = torch.tensor([index[p] for p in range(first - 1, end - 1)], device=logprobs.device)
            targets = ids[row, first:end].to(logprobs.device)
            sums.append(float(logprobs[row, cols].gather(-1, targets[:, None]).sum()))
            counts.append(end - first)
        return sums, counts

    def _answer_span(self, tokens: list[int], sample: _Sample, query: Example, answer: str) -> tuple[int, int]:
        tokenizer = self.processor.tokenizer
        first, end = len(sample.prefix_ids), len(tokens)
        if tokens[:first] != sample.prefix_ids or sample.full_ids[:end] != tokens or end <= first:
            raise ValueError(f"query {query.id!r}: the answer's tokens depend on the text around it (tokenization "
                             "of the prompt with and without the answer disagrees); cannot locate the answer span")
        while end - first > 1 and not tokenizer.decode(tokens[first:first + 1]).strip():
            first += 1  # whitespace-only separator after the generation prompt
        decoded = tokenizer.decode(tokens[first:end])
        if decoded.strip() != answer.strip():
            raise ValueError(f"query {query.id!r}: the scored span decodes to {decoded!r}, not the answer {answer!r}")
        return first, end


def _user_turn(question: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def _assistant_turn(answer: str) -> dict[str, Any]:
    return {"role": "assistant", "content": [{"type": "text", "text": answer}]}


def _answer_end(reply: str, answer: str) -> int | None:
    """End offset of ``answer`` in the rendered assistant reply, when only whitespace precedes it."""
    for needle in dict.fromkeys([answer, answer.strip()]):
        at = reply.find(needle)
        if at >= 0 and not reply[:at].strip():
            return at + len(needle)
    return None


def _load_image(example: Example, cache: dict[str, Any]) -> Any:
    from PIL import Image, UnidentifiedImageError

    if example.image not in cache:
        if not os.path.isfile(example.image):
            raise ValueError(f"example {example.id!r}: image file not found: {example.image}")
        try:
            with Image.open(example.image) as image:
                cache[example.image] = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ValueError(f"example {example.id!r}: cannot read image {example.image}: {exc}") from exc
    return cache[example.image]


def _device_dtype(model: Any) -> tuple[Any, Any]:
    param = next(model.parameters())
    return getattr(model, "device", param.device), getattr(model, "dtype", param.dtype)


def _takes_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
