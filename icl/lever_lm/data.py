"""Lever-LM's training data D_M: beam-searched demonstration sequences for anchors of a pool.

```
DM/settings.json          what the data is: pool (path, fingerprint), scorer identity, n, M, sampling, b, l, seed
DM/parts/part-NNNNN.parquet   finished blocks of anchors (resume unit; written atomically)
DM/sequences.parquet      anchor_id, beam (0 = best), demo_ids (prompt order), step_scores, probability
DM/anchors.parquet        anchor_id, candidates, first_step_scores, base_probability, sets_scored, seconds
DM/manifest.json          settings + counts, sets scored, forward passes, seconds (written last)
```

Anchors are a seeded sample of the pool; each draws its M candidates with a retriever (``random`` by
default, ``siir`` etc. for similarity sampling) that already excludes the anchor, its image and near
copies. Under ``torchrun`` rank r takes the blocks i with i % world == r; rank 0 merges once every block's
file exists (no process group: ranks share only the output folder, so any launcher works).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.distributed import dist_env
from datastore import layout
from icl.lever_lm.beam import beam_search
from icl.pool import Pool
from icl.scoring import Scorer

logger = logging.getLogger(__name__)

SEQUENCES, ANCHORS, SETTINGS, MANIFEST = "sequences.parquet", "anchors.parquet", "settings.json", "manifest.json"


@dataclass
class BuildDataConfig:
    """How to mine D_M.

    Attributes:
        pool: demonstration pool directory; anchors and candidates come from it.
        out: D_M directory.
        anchors: n, anchors sampled from the pool (capped at its size).
        candidates: M, candidate demos per anchor.
        sampling: retriever that draws the candidate set (random, siir, sttr, sitr, sit).
        beam: b, sequences kept per step.
        length: l, demos per sequence.
        seed: anchor sample and random candidate sets.
        block: anchors per part file (the resume unit).
    """

    pool: str
    out: str
    anchors: int = 1000
    candidates: int = 64
    sampling: str = "random"
    beam: int = 5
    length: int = 2
    seed: int = 0
    block: int = 8

    def __post_init__(self) -> None:
        from icl.retrievers import RETRIEVERS

        if min(self.anchors, self.candidates, self.beam, self.length, self.block) < 1:
            raise ValueError("anchors, candidates, beam, length and block must all be >= 1")
        if self.length > self.candidates:
            raise ValueError(f"length={self.length} > candidates={self.candidates}")
        if self.sampling not in RETRIEVERS or self.sampling == "oracle":
            raise ValueError(f"sampling={self.sampling!r}: expected one of random, siir, sttr, sitr, sit")


def anchor_ids(pool: Pool, n: int, seed: int) -> list[str]:
    """A seeded sample of n pool ids (all of them when n >= the pool): the same on every rank and resume."""
    rng = np.random.default_rng(seed)
    return [pool.examples[i].id for i in rng.permutation(len(pool))[:n]]


def _check_settings(out: Path, record: dict[str, Any]) -> None:
    path = out / SETTINGS
    if path.is_file():
        if json.loads(path.read_text()) != record:
            raise ValueError(f"{out} holds D_M mined with other settings or another scorer; use another --out "
                             f"or --overwrite")
    else:
        out.mkdir(parents=True, exist_ok=True)
        layout.write_json_atomic(path, record)


def build_data(config: BuildDataConfig, scorer: Scorer, scorer_identity: dict[str, Any], progress: bool = True
               ) -> dict[str, Any] | None:
    """Mine D_M into ``config.out`` (resuming finished blocks); returns the manifest on rank 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from icl.retrievers import make_retriever

    out = Path(config.out)
    pool = Pool.open(config.pool)
    record = {"pool": str(Path(config.pool).resolve()), "pool_fingerprint": pool.fingerprint,
              "settings": asdict(config) | {"pool": None, "out": None}, "scorer": scorer_identity}
    rank, world, _ = dist_env()
    _check_settings(out, record)  # every rank: the same record, written atomically by whichever is first
    anchors = anchor_ids(pool, config.anchors, config.seed)
    blocks = [anchors[i:i + config.block] for i in range(0, len(anchors), config.block)]
    mine = [i for i in range(len(blocks)) if i % world == rank]
    todo = [i for i in mine if not _part(out, i).is_file()]
    if len(todo) < len(mine):
        logger.info("D_M %s: %d of this rank's %d blocks already mined, resuming", out, len(mine) - len(todo), len(mine))
    sampler = make_retriever(config.sampling, pool, seed=config.seed)
    bar = tqdm(total=sum(len(blocks[i]) for i in todo), desc=f"beam search (rank {rank})", unit="anchor",
               disable=not progress)
    sets, start = 0, time.perf_counter()
    batch = getattr(scorer, "batch_size", 1)
    for i in todo:
        sequence_rows, anchor_rows = [], []
        queries = [pool.examples[pool.position[a]] for a in blocks[i]]
        for query, ranked in zip(queries, sampler.retrieve(queries, config.candidates)):
            t0 = time.perf_counter()
            candidates = [pool.examples[pool.position[d]] for d, _ in ranked]
            result = beam_search(scorer, query, candidates, config.beam, min(config.length, len(candidates)))
            sequence_rows += [{"anchor_id": query.id, "beam": b, "demo_ids": [candidates[d].id for d in s.demos],
                               "step_scores": s.step_scores, "probability": s.probability}
                              for b, s in enumerate(result.sequences)]
            anchor_rows.append({"anchor_id": query.id, "candidates": [c.id for c in candidates],
                                "first_step_scores": result.first_step_scores.tolist(),
                                "base_probability": result.base_probability, "sets_scored": result.sets_scored,
                                # each scoring call splits its sets into batches of the scorer's size
                                "forward_passes": 1 + sum(-(-n // batch) for n in result.steps),
                                "seconds": time.perf_counter() - t0})
            sets += result.sets_scored
            bar.update(1)
            bar.set_postfix(sets_per_s=f"{sets / (time.perf_counter() - start):.1f}")
        part = _part(out, i)
        part.parent.mkdir(parents=True, exist_ok=True)
        tmp = part.with_suffix(".tmp")
        # one file per block: sequences and anchors travel together, so a block is done or not at all
        pq.write_table(pa.table({"sequences": [json.dumps(sequence_rows)], "anchors": [json.dumps(anchor_rows)]}), tmp)
        tmp.replace(part)
    bar.close()
    if rank != 0:
        return None
    waited = 0.0
    while not all(_part(out, i).is_file() for i in range(len(blocks))):  # the other ranks' blocks
        if waited % 60 == 0:
            logger.info("D_M %s: waiting for the other ranks' blocks", out)
        time.sleep(1.0)
        waited += 1.0
    return _merge(out, record, len(blocks), scorer)


def _part(out: Path, i: int) -> Path:
    return out / "parts" / f"part-{i:05d}.parquet"


def _merge(out: Path, record: dict[str, Any], n_blocks: int, scorer: Scorer) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sequences, anchors = [], []
    for i in range(n_blocks):
        row = pq.read_table(_part(out, i)).to_pylist()[0]
        sequences += json.loads(row["sequences"])
        anchors += json.loads(row["anchors"])
    pq.write_table(pa.Table.from_pylist(sequences), out / SEQUENCES)
    pq.write_table(pa.Table.from_pylist(anchors), out / ANCHORS)
    sets = sum(a["sets_scored"] for a in anchors)
    seconds = sum(a["seconds"] for a in anchors)
    manifest = {**record, "anchors": len(anchors), "sequences": len(sequences), "sets_scored": sets,
                "forward_passes": sum(a["forward_passes"] for a in anchors),
                "scorer_batch_size": getattr(scorer, "batch_size", 1), "seconds_scoring": round(seconds, 2),
                "seconds_per_anchor": round(seconds / max(1, len(anchors)), 3),
                "sets_per_second": round(sets / seconds, 2) if seconds else None}
    layout.write_json_atomic(out / MANIFEST, manifest)
    logger.info("D_M %s: %d anchors, %d sequences, %d sets scored, %.2f s per anchor", out, len(anchors),
                len(sequences), sets, manifest["seconds_per_anchor"])
    return manifest


def read_dm(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(manifest, sequences, anchors) of a finished D_M directory."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ValueError(f"{path} has no {MANIFEST}: not a D_M directory, or its build-data has not finished")
    manifest = json.loads((path / MANIFEST).read_text())
    return manifest, pq.read_table(path / SEQUENCES).to_pylist(), pq.read_table(path / ANCHORS).to_pylist()


def diagnostics(path: str | Path, pool: Pool) -> dict[str, Any]:
    """Does the large model's InfoScore prefer demos of the anchor's label? Shares of label-matching demos in
    the kept sequences (per position) against their share of the candidate sets, and the mean percentile of
    label-matching candidates in the first step's InfoScore ranking (50 = no preference, 100 = all first)."""
    _, sequences, anchors = read_dm(path)
    label = {e.id: e.label for e in pool.examples}
    # only labelled anchors say anything about labels (caption pools have none: None == None is no match)
    anchors = [a for a in anchors if label.get(a["anchor_id"]) is not None]
    sequences = [s for s in sequences if label.get(s["anchor_id"]) is not None]
    length = max((len(s["demo_ids"]) for s in sequences), default=0)
    by_position = [[label[s["demo_ids"][p]] == label[s["anchor_id"]] for s in sequences if len(s["demo_ids"]) > p]
                   for p in range(length)]
    best = [s for s in sequences if s["beam"] == 0]
    base_rate = [label[c] == label[a["anchor_id"]] for a in anchors for c in a["candidates"]]
    percentiles = []
    for a in anchors:
        scores = np.asarray(a["first_step_scores"])
        same = np.array([label[c] == label[a["anchor_id"]] for c in a["candidates"]])
        if same.any() and not same.all():
            ranks = scores.argsort().argsort() / max(1, len(scores) - 1)  # 0 = lowest InfoScore, 1 = highest
            percentiles.append(100.0 * ranks[same].mean())

    def share(values) -> float | None:
        return round(100.0 * float(np.mean(values)), 1) if len(values) else None

    return {"labelled_anchors": len(anchors), "sequences": len(sequences),
            "candidates_with_anchor_label_pct": share(base_rate),
            "sequences_holding_anchor_label_pct": share(
                [any(label[d] == label[s["anchor_id"]] for d in s["demo_ids"]) for s in sequences]),
            "best_sequences_holding_anchor_label_pct": share(
                [any(label[d] == label[s["anchor_id"]] for d in s["demo_ids"]) for s in best]),
            "demos_with_anchor_label_pct_by_position": [share(v) for v in by_position],
            "infoscore_percentile_of_anchor_label_candidates": round(float(np.mean(percentiles)), 1)
            if percentiles else None,
            "mean_base_probability": round(float(np.mean([a["base_probability"] for a in anchors])), 4)
            if anchors else None,
            "mean_best_probability": round(float(np.mean([s["probability"] for s in best])), 4) if best else None}
