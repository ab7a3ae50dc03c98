"""Do more existence questions in stage 2 teach TUNA to answer POPE from its tag block? (issue 21, item 1)

The quickstart's instruction data asks one existence question per image ("Is there a X in the image?",
yes or no, balanced). Whether X is among the training blocks' tags gives the answer for 96 % of them,
yet TUNA answers POPE at chance. Here a copy of a finished quickstart gets ``--per-image`` existence
questions per image instead (alternately yes and no, each at a random turn, the other questions as
before); TUNA is retrained on it (stage 1 + 2, the quickstart's commands) and evaluated on
``synth_open`` and ``synth_pope``. Printed: POPE accuracy, yes-rate, and the yes-rate split by whether
the asked name heads a tag of the block (a model that reads its block says "yes" far more often
when it does).

    python experiments/existence_questions.py --quickstart RUN --out /tmp/e2 --per-image 2
    python experiments/existence_questions.py --pope RUN/eval/tuna RUN/eval/baseline   # the split only

About 5 minutes on 2 cores (the copy is ~300 MB). Answered in docs/experiments.md, section 23.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from common.cli import HelpFormatter


def instruct_with_existence(world: Path, per_image: int) -> list[dict]:
    """The instruction records of the world at ``world``, with ``per_image`` existence questions each."""
    import datastore.synth.questions as questions
    from datastore.synth.generate import SynthConfig
    from datastore.synth.scene import render_sample, sample_rng

    config = SynthConfig(**{**json.loads((world / "world.json").read_text())["args"], "out": str(world)})
    catalogue, records = config.world(), []
    for index in range(config.n_instruct):
        # the scene as the generator rendered it (its image is on disk already)
        scene = render_sample(catalogue, config.seed, "instruct", index, config.image_size)
        rng = sample_rng(config.seed, "instruct_qa", index)
        rng.integers(len(questions.PRETRAIN_PROMPTS))  # the stream as instruct_record draws it
        pairs = questions._qa_pairs(scene.scene)
        chosen = [pairs[i] for i in rng.permutation(len(pairs))[: int(rng.integers(2, 5))]]
        existence = questions._existence_pairs(scene.scene, catalogue, rng)
        by_answer = [[p for p in existence if p[1] == answer] for answer in ("Yes", "No")]
        first = int(rng.integers(2))
        picks = [(pool := by_answer[(first + k) % 2])[int(rng.integers(len(pool)))] for k in range(per_image)]
        for pick in picks:
            chosen.insert(int(rng.integers(len(chosen) + 1)), pick)
        records.append({"id": scene.key, "image": f"instruct/{scene.key}.jpg",
                        "conversations": questions.short_answer_turns(chosen)})
    return records


def print_pope(eval_dir: Path) -> None:
    """POPE accuracy and yes-rate, and the yes-rate split by whether the block names the asked object
    (``pipeline.report.pope_block_diagnostics``, the quickstart's own diagnostic)."""
    from pipeline.report import pope_block_diagnostics

    groups = json.loads((eval_dir / "results.json").read_text())["benchmarks"]["synth_pope"]["groups"]["novelty"]
    d = pope_block_diagnostics(eval_dir)

    def pct(key: str, novelty: str) -> str:
        return "–" if d[key][novelty] is None else f"{d[key][novelty]:.0f} %"

    for novelty in ("seen", "novel"):
        g = groups[novelty]
        print(f"{eval_dir} {novelty}: accuracy {g['accuracy']:.1f}, yes {g['yes_ratio']:.1f}; "
              f"yes-rate with the name in the block {pct('pope_yes_name_in_block', novelty)} / "
              f"not {pct('pope_yes_name_not_in_block', novelty)} "
              f"(in the block: {pct('pope_name_in_block', novelty)} of the questions)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--quickstart", type=Path, help="a finished `tuna quickstart --out` directory")
    parser.add_argument("--out", type=Path, help="where the copy goes (must not exist)")
    parser.add_argument("--per-image", type=int, default=2,
                        help="existence questions per instruction image, alternately yes and no from a random "
                        "first (so 1 is not the quickstart's own data, whose one question is drawn from all its "
                        "pairs: compare with the quickstart run itself)")
    parser.add_argument("--pope", type=Path, nargs="*", default=[], help="only print the split for these eval dirs")
    args = parser.parse_args()
    if args.pope:
        needed = ("synth_pope/predictions.jsonl", "results.json")  # the records and the scorer's totals
        missing = [str(d) for d in args.pope if not all((d / name).is_file() for name in needed)]
        for eval_dir in args.pope:
            if str(eval_dir) not in missing:
                print_pope(eval_dir)
        if missing:
            print(f"no synth_pope/predictions.jsonl or results.json in {len(missing)} of the dirs: "
                  f"{', '.join(missing)}")
        return 1 if missing else 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from exp_retrain_tuna import _recipe, not_finished, retrain

    from pipeline.processes import run_logged
    from pipeline.quickstart import Paths, QuickstartConfig, eval_command, eval_runs

    if args.quickstart is None or args.out is None:
        parser.error("--quickstart and --out are needed (or --pope)")
    if (reason := not_finished(args.quickstart)) is not None:
        print(reason, file=sys.stderr)
        return 1
    shutil.copytree(args.quickstart, args.out, ignore=shutil.ignore_patterns("models", "eval", "logs"))
    records = instruct_with_existence(args.out / "world", args.per_image)
    Paths(args.out).world.joinpath("llava", "instruct.json").write_text(json.dumps(records, indent=1) + "\n")
    answers = Counter(t["value"] for r in records for t in r["conversations"] if t["value"] in ("Yes", "No"))
    print(f"{len(records)} instruction samples, existence answers {dict(answers)}", flush=True)
    model = retrain(args.out, args.out / "retrained", {}, {}, None, f"with {args.per_image} existence questions")
    recipe = _recipe(args.out)
    config, paths = QuickstartConfig(**{**recipe, "out": str(args.out)}), Paths(args.out)
    cmd, env = eval_command(config, model, paths.world, ["synth_open", "synth_pope"], args.out / "retrained" / "eval",
                            list(eval_runs(config, paths)["tuna"][3]))
    run_logged(cmd, args.out / "retrained" / "eval.log", env, "evaluation")
    print_pope(args.out / "retrained" / "eval")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
