"""Experiment (issue 21, item 3): how much could any tag weighting add in this world?

Perfect weights would give each tag that names an object in the image its full weight and every other tag
none. That is TUNA reading oracle-clean blocks: the eval images' cached tags whose object is absent
removed (``exp_oracle_tags.clean_cache``, ground truth from the world), with uniform weights. Its gain
over uniform weights on the retrieved blocks is the most any weighting can add to the trained model. The
run's own support filter is applied after the cleaning, so present-object tags it dropped before may now
be kept: the ceiling is, if anything, too high. The model is the quickstart's TUNA (evaluation only).
About 40 s per quickstart on 2 cores.

    python experiments/exp_oracle_weights.py --quickstart /tmp/q0 /tmp/q1 /tmp/q2 /tmp/q3

Writes ``QUICKSTART/oracle_weights/`` (the clean cache, logs, the two evaluations) and prints a markdown
table: identification seen / novel and by scene for adaptive and uniform weights on retrieved and
oracle-clean blocks, and per run the ceiling and TUNA's adaptive − uniform on novel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli import HelpFormatter

ROWS = (("retrieved, adaptive (TUNA)", "tuna"), ("retrieved, uniform", "tuna_uniform_weights"),
        ("oracle-clean, uniform (perfect weights)", "clean_uniform"), ("oracle-clean, adaptive", "clean_adaptive"))


def measure(root: Path) -> dict[str, dict[str, float]]:
    """Identification (all / one object / several objects, seen and novel) of the four rows for one run."""
    from exp_oracle_tags import clean_cache
    from exp_retrain_tuna import evaluate, identification

    from pipeline.quickstart import Paths
    from pipeline.runs import RUNS

    paths, out = Paths(root), root / "oracle_weights"
    cache = out / "tags.parquet"
    out.mkdir(exist_ok=True)
    counts = clean_cache(paths.cache, paths.world, cache)
    print(f"{root}: oracle cache kept {counts['tags_kept']} of {counts['tags_before']} tags", flush=True)
    model = paths.model(RUNS["tuna"].model, 2)
    dirs = {"tuna": paths.eval / "tuna", "tuna_uniform_weights": paths.eval / "tuna_uniform_weights",
            "clean_uniform": evaluate(root, model, out / "clean_uniform", cache, run="tuna_uniform_weights"),
            "clean_adaptive": evaluate(root, model, out / "clean_adaptive", cache, run="tuna")}
    result = {key: identification(run_dir, paths.world) for key, run_dir in dirs.items()}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| run | blocks | id seen | id novel | one object, novel | several, novel |", "|---|---|---|---|---|---|"]
    for root, result in results.items():
        for label, key in ROWS:
            r = result[key]
            lines.append(f"| {Path(root).name} | {label} | {r['seen']:.1f} | {r['novel']:.1f} | "
                         f"{r['single_novel']:.1f} | {r['multi_novel']:.1f} |")
    lines += ["", "| run | adaptive − uniform, novel | ceiling: perfect − uniform, novel |", "|---|---|---|"]
    for root, r in results.items():
        base = r["tuna_uniform_weights"]["novel"]
        lines.append(f"| {Path(root).name} | {r['tuna']['novel'] - base:+.1f} | {r['clean_uniform']['novel'] - base:+.1f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--quickstart", nargs="+", required=True, type=Path, help="finished `tuna quickstart` directories")
    args = parser.parse_args()

    from exp_retrain_tuna import not_finished

    roots = [r.resolve() for r in args.quickstart]
    for root in roots:
        if problem := not_finished(root):
            print(f"error: {problem}", file=sys.stderr)
            return 1
    print(table({str(root): measure(root) for root in roots}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:  # StageError: which evaluation failed, and its log
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
