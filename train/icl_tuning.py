"""In-context tuning (vanilla, MMICT's baseline): a share of the training samples become k-shot samples.

``train/train.py --icl_pool POOL --icl_p P --icl_shots 1,2,4 [--icl_retriever siir] [--icl_order similar-last]``:

- **Which samples.** Each LLaVA record ``i`` is drawn with probability ``P`` from ``random.Random(f"{seed}:icl:{i}")``
  (``--seed``), and the same generator draws its shot count ``K`` from ``--icl_shots``: every rank, DataLoader
  worker and epoch makes the same choice, and a rerun is identical. (The draw is independent of
  ``--rename_p``'s, which seeds ``f"{seed}:{i}"``.)
- **The query.** A drawn record becomes the query :class:`icl.formats.Example` ``"{id}:0"``: its image (absolute
  path ``image_folder/image``), its FIRST human question (``<image>`` marker removed) and the first gpt answer,
  exactly as ``icl.formats`` reads round 0 of a LLaVA record. A multi-round record keeps only that first round
  when it gets demonstrations (its later rounds are dropped from the k-shot sample; the plain samples keep
  theirs). Text-only records, records with several images and records whose first round is not a human
  question + gpt answer stay plain (counted as ``ineligible``).
- **The demos.** Retrieved once, when the dataset is built, for all drawn records (in batches of
  ``RETRIEVAL_BATCH``; the time is logged): the ranked ``max(K)`` demos of each query, of which the first ``K``
  (the most similar) are kept and put in prompt order by :func:`icl.retrievers.order_demos`. The retriever
  drops the query itself and every demo on the query's image: when the pool was built from the training
  JSON (``tuna-icl pool build --format llava`` with the same image root), the query is the pool's own example
  (same id, same absolute image path; its stored vectors are reused, nothing is CLIP-encoded) and its other
  rounds are excluded too; from any other pool, exact image copies are still excluded by cosine (the
  retriever's ``dedup_threshold``). A record for which the pool has no demo left stays plain (counted).
- **Encoding.** :func:`icl.prompts.encode_kshot`: one round per demo, then the query round; only the query's
  answer is labelled. Too long for ``--max_length``: the demos farthest from the query are dropped first
  (counted); a query too long alone is a bad sample (``--on_bad_sample``). ``--rename_p`` renames the demos
  with the sample's word map too.
- **Tags.** Each image's tags come from the run's tag source. The query's tag key is the record's image name
  (as for plain samples); a demo's is its path relative to ``--image_folder`` when it lies there (a pool of the
  training images then finds the retrieval cache's entries), else its absolute path. A cache-only setup
  (``--retrieval_cache`` without ``--datastore``) has no tags for demo images outside the cache: that is a
  ``MissingTagsError`` naming the image, under the ``--on_bad_sample`` policy. Give ``--datastore`` (live
  retrieval) for such demos, or ``--icl_demo_tags false``: the demos get an empty tag block (not looked up).

Counts: the plan (samples drawn, given demos, per K, short of K, ineligible, retriever exclusions) is logged
when the dataset is built; the k-shot samples encoded, their demos and the demos dropped to fit
``--max_length`` are counted across DataLoader workers (shared memory) and logged, summed over ranks, when
training ends, with everything written to ``OUTPUT_DIR/icl_counts.json``.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from icl.formats import GPT_ROLES, HUMAN_ROLES, IMAGE_MARKER, Example
from icl.prompts import encode_kshot
from train.data import LlavaJsonDataset, images_of
from tuna.processing_tuna import TunaProcessor

logger = logging.getLogger(__name__)

ORDERS = ("similar-last", "similar-first", "shuffled")
RETRIEVAL_BATCH = 256
COUNTS_FILE = "icl_counts.json"


def parse_shots(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,2,4"`` (or a sequence of ints) -> (1, 2, 4); each shot count must be an integer >= 1.

    Raises:
        ValueError: empty, not integers, or a count below 1.
    """
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else list(text)
    try:
        shots = tuple(int(p) for p in parts if p != "")
    except (TypeError, ValueError):
        raise ValueError(f"--icl_shots {text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not shots or min(shots) < 1:
        raise ValueError(f"--icl_shots {text!r}: give one or more shot counts, each >= 1")
    return shots


@dataclass(frozen=True)
class ICLSettings:
    """In-context tuning settings (the ``--icl_*`` flags; see the module docstring).

    Attributes:
        pool: demonstration pool directory (``tuna-icl pool build``).
        retriever: retriever name (icl.retrievers) or PREFIX:PATH.
        shots: the shot counts K is drawn from (uniformly, per sample).
        p: share of the samples given demos.
        order: prompt order of the demos (similar-last, similar-first, shuffled).
        demo_tags: look up the demos' tags (off: empty tag blocks for the demo images).
        seed: seed of the draws, of the random retriever and of shuffled orders.
    """

    pool: str
    retriever: str = "siir"
    shots: tuple[int, ...] = (1, 2, 4)
    p: float = 0.5
    order: str = "similar-last"
    demo_tags: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shots", parse_shots(self.shots))
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"--icl_p {self.p}: must be in [0, 1]")
        if self.order not in ORDERS:
            raise ValueError(f"--icl_order {self.order!r}: expected one of {', '.join(ORDERS)}")


