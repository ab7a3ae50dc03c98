"""Does MMICT's M-Hub learn from demonstrations better than vanilla in-context tuning and plain fine-tuning?

Takes a finished quickstart with its ICL suite (``tuna quickstart-icl``: the task, ``pool_seen`` and
``pool_all``). Trains each variant around the quickstart baseline's instruction-tuned LLM (fresh connectors) with the same data (instruction data
+ the seen support set), steps, learning rate and seed, CLIP and LLM frozen (``--stage finetune --freeze_llm
true``: only the connector or M-Hub trains, MMICT's recipe), tags off (``--ablation no_tags``); then evaluates each
on ``synth_icl`` at 0-4 shots with SIIR demonstrations from ``pool_all`` (novel names appear only there).

    .venv/bin/python experiments/mmict_synth.py --run /tmp/q24s0 --out /tmp/mmict/exp
    .venv/bin/python experiments/mmict_synth.py ... --variants finetune,vanilla,mmict --seeds 0,1

Variants: ``finetune`` (LLaVA connector, no demonstrations), ``vanilla`` (LLaVA connector, a share ``--icl-p``
of the samples with K in 1,2,4 SIIR demos: demos as ordinary image tokens + text), ``mmict`` (the M-Hub, same
demos), ``mmict-visual`` (ablation: demo images as textual-guided visual features, i.e. uni-modal features side
by side instead of the hub's fused text features), ``mmict-random`` (ablation: random demos in training).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lever_lm_synth import evaluate, table  # noqa: E402

SHOTS = (0, 1, 2, 4)
HUB = {"mhub_queries": 8, "mhub_hidden": 128, "mhub_layers": 2, "mhub_heads": 4, "mhub_cross_attention_every": 1,
       "mhub_max_text": 32}
VARIANTS = {
    "finetune": {},
    "vanilla": {"icl": "siir"},
    "mmict": {"icl": "siir", "connector": "mhub", **HUB},
    "mmict-visual": {"icl": "siir", "connector": "mhub", **HUB, "mhub_demo_features": "visual"},
    "mmict-random": {"icl": "random", "connector": "mhub", **HUB},
}


def instruction_tuned_llm(run: Path, out: Path) -> Path:
    """The LLM of the quickstart's no-tags baseline after instruction tuning, saved alone: a frozen LLM must already
    answer in the task's format (MMICT starts from BLIP-2's instruction-tuned FlanT5); the text-pretrained LLM
    alone answers nothing (all variants 0.0 in a first run)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoTokenizer

    from tuna.modeling_tuna import TunaForCausalLM

    source = run / "models" / "baseline-stage2"
    TunaForCausalLM.from_pretrained(source).language_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def train_command(run: Path, out: Path, variant: dict, seed: int, steps: int, lr: float, icl_p: float,
                  llm: Path) -> list[str]:
    from pipeline.processes import console_script, free_port
    from pipeline.quickstart import clip_args, ds_config_file, recorded_config
    from pipeline.runs import Paths

    qs, paths = recorded_config(run), Paths(run)
    clip = clip_args(paths)
    world = paths.world
    args = {
        "deepspeed": str(ds_config_file(qs, paths)), "model_name_or_path": str(llm), "stage": "finetune",
        "freeze_llm": "true", "ablation": "no_tags", "clip_model_config": clip["model_config"],
        "clip_pretrained": clip["pretrained"],
        "data_path": [str(world / "llava" / "instruct.json"), str(world / "icl" / "support_seen.json")],
        "image_folder": str(world / "images"), "template": "chat_template", "output_dir": str(out),
        "max_steps": steps, "per_device_train_batch_size": qs.batch_size, "learning_rate": lr,
        "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.0, "logging_steps": max(1, steps // 10),
        "save_strategy": "no", "report_to": "none", "seed": seed, "dataloader_num_workers": 0, "disable_tqdm": "true",
        "max_length": 1024, "image_patch_positions": str(qs.image_patch_positions).lower(), "use_cpu": "true",
    }
    extra = {k: v for k, v in variant.items() if k != "icl"}
    if "icl" in variant:
        extra.update(icl_pool=str(run / "icl" / "pool_seen"), icl_retriever=variant["icl"], icl_p=icl_p,
                     icl_shots="1,2,4")
    cmd = [console_script("deepspeed"), "--num_gpus", str(qs.nproc), "--master_port", str(free_port()),
           "--module", "train.train"]
    for key, value in {**args, **extra}.items():
        cmd += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return cmd


