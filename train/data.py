"""Training data: LLaVA JSON and webdataset shards -> TunaProcessor samples, bad-input policy, modality grouping.

Preprocessing is lazy (in DataLoader workers): images are opened, tags looked up (retrieval cache, then
live datastore retrieval) and conversations tokenized in ``__getitem__``. A bad sample (a record of the wrong
shape -- see :func:`check_record` --, a missing or unreadable image, no tags for its image, tokenization
mismatch, over-long) raises a one-line error naming the
sample under ``on_bad_sample="error"`` (default), or is skipped and counted under ``"skip"``: the next
sample takes its place and the batch carries the skipped ids, so the trainer can count and report them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset, Sampler

from tuna.configuration_tuna import ablation_policy
from tuna.conversation import IMAGE_MARKER, SequenceTooLongError, TokenizationError
from tuna.processing_tuna import TunaProcessor
from tuna.tag_source import MissingTagsError

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")
SAMPLE_ERRORS = (ValueError, OSError, MissingTagsError, TokenizationError, SequenceTooLongError)
MAX_CONSECUTIVE_SKIPS = 100


class BadSampleError(ValueError):
    """A training sample cannot be used (the message names it and says why)."""


def load_llava_json(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Records of one or more LLaVA JSON files (a list of {id, image?, conversations})."""
    records = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read LLaVA JSON {path}: {exc}") from exc
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of samples, got {type(data).__name__}")
        records.extend(data)  # malformed records are bad samples, checked when encoded (check_record)
    return records


def images_of(record: Any) -> list[str]:
    """The image names (relative paths) of a LLaVA record: none, one, or a list (none for a non-object)."""
    image = record.get("image") if isinstance(record, dict) else None
    if image is None:
        return []
    return list(image) if isinstance(image, list) else [image]


