"""The scoring model's feedback s(z) = log P(answer_q | z, query) per (query, demo), cached on disk.

Each writer adds a parquet part file (written to a temporary name, then renamed), so ranks and runs can share
one cache folder without locks; reading unions the parts. Rows carry the key of the scoring model (a sha256
of its identity and of the pool), so scores of another model or pool in the same folder are never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

COLUMNS = ("model_key", "query_id", "demo_id", "sum", "mean", "n_tokens")


def model_key(identity: dict[str, Any], pool_fingerprint: str) -> str:
    """The cache key of a scoring model over a pool (ids only name examples within one pool)."""
    text = json.dumps({"scorer": identity, "pool": pool_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FeedbackCache:
    """Summed and mean answer log-likelihoods of single-demo prompts, by (query id, demo id), for one model."""

    def __init__(self, folder: str | Path, key: str) -> None:
        import pyarrow.parquet as pq

        self.folder, self.key = Path(folder), key
        self.scores: dict[tuple[str, str], tuple[float, float, int]] = {}
        self.folder.mkdir(parents=True, exist_ok=True)
        for part in sorted(self.folder.glob("part-*.parquet")):
            table = pq.read_table(part).to_pydict()
            for row in zip(*(table[c] for c in COLUMNS)):
                if row[0] == key:
                    self.scores[(row[1], row[2])] = (row[3], row[4], row[5])
        self.reused = self.added = 0

    def __len__(self) -> int:
        return len(self.scores)

    def missing(self, pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The pairs not yet scored, in order, once each; the others count as reused."""
        out, seen = [], set()
        for pair in pairs:
            if pair in self.scores:
                self.reused += 1
            elif pair not in seen:
                seen.add(pair)
                out.append(pair)
        return out

    def add(self, rows: list[tuple[str, str, float, float, int]]) -> None:
        """Store (query id, demo id, sum, mean, n_tokens) rows in a new part file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return
        columns = {"model_key": [self.key] * len(rows)}
        for i, name in enumerate(COLUMNS[1:]):
            columns[name] = [r[i] for r in rows]
        name = f"part-{uuid.uuid4().hex}.parquet"
        pq.write_table(pa.table(columns), self.folder / f".{name}.tmp")
        os.replace(self.folder / f".{name}.tmp", self.folder / name)
        for q, d, total, mean, n in rows:
            self.scores[(q, d)] = (total, mean, n)
        self.added += len(rows)

    def score(self, query_id: str, demo_id: str) -> float:
        """s(z): the summed answer log-likelihood."""
        return self.scores[(query_id, demo_id)][0]
