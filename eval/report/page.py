"""Write the report: the page template with the data blob, and the ``tuna-eval report`` command."""

from __future__ import annotations

import argparse
import html
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.report.data import ReportConfig, collect

logger = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("page.html")
DATA_MARK, TITLE_MARK = "/*__DATA__*/", "__TITLE__"


@dataclass
class ReportStats:
    """What :func:`build_report` wrote."""

    path: str
    samples: int
    columns: int
    images: int
    missing_images: int
    bytes: int
    seconds: float


def render_html(data: dict[str, Any]) -> str:
    """The page: the template with the data as a JSON blob that no string can break out of."""
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    # "<" can only occur inside JSON strings, where \u003c means the same: no "</script>" can close the tag
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    head, tail = TEMPLATE.read_text(encoding="utf-8").split(DATA_MARK)
    title = html.escape(str(data["title"]))
    return head.replace(TITLE_MARK, title) + blob + tail


def build_report(config: ReportConfig, progress: bool = True) -> ReportStats:
    """Collect the runs' samples, make the thumbnails and write ``config.out``.

    Raises:
        ReportError: a run folder without results.json or per-sample records, an unreadable datastore, or
            a ``group`` no sample has (one line naming the file or option).
    """
    start = time.perf_counter()
    data, thumbs = collect(config, progress)
    if thumbs.missing:
        logger.warning("%d images not found or unreadable (shown as placeholders), e.g. %s", len(thumbs.missing),
                       thumbs.missing[0])
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(data), encoding="utf-8")
    return ReportStats(path=str(out), samples=len(data["samples"]), columns=len(data["columns"]),
                       images=len(data["images"]), missing_images=len(thumbs.missing), bytes=out.stat().st_size,
                       seconds=round(time.perf_counter() - start, 2))


def main(argv: list[str]) -> int:
    """``tuna-eval report RUN [RUN ...] --out FILE``; returns the exit code."""
    from common.log import error_line, setup_logging

    p = argparse.ArgumentParser(
        prog="tuna-eval report", description="Write one self-contained HTML page (thumbnails embedded, no server "
        "or network needed) of one or more tuna-eval runs, sample by sample: image, question, gold answer, each "
        "run's answer marked right/wrong, the tags with their weights, the datastore neighbours (--datastore), "
        "k-shot demonstrations; the runs' metrics per benchmark and group on top; filters and paging.",
        epilog="example: tuna-eval report ev/baseline ev/tuna --out report.html --datastore ds --group novelty=novel")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="tuna-eval --out folders, one column each")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--datastore", help="datastore the runs retrieved from: neighbour thumbnails and captions")
    p.add_argument("--data-root", help="benchmark data root for the images (default: each run's --data-root)")
    p.add_argument("--names", help="comma-separated column labels, one per run (default: folder names)")
    p.add_argument("--group", metavar="KEY=VALUE", help="only samples whose field KEY is VALUE, e.g. novelty=novel")
    p.add_argument("--thumb-size", type=int, default=112, help="longest thumbnail side in pixels (default 112)")
    p.add_argument("--title", default="tuna-eval report", help="page title")
    args = p.parse_args(argv)
    setup_logging(logging.INFO)
    try:
        config = ReportConfig(runs=args.runs, out=args.out, datastore=args.datastore, data_root=args.data_root,
                              names=args.names.split(",") if args.names else None, group=args.group,
                              thumb_size=args.thumb_size, title=args.title)
        stats = build_report(config)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        print(f"tuna-eval report: error: {error_line(exc)}", file=sys.stderr)
        return 1
    print(f"report: {stats.samples} samples x {stats.columns} columns, {stats.images} images "
          f"({stats.missing_images} missing) in {stats.seconds:.1f} s -> {stats.path} ({stats.bytes / 1e6:.2f} MB)")
    return 0
