"""Does DRUM pick better demonstrations than the similarity retrievers on the synthetic ICL task?

Takes a finished quickstart with its ICL suite (``tuna quickstart-icl``). Trains DRUM embedders on ``pool_all``
with the quickstart's TUNA (before in-context tuning) as the scoring model, in this process, sharing one score
cache; then evaluates that TUNA at 1-8 shots with each retriever (tables by seen / novel, clean / distractor
queries), each round's embedder at 4 shots (convergence), and the transfer to the in-context-tuned TUNA.

    .venv/bin/python experiments/drum_synth.py --run /tmp/q24s0 --out /tmp/drum/exp
    .venv/bin/python experiments/drum_synth.py ... --only train          # DRUM runs only (resumable)

Runs (``--out/runs/NAME``): ``kl`` (DRUM: list-wise KL, head scope, n = 16, 3 rounds), ``kl-seed1`` (another
query sample and initialisation), ``epr`` (EPR's contrastive loss, one round: EPR does not re-mine),
``n16`` / ``n32`` / ``n64`` (candidate list size, one round, half the training queries).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from lever_lm_synth import accuracy, evaluate, table

SHOTS = (1, 2, 4, 8)
ABLATION_SHOTS = (4,)  # the reference point; keeps the CPU budget (EPR, n ablation, rounds)
TRANSFER_SHOTS = (1, 2, 4)  # the ICL suite's shot counts
FULL_RUNS = ("kl", "kl-seed1")  # DRUM runs evaluated at every shot count


def runs(queries: int, rounds: int) -> dict[str, dict]:
    main = {"rounds": rounds, "candidates": 16, "queries": queries}
    half = {"rounds": 1, "queries": queries // 2}
    return {"kl": main, "kl-seed1": {**main, "seed": 1}, "epr": {**main, "rounds": 1, "loss": "epr"},
            "n16": {**half, "candidates": 16}, "n32": {**half, "candidates": 32}, "n64": {**half, "candidates": 64}}


def scorer_for(run: Path):
    """The quickstart TUNA with the evaluation's tag settings, through the CLI's own scorer factory."""
    from icl.cli import scorer_from_args

    recipe = json.loads((run / "stages.json").read_text())["recipe"]
    args = argparse.Namespace(model=str(run / "models" / "tuna-stage2"), hf_model=None,
                              datastore=str(run / "datastore"), retrieval_cache=str(run / "tags.parquet"),
                              k_images=recipe["k_images"], min_tag_support=recipe["eval_min_tag_support"],
                              no_demo_tags=False, scorer_batch_size=16, device="cpu")
    return scorer_from_args(args)


def train_runs(run: Path, out: Path, names: list[str], queries: int, rounds: int) -> dict[str, list[dict]]:
    import torch

    from icl.drum.train import DrumConfig, train_drum

    torch.set_num_threads(2)
    scorer, identity = scorer_for(run)
    histories = {}
    for name in names:
        start = time.perf_counter()
        settings = {"dev_queries": 40, "epochs": 6, "batch_size": 16, **runs(queries, rounds)[name]}
        config = DrumConfig(pool=str(run / "icl" / "pool_all"), out=str(out / "runs" / name),
                            feedback=str(out / "feedback"), device="cpu", **settings)
        histories[name] = train_drum(config, scorer, identity, progress=False)
        print(f"   trained {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return histories


def convergence_table(histories: dict[str, list[dict]], evals: Path, labels: dict[str, str]) -> str:
    keys = ("train_top1_score", "train_top1_same_label", "dev_top1_score", "dev_4shot_token_loglik",
            "dev_top1_same_label", "dev_top4_same_label", "scored", "pairs_per_second")
    lines = ["### DRUM rounds (dev: 40 held-out pool queries; test: the 200 ICL queries at 4 shots)", "",
             "| run | round | " + " | ".join(keys) + " | test novel 4-shot | test all 4-shot | s (score / train) |",
             "|---|---|" + "---|" * (len(keys) + 3)]
    for name, history in histories.items():
        for h in history:
            test = evals / f"{name}-round{h['round']}"
            acc = accuracy(test, 4) if (test / "synth_icl").is_dir() else {}
            cells = [h.get(k) for k in keys] + [acc.get("novel"), acc.get("all")]
            seconds = f"{h['seconds']['score']} / {h['seconds'].get('train', '-')}"
            lines.append(f"| {name} | {h['round']} | " + " | ".join("-" if c is None else str(c) for c in cells)
                         + f" | {seconds} |")
    return "\n".join(lines) + "\n"


def demo_diagnostics(runs: dict[str, Path], labels: dict[str, str]) -> str:
    """Per run, shot count and query kind: accuracy, the share of demos naming the query's object, and how
    often the prediction is one of the demos' names (the model copies a demo's name, right or wrong)."""
    from lever_lm_synth import predictions

    lines = ["### Why: right demos and copying, clean vs distractor queries", "",
             "| run | shots | queries | accuracy | demos with the right name % | prediction = a demo's name % |",
             "|---|---|---|---|---|---|"]
    for name, out in runs.items():
        for k in (1, 4):
            records = predictions(out, k)
            for kind in ("clean", "distractor"):
                rows = [r for r in records if r["distractor"] == (kind == "distractor")]
                if not rows:
                    continue
                right = sum(labels[d["id"]] == r["answers"][0] for r in rows for d in r["demos"])
                copied = sum(any(labels[d["id"]] == r["prediction"] for d in r["demos"]) for r in rows)
                lines.append(f"| {name} | {k} | {kind} ({len(rows)}) | {100 * sum(r['score'] for r in rows) / len(rows):.1f} "
                             f"| {100 * right / sum(len(r['demos']) for r in rows):.1f} | {100 * copied / len(rows):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="finished quickstart with its quickstart-icl")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", choices=["train", "eval", "baselines"],
                        help="one part only (default both); baselines: evaluate the retrievers DRUM is compared with")
    parser.add_argument("--runs", default="kl,kl-seed1,epr,n16,n32,n64", help="DRUM runs to train and evaluate")
    parser.add_argument("--retrievers", default="random,siir,sit,bm25", help="baselines of the main table")
    parser.add_argument("--queries", type=int, default=240, help="training queries of the main runs")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the main runs")
    parser.add_argument("--parallel", type=int, default=2, help="evaluations side by side")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    names = args.runs.split(",")
    start = time.perf_counter()
    histories = {}
    if args.only not in ("eval", "baselines"):
        histories = train_runs(args.run, args.out, names, args.queries, args.rounds)
    elif args.only == "eval":
        histories = {n: json.loads((args.out / "runs" / n / "rounds.json").read_text()) for n in names}
    if args.only == "train":
        return
    pool = args.run / "icl" / "pool_all"
    labels = {r["id"]: r["label"] for r in pq.read_table(pool / "examples.parquet", columns=["id", "label"]).to_pylist()}
    evals = args.out / "eval"
    untuned, tuned = args.run / "models" / "tuna-stage2", args.run / "icl" / "tuna-icl"
    jobs = {r: (untuned, r, SHOTS) for r in args.retrievers.split(",")}
    jobs.update({f"transfer-{r}": (tuned, r, TRANSFER_SHOTS) for r in ("sit", "siir")})
    if args.only == "baselines":
        names = []
    jobs.update({f"drum-{n}": (untuned, f"drum:{args.out / 'runs' / n}", SHOTS if n in FULL_RUNS else ABLATION_SHOTS)
                 for n in names})
    if "kl" in names:
        for h in histories["kl"][1:-1]:  # round 0 is sit, the last round is drum-kl
            folder = args.out / "runs" / "kl" / f"round-{h['round']}"
            jobs[f"kl-round{h['round']}"] = (untuned, f"drum:{folder}", (4,))
        jobs["transfer-drum-kl"] = (tuned, f"drum:{args.out / 'runs' / 'kl'}", TRANSFER_SHOTS)

    def run_job(item) -> None:
        name, (model, retriever, shots) = item
        evaluate(args.run, pool, evals / name, retriever, shots, "similar-last", threads=1, model=model)

    with ThreadPoolExecutor(args.parallel) as executor:
        list(executor.map(run_job, jobs.items()))
    if args.only == "baselines":
        return
    sections = []
    main_runs = {r: evals / r for r in args.retrievers.split(",")} | {f"drum-{n}": evals / f"drum-{n}" for n in names}
    sections.append(table("DRUM against the retrievers (untuned quickstart TUNA, the scoring model)", main_runs,
                          SHOTS, labels)[0])
    if "kl" in names:
        for h in histories["kl"]:
            r = h["round"]
            link = evals / f"kl-round{r}"
            source = {0: evals / "sit", len(histories["kl"]) - 1: evals / "drum-kl"}.get(r)
            if source is not None and not link.exists() and source.exists():
                link.symlink_to(source)
        transfer = {r: evals / f"transfer-{r}" for r in ("sit", "siir", "drum-kl")}
        sections.append(table("Transfer: the in-context-tuned TUNA with the retriever trained on the untuned one's "
                              "feedback", transfer, TRANSFER_SHOTS, labels)[0])
    sections.append(convergence_table(histories, evals, labels))
    sections.append(demo_diagnostics(main_runs | {f"kl-round{r}": evals / f"kl-round{r}" for r in (1, 2)}, labels))
    report = "\n".join(sections)
    (args.out / "report.md").write_text(report)
    print(report)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
