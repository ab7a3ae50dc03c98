"""TunaProcessor: (conversations or questions, images, tags / a tag source) -> model inputs.

One sample may hold several images at ``<image>`` markers, each with its own tags. Tags come from the
caller, else from a :class:`tuna.tag_source.TagSource` (retrieval cache, live datastore, ablations).
A batch holds ``input_ids``/``attention_mask`` (and ``labels`` when answers are given) plus, for the N
images in sentinel order: ``pixel_values`` (N, 3, H, W), ``tags`` (N lists of strings) and their LLM
token ids ``tag_input_ids`` / ``tag_attention_mask`` (N, T, Lt), and ``tag_scores`` (N, T), the
tags' retrieval scores when the tag source gave them (None when every tag came from the caller).

A ``word_map`` renames words on the LLM side only (conversation text and the tag words it reads) while
the CLIP side keeps the original tags: training-time name randomisation (``train/rename.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from datastore.reader import OversizedImage, open_image
from tuna.conversation import (IGNORE_INDEX, IMAGE_MARKER, TokenizationError, encode_after, build_generation_prompt,
                               tokenize_conversation)
from tuna.tag_source import TagSource


@dataclass
class TunaProcessor:
    """Turns samples into :class:`tuna.TunaForCausalLM` inputs.

    Args:
        tokenizer: the LLM tokenizer.
        image_processor: PIL image -> (3, H, W) tensor (the CLIP preprocess).
        template: conversation template name.
        max_tags: tags kept per image; max_tag_tokens: word tokens kept per tag.
        tag_prefix: the text before the first tag (tags are tokenized in its context).
        tag_source: where tags come from when the caller gives none (None: no tags).
        max_length: longest sequence after splicing (None: unlimited); longer samples raise
            :class:`tuna.conversation.SequenceTooLongError`.
        tokens_per_image: positions one image takes after splicing (patches + tag block), for max_length.
    """

    tokenizer: Any
    image_processor: Callable
    template: str = "vicuna_v1"
    max_tags: int = 10
    max_tag_tokens: int = 8
    tag_prefix: str = " Tags:"
    tag_source: TagSource | None = None
    max_length: int | None = None
    tokens_per_image: int = 1
    _tag_ids: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, tag_source: TagSource | None = None,
                   max_length: int | None = None) -> "TunaProcessor":
        """A processor matching ``model``'s template, tag limits and CLIP preprocessing."""
        cfg = model.config
        per_tag = cfg.tag_queries + cfg.max_tag_tokens + len(cfg.tag_separator_ids)
        block = len(cfg.tag_prefix_ids) + len(cfg.tag_suffix_ids) + cfg.max_tags * per_tag
        return cls(tokenizer=tokenizer, image_processor=model.vision.clip.preprocess, template=cfg.template,
                   max_tags=cfg.max_tags, max_tag_tokens=cfg.max_tag_tokens, tag_prefix=cfg.tag_prefix,
                   tag_source=tag_source, max_length=max_length, tokens_per_image=cfg.num_image_tokens + block)

    # ------------------------------------------------------------------------------ samples
    def encode(self, conversation: list[dict] | str, images: Sequence[Any] = (), image_ids: Sequence[str] | None = None,
               tags: Sequence[Sequence[str] | None] | None = None, sample_id: str = "?",
               word_map: dict[str, str] | None = None) -> dict[str, Any]:
        """One sample, unpadded.

        Args:
            conversation: LLaVA turns (ending with a gpt answer -> ``labels``; with a human turn -> a
                generation prompt) or a question string. Without ``<image>`` markers, one marker per
                image is put in front of the first human turn (LLaVA's convention).
            images: PIL images or image file paths, in marker order.
            image_ids: ids for the tag lookup (default: the path, or ``"{sample_id}:{i}"``).
            tags: tags per image (caller-given tags carry no retrieval scores); None, for all images or
                for one, = ask ``tag_source``.
            sample_id: named in errors.
            word_map: whole words (and their "-s" plurals) to replace in the conversation and in the tag
                words the LLM reads; the tags' CLIP text embeddings still read the original tags.

        Raises:
            ValueError: marker/image count mismatch, unreadable image, bad conversation.
            tuna.tag_source.MissingTagsError: no tags for an image and no way to retrieve them.
        """
        images = list(images)
        rename = _renamer(word_map)
        if rename is not None:
            conversation = rename(conversation) if isinstance(conversation, str) else [
                {**turn, "value": rename(str(turn.get("value", "")))} for turn in conversation]
        conversation = _with_markers(conversation, len(images))
        if isinstance(conversation, list) and conversation and conversation[-1].get("from") in ("gpt", "assistant"):
            out = tokenize_conversation(conversation, self.tokenizer, self.template, sample_id=sample_id,
                                        max_length=self.max_length, tokens_per_image=self.tokens_per_image)
        else:
            out = build_generation_prompt(conversation, self.tokenizer, self.template, sample_id=sample_id)
        if out["n_images"] != len(images):
            raise ValueError(f"sample {sample_id!r}: {out['n_images']} {IMAGE_MARKER} markers but {len(images)} images")
        ids = list(image_ids) if image_ids is not None else [
            str(im) if isinstance(im, (str, Path)) else f"{sample_id}:{i}" for i, im in enumerate(images)]
        pil = [_open_image(im, sample_id) for im in images]
        tags = [None] * len(images) if tags is None else list(tags)
        if len(tags) != len(images):
            raise ValueError(f"sample {sample_id!r}: tags for {len(tags)} images, but {len(images)} images")
        found = [self.tag_source(i, im) if t is None and self.tag_source is not None else None
                 for i, im, t in zip(ids, pil, tags)]
        scores = [None if f is None else list(f.scores)[:self.max_tags] for f in found]
        tags = [(t if t is not None else [] if f is None else f.tags) for t, f in zip(tags, found)]
        out["pixel_values"] = torch.stack([self.image_processor(im) for im in pil]) if pil else None
        out["tags"] = [list(t)[:self.max_tags] for t in tags]
        out["tag_words"] = out["tags"] if rename is None else [[rename(t) for t in row] for row in out["tags"]]
        out["tag_scores"] = scores
        out["sample_id"] = sample_id
        return out

    def tag_token_ids(self, tag: str) -> list[int]:
        """LLM token ids of one tag as it reads after the tag prefix (cached), at most ``max_tag_tokens``."""
        if tag not in self._tag_ids:
            try:
                ids = encode_after(self.tag_prefix, " " + tag, self.tokenizer, f"tag {tag!r}")
            except TokenizationError:  # tag tokens are inputs only, never labels: plain encoding is fine
                ids = list(self.tokenizer.encode(" " + tag, add_special_tokens=False))
            if not ids:
                raise ValueError(f"tag {tag!r} tokenizes to nothing")
            self._tag_ids[tag] = ids[:self.max_tag_tokens]
        return self._tag_ids[tag]

    # ------------------------------------------------------------------------------ batches
    def collate(self, samples: list[dict[str, Any]], padding_side: str = "right") -> dict[str, Any]:
        """Pad encoded samples into a batch (``padding_side``: "right" for training, "left" to generate)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        length = max(len(s["input_ids"]) for s in samples)
        batch = len(samples)
        input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        with_labels = all("labels" in s for s in samples)
        if not with_labels and any("labels" in s for s in samples):
            raise ValueError("cannot batch training samples (with answers) together with generation prompts "
                             f"(without): {[s['sample_id'] for s in samples if 'labels' not in s]}")
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        for b, s in enumerate(samples):
            n = len(s["input_ids"])
            span = slice(length - n, length) if padding_side == "left" else slice(0, n)
            input_ids[b, span] = s["input_ids"]
            attention_mask[b, span] = 1
            if with_labels:
                labels[b, span] = s["labels"]
        pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        tags = [t for s in samples for t in s["tags"]]
        words = [t for s in samples for t in s.get("tag_words", s["tags"])]
        out = {"input_ids": input_ids, "attention_mask": attention_mask,
               "pixel_values": torch.cat(pixels) if pixels else None, "tags": tags}
        out["tag_input_ids"], out["tag_attention_mask"] = self._tag_tensors(words, pad_id)
        out["tag_scores"] = _score_tensor([s for sample in samples for s in sample.get("tag_scores", [None] * len(
            sample["tags"]))], tags, out["tag_input_ids"].shape[1])
        if with_labels:
            out["labels"] = labels
        return out

    def __call__(self, conversations: Sequence[list[dict] | str], images: Sequence[Sequence[Any]] | None = None,
                 image_ids: Sequence[Sequence[str] | None] | None = None,
                 tags: Sequence[Sequence[Sequence[str]] | None] | None = None,
                 padding_side: str = "left", sample_ids: Sequence[str] | None = None) -> dict[str, Any]:
        """Encode and collate several samples (per sample: its images, image ids, tags; ids for errors)."""
        n = len(conversations)
        images = images if images is not None else [()] * n
        image_ids = image_ids if image_ids is not None else [None] * n
        tags = tags if tags is not None else [None] * n
        sample_ids = sample_ids if sample_ids is not None else [str(i) for i in range(n)]
        samples = [self.encode(c, im, ids, t, sample_id=sid)
                   for c, im, ids, t, sid in zip(conversations, images, image_ids, tags, sample_ids)]
        return self.collate(samples, padding_side)

    def _tag_tensors(self, tags: list[list[str]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        n_tags = max((len(t) for t in tags), default=0)
        encoded = [[self.tag_token_ids(tag) for tag in row] for row in tags]
        width = max((len(ids) for row in encoded for ids in row), default=0)
        ids = torch.full((len(tags), n_tags, width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(tags), n_tags, width), dtype=torch.bool)
        for n, row in enumerate(encoded):
            for j, tok in enumerate(row):
                ids[n, j, :len(tok)] = torch.tensor(tok)
                mask[n, j, :len(tok)] = True
        return ids, mask


def _renamer(word_map: dict[str, str] | None) -> Callable[[str], str] | None:
    """A function replacing ``word_map``'s whole words (and their "-s" plurals) in a text; None if empty."""
    if not word_map:
        return None
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(word_map, key=len, reverse=True))) + r")(s?)\b")
    return lambda text: pattern.sub(lambda m: word_map[m.group(1)] + m.group(2), text)