def train(run: Path, out: Path, variant: dict, seed: int, steps: int, lr: float, icl_p: float, llm: Path) -> float:
    """Train one variant (skipped when its model is there); returns seconds per step."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return json.loads((out / "timing.json").read_text())["s_per_step"]
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(train_command(run, out, variant, seed, steps, lr, icl_p, llm), check=True, stdout=log,
                       stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds = time.perf_counter() - start
    (out / "timing.json").write_text(json.dumps({"seconds": seconds, "s_per_step": seconds / steps}) + "\n")
    print(f"   trained {out.name}: {seconds:.0f} s", flush=True)
    return seconds / steps


def copy_diagnostics(evals: dict[str, Path], shots: tuple[int, ...], labels: dict[str, str]) -> str:
    """Novel queries: how often the answer is one of the demos' names (copied), the right one, or a seen name
    (the answer the connector learned for seen images): does a variant read its demonstrations at all?"""
    from lever_lm_synth import predictions

    seen_names = {r["answers"][0].lower() for r in predictions(next(iter(evals.values())), 0)
                  if r.get("novelty") == "seen"}
    lines = ["| variant | shots | novel queries | answer is a demo's name | ... the right one | a seen name |",
             "|---|---|---|---|---|---|"]
    for name, out in evals.items():
        for k in shots[1:]:
            novel = [r for r in predictions(out, k) if r.get("novelty") == "novel"]
            if not novel:
                continue
            said = [str(r.get("prediction", "")).strip().lower() for r in novel]
            demo_names = [{labels.get(d["id"], "").lower() for d in r.get("demos", [])} for r in novel]
            copied = sum(p in names for p, names in zip(said, demo_names))
            right = sum(p == r["answers"][0].lower() for p, r in zip(said, novel))
            seen = sum(p in seen_names for p in said)
            pct = lambda n: f"{100 * n / len(novel):.1f}"  # noqa: E731
            lines.append(f"| {name} | {k} | {len(novel)} | {pct(copied)} | {pct(right)} | {pct(seen)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="finished quickstart with its quickstart-icl")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--variants", default="finetune,vanilla,mmict", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3, help="LLaVA's connector learning rate")
    parser.add_argument("--icl-p", type=float, default=0.7, help="share of the samples given demonstrations")
    parser.add_argument("--eval-shots", default="0,1,2,4")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    start = time.perf_counter()
    shots = tuple(int(k) for k in args.eval_shots.split(","))
    pool = args.run / "icl" / "pool_all"
    labels = {r["id"]: r["label"] for r in pq.read_table(pool / "examples.parquet", columns=["id", "label"]).to_pylist()}
    sections, timings = [], {}
    llm = instruction_tuned_llm(args.run, args.out / "llm")
    for seed in (int(s) for s in args.seeds.split(",")):
        evals = {}
        for name in args.variants.split(","):
            model = args.out / f"seed{seed}" / name
            timings[f"{name}/seed{seed}"] = train(args.run, model, VARIANTS[name], seed, args.steps, args.lr,
                                                   args.icl_p, llm)
            evals[name] = args.out / f"seed{seed}" / "eval" / name
            evaluate(args.run, pool, evals[name], "siir", shots, "similar-last", threads=2, model=model)
        sections.append(table(f"seed {seed}: accuracy by shots (SIIR demos from pool_all)", evals, shots, labels)[0])
        sections.append(f"seed {seed}: novel queries, what the answer is\n\n" + copy_diagnostics(evals, shots, labels))
    sections.append("seconds per training step: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()) + "\n")
    report = "\n".join(sections)
    (args.out / "report.md").write_text(report)
    print(report)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