def draw_shots(seed: int, index: int, p: float, shots: Sequence[int]) -> int:
    """Sample ``index``'s shot count: 0 (plain) with probability 1 - p, else K drawn from ``shots``."""
    rng = random.Random(f"{seed}:icl:{index}")
    if p == 0.0 or rng.random() >= p:
        return 0
    return shots[rng.randrange(len(shots))]


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def query_example(record: dict[str, Any], index: int, image_folder: str | Path | None) -> tuple[Example | None, str]:
    """The query Example of a LLaVA record (round 0, as ``icl.formats`` reads it), or (None, why not)."""
    names = images_of(record)
    if not names:
        return None, "text-only"
    if len(names) > 1:
        return None, "several images"
    turns = record.get("conversations")
    pair = turns[:2] if isinstance(turns, list) else []
    if len(pair) != 2 or not all(isinstance(t, dict) for t in pair) \
            or pair[0].get("from") not in HUMAN_ROLES or pair[1].get("from") not in GPT_ROLES:
        return None, "bad first round"
    question = _text(_text(pair[0].get("value")).replace(IMAGE_MARKER, ""))
    answer = _text(pair[1].get("value"))
    if not question or not answer:
        return None, "bad first round"
    rid = str(record.get("id", index)).strip()
    image = os.path.abspath(os.path.join(str(image_folder or ""), str(names[0])))
    return Example(f"{rid}:0", image, question, (answer,), "vqa", answer), ""


def _as_in_pool(query: Example, pool: Any) -> Example:
    """``query`` with the pool's spelling of its image path when the pool holds it (same id, same file
    through another path, e.g. a symlinked folder): the retriever's same-image exclusion compares the strings,
    and the query is then the pool's own example (its stored vectors are reused)."""
    position = pool.position.get(query.id)
    if position is None:
        return query
    image = pool.examples[position].image
    if image != query.image and os.path.realpath(image) == os.path.realpath(query.image):
        return replace(query, image=image)
    return query


@dataclass
class ICLPlan:
    """What the dataset's construction decided (logged, and written to ``icl_counts.json``)."""

    samples: int = 0
    drawn: int = 0  # samples the P-draw chose
    with_demos: int = 0  # drawn samples that got at least one demo
    by_shots: dict[int, int] = field(default_factory=dict)  # K drawn -> samples given demos
    demos: int = 0  # demos planned in all
    short: int = 0  # samples given fewer than their K demos (the pool ran out)
    no_demos: int = 0  # drawn, eligible, but no demo left in the pool: stay plain
    ineligible: dict[str, int] = field(default_factory=dict)  # drawn but cannot be queries, by reason
    excluded: dict[str, int] = field(default_factory=dict)  # retriever exclusions (self, same image, copies)
    seconds: float = 0.0

    def summary(self) -> str:
        per_k = ", ".join(f"K={k}: {n}" for k, n in sorted(self.by_shots.items())) or "none"
        extra = [f"{self.short} short of K", f"{self.no_demos} without any demo"]
        if self.ineligible:
            extra.append("ineligible " + ", ".join(f"{r}: {n}" for r, n in sorted(self.ineligible.items())))
        return (f"{self.with_demos} of {self.samples} samples get demonstrations ({self.drawn} drawn; {per_k}; "
                f"{self.demos} demos; {'; '.join(extra)}; retriever excluded "
                f"{', '.join(f'{k} {v}' for k, v in self.excluded.items())}) in {self.seconds:.1f}s")


