"""Experiment: retrain TUNA on a finished quickstart with other training settings, and compare.

TUNA is trained again (stage 1 + 2) with the quickstart's own commands, seed, data and budget, plus the
given ``train/train.py`` overrides and/or another training retrieval cache, then evaluated on
``synth_open`` exactly as the quickstart evaluates it (same cache, k, support filter). The baseline and
the quickstart's TUNA are read from the run itself. Retraining with no change reproduces the
quickstart's TUNA figures exactly, so any difference is the change (at that seed: judge on several).

    python experiments/exp_retrain_tuna.py --quickstart runs/qs --name prior1 --train '{"tag_score_prior": 1.0}'
    python experiments/exp_retrain_tuna.py --quickstart runs/qs --name lr --stage2 '{"learning_rate": 1e-4}'
    python experiments/exp_retrain_tuna.py --quickstart runs/qs --name c --train-cache my_cache.parquet

About 4 min on 2 cores. Writes ``QUICKSTART/<name>/`` (models, logs, eval) and prints a markdown table:
identification seen / novel, by scene, and the copy rate (identification when the top-weighted tag
names the object, ``pipeline.report.tag_diagnostics``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _recipe(root: Path) -> dict:
    """The quickstart settings of ``root`` (runs from before name permutation existed trained without it)."""
    return {"rename_p": 0.0, **json.loads((root / "stages.json").read_text())["recipe"]}


def retrain(root: Path, out: Path, train: dict, stage2: dict, train_cache: Path | None, what: str) -> Path:
    """Train TUNA stage 1 + 2 into ``out`` as the quickstart at ``root`` did, with the overrides; the
    stage-2 model directory."""
    from pipeline.processes import run_logged
    from pipeline.quickstart import Paths, QuickstartConfig, process_env, train_command

    recipe = _recipe(root)
    extra = recipe.get("extra", {})
    paths = Paths(root)
    config = None
    for stage in (1, 2):
        overrides = {**train, **(stage2 if stage == 2 else {}), "output_dir": str(out / f"tuna-stage{stage}")}
        if train_cache is not None:
            overrides["retrieval_cache"] = str(train_cache)
        if stage == 2:
            overrides["stage1_checkpoint"] = str(out / "tuna-stage1")
        config = QuickstartConfig(**{**recipe, "out": str(root),
                                     "extra": {**extra, "train": {**extra.get("train", {}), **overrides}}})
        run_logged(train_command(config, paths, "tuna", stage), out / f"train-stage{stage}.log", process_env(config),
                   f"training tuna stage {stage} {what}")
    return out / "tuna-stage2"


def evaluate(root: Path, model_dir: Path, out: Path, eval_cache: Path | None = None,
             min_support: float | None = None, run: str = "tuna") -> Path:
    """``synth_open`` of ``model_dir`` with the tag flags of the quickstart's evaluation ``run`` (e.g.
    ``tuna_uniform_weights``; ``eval_cache`` replacing its cache, ``min_support`` its support filter); the
    eval directory."""
    from pipeline.processes import run_logged
    from pipeline.quickstart import Paths, QuickstartConfig, eval_command, eval_runs

    recipe = _recipe(root)
    config, paths = QuickstartConfig(**{**recipe, "out": str(root)}), Paths(root)
    flags = list(eval_runs(config, paths)[run][3])
    if eval_cache is not None:
        flags[flags.index("--retrieval-cache") + 1] = str(eval_cache)
    if min_support is not None:
        flags[flags.index("--min-tag-support") + 1] = str(min_support)
    cmd, env = eval_command(config, model_dir, paths.world, ["synth_open"], out, flags)
    run_logged(cmd, out.parent / f"{out.name}.log", env, "evaluation")
    return out


def not_finished(root: Path) -> str | None:
    """Why ``root`` is not a finished quickstart to experiment on, or None."""
    if not (root / "stages.json").is_file() or not (root / "eval" / "tuna" / "synth_open").is_dir():
        return f"{root} is not a finished quickstart (run `tuna quickstart --out {root}`)"
    return None


def compare(root: Path, out: Path, label: str, train: dict | None = None, stage2: dict | None = None,
            train_cache: Path | None = None, eval_cache: Path | None = None, min_support: float | None = None,
            what: str = "") -> str:
    """Retrain into ``out``, evaluate, and the table: baseline, the quickstart's TUNA, this one (``label``)."""
    from pipeline.quickstart import Paths

    start = time.perf_counter()
    model = retrain(root, out, train or {}, stage2 or {}, train_cache, what)
    print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
    evaluate(root, model, out / "eval", eval_cache, min_support)
    paths = Paths(root)
    return table(root, [("baseline (no tags)", paths.eval / "baseline"), ("TUNA (quickstart)", paths.eval / "tuna"),
                        (label, out / "eval")])


def identification(run_dir: Path, world: Path) -> dict[str, float]:
    """An evaluation's identification accuracy: seen, novel, and novel in one- and several-object scenes."""
    from pipeline.report import identification_by_scene, run_metrics

    ident, scene = run_metrics(run_dir, pope=False)["identification"], identification_by_scene(run_dir, world)
    return {"seen": ident["seen"], "novel": ident["novel"], "single_novel": scene["single"]["novel"],
            "multi_novel": scene["multi"]["novel"]}


def table(root: Path, rows: list[tuple[str, Path]]) -> str:
    from pipeline.quickstart import Paths
    from pipeline.report import tag_diagnostics

    world = Paths(root).world
    lines = ["| run | id seen | id novel | one object, novel | several, novel | copy rate seen | copy rate novel |",
             "|---|---|---|---|---|---|---|"]
    for name, run_dir in rows:
        copy = tag_diagnostics(run_dir)["accuracy_when_top_weighted"] if name != "baseline (no tags)" else {}
        cells = [*identification(run_dir, world).values(), copy.get("seen"), copy.get("novel")]
        lines.append(f"| {name} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, help="a finished `tuna quickstart --out` directory")
    parser.add_argument("--name", required=True, help="subdirectory of QUICKSTART for this experiment")
    parser.add_argument("--train", default="{}", help="JSON of train/train.py overrides, both stages")
    parser.add_argument("--stage2", default="{}", help="JSON of train/train.py overrides, stage 2 only")
    parser.add_argument("--train-cache", type=Path, help="retrieval cache to train on (default: the run's)")
    parser.add_argument("--eval-cache", type=Path, help="retrieval cache to evaluate with (default: the run's)")
    args = parser.parse_args()

    root = Path(args.quickstart).resolve()
    if problem := not_finished(root):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        train, stage2 = json.loads(args.train), json.loads(args.stage2)
    except json.JSONDecodeError as err:
        print(f"error: --train / --stage2 must be JSON objects: {err}", file=sys.stderr)
        return 1
    print(compare(root, root / args.name, f"TUNA, {args.name}", train, stage2, args.train_cache, args.eval_cache,
                  what=f"({args.name})"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:  # StageError: which step failed, and its log
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
