"""``tuna quickstart-icl``: in-context learning on a finished quickstart's world (issue 22, section 8).

Stages (each skipped when a rerun finds it done):

1. ``task``   the synthetic ICL task in the quickstart's world (support set + queries, datastore/synth/icl_task.py);
2. ``pools``  two demonstration pools with the quickstart's CLIP: seen categories only (training: no novel
              name enters it) and every category (evaluation);
3. ``tune``   in-context tuning of the quickstart's TUNA model with ``deepspeed train/train.py --icl_pool``:
              instruction data + the seen support set, a share of the samples with retrieved demos;
4. ``eval``   ``tuna-eval --bench synth_icl --shots ...`` per retriever (RS, SIIR, STTR, SITR, SIT, oracle),
              the 0-shot pass once;
5. ``report`` the k-shot table (seen / novel, clean / distractor) and a chart, ``OUT/results_icl.{json,md,png}``.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.processes import StageError, console_script, free_port, run_logged
from pipeline.quickstart import (
    Paths,
    Pipeline,
    _train_progress,
    clip_args,
    ds_config_file,
    process_env,
    process_threads,
    recorded_config,
)

RETRIEVERS = ("random", "siir", "sttr", "sitr", "sit", "oracle")


@dataclass
class ICLSuiteConfig:
    """The in-context learning suite on a finished quickstart.

    Attributes:
        quickstart: a finished ``tuna quickstart --out`` directory (its world, CLIP, datastore and TUNA model).
        out: output directory (default: QUICKSTART/icl).
        support_per_category: support images per category.
        queries: ICL query images (half seen, half novel).
        distractor_share: share of queries whose object stands between two of its confusable partner's.
        steps: in-context tuning steps.
        icl_p: share of the tuning samples given demonstrations.
        train_shots: demonstration counts drawn per tuning sample.
        shots: evaluated shot counts.
        retrievers: evaluated retrievers.
        lr: tuning learning rate.
        overwrite: delete --out first instead of resuming.
    """

    quickstart: str = "runs/quickstart"
    out: str = ""
    support_per_category: int = 20
    queries: int = 200
    distractor_share: float = 0.5
    steps: int = 150
    icl_p: float = 0.7
    train_shots: tuple[int, ...] = (1, 2, 4)
    shots: tuple[int, ...] = (0, 1, 2, 4)
    retrievers: tuple[str, ...] = RETRIEVERS
    lr: float = 1e-4  # 5e-4 cost the model 5–8 points 0-shot (docs/experiments.md, section 14)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not (Path(self.quickstart) / "stages.json").is_file():
            raise ValueError(f"{self.quickstart} is not a finished tuna quickstart (no stages.json)")
        seconds = json.loads((Path(self.quickstart) / "stages.json").read_text()).get("seconds", {})
        if "train" not in seconds:
            raise ValueError(f"{self.quickstart}: its train stage has not finished")
        unknown = set(self.retrievers) - set(RETRIEVERS)
        if unknown or not self.shots or min(self.shots) < 0 or not 0 <= self.icl_p <= 1:
            raise ValueError(f"retrievers {sorted(unknown)} unknown, or shots={self.shots} / icl_p={self.icl_p} "
                             "out of range")
        self.out = self.out or str(Path(self.quickstart) / "icl")

    @property
    def root(self) -> Path:
        return Path(self.out).resolve()


class SuitePaths:
    def __init__(self, config: ICLSuiteConfig) -> None:
        self.qs = Paths(Path(config.quickstart).resolve())
        self.root = config.root
        self.world = self.qs.world
        self.pool_seen, self.pool_all = self.root / "pool_seen", self.root / "pool_all"
        self.model = self.root / "tuna-icl"
        self.eval, self.logs = self.root / "eval", self.root / "logs"


def stage_task(config: ICLSuiteConfig, paths: SuitePaths) -> None:
    from datastore.synth.icl_task import add_icl_task

    counts = add_icl_task(paths.world, config.support_per_category, config.queries, config.distractor_share)
    print("   " + ", ".join(f"{k} {v}" for k, v in counts.items()), flush=True)


def stage_pools(config: ICLSuiteConfig, paths: SuitePaths) -> None:
    from datastore.clip import ClipSpec
    from icl.pool import PoolConfig, build_pool

    clip = clip_args(paths.qs)
    spec = ClipSpec(model_config=clip["model_config"], pretrained=clip["pretrained"])
    for out, name in ((paths.pool_seen, "support_seen.json"), (paths.pool_all, "support.json")):
        manifest = build_pool(PoolConfig(format="llava", inputs=[str(paths.world / "icl" / name)], out=str(out),
                                         clip=spec, image_root=str(paths.world / "images")), progress=False)
        print(f"   {out.name}: {manifest['n']} examples, skipped {manifest['skipped']['total']}", flush=True)


def tune_command(config: ICLSuiteConfig, paths: SuitePaths) -> list[str]:
    """``deepspeed train.train`` continuing the quickstart's TUNA with in-context tuning."""
    qs = recorded_config(paths.qs.root)
    clip = clip_args(paths.qs)
    args = {
        "deepspeed": str(ds_config_file(qs, paths.qs)), "model_name_or_path": str(paths.qs.model("tuna", 2)),
        "stage": "finetune", "clip_model_config": clip["model_config"], "clip_pretrained": clip["pretrained"],
        "data_path": [str(paths.world / "llava" / "instruct.json"), str(paths.world / "icl" / "support_seen.json")],
        "image_folder": str(paths.world / "images"), "template": "chat_template", "output_dir": str(paths.model),
        "max_steps": config.steps, "per_device_train_batch_size": qs.batch_size, "learning_rate": config.lr,
        "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.0,
        "logging_steps": max(1, config.steps // 10), "save_strategy": "no", "report_to": "none",
        "seed": qs.seed, "dataloader_num_workers": 0, "disable_tqdm": "true", "max_length": 1024,
        "retrieval_cache": str(paths.qs.cache), "datastore": str(paths.qs.datastore),
        "freeze_llm_embeddings": str(qs.freeze_llm_embeddings).lower(),
        "image_patch_positions": str(qs.image_patch_positions).lower(),
        "icl_pool": str(paths.pool_seen), "icl_retriever": "siir", "icl_p": config.icl_p,
        "icl_shots": ",".join(map(str, config.train_shots)),
    }
    if qs.device == "cpu":
        args["use_cpu"] = "true"
    cmd = [console_script("deepspeed"), "--num_gpus", str(qs.nproc), "--master_port", str(free_port()),
           "--module", "train.train"]
    for key, value in args.items():
        cmd += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return cmd


def stage_tune(config: ICLSuiteConfig, paths: SuitePaths) -> None:
    qs = recorded_config(paths.qs.root)
    run_logged(tune_command(config, paths), paths.logs / "tune.log", process_env(qs), "in-context tuning",
               echo=_train_progress)


def eval_runs(config: ICLSuiteConfig, paths: SuitePaths) -> dict[str, tuple[Path, str, list[str]]]:
    """run name -> (model, retriever, shot counts): the tuned model's 0-shot pass once, then every retriever at
    K > 0; and the quickstart's TUNA before in-context tuning, 0-shot and with SIIR's and the oracle's demos
    (does the tuning give the in-context ability, or had the model it already?)."""
    ks = [str(k) for k in config.shots if k > 0]
    before = paths.qs.model("tuna", 2)
    runs = {"zero_shot": (paths.model, "random", ["0"]), "untuned_zero_shot": (before, "random", ["0"])}
    runs.update({r: (paths.model, r, ks) for r in config.retrievers} if ks else {})
    for retriever in ("siir", "oracle"):  # image similarity and its ceiling
        if ks and retriever in config.retrievers:
            runs[f"untuned_{retriever}"] = (before, retriever, ks)
    return runs


def stage_eval(config: ICLSuiteConfig, paths: SuitePaths) -> None:
    qs = recorded_config(paths.qs.root)
    side_by_side = qs.nproc if qs.device == "cpu" else 1

    def evaluate(item: tuple[str, tuple[Path, str, list[str]]]) -> None:
        name, (model, retriever, shots) = item
        start = time.perf_counter()
        cmd = [console_script("tuna-eval"), "--model", str(model), "--bench", "synth_icl",
               "--data-root", str(paths.world), "--out", str(paths.eval / name), "--batch-size", "16",
               "--device", qs.device, "--datastore", str(paths.qs.datastore), "--retrieval-cache", str(paths.qs.cache),
               "--min-tag-support", str(qs.eval_min_tag_support), "--k-images", str(qs.k_images),
               "--shots", ",".join(shots), "--demo-pool", str(paths.pool_all), "--retriever", retriever]
        env = {**process_env(qs), "OMP_NUM_THREADS": str(max(1, process_threads(qs) * qs.nproc // side_by_side))}
        run_logged(cmd, paths.logs / f"eval-{name}.log", env, f"evaluation {name}")
        print(f"   {name}: {time.perf_counter() - start:.1f} s", flush=True)

    with ThreadPoolExecutor(side_by_side) as pool:
        list(pool.map(evaluate, eval_runs(config, paths).items()))


def _accuracy(records: list[dict], keep) -> float | None:
    scores = [r["score"] for r in records if keep(r)]
    return round(100.0 * sum(scores) / len(scores), 1) if scores else None


def report(config: ICLSuiteConfig, paths: SuitePaths) -> dict[str, Any]:
    """Accuracy per retriever and shot count, by novelty and distractor; table, JSON and chart."""
    groups = {"seen": lambda r: r["novelty"] == "seen", "novel": lambda r: r["novelty"] == "novel",
              "clean": lambda r: not r["distractor"], "distractor": lambda r: r["distractor"]}

    def predictions(name: str, k: int) -> list[dict]:
        folder = paths.eval / name / "synth_icl" / (f"{k}-shot" if k else "")
        path = folder / "predictions.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    results: dict[str, Any] = {"retrievers": {}, "label_precision": {}}
    labels = _pool_labels(paths)
    for name, (model, retriever, shots) in eval_runs(config, paths).items():
        if name.endswith("zero_shot"):
            continue
        untuned = name.startswith("untuned_")
        zero = predictions("untuned_zero_shot" if untuned else "zero_shot", 0)
        per_shot = {0: {g: _accuracy(zero, keep) for g, keep in groups.items()}} if 0 in config.shots else {}
        for k in map(int, shots):
            records = predictions(name, k)
            per_shot[k] = {g: _accuracy(records, keep) for g, keep in groups.items()}
        label = f"{retriever} (before tuning)" if untuned else retriever
        results["retrievers"][label] = per_shot
        results["label_precision"][label] = _demo_precision(predictions(name, max(map(int, shots))), labels)
    (paths.root / "results_icl.json").write_text(json.dumps(results, indent=2))
    (paths.root / "results_icl.md").write_text(markdown(results))
    _chart(results, paths.root / "results_icl.png")
    return results


def _pool_labels(paths: SuitePaths) -> dict[str, str]:
    import pyarrow.parquet as pq

    table = pq.read_table(paths.pool_all / "examples.parquet", columns=["id", "label"]).to_pylist()
    return {r["id"]: r["label"] for r in table}


def _demo_precision(records: list[dict], labels: dict[str, str]) -> float | None:
    hits = [labels.get(d["id"]) == r["answers"][0] for r in records for d in r.get("demos", [])]
    return round(100.0 * sum(hits) / len(hits), 1) if hits else None


def markdown(results: dict[str, Any]) -> str:
    shots = sorted({int(k) for per in results["retrievers"].values() for k in per})
    lines = ["| retriever | group | " + " | ".join(f"{k}-shot" for k in shots) + " | demos with the right name (max K) |",
             "|---|---|" + "---|" * (len(shots) + 1)]
    for retriever, per in results["retrievers"].items():
        for group in ("seen", "novel", "clean", "distractor"):
            cells = [per.get(k, per.get(str(k), {})).get(group) for k in shots]
            precision = results["label_precision"].get(retriever) if group == "seen" else None
            lines.append(f"| {retriever} | {group} | " + " | ".join("-" if v is None else f"{v:.1f}" for v in cells)
                         + f" | {'' if precision is None else f'{precision:.1f}'} |")
    return "\n".join(lines) + "\n"


def _chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, group in zip(axes, ("seen", "novel")):
        for retriever, per in results["retrievers"].items():
            shots = sorted(int(k) for k in per)
            ax.plot(shots, [per[k][group] if k in per else per[str(k)][group] for k in shots], marker="o",
                    label=retriever)
        ax.set_xticks(sorted({int(k) for per in results["retrievers"].values() for k in per}))
        ax.set_title(f"{group} categories")
        ax.set_xlabel("demonstrations (shots)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("synth_icl accuracy (%)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_icl_suite(config: ICLSuiteConfig) -> dict[str, Any]:
    paths = SuitePaths(config)
    pipeline = Pipeline(config)
    print(f"tuna quickstart-icl -> {paths.root} (on {paths.qs.root})", flush=True)
    holder: dict[str, Any] = {}
    pipeline.run({
        "task": lambda: stage_task(config, paths),
        "pools": lambda: stage_pools(config, paths),
        "tune": lambda: stage_tune(config, paths),
        "eval": lambda: stage_eval(config, paths),
        "report": lambda: holder.update(results=report(config, paths)),
    })
    print()
    print(markdown(holder["results"]))
    seconds = pipeline.state["seconds"]
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
          + f"; total {sum(seconds.values()):.0f} s")
    print(f"written: {paths.root / 'results_icl.json'}, {paths.root / 'results_icl.md'}, "
          f"{paths.root / 'results_icl.png'}; logs {paths.logs}")
    if not holder["results"]["retrievers"]:
        raise StageError("no k-shot results: give shot counts above 0")
    return holder["results"]
