"""k-shot evaluation: K retrieved demonstrations before each question, one pass per shot count.

The demonstrations come from an ``icl`` pool and a retriever; each is a round of its own (image, question,
answer) before the question (``icl.prompts``). The results table has a column per shot count and the
Lever-LM paper's summary columns: the mean over 1-2 shots (interpolation) and over 3-8 (extrapolation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

INTERPOLATION = (1, 2)
EXTRAPOLATION = tuple(range(3, 9))


@dataclass
class KShotSettings:
    """Where the demonstrations come from.

    Attributes:
        pool: demonstration pool directory (``tuna-icl pool build``).
        retriever: retriever name (icl.retrievers) or PREFIX:PATH.
        order: prompt order of the demos (similar-last, similar-first, shuffled).
        demo_tags: retrieved tags for the demos' images too (the query's follow the run's tag flags).
        seed: seed of the random retriever and of shuffled orders.
    """

    pool: str
    retriever: str = "siir"
    order: str = "similar-last"
    demo_tags: bool = True
    seed: int = 0


class DemoSource:
    """Retrieves and orders demonstrations for benchmark samples (the pool opens once per run)."""

    def __init__(self, settings: KShotSettings) -> None:
        from icl.pool import Pool
        from icl.retrievers import make_retriever

        self.settings = settings
        self.pool = Pool.open(settings.pool)
        self.retriever = make_retriever(settings.retriever, self.pool, seed=settings.seed)

    def demos_for(self, queries: list[Any], k: int, prompt_suffix: str = "") -> list[list[tuple[Any, float]]]:
        """Per query (icl Example): (demo Example, score) in prompt order; each demo's question ends with the
        benchmark's ``prompt_suffix`` as the query's does (a demo should read like the question it precedes)."""
        from dataclasses import replace

        from eval.benchmarks import strip_suffix
        from icl.retrievers import order_demos

        def styled(demo):
            if not prompt_suffix:
                return demo
            return replace(demo, question=strip_suffix(demo.question, prompt_suffix) + "\n" + prompt_suffix)

        ranked = self.retriever.retrieve(queries, k)
        return [[(styled(self.pool.examples[self.pool.position[d]]), s)
                 for d, s in order_demos(r, self.settings.order, self.settings.seed, q.id)]
                for q, r in zip(queries, ranked)]


def query_example(sample: dict, question: str, folder: Path):
    """The icl Example of a benchmark sample (its image must be a file: inline images have no path)."""
    from icl.formats import Example

    if sample.get("image_bytes") is not None:
        raise ValueError(f"question {sample['question_id']!r}: k-shot evaluation needs image files, this "
                         "benchmark stores its images inline")
    answers = tuple(str(a) for a in sample.get("answers") or [sample.get("answer", "")])
    # the label is the gold answer, as the pools label their examples: only the oracle retriever reads it
    return Example(id=str(sample["question_id"]), image=str(folder / sample["image"]), question=question,
                   answers=answers or ("",), task=str(sample.get("category", "vqa")), label=answers[0] if answers else None)


def encode_kshot_prompt(processor, demos: list, query, demo_tags: bool, query_image_id: str | None = None) -> dict:
    """A generation prompt: the demos' rounds, then the query's question. ``query_image_id``: the id the
    query image's tags are looked up by (the benchmark's ``image`` field, as the retrieval cache and the
    0-shot path key it); default: its path."""
    from icl.prompts import kshot_conversation, tags_to_read

    conversation = kshot_conversation(demos, query, with_answer=False)
    images = [d.image for d in demos] + [query.image]
    ids = [str(d.image) for d in demos] + [query_image_id or str(query.image)]
    return processor.encode(conversation, images=images, image_ids=ids, tags=tags_to_read(len(demos), demo_tags),
                            sample_id=query.id)


def summary_columns(by_shot: dict[int, float | None]) -> dict[str, float | None]:
    """Interpolation (1-2 shots) and extrapolation (3-8) means over the shot counts that were run."""
    def mean(shots: tuple[int, ...]) -> float | None:
        values = [by_shot[k] for k in shots if by_shot.get(k) is not None]
        return sum(values) / len(values) if values else None

    return {"interpolation": mean(INTERPOLATION), "extrapolation": mean(EXTRAPOLATION)}


def kshot_table(runs: list[dict[str, Any]], names: list[str]) -> str:
    """Benchmarks x shot counts (+ interpolation/extrapolation) per run, each cell the main metric."""
    shots = sorted({int(k) for run in runs for per in run.get("kshot", {}).values() for k in per["shots"]})
    if not shots:
        return ""
    header = [f"{k}-shot" for k in shots] + ["interp. (1-2)", "extrap. (3-8)"]
    lines = ["| run | benchmark | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    for run, name in zip(runs, names):
        for bench, per in run.get("kshot", {}).items():
            cells = [per["shots"].get(str(k), per["shots"].get(k)) for k in shots]
            cells += [per["interpolation"], per["extrapolation"]]
            text = ["-" if v is None else f"{v:.1f}" for v in cells]
            lines.append(f"| {name} ({per['retriever']}) | {bench} ({per['main_metric']}) | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"
