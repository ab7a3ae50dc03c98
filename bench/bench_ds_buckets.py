"""ZeRO gradient-bucket size on a tiny LLM: the quickstart's DeepSpeed config against the shipped "auto" one.

HF fills a DeepSpeed config's ``reduce_bucket_size: "auto"`` with hidden_size² elements. For the
quickstart's 128-wide LLM that is 16,384, so ZeRO-2 reduces each step's gradients in many tiny
collective calls. The quickstart therefore trains with DeepSpeed's own default bucket sizes
(``pipeline.quickstart.SMALL_LLM_BUCKETS``). This runs the quickstart's own TUNA stage-2 command
(``--quickstart``, a finished ``tuna quickstart --out`` directory) for ``--steps`` steps with each
config, ``--rounds`` times in alternating order, and prints the Trainer's ``train_runtime`` (which
excludes start-up) and the final loss of each run.

    python bench/bench_ds_buckets.py --quickstart runs/qs
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import tempfile
from pathlib import Path


def run(config, ds_config: Path, steps: int, work: Path) -> dict:
    """Runtime and final loss of ``steps`` TUNA stage-2 steps of the quickstart ``config`` under ``ds_config``."""
    from pipeline.processes import run_logged
    from pipeline.quickstart import Paths, process_env, train_command

    cmd = train_command(config, Paths(Path(config.out)), "tuna", 2)
    for flag, value in (("--deepspeed", ds_config), ("--max_steps", steps), ("--output_dir", work / "model"),
                        ("--logging_steps", steps)):
        cmd[cmd.index(flag) + 1] = str(value)
    log = work / f"{ds_config.stem}.log"
    run_logged(cmd, log, process_env(config), f"training with {ds_config}")
    dicts = [ast.literal_eval(line) for line in log.read_text().splitlines() if line.startswith("{'")]
    return {"runtime_s": float(dicts[-1]["train_runtime"]), "loss": float(dicts[-2]["loss"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", type=Path, required=True, help="a finished `tuna quickstart --out` directory")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per config, in alternating order")
    args = parser.parse_args()
    from pipeline.processes import REPO
    from pipeline.quickstart import Paths, ds_config_file, recorded_config

    root = args.quickstart.resolve()
    config = recorded_config(root)
    configs = {"auto (ds_configs/)": REPO / "ds_configs" / config.ds_config,
               "quickstart (SMALL_LLM_BUCKETS)": ds_config_file(config, Paths(root))}
    results: dict[str, list[dict]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for name in (list(configs) if i % 2 == 0 else list(configs)[::-1]):
                results[name].append(run(config, configs[name], args.steps, Path(tmp)))
    base = statistics.median(r["runtime_s"] for r in results["auto (ds_configs/)"])
    print(f"{root}: TUNA stage 2, {args.steps} steps, {args.rounds} runs per config")
    print("| DeepSpeed buckets | train_runtime s (median) | ratio | final loss |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        t = statistics.median(r["runtime_s"] for r in rows)
        losses = ", ".join(f"{r['loss']:.3f}" for r in rows)
        print(f"| {name} | {t:.1f} | {t / base:.3f} | {losses} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
