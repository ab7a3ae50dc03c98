"""Byte sizes and file hashes."""

from __future__ import annotations

import hashlib
import re

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value: str | int) -> int:
    """Parse a size such as ``"16G"``, ``"512M"``, ``"1.5T"`` or a plain integer into bytes.

    Raises:
        ValueError: the string is not a number with an optional K/M/G/T suffix.
    """
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(value).upper())
    if not match:
        raise ValueError(f"cannot parse size {value!r}: expected e.g. '512M', '16G' or a byte count")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a local file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