def _shown(value: Any, limit: int = 60) -> str:
    """``value`` for an error line: its repr (one line), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_conversation(conversation: Any, where: str) -> None:
    """Raise :class:`BadSampleError` (``where`` names the sample) unless ``conversation`` is a non-empty list of
    ``{"from": str, "value": str}`` turns; roles and their order are checked when it is tokenized."""
    if not isinstance(conversation, list) or not conversation:
        raise BadSampleError(f"{where}: 'conversations' must be a non-empty list of turns, got {_shown(conversation)}")
    for k, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            raise BadSampleError(f"{where}: turn {k} must be an object with 'from' and 'value', got {_shown(turn)}")
        for key in ("from", "value"):
            if key not in turn:
                raise BadSampleError(f"{where}: turn {k} has no {key!r}")
            if not isinstance(turn[key], str):
                raise BadSampleError(f"{where}: turn {k}'s {key!r} must be a string, got {_shown(turn[key])}")


def check_record(record: Any, where: str) -> None:
    """Raise :class:`BadSampleError` (``where`` names the sample) unless ``record`` has the LLaVA shape:
    an object with ``conversations`` (see :func:`check_conversation`) and an optional ``image``, a file name
    or a list of file names."""
    if not isinstance(record, dict):
        raise BadSampleError(f"{where}: expected a JSON object with 'conversations', got {_shown(record)}")
    if "conversations" not in record:
        raise BadSampleError(f"{where}: has no 'conversations'")
    if not all(isinstance(n, str) and n.strip() for n in images_of(record)):
        raise BadSampleError(f"{where}: 'image' must be a file name or a list of file names, "
                             f"got {_shown(record.get('image'))}")
    check_conversation(record["conversations"], where)


class LlavaJsonDataset(Dataset):
    """LLaVA-format samples; image paths are relative to ``image_folder`` and double as tag-cache keys.

    Args:
        paths: LLaVA JSON files.
        image_folder: root of the relative image paths.
        processor: tokenizes, loads images and fetches tags.
        on_bad_sample: "error" (raise naming the sample) or "skip" (count and use the next sample).
        renamer: sample index -> word map renaming names on the LLM side (train/rename.py), or None.
    """

    def __init__(self, paths: Sequence[str], image_folder: str | None, processor: TunaProcessor,
                 on_bad_sample: str = "error", renamer: Callable[[int], dict[str, str] | None] | None = None) -> None:
        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample={on_bad_sample!r}: expected one of {list(BAD_SAMPLE_POLICIES)}")
        self.records = load_llava_json(paths)
        if not self.records:
            raise ValueError(f"no samples in {list(paths)}")
        self.image_folder = Path(image_folder) if image_folder else None
        if self.image_folder is None and any(images_of(r) for r in self.records):
            raise ValueError("the data has image samples: give --image_folder")
        self.processor, self.on_bad_sample, self.renamer = processor, on_bad_sample, renamer

    def __len__(self) -> int:
        return len(self.records)

    def lengths(self) -> list[int]:
        """Approximate sequence length per sample, negative for text-only (for modality grouping)."""
        out = []
        for record in self.records:
            turns = record.get("conversations") if isinstance(record, dict) else None
            values = [turn.get("value") for turn in turns if isinstance(turn, dict)] if isinstance(turns, list) else []
            words = sum(len(value.split()) for value in values if isinstance(value, str))  # malformed records: 0
            n_images = len(images_of(record))
            length = words + n_images * self.processor.tokens_per_image
            out.append(length if n_images else -length)
        return out

    def sample_id(self, i: int) -> str:
        """The id of sample ``i`` as errors and skip records name it (its ``id``, else its index)."""
        record = self.records[i]
        return str(record.get("id", i) if isinstance(record, dict) else i)

    def word_map(self, i: int) -> dict[str, str] | None:
        """Sample ``i``'s renaming (train/rename.py), or None."""
        return self.renamer(i) if self.renamer is not None else None

    def _encode(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        sample_id = self.sample_id(i)
        check_record(record, f"sample {sample_id!r}")
        names = images_of(record)
        conversation = record["conversations"]
        if names and not any(IMAGE_MARKER in str(t.get("value", "")) for t in conversation):
            raise BadSampleError(f"sample {sample_id!r}: has an image but no {IMAGE_MARKER} marker")
        return self.processor.encode(conversation, images=[self.image_folder / n for n in names],
                                     image_ids=names, sample_id=sample_id, word_map=self.word_map(i))

    def __getitem__(self, i: int) -> dict[str, Any]:
        skipped = []
        for attempt in range(MAX_CONSECUTIVE_SKIPS):
            j = (i + attempt) % len(self.records)
            try:
                item = self._encode(j)
            except SAMPLE_ERRORS as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if self.on_bad_sample == "error":
                    raise BadSampleError(f"bad training sample (index {j}): {reason}") from exc
                skipped.append({"index": j, "id": self.sample_id(j), "reason": reason})
                continue
            item["skipped"] = skipped
            return item
        raise BadSampleError(f"{MAX_CONSECUTIVE_SKIPS} consecutive bad samples from index {i}; last: "
                             f"{skipped[-1]['reason']}")


class WebDatasetSamples(IterableDataset):
    """Image-caption (or image + ``json`` conversations) samples from webdataset shards.

    A sample's conversation is its json's ``conversations`` if present, else ``<image>`` -> caption
    (connector pretraining). Shards are split over distributed ranks and DataLoader workers; the tag
    cache key is the sample's ``__key__``.
    """

    def __init__(self, shards: Sequence[str], processor: TunaProcessor, on_bad_sample: str = "error",
                 caption_key: str = "txt;caption", image_key: str = "jpg;jpeg;png;webp") -> None:
        from datastore.reader import expand_shards

        if on_bad_sample not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"on_bad_sample={on_bad_sample!r}: expected one of {list(BAD_SAMPLE_POLICIES)}")
        self.shards = expand_shards(list(shards))
        self.processor, self.on_bad_sample = processor, on_bad_sample
        self.caption_key, self.image_key = caption_key, image_key

    def _my_shards(self) -> list[str]:
        from common.distributed import dist_env

        rank, world, _ = dist_env()
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        return self.shards[rank * n_workers + worker::world * n_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from datastore.reader import decode_image, iter_raw_samples

        skipped = []
        for shard in self._my_shards():
            for raw in iter_raw_samples(shard):
                key = raw["__key__"]
                image, why = decode_image(raw, self.image_key)
                conversation = _wds_conversation(raw, self.caption_key) if image is not None else None
                try:
                    if image is None or conversation is None:
                        raise BadSampleError(f"sample {key!r} in {shard}: {why or 'no caption or conversations'}")
                    check_conversation(conversation, f"sample {key!r}")
                    item = self.processor.encode(conversation, images=[image], image_ids=[key], sample_id=key)
                except SAMPLE_ERRORS as exc:
                    if self.on_bad_sample == "error":
                        raise BadSampleError(f"bad training sample {key!r} in {shard}: {exc}") from exc
                    skipped.append({"index": -1, "id": key, "reason": f"{type(exc).__name__}: {exc}"})
                    continue
                item["skipped"], skipped = skipped, []
                yield item


def _wds_conversation(raw: dict[str, Any], caption_key: str) -> Any:
    from datastore.reader import decode_caption

    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError):
            meta = {}
        if isinstance(meta, dict) and meta.get("conversations") is not None:
            return meta["conversations"]  # checked by the caller: a malformed one is a bad sample
    caption, _ = decode_caption(raw, caption_key)
    return None if caption is None else [{"from": "human", "value": IMAGE_MARKER},
                                         {"from": "gpt", "value": caption}]


