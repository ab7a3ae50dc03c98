"""Index choice: which faiss index fits a corpus size and memory budget, and its estimated size."""

from __future__ import annotations

import functools
import logging
import math
import re

logger = logging.getLogger(__name__)

FLAT_MAX_N = 50_000  # exact search is fast enough up to here
HNSW_MAX_N = 500_000  # above this HNSW build time on few cores becomes impractical
HNSW_M = 32
IVF_HNSW_MIN_NLIST = 1 << 15  # coarse quantizer switches from flat to HNSW at this many lists

def ivf_nlist(n: int) -> int:
    """IVF list count: the power of two nearest 4*sqrt(n), halved until every list has >= 39
    training points (n/39), at least 1."""
    nlist = 2 ** round(math.log2(max(4.0 * math.sqrt(n), 1.0)))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


@functools.cache
def rabitq_available() -> bool:
    """Whether this faiss has multi-bit RaBitQ (``IVF..,RaBitQ{b}``)."""
    import faiss

    try:
        faiss.index_factory(8, "IVF1,RaBitQ4", faiss.METRIC_INNER_PRODUCT)
    except (RuntimeError, AttributeError):
        return False
    return True


def _ivf_candidates(n: int, d: int) -> list[str]:
    nlist = ivf_nlist(n)
    coarse = f"IVF{nlist}_HNSW{HNSW_M}" if nlist >= IVF_HNSW_MIN_NLIST else f"IVF{nlist}"
    codecs = ["SQ8"] + ([f"RaBitQ{b}" for b in range(7, 1, -1)] if rabitq_available() else ["SQ6", "SQ4"])
    options = [f"{coarse},{codec}" for codec in codecs]
    if n >= 256 * 39:  # 8-bit PQ codebooks need ~10k training points
        for m in (128, 64, 32, 16, 8):
            if m <= d // 2:
                options.append(f"OPQ{m}_{min(d, 4 * m) // m * m},{coarse},PQ{m}x8")
    return options


_IVF_RE = re.compile(r"(?:OPQ(\d+)_(\d+),)?IVF(\d+)(?:_HNSW(\d+))?,"
                     r"(SQ4|SQ6|SQ8|SQfp16|Flat|RaBitQ(\d?)|PQ(\d+)x(\d+))")


def _code_bytes(codec: str, d: int) -> tuple[int, int]:
    """(bytes per vector code, trained codec bytes) for an IVF codec over d dimensions."""
    match = re.fullmatch(r"RaBitQ(\d?)|PQ(\d+)x(\d+)", codec)
    if match and match.group(2):  # PQ: m codes of nbits, codebooks 2**nbits x d floats
        return math.ceil(int(match.group(2)) * int(match.group(3)) / 8), (1 << int(match.group(3))) * d * 4
    if match:  # RaBitQ: sign bits + 2 floats, then (b-1) extra bits per dim + 3 floats
        bits = int(match.group(1) or 1)
        return math.ceil(d / 8) + 8 + (math.ceil(d * (bits - 1) / 8) + 12 if bits > 1 else 0), 0
    per_dim = {"SQ4": 0.5, "SQ6": 0.75, "SQ8": 1, "SQfp16": 2, "Flat": 4}[codec]
    return math.ceil(d * per_dim), 2 * d * 4  # scalar quantizers keep a (min, range) per dim


def estimate_memory(factory: str, n: int, d: int) -> int:
    """Estimated serialized size in bytes of ``factory`` holding ``n`` vectors of dimension ``d``.

    Supports the strings :func:`choose_factory` produces: ``Flat``, ``HNSW{M}[,Flat]`` and
    ``[OPQ{m}_{d'},]IVF{k}[_HNSW{M}],{SQ4|SQ6|SQ8|SQfp16|Flat|RaBitQ[b]|PQ{m}x{bits}}``.

    Raises:
        ValueError: the string is not one of those forms.
    """
    if factory == "Flat":
        return n * d * 4 + 64
    hnsw = re.fullmatch(r"HNSW(\d+)(?:,Flat)?", factory)
    if hnsw:
        return int(n * _hnsw_node_bytes(int(hnsw.group(1)), d)) + 256
    match = _IVF_RE.fullmatch(factory)
    if not match:
        raise ValueError(f"cannot estimate memory of factory {factory!r}: unsupported form")
    opq_m, d_opq, nlist, q_m, codec = match.groups()[:5]
    d_in, nlist = int(d_opq or d), int(nlist)
    code, trained = _code_bytes(codec, d_in)
    total = 512 + trained + (d * d_in * 4 + d_in * 4 if opq_m else 0)  # headers, codec, OPQ matrix
    total += nlist * (_hnsw_node_bytes(int(q_m), d_in) if q_m else d_in * 4)  # coarse centroids
    return int(total + nlist * 8 + n * (code + 8))  # list sizes, codes + int64 ids


def _hnsw_node_bytes(m: int, d: int) -> float:
    """Vector + expected links (2m on level 0, m per upper level, P(level>=l) = m**-l) + level/offset."""
    return d * 4 + 4 * (2 * m + m / (m - 1)) + 4 + 8


def choose_factory(n: int, d: int, max_memory_bytes: int) -> str:
    """Pick an index_factory string for ``n`` normalised ``d``-dim vectors within a memory budget.

    Rules (sizes from :func:`estimate_memory`; the first option that fits wins):

    1. ``n <= 50_000``: ``Flat`` (exact search is cheap at this size).
    2. ``n <= 500_000``: ``HNSW32,Flat`` (fast graph search on uncompressed vectors).
    3. Otherwise, or when nothing above fits: IVF with ``nlist`` from :func:`ivf_nlist` (an HNSW32
       coarse quantizer from 32768 lists on) and codes from largest (most accurate) to smallest:
       ``SQ8`` (d bytes), ``RaBitQ7`` .. ``RaBitQ2`` (~b*d/8 bytes; ``SQ6``, ``SQ4`` if this faiss
       lacks multi-bit RaBitQ), then ``OPQ{m}_{d'},IVF..,PQ{m}x8`` for m = 128 .. 8 (m <= d/2,
       d' = 4m capped at d; only when n >= 9984 so 8-bit codebooks can be trained). Every IVF
       vector also costs an 8-byte id.

    Raises:
        ValueError: a size is not positive, or no option fits; the message gives the smallest
            estimate and says to raise ``--max-index-memory``.
    """
    if min(n, d, max_memory_bytes) < 1:
        raise ValueError(f"choose_factory: n, d, max_memory_bytes must be >= 1, got {n}, {d}, {max_memory_bytes}")
    candidates = (["Flat"] if n <= FLAT_MAX_N else []) + ([f"HNSW{HNSW_M},Flat"] if n <= HNSW_MAX_N else [])
    estimates = {factory: estimate_memory(factory, n, d) for factory in candidates + _ivf_candidates(n, d)}
    for factory, size in estimates.items():
        if size <= max_memory_bytes:
            logger.info("chose %s for n=%d d=%d: estimated %s <= budget %s", factory, n, d,
                        fmt_bytes(size), fmt_bytes(max_memory_bytes))
            return factory
    smallest = min(estimates, key=estimates.get)
    raise ValueError(
        f"no index fits max_index_memory={fmt_bytes(max_memory_bytes)} for n={n}, d={d}: the smallest "
        f"option {smallest} needs an estimated {fmt_bytes(estimates[smallest])} "
        f"({estimates[smallest]} bytes); raise --max-index-memory to at least that")


def fmt_bytes(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"
