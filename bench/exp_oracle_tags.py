"""Experiment: TUNA with oracle-clean tag blocks, on a finished quickstart.

Every tag whose object is not in the image is removed from the retrieval cache, for the instruction
and the eval images alike (the objects come from the world's ground truth, ``world_scenes``). TUNA is
then trained (stage 1 + 2, the quickstart's own commands, seed and budget) and evaluated on
``synth_open`` with that cache. The gap to the quickstart's TUNA is what wrong tags in the block cost;
it is an upper bound for better retrieval, not a method (the eval blocks use the answers).

    python bench/exp_oracle_tags.py --quickstart runs/quickstart      # ~4 min on 2 cores

Writes ``QUICKSTART/oracle_tags/`` (cache, models, eval) and prints the comparison as markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def clean_cache(cache: Path, world: Path, out: Path) -> dict[str, int]:
    """Copy ``cache`` to ``out`` keeping, for instruction and eval images, only tags naming a present object."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datastore.purity import world_scenes
    from datastore.store import entity_of

    table = pq.read_table(cache)
    cols = table.to_pydict()
    rows = [i for i, image in enumerate(cols["image"]) if image.startswith(("instruct/", "eval/"))]
    kept = total = 0
    for i, scene in zip(rows, world_scenes(world, [cols["image"][i] for i in rows])):
        present = {o.category.name for o in scene.objects}
        keep = [j for j, tag in enumerate(cols["tags"][i]) if entity_of(tag) in present]
        kept, total = kept + len(keep), total + len(cols["tags"][i])
        cols["tags"][i] = [cols["tags"][i][j] for j in keep]
        cols["scores"][i] = [cols["scores"][i][j] for j in keep]
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(cols, schema=table.schema), out)
    return {"tags_kept": kept, "tags_before": total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", required=True, help="a finished `tuna quickstart --out` directory")
    args = parser.parse_args()

    from tuna.quickstart import (Paths, QuickstartConfig, _env, eval_command, identification_by_scene,
                                 run_logged, run_metrics, train_command)

    root = Path(args.quickstart).resolve()
    stages = root / "stages.json"
    if not stages.is_file() or not (root / "eval" / "tuna").is_dir():
        print(f"error: {root} is not a finished quickstart (run `tuna quickstart --out {root}`)", file=sys.stderr)
        return 1
    recipe = json.loads(stages.read_text())["recipe"]
    paths, out = Paths(root), root / "oracle_tags"
    cache = out / "tags.parquet"
    counts = clean_cache(paths.cache, paths.world, cache)
    print(f"oracle cache: kept {counts['tags_kept']} of {counts['tags_before']} tags -> {cache}", flush=True)
    extra = recipe.get("extra", {})
    start = time.perf_counter()
    for stage in (1, 2):
        overrides = {"retrieval_cache": str(cache), "output_dir": str(out / f"tuna-stage{stage}")}
        if stage == 2:
            overrides["stage1_checkpoint"] = str(out / "tuna-stage1")
        config = QuickstartConfig(**{**recipe, "out": str(root),
                                     "extra": {**extra, "train": {**extra.get("train", {}), **overrides}}})
        run_logged(train_command(config, paths, "tuna", stage), out / f"train-stage{stage}.log", _env(config),
                   f"training tuna stage {stage} on oracle tags")
    print(f"trained in {time.perf_counter() - start:.0f} s", flush=True)
    cmd, env = eval_command(config, out / "tuna-stage2", paths.world, ["synth_open"], out / "eval",
                            ["--retrieval-cache", str(cache), "--datastore", str(paths.datastore)])
    run_logged(cmd, out / "eval.log", env, "evaluation on oracle tags")
    print("| run | id seen | id novel | one object, novel | several, novel |\n|---|---|---|---|---|")
    for name, run_dir in (("baseline (no tags)", paths.eval / "baseline"), ("TUNA, retrieved tags", paths.eval / "tuna"),
                          ("TUNA, oracle-clean tags (train + eval)", out / "eval")):
        ident = run_metrics(run_dir, pope=False)["identification"]
        scene = identification_by_scene(run_dir, paths.world)
        print(f"| {name} | {ident['seen']:.1f} | {ident['novel']:.1f} | {scene['single']['novel']:.1f} | "
              f"{scene['multi']['novel']:.1f} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:  # QuickstartError: which step failed, and its log
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
