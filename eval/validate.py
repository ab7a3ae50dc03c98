"""Every benchmark's files, questions and images checked before the model loads.

A bad question found half-way through a run used to stop ``tuna-eval`` after earlier benchmarks had
finished, with no results written. Now all benchmarks are loaded and each question's image is opened
(header only: cheap) up front; a bad one is a one-line error naming it, or, with
``--on-bad-sample skip``, dropped and counted per reason in ``results.json``.
"""

from __future__ import annotations

import io
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.benchmarks import Benchmark, get_benchmark

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("error", "skip")
N_EXAMPLES = 5


@dataclass
class PreparedBenchmark:
    """A benchmark's resolved files and the questions that will be asked (``--limit`` applied).

    Attributes:
        skipped: reason -> questions dropped for it (``--on-bad-sample skip``).
        examples: the first few dropped questions, "question_id: why".
    """

    bench: Benchmark
    files: dict[str, Path]
    samples: list[dict]
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip_report(self) -> dict[str, Any]:
        return {"n": sum(self.skipped.values()), "reasons": dict(self.skipped), "examples": self.examples}


def prepare_benchmarks(names: list[str], data_root: str, limit: int | None = None,
                       on_bad_sample: str = "error") -> list[PreparedBenchmark]:
    """Resolve, load and check every benchmark in ``names``.

    Raises:
        ValueError: on a missing or malformed file (always), or on a question whose image is missing,
            unreadable or over the pixel cap when ``on_bad_sample`` is "error"; the message names it.
    """
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise ValueError(f"on_bad_sample={on_bad_sample!r}: expected one of {list(BAD_SAMPLE_POLICIES)}")
    benches = [get_benchmark(name) for name in names]
    resolved = [bench.resolve(data_root) for bench in benches]  # every missing file first: nothing is loaded yet
    prepared = []
    for bench, files in zip(benches, resolved):
        item = PreparedBenchmark(bench, files, [])
        for sample in bench.load(files)[:limit]:
            why = image_problem(sample, files["images"])
            if why is None:
                item.samples.append(sample)
                continue
            where = f"{bench.name}: question {sample.get('question_id')!r}: {why[1]}"
            if on_bad_sample == "error":
                raise ValueError(f"{where} (--on-bad-sample skip drops and counts such questions)")
            item.skipped[why[0]] += 1
            if len(item.examples) < N_EXAMPLES:
                item.examples.append(f"{sample.get('question_id')}: {why[1]}")
        if item.skipped:
            logger.warning("%s: skipped %d bad question(s) (%s), e.g. %s", bench.name, sum(item.skipped.values()),
                           ", ".join(f"{k} {v}" for k, v in item.skipped.items()), item.examples[0])
        prepared.append(item)
    return prepared


def image_source(sample: dict, folder: Path) -> tuple[Any, str]:
    """(what PIL opens, how messages name it): ``image_bytes`` (e.g. MMBench's base64 tsv) or the path of
    ``image`` under ``folder``."""
    if sample.get("image_bytes") is not None:
        return io.BytesIO(sample["image_bytes"]), "inline image"
    path = folder / sample["image"]
    return path, f"image {str(path)!r}"


def image_problem(sample: dict, folder: Path) -> tuple[str, str] | None:
    """(reason, message) when the question's image cannot be used, else None; reads only the header."""
    from PIL import UnidentifiedImageError

    from datastore.reader import OversizedImage, open_image

    inline = sample.get("image_bytes") is not None
    if not inline and not sample.get("image"):
        return "missing_image", "no image given"
    source, what = image_source(sample, folder)
    if not inline and not Path(source).is_file():
        return "missing_image", f"{what} not found"
    try:
        open_image(source).close()
    except OversizedImage as exc:
        return "oversized_image", f"{what}: {exc}"
    except (OSError, UnidentifiedImageError) as exc:
        return "unreadable_image", f"cannot read {what}: {exc}"
    return None
