"""Runner: build a datastore's parts from webdataset shards (resumable, one rank per shard subset).

Every rank of a ``torchrun`` launch (or every job of an array given ``rank``/``world_size``) takes
input shards ``i`` with ``i % world_size == rank``; a shard becomes one part. Parts already marked
done are skipped, so a killed build re-run continues where it stopped. After all parts exist,
rank 0 runs :func:`datastore.merge.merge` (index + manifest).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.distributed import barrier, dist_env, init_distributed
from datastore import layout
from datastore.clip import ClipSpec, LoadedClip, describe_mismatch, load_clip, same_clip
from datastore.index import IndexConfig
from datastore.reader import ReaderConfig, ShardBatches, check_shards, expand_shards
from datastore.tags import TagParserConfig, build_tag_parser
from datastore.writer import PartWriter

logger = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The build cannot proceed (inconsistent output directory, missing parts ...)."""


@dataclass
class BuildConfig:
    """Everything a datastore build needs.

    Attributes:
        inputs: webdataset shard patterns (brace expansion, globs, fsspec URLs).
        out: output directory (local or shared filesystem).
        clip: the image encoder.
        reader: sample keys, batch size, decode workers.
        tags: caption → tags parser.
        index: FAISS index choice and recall target.
        overwrite: delete an existing output directory first instead of resuming.
        rank, world_size: override the torchrun environment (e.g. for SLURM job arrays).
        merge: let rank 0 build the index and manifest once every part is done.
        distributed_timeout_s: how long ranks wait for each other at the final barrier.
        decode_device: decode JPEGs on this device in the main process (``torchvision.io.decode_jpeg``,
            batched; workers ship raw bytes; :mod:`datastore.gpu_decode`); None: workers decode with PIL.
        overlap: on CUDA, copy the next batch and queue its encoding while this one finishes
            (:mod:`datastore.device_feed`); False: one batch at a time. No effect on CPU.
    """

    inputs: list[str]
    out: str
    clip: ClipSpec
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    tags: TagParserConfig = field(default_factory=TagParserConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    overwrite: bool = False
    rank: int | None = None
    world_size: int | None = None
    merge: bool = True
    distributed_timeout_s: int = 24 * 3600
    decode_device: str | None = None
    overlap: bool = True

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: at least one shard pattern is required")
        rank, world = _rank_world(self)
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} out of range for world_size={world}")


def build(config: BuildConfig, show_progress: bool = True) -> dict[str, Any] | None:
    """Build (or resume) the datastore in ``config.out``.

    Returns:
        The manifest on the rank that merged, else None.

    Raises:
        BuildError: the output directory holds a build with another encoder, parser or input list.
        ShardError: an input shard cannot be read.
    """
    rank, world = _rank_world(config)
    group = _init_distributed(config, world)
    try:
        shards = expand_shards(config.inputs)
        stats = check_shards(shards)  # every input reachable before anything is encoded
        if config.overwrite and rank == 0:
            _remove_datastore(config.out)
        if group:
            barrier()
        clip = load_clip(config.clip)
        parser = build_tag_parser(config.tags)
        _check_or_write_build_record(config, clip, parser.describe(), shards)
        mine = [(i, s) for i, s in enumerate(shards) if i % world == rank]
        todo = [(i, s) for i, s in mine if not _part_done(config.out, i, s, stats[s])]
        logger.info("%d shards in total; this rank builds %d (%d already done)", len(shards), len(todo),
                    len(mine) - len(todo))
        encode_parts(config, clip, parser, todo, show_progress and rank == 0)
        if group:
            barrier()
        if config.merge and rank == 0 and (group or world == 1):
            from datastore.merge import merge

            return merge(config.out, config.index)
        if config.merge and rank == 0:
            logger.info("parts of rank 0 done; run `tuna-datastore merge --out %s` once every job finished",
                        config.out)
        return None
    finally:
        if group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _part_done(out: str, part: int, shard: str, now: dict[str, Any]) -> bool:
    """Whether ``part`` has a valid marker for ``shard`` as it is now (``now``: its :func:`shard_stat`, taken
    by the up-front check). A part whose shard changed since
    (size or modification time), whose marker is unreadable or whose files are damaged is redone: its
    marker is removed and the reason logged."""
    marker = layout.marker_path(out, part)
    if not marker.exists():
        return False
    try:
        record = layout.read_json_object(marker, ("shard", "embeddings", "metadata"))
    except ValueError as err:
        return _redo(marker, f"its marker is unreadable ({err})")
    old = record.get("shard_stat")
    if old is not None and old != now:
        return _redo(marker, f"shard {shard} changed since the part was built ({_stat_change(old, now)})")
    files = record.get("files") or {}
    for name in ("embeddings", "metadata"):
        problem = layout.check_file(out, record[name], files.get(name))
        if problem:
            return _redo(marker, problem)
    return True


def _redo(marker: Path, why: str) -> bool:
    logger.warning("redoing %s: %s", marker.stem.replace("_", " "), why)
    marker.unlink()
    return False


