"""How much the quickstart's outcome depends on the seed: ``tuna quickstart`` once per seed, one table.

Each seed is a different synthetic world, CLIP, LLM and training order, so the spread across seeds is
the error bar of any single quickstart figure (single runs differ by 10-20 points). Compare recipe
changes on several seeds, never on one run.

    python experiments/quickstart_seeds.py --seeds 0 1 2 --out runs/seeds          # ~13 min per seed on 2 cores
    python experiments/quickstart_seeds.py --seeds 0 1 --out runs/seeds -- --steps 600   # extra quickstart flags
    python experiments/quickstart_seeds.py --collect /tmp/qs6 /tmp/qs7              # tabulate finished runs only

A seed whose ``OUT/seed-S/results.json`` exists is not run again (delete it to rerun). Prints one row
per seed (identification seen/novel for the baseline and TUNA, the novel gain, random tags, adaptive −
uniform, the swap, POPE F1 and TUNA's POPE yes-rate with the asked object in its block or not) and the
mean, minimum and maximum of the gain; ``--json`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROWS = (("baseline seen", ("runs", "baseline", "identification", "seen")),
        ("baseline novel", ("runs", "baseline", "identification", "novel")),
        ("TUNA seen", ("runs", "tuna", "identification", "seen")),
        ("TUNA novel", ("runs", "tuna", "identification", "novel")),
        ("one-object novel", ("identification_by_scene", "tuna", "single", "novel")),
        ("random tags novel", ("runs", "tuna_random_tags", "identification", "novel")),
        ("copy rate novel", ("diagnostics", "accuracy_when_top_weighted", "novel")),
        ("novel gain", ("checks", "novel_gain", "value")),
        ("adaptive - uniform novel", ("checks", "adaptive_vs_uniform_novel", "value")),
        ("swap gain", ("checks", "swap_gain", "value")),
        ("POPE F1 baseline novel", ("runs", "baseline", "pope_f1", "novel")),
        ("POPE F1 TUNA novel", ("runs", "tuna", "pope_f1", "novel")),
        # does TUNA read its block for yes/no? (runs before 2026-12-06 lack these: "–")
        ("POPE yes, object in block, novel", ("diagnostics", "pope_yes_name_in_block", "novel")),
        ("POPE yes, not in block, novel", ("diagnostics", "pope_yes_name_not_in_block", "novel")))


def _get(results: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(results, dict) or key not in results:
            return None
        results = results[key]
    return results


def run_seed(seed: int, out: Path, extra: list[str]) -> Path:
    """``tuna quickstart --seed S --out OUT/seed-S`` (skipped when its results.json exists)."""
    run_dir = out / f"seed-{seed}"
    if not (run_dir / "results.json").is_file():
        cmd = [str(Path(sys.executable).parent / "tuna"), "quickstart", "--seed", str(seed), "--out", str(run_dir),
               *extra]
        print(f"seed {seed}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s", flush=True)
    return run_dir


def table(run_dirs: list[Path]) -> dict:
    rows = {}
    for run_dir in run_dirs:
        results = json.loads((run_dir / "results.json").read_text())
        label = f"seed {results['config']['seed']} ({run_dir})"
        rows[label] = {name: _get(results, path) for name, path in ROWS}
    gains = [r["novel gain"] for r in rows.values() if r["novel gain"] is not None]
    summary = {"n": len(gains), "gain_mean": statistics.fmean(gains) if gains else None,
               "gain_min": min(gains, default=None), "gain_max": max(gains, default=None),
               "gain_sd": statistics.stdev(gains) if len(gains) > 1 else None}
    return {"rows": rows, "summary": summary}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown(result: dict) -> str:
    names = [name for name, _ in ROWS]
    lines = ["| run | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, row in result["rows"].items():
        lines.append(f"| {label} | " + " | ".join(_fmt(row[n]) for n in names) + " |")
    s = result["summary"]
    lines.append(f"\nnovel gain over {s['n']} seeds: mean {_fmt(s['gain_mean'])}, sd {_fmt(s['gain_sd'])}, "
                 f"min {_fmt(s['gain_min'])}, max {_fmt(s['gain_max'])} (goal: >= 30 in every run)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="quickstart seeds to run")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart-seeds"), help="one seed-S folder per seed")
    parser.add_argument("--collect", type=Path, nargs="+", help="only tabulate these finished quickstart folders")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    try:
        run_dirs = args.collect or [run_seed(seed, args.out, extra) for seed in args.seeds]
        missing = [str(d) for d in run_dirs if not (d / "results.json").is_file()]
        if missing:
            raise ValueError(f"no results.json in {', '.join(missing)} (run `tuna quickstart` there first)")
        result = table(run_dirs)
    except (ValueError, OSError, subprocess.CalledProcessError) as exc:
        print(f"quickstart_seeds: error: {exc}", file=sys.stderr)
        return 1
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
