"""What a quickstart run directory holds: its file layout (:class:`Paths`) and its evaluation runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EvalRun:
    """One evaluation of the quickstart: which trained model, with which ``tuna-eval`` tag flags."""

    model: str  # "baseline" or "tuna"
    flags: tuple[str, ...]
    label: str  # its row in the report


RUNS = {  # eval folder -> run; the swap runs are added when the swap is on (quickstart.eval_runs)
    "baseline": EvalRun("baseline", ("--no-tags",), "baseline (no tags)"),
    "tuna": EvalRun("tuna", (), "TUNA"),
    "tuna_random_tags": EvalRun("tuna", ("--ablation", "random_tags"), "TUNA, random tags"),
    "tuna_uniform_weights": EvalRun("tuna", ("--ablation", "uniform_weights"), "TUNA, uniform weights"),
}
TEXT_REFERENCE = "llm_tags_as_text"  # eval folder of the text-only LLM reading TUNA's tag blocks


class Paths:
    """Where each stage of the quickstart at ``root`` writes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.world, self.world2 = root / "world", root / "world_swap"
        self.clip = root / "clip"
        self.llm = root / "llm"
        self.text_replay = root / "text_replay.json"
        self.seen_names = root / "seen_names.txt"  # the names TUNA's stage 2 renames (rename_p)
        self.fresh_names = root / "fresh_names.txt"  # what it renames them into (rename_to "fresh")
        self.datastore, self.datastore2 = root / "datastore", root / "datastore_swap"
        self.cache, self.cache2 = root / "tags.parquet", root / "tags_swap.parquet"
        self.random_vocab = root / "random_tags_vocab.txt"  # what the random-tags ablation draws from
        self.models = root / "models"
        self.eval = root / "eval"
        self.logs = root / "logs"

    def model(self, name: str, stage: int) -> Path:
        return self.models / f"{name}-stage{stage}"