def _stat_change(old: dict, now: dict) -> str:
    return ", ".join(f"{key} {old.get(key)} -> {now.get(key)}" for key in sorted(set(old) | set(now))
                     if old.get(key) != now.get(key))


def _remove_datastore(out: str) -> None:
    """Delete a previous build in ``out`` for --overwrite; refuse to delete anything else."""
    path = Path(out)
    if not path.exists() or not any(path.iterdir()):
        return
    if not layout.build_path(path).exists():
        raise BuildError(f"refusing to --overwrite {out}: it is not empty and holds no tuna datastore (build.json)")
    shutil.rmtree(path)


def _rank_world(config: BuildConfig) -> tuple[int, int]:
    env_rank, env_world, _ = dist_env()
    rank = config.rank if config.rank is not None else env_rank
    world = config.world_size if config.world_size is not None else env_world
    return rank, world


def _init_distributed(config: BuildConfig, world: int) -> bool:
    """Join a gloo group when launched by torchrun with several ranks (used for barriers only; job arrays
    with --world-size, or ranks started without a launcher, share none)."""
    import os

    if world == 1 or config.world_size is not None or "MASTER_ADDR" not in os.environ:
        return False
    return init_distributed("gloo", timeout_s=config.distributed_timeout_s)


def _build_record(config: BuildConfig, clip: LoadedClip, parser: dict, shards: list[str]) -> dict[str, Any]:
    return {
        "format_version": layout.FORMAT_VERSION,
        "clip": {**clip.spec.to_dict(), **clip.identity},
        "parser": parser,
        "reader": {"image_key": config.reader.image_key, "caption_key": config.reader.caption_key},
        "shards": shards,
    }


def _check_or_write_build_record(config: BuildConfig, clip: LoadedClip, parser: dict, shards: list[str]) -> None:
    record = _build_record(config, clip, parser, shards)
    path = layout.build_path(config.out)
    if not path.exists():
        layout.write_json_atomic(path, record)
        return
    old = layout.read_json_object(path, ("clip",))
    hint = "use a new --out, or --overwrite to discard it"
    if not same_clip(old["clip"], record["clip"]):
        raise BuildError(f"{config.out} was built with a different CLIP model: "
                         f"{describe_mismatch(old['clip'], record['clip'])}; {hint}")
    for key in ("format_version", "parser", "reader", "shards"):
        if old.get(key) != record[key]:
            raise BuildError(f"{config.out} was built with a different {key} "
                             f"({_short(old.get(key))} vs {_short(record[key])}); {hint}")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def encode_parts(config: BuildConfig, clip: LoadedClip, parser, todo: list[tuple[int, str]],
                 show_progress: bool = False) -> dict[str, Any]:
    """Decode/tag ``todo`` parts in DataLoader workers, encode here, write finished parts.

    Returns:
        {"images": images encoded, "seconds": wall time of the loop, "stages": seconds per step
        ("read", "tag": summed over workers; "wait", "decode", "copy", "encode", "write": this process),
        "decode_fallback": images the device decoder handed to PIL, by reason}.
    """
    import torch
    from tqdm import tqdm

    from datastore.device_feed import DeviceFeed

    if not todo:
        return {"images": 0, "seconds": 0.0, "stages": {}, "decode_fallback": {}}
    writer = PartWriter(config.out, clip.embed_dim)
    workers = min(config.reader.num_workers, len(todo))
    dataset, decoder = ShardBatches(todo, config.reader, clip.preprocess, parser.parse_batch), None
    if config.decode_device:
        from datastore.gpu_decode import DeviceDecoder, JpegBatches

        dataset = JpegBatches(todo, config.reader, clip.preprocess, parser.parse_batch)
        decoder = DeviceDecoder(config.decode_device, clip.preprocess)
    feed = DeviceFeed(clip.spec.device, decoder=decoder, overlap=config.overlap)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None,
        pin_memory=feed.pin_memory)
    bar = tqdm(total=len(todo), unit="part", desc="build", disable=not show_progress)
    n_images, start, stages = 0, time.perf_counter(), Counter()
    with bar:  # closed on errors too, so the CLI's one-line error starts a line of its own
        for batch, emb, encode_seconds in feed.run(loader, clip.encode_images):
            n_images += len(batch.keys)
            stages.update(batch.seconds)
            write_start = time.perf_counter()
            if writer.add(batch, emb, encode_seconds) is not None:
                bar.update(1)
                bar.set_postfix(img_s=f"{n_images / (time.perf_counter() - start):.0f}")
            stages["write"] += time.perf_counter() - write_start
    seconds = time.perf_counter() - start
    stages.update(feed.seconds)
    logger.info("encoded %d images in %.1fs (%.0f img/s)", n_images, seconds, n_images / max(seconds, 1e-9))
    if feed.fallback:
        logger.info("device decode fell back to PIL for %s", dict(feed.fallback))
    return {"images": n_images, "seconds": seconds, "stages": dict(stages), "decode_fallback": dict(feed.fallback)}