def _with_markers(conversation: list[dict] | str, n_images: int) -> list[dict] | str:
    """Put one ``<image>`` marker per image before the first human turn when none are present."""
    if n_images == 0:
        return conversation
    prefix = (IMAGE_MARKER + "\n") * n_images
    if isinstance(conversation, str):
        return conversation if IMAGE_MARKER in conversation else prefix + conversation
    if any(IMAGE_MARKER in turn.get("value", "") for turn in conversation):
        return conversation
    turns = [dict(t) for t in conversation]
    for turn in turns:
        if turn.get("from") in ("human", "user"):
            turn["value"] = prefix + turn["value"]
            break
    return turns


def _open_image(image: Any, sample_id: str) -> Any:
    from PIL import UnidentifiedImageError

    if isinstance(image, (str, Path)):
        try:
            with open_image(image) as im:  # over the pixel cap: an error before anything is decoded
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, OversizedImage) as exc:
            raise ValueError(f"sample {sample_id!r}: cannot read image {str(image)!r}: {exc}") from exc
    return image.convert("RGB") if hasattr(image, "convert") else image


def _score_tensor(scores: list[list[float] | None], tags: list[list[str]], width: int) -> torch.Tensor | None:
    """(N, width) retrieval scores of the tags, 0 at padding; images without scores get an equal 1.0 each.
    None when no image has scores (tags all given by the caller)."""
    if all(s is None for s in scores):
        return None
    out = torch.zeros(len(tags), width)
    for n, (row, t) in enumerate(zip(scores, tags)):
        row = [1.0] * len(t) if row is None else row
        if len(row) != len(t):
            raise ValueError(f"image {n}: {len(row)} tag scores for {len(t)} tags")
        out[n, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def load_pretrained(path: str | Path, device: str = "cpu", **tag_flags: Any) -> tuple[Any, Any, TunaProcessor]:
    """A saved TUNA model (eval mode, on ``device``), its tokenizer, and a processor whose tag source follows
    ``tag_flags`` (:meth:`tuna.tag_source.TagSource.for_model`'s keywords); the processor's ``tag_source``
    is None when the model reads tags but no flag says where from: each caller decides what that means."""
    from transformers import AutoTokenizer

    from tuna.modeling_tuna import TunaForCausalLM

    model = TunaForCausalLM.from_pretrained(path).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    source = TagSource.for_model(model, **tag_flags)
    return model, tokenizer, TunaProcessor.from_model(model, tokenizer, tag_source=source)
