"""On-disk layout of a datastore directory and atomic JSON/array writes.

    DIR/build.json                      what the parts were built with (checked on resume)
    DIR/img_emb/img_emb_{part}.npy      float16 (n, dim) L2-normalised CLIP image embeddings
    DIR/metadata/metadata_{part}.parquet key, caption, tags (list<string>), shard
    DIR/parts/part_{part}.json          completion marker + per-part counts, timings, shard size/mtime,
                                        and the part files' sizes and sha256
    DIR/index/index.faiss, index_infos.json
    DIR/manifest.json                   written last: the datastore is complete when it exists
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.files import sha256_file

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
    """Parse a JSON file; ValueError names the file when it is not valid JSON."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def read_json_object(path: str | Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a JSON object holding ``required`` keys; ValueError names the file and what is wrong."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    require_keys(path, data, required)
    return data


def require_keys(path: str | Path, data: dict[str, Any], required: tuple[str, ...]) -> None:
    """ValueError naming ``path`` and the keys of ``required`` that ``data`` (read from it) lacks."""
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(repr(k) for k in missing)}")


class DamagedFileError(RuntimeError):
    """A datastore file is missing, or its size or checksum differs from what was recorded."""


def file_record(path: str | Path) -> dict[str, Any]:
    """Size and sha256 of a written file, recorded in part markers and the manifest."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(str(path))}


def check_file(root: str | Path, rel: str, record: dict[str, Any] | None, checksum: bool = False) -> str | None:
    """None when ``root/rel`` matches ``record`` (size; sha256 too with ``checksum``), else what is wrong.
    A missing record (written by an older version) checks only that the file exists."""
    path = Path(root) / rel
    if not path.is_file():
        return f"{path}: missing"
    if not record:
        return None
    size = path.stat().st_size
    if record.get("bytes") is not None and size != record["bytes"]:
        return f"{path}: {size} bytes, {record['bytes']} recorded (truncated or replaced)"
    if checksum and record.get("sha256") and sha256_file(str(path)) != record["sha256"]:
        return f"{path}: sha256 differs from the recorded one (corrupted or replaced)"
    return None


def tmp_sibling(path: Path) -> Path:
    """A per-process temporary name next to ``path`` (renamed into place when complete)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")