@dataclass
class TrainCollator:
    """Right-padded training batches; ``skipped`` lists the bad samples replaced in this batch."""

    processor: TunaProcessor

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.processor.collate(items, padding_side="right")
        batch["skipped"] = [s for item in items for s in item.get("skipped", [])]
        return batch


class ModalityLengthGroupedSampler(Sampler):
    """LLaVA-style grouping: batches hold only image or only text samples, of similar length.

    Indices are shuffled with ``seed`` + epoch, split by modality, cut into megabatches of
    ``batch_size * world_size`` sorted by length, and the megabatches shuffled; deterministic per seed.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0) -> None:
        self.lengths, self.group = list(lengths), batch_size * world_size
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        megabatches = []
        for modality in (True, False):
            idx = [i for i in order if (self.lengths[i] > 0) == modality]
            for k in range(0, len(idx), self.group):
                megabatches.append(sorted(idx[k:k + self.group], key=lambda i: -abs(self.lengths[i])))
        perm = torch.randperm(len(megabatches), generator=generator).tolist()
        return iter([i for m in perm for i in megabatches[m]])


def count_tokens(batch: dict[str, Any], config: Any) -> int:
    """LLM positions of a batch after splicing (text, patch tokens, tag blocks) under the model ``config``."""
    text = int(batch["attention_mask"].sum())
    n_images = 0 if batch.get("pixel_values") is None else int(batch["pixel_values"].shape[0])
    total = text - n_images + n_images * config.num_image_tokens
    mask = batch.get("tag_attention_mask")
    policy = ablation_policy(config.ablation)
    if mask is not None and mask.numel() and policy.use_tags:
        tags_per_image = mask.any(-1).sum(-1)  # (N,)
        with_tags = int((tags_per_image > 0).sum())
        n_tags = int(tags_per_image.sum())
        queries = config.tag_queries if policy.image_aware else 0
        total += int(mask.sum()) + n_tags * queries + (n_tags - with_tags) * len(config.tag_separator_ids)
        total += with_tags * (len(config.tag_prefix_ids) + len(config.tag_suffix_ids))
    return total
