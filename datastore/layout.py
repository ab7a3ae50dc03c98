"""On-disk layout of a datastore directory and atomic JSON/array writes.

    DIR/build.json                      what the parts were built with (checked on resume)
    DIR/img_emb/img_emb_{part}.npy      float16 (n, dim) L2-normalised CLIP image embeddings
    DIR/metadata/metadata_{part}.parquet key, caption, tags (list<string>), shard
    DIR/parts/part_{part}.json          completion marker + per-part counts and timings
    DIR/index/index.faiss, index_infos.json
    DIR/manifest.json                   written last: the datastore is complete when it exists
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
PART_DIGITS = 6


def part_name(part: int) -> str:
    return f"{part:0{PART_DIGITS}d}"


def emb_path(root: str | Path, part: int) -> Path:
    return Path(root) / "img_emb" / f"img_emb_{part_name(part)}.npy"


def metadata_path(root: str | Path, part: int) -> Path:
    return Path(root) / "metadata" / f"metadata_{part_name(part)}.parquet"


def marker_path(root: str | Path, part: int) -> Path:
    return Path(root) / "parts" / f"part_{part_name(part)}.json"


def build_path(root: str | Path) -> Path:
    return Path(root) / "build.json"


def manifest_path(root: str | Path) -> Path:
    return Path(root) / "manifest.json"


def index_dir(root: str | Path) -> Path:
    return Path(root) / "index"


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON to a temporary sibling, then rename: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    with open(path) as handle:
        return json.load(handle)


def tmp_sibling(path: Path) -> Path:
    """A per-process temporary name next to ``path`` (renamed into place when complete)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")
