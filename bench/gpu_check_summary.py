"""summary.json and summary.md of a ``scripts/gpu_check.sh`` run, from the files its stages left in OUTDIR.

    python bench/gpu_check_summary.py OUTDIR --mode cuda --total-s 455 --commit abc1234

Reads ``stages.jsonl`` (one status line per stage), ``probe.json``, ``build_*.json`` (bench/bench_build.py
--json), ``train_*.json`` (bench/bench_train.py --json) and ``quickstart_stages.json`` (the quickstart's
stages.json); a missing file leaves its section empty (its stage failed, timed out or was skipped).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

BUILD_RUNS = ("build_workers", "build_gpu_decode")
TRAIN_RUNS = ("train_pretrain", "train_finetune")
BUILD_GOAL, MFU_GOAL = 0.90, 0.40
SUMMARY_KEYS = ("device", "mode", "commit", "started", "total_s", "stages", "build", "train", "quickstart", "goals")


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(outdir: Path, mode: str, total_s: float | None, commit: str) -> dict[str, Any]:
    """The summary dict (keys :data:`SUMMARY_KEYS`)."""
    stages = {}
    for line in (outdir / "stages.jsonl").read_text().splitlines() if (outdir / "stages.jsonl").is_file() else []:
        if line.strip():
            record = json.loads(line)
            stages[record.pop("stage")] = record
    probe = _load(outdir / "probe.json") or {}
    build = {name: _load(outdir / f"{name}.json") for name in BUILD_RUNS}
    train = {name: _load(outdir / f"{name}.json") for name in TRAIN_RUNS}
    qs_stages = _load(outdir / "quickstart_stages.json") or {}
    qs = {"stage_seconds": qs_stages.get("seconds", {}),
          "completed": stages.get("quickstart", {}).get("status") == "ok"}
    ratios = [b["ratio"] for b in build.values() if b]
    mfus = [r["mfu"] for t in train.values() if t for r in t["results"] if r.get("mfu") is not None]
    goals = {
        "build_ratio": max(ratios) if ratios else None,
        "build_ratio_goal_met": (max(ratios) >= BUILD_GOAL) if ratios else None,
        "mfu": max(mfus) if mfus else None,
        "mfu_goal_met": (max(mfus) >= MFU_GOAL) if mfus else None,
        "quickstart_completed": qs["completed"] if stages.get("quickstart", {}).get("status") != "skipped" else None,
    }
    started = (outdir / "started.txt").read_text().strip() if (outdir / "started.txt").is_file() else None
    return {"device": probe.get("device"), "mode": mode, "commit": commit, "started": started, "total_s": total_s,
            "stages": stages, "build": build, "train": train, "quickstart": qs, "goals": goals, "probe": probe}


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _not_measured(s: dict[str, Any], name: str, columns: int) -> str:
    """A table row for a stage that produced no figures, with how the stage ended."""
    status = s["stages"].get(name, {}).get("status", "absent")
    return f"| {name} | not measured (stage {status}) " + "| " * (columns - 2) + "|"


def markdown(s: dict[str, Any]) -> str:
    """summary.md: what was measured, on which device, and how each stage ended."""
    lines = [f"# gpu_check: {s['device'] or 'unknown device'} ({s['mode']}), commit {s['commit']}", "",
             f"Started {s['started']}, {_fmt(s['total_s'])} s in all. Probe: {json.dumps(s['probe'])}", "",
             "| stage | status | seconds | timeout s | note |", "|---|---|---|---|---|"]
    for name, r in s["stages"].items():
        lines.append(f"| {name} | {r['status']} | {r['seconds']} | {_fmt(r['timeout_s'])} | {r.get('reason', '')} |")
    lines += ["", "## Datastore build vs encoder (bench/bench_build.py)", "",
              "| run | model | precision | images | decode | build img/s | encoder img/s (copy incl.) | "
              "encoder img/s (on device) | ratio (goal 0.90) | stage seconds | decode fallbacks |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, b in s["build"].items():
        if not b:
            lines.append(_not_measured(s, name, columns=11))
            continue
        stages = ", ".join(f"{k} {v}" for k, v in b["stages_s"].items())
        lines.append(f"| {name} | {b['model']} | {b['precision']} | {b['images']} | {b['decode_device'] or 'workers'} "
                     f"| {b['build_img_s']} | {b['encoder_img_s']} | {_fmt(b['encoder_on_device_img_s'])} | "
                     f"{b['ratio']} | {stages} | {b['decode_fallback'] or '-'} |")
    lines += ["", "## Training (bench/bench_train.py; MFU includes the optimizer step)", "",
              "| run | stage | variant | ZeRO | tokens/s | step ms | TFLOP/s | MFU (goal 40 %) | peak MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, t in s["train"].items():
        if not t:
            lines.append(_not_measured(s, name, columns=9))
            continue
        for r in t["results"]:
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
            lines.append(f"| {name} | {t['config']['stage']} | {r['variant']} | {r['zero']} | {r['tokens_s']:.0f} | "
                         f"{r['step_ms']:.0f} | {_fmt(r.get('tflops'), '.3g')} | {mfu} | {r['peak_mb']:.0f} |")
    qs = s["quickstart"]
    lines += ["", "## Quickstart", "", f"completed: {qs['completed']}; stage seconds: "
              + (", ".join(f"{k} {v}" for k, v in qs["stage_seconds"].items()) or "none recorded"), "",
              "## Goals", "", "```", json.dumps(s["goals"], indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir", type=Path)
    p.add_argument("--mode", default="cuda", help="cuda, or cpu for a dry run")
    p.add_argument("--total-s", type=float)
    p.add_argument("--commit", default="unknown")
    a = p.parse_args(argv)
    summary = summarize(a.outdir, a.mode, a.total_s, a.commit)
    (a.outdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (a.outdir / "summary.md").write_text(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