@dataclass
class _SampleEncoder:
    """The processor as :func:`encode_kshot` sees it for one record: tag keys, sample id and word map bound."""

    processor: TunaProcessor
    demo_key: Callable[[str], str]
    query_key: str
    sample_id: str
    word_map: dict[str, str] | None

    def encode(self, conversation: list[dict], images: Sequence[Any] = (), tags: Sequence[Any] | None = None,
               sample_id: str = "?", **_: Any) -> dict[str, Any]:
        images = list(images)
        ids = [self.demo_key(str(im)) for im in images[:-1]] + [self.query_key]
        return self.processor.encode(conversation, images=images, image_ids=ids, tags=tags,
                                     sample_id=self.sample_id, word_map=self.word_map)


class ICLTuningDataset(LlavaJsonDataset):
    """:class:`train.data.LlavaJsonDataset` whose drawn samples are k-shot samples (see the module docstring).

    Args:
        paths, image_folder, processor, on_bad_sample, renamer: as for LlavaJsonDataset.
        settings: the in-context tuning settings.
        pool: an opened :class:`icl.pool.Pool` (default: open ``settings.pool``).
    """

    def __init__(self, paths: Sequence[str], image_folder: str | None, processor: TunaProcessor,
                 settings: ICLSettings, on_bad_sample: str = "error",
                 renamer: Callable[[int], dict[str, str] | None] | None = None, pool: Any = None) -> None:
        from icl.pool import Pool

        super().__init__(paths, image_folder, processor, on_bad_sample, renamer)
        self.settings = settings
        pool = pool if pool is not None else Pool.open(settings.pool)
        self.plan: dict[int, tuple[int, ...]] = {}  # sample index -> pool positions of its demos, prompt order
        self.info = self._make_plan(pool)
        self.demos = pool.examples  # the indexes, vectors and CLIP are not needed after planning
        self._folder = os.path.realpath(str(self.image_folder)) if self.image_folder is not None else None
        # k-shot samples encoded, their demos, demos dropped to fit max_length: shared with DataLoader workers
        self._counts = multiprocessing.Array("q", 3)
        logger.info("in-context tuning (pool %s, retriever %s, p=%g, K in %s, %s): %s", settings.pool,
                    settings.retriever, settings.p, list(settings.shots), settings.order, self.info.summary())

    def _make_plan(self, pool: Any) -> ICLPlan:
        from icl.retrievers import make_retriever, order_demos

        start = time.perf_counter()
        s = self.settings
        info = ICLPlan(samples=len(self.records))
        ineligible: Counter[str] = Counter()
        queries: list[tuple[int, int, Example]] = []
        for i, record in enumerate(self.records):
            k = draw_shots(s.seed, i, s.p, s.shots)
            if not k:
                continue
            info.drawn += 1
            query, why = query_example(record, i, self.image_folder)
            if query is None:
                ineligible[why] += 1
            else:
                queries.append((i, k, _as_in_pool(query, pool)))
        retriever = make_retriever(s.retriever, pool, seed=s.seed)
        depth = max(s.shots)
        by_shots: Counter[int] = Counter()
        # a sequence retriever's K demos are not the top of a longer list (Lever-LM's first K generated are):
        # ask it for each sample's own K
        groups = ([queries] if retriever.nested else
                  [[q for q in queries if q[1] == k] for k in sorted({k for _, k, _ in queries})])
        batches = [group[b:b + RETRIEVAL_BATCH] for group in groups for b in range(0, len(group), RETRIEVAL_BATCH)]
        for batch in batches:
            ranked = retriever.retrieve([q for _, _, q in batch], depth if retriever.nested else batch[0][1])
            for (i, k, query), demos in zip(batch, ranked):
                if not demos:
                    info.no_demos += 1
                    continue
                chosen = order_demos(demos[:k], s.order, s.seed, query.id)
                self.plan[i] = tuple(pool.position[d] for d, _ in chosen)
                by_shots[k] += 1
                info.demos += len(chosen)
                info.short += len(chosen) < k
        info.with_demos = len(self.plan)
        info.by_shots, info.ineligible = dict(sorted(by_shots.items())), dict(sorted(ineligible.items()))
        info.excluded = retriever.excluded.to_dict()
        info.seconds = time.perf_counter() - start
        return info

    def _demo_key(self, path: str) -> str:
        path = os.path.abspath(path)
        if self._folder is not None:  # resolved: the pool may name the images through another (symlinked) path
            rel = os.path.relpath(os.path.realpath(path), self._folder)
            if not rel.startswith(".."):
                path = rel.replace(os.sep, "/")
        return path

    def lengths(self) -> list[int]:
        """As LlavaJsonDataset's; a k-shot sample counts its first round, its demos and their images."""
        out = super().lengths()
        for i, positions in self.plan.items():
            turns = self.records[i]["conversations"][:2]
            words = sum(len(str(t.get("value", "")).split()) for t in turns)
            words += sum(len(self.demos[p].question.split()) + len(self.demos[p].answers[0].split())
                         for p in positions)
            out[i] = words + (len(positions) + 1) * self.processor.tokens_per_image
        return out

    def _encode(self, i: int) -> dict[str, Any]:
        positions = self.plan.get(i)
        if positions is None:
            return super()._encode(i)
        query, _ = query_example(self.records[i], i, self.image_folder)
        encoder = _SampleEncoder(self.processor, self._demo_key, str(images_of(self.records[i])[0]),
                                 self.sample_id(i), self.word_map(i))
        sample = encode_kshot(encoder, [self.demos[p] for p in positions], query, demo_tags=self.settings.demo_tags)
        with self._counts.get_lock():
            self._counts[0] += 1
            self._counts[1] += len(sample.demos)
            self._counts[2] += sample.dropped
        return sample.encoded

    def counts(self) -> dict[str, int]:
        """k-shot samples encoded so far (by this process and its DataLoader workers), their demos, demos dropped."""
        with self._counts.get_lock():
            encoded, demos, dropped = self._counts[:]
        return {"kshot_samples_encoded": encoded, "demos_encoded": demos, "demos_dropped_for_length": dropped}


class ICLCountsCallback(TrainerCallback):
    """At the end of training: logs the k-shot encoding counts summed over ranks, writes ``icl_counts.json``."""

    def __init__(self, dataset: ICLTuningDataset) -> None:
        self.dataset = dataset

    def on_train_end(self, args, state, control, **kwargs):
        import torch

        counts = self.dataset.counts()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # on the training device: an NCCL process group has no CPU backend
            device = args.device if torch.distributed.get_backend() == "nccl" else "cpu"
            total = torch.tensor(list(counts.values()), dtype=torch.float64, device=device)
            torch.distributed.all_reduce(total)
            counts = dict(zip(counts, (int(v) for v in total.tolist())))
        if not state.is_world_process_zero:
            return control
        logger.info("in-context tuning: %d k-shot samples encoded with %d demos; %d demos dropped to fit "
                    "max_length", counts["kshot_samples_encoded"], counts["demos_encoded"],
                    counts["demos_dropped_for_length"])
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"settings": asdict(self.dataset.settings), "plan": asdict(self.dataset.info), "encoded": counts,
                  "steps": state.global_step}
        (out / COUNTS_FILE).write_text(json.dumps(record, indent=1) + "\n")
        return control
