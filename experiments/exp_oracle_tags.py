"""Experiment: TUNA with oracle-clean tag blocks, on a finished quickstart.

Every tag whose object is not in the image is removed from the retrieval cache, for the instruction
and the eval images alike (the objects come from the world's ground truth, ``World.scenes``). TUNA is
then trained (stage 1 + 2, the quickstart's own commands, seed and budget) and evaluated on
``synth_open`` with that cache. The gap to the quickstart's TUNA is what wrong tags in the block cost;
it is an upper bound for better retrieval, not a method (the eval blocks use the answers).

    python experiments/exp_oracle_tags.py --quickstart runs/quickstart      # ~4 min on 2 cores

Writes ``QUICKSTART/oracle_tags/`` (cache, models, eval) and prints the comparison as markdown.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def clean_cache(cache: Path, world: Path, out: Path) -> dict[str, int]:
    """Copy ``cache`` to ``out`` keeping, for instruction and eval images, only tags naming a present object."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datastore.store import entity_of
    from datastore.synth.layout import World

    table = pq.read_table(cache)
    cols = table.to_pydict()
    rows = [i for i, image in enumerate(cols["image"]) if image.startswith(("instruct/", "eval/"))]
    kept = total = 0
    for i, scene in zip(rows, World.open(world).scenes([cols["image"][i] for i in rows])):
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

    from exp_retrain_tuna import compare, not_finished

    from pipeline.quickstart import Paths

    root = Path(args.quickstart).resolve()
    if problem := not_finished(root):
        print(f"error: {problem}", file=sys.stderr)
        return 1
    paths, out = Paths(root), root / "oracle_tags"
    out.mkdir(exist_ok=True)
    cache = out / "tags.parquet"
    counts = clean_cache(paths.cache, paths.world, cache)
    print(f"oracle cache: kept {counts['tags_kept']} of {counts['tags_before']} tags -> {cache}", flush=True)
    # the clean blocks in training and evaluation, read unfiltered
    print(compare(root, out, "TUNA, oracle-clean tags (train + eval)", train_cache=cache, eval_cache=cache,
                  min_support=0.0, what="on oracle tags"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:  # StageError: which step failed, and its log
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
