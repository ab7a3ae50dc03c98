"""Does Lever-LM pick better demonstrations than the similarity retrievers on the synthetic ICL task?

Takes a finished quickstart with its ICL suite (``tuna quickstart-icl``: the task and ``pool_all``) and a D_M
mined with the quickstart's TUNA (``tuna-icl lever-lm build-data``). Trains Lever-LM variants, evaluates the
quickstart's TUNA (the model D_M was scored with, not in-context tuned) at 1-8 shots with each retriever,
and writes tables by group (seen / novel categories, clean / distractor queries) with the interpolation
(1-2 shots) and extrapolation (3-8) means, plus D_M diagnostics.

    .venv/bin/python experiments/lever_lm_synth.py --run /tmp/q21s0 --dm /tmp/lever/dm_siir --out /tmp/lever/exp
    .venv/bin/python experiments/lever_lm_synth.py ... --only main          # the retriever comparison only

Ablations (each a table): shuffled demo order; D_M with fewer anchors (n), length 1 (l), the best beam
only (b); random instead of similarity candidate sets (``--dm-random``, a second D_M); 1 / 2 / 4 layers;
the golden sequence (D_M's most frequent) for every query vs fixed random sets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MAIN_SHOTS = (1, 2, 3, 4, 8)
ABLATION_SHOTS = (2, 4, 8)  # interpolation = the 2-shot column there, extrapolation = mean of 4 and 8
GROUPS = {"seen": lambda r: r["novelty"] == "seen", "novel": lambda r: r["novelty"] == "novel",
          "clean": lambda r: not r["distractor"], "distractor": lambda r: r["distractor"],
          "all": lambda r: True}


def derive_dm(src: Path, dst: Path, anchors: int | None = None, best_only: bool = False, length_one: bool = False,
              beam: int = 5) -> Path:
    """A D_M that the source's search also found, without rescoring: the first ``anchors`` anchors (the
    sample is a seeded prefix), only beam 0, or length 1 (the top ``beam`` single demos by step-1 InfoScore,
    exactly what a length-1 beam search keeps)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from icl.lever_lm.data import ANCHORS, MANIFEST, SEQUENCES, read_dm

    if (dst / MANIFEST).is_file():
        return dst
    manifest, sequences, anchor_rows = read_dm(src)
    if anchors is not None:
        anchor_rows = anchor_rows[:anchors]
    keep = {a["anchor_id"] for a in anchor_rows}
    sequences = [s for s in sequences if s["anchor_id"] in keep]
    if best_only:
        sequences = [s for s in sequences if s["beam"] == 0]
    if length_one:
        sequences = []
        for a in anchor_rows:
            scores = np.asarray(a["first_step_scores"])
            for b, i in enumerate(np.argsort(-scores, kind="stable")[:beam]):
                sequences.append({"anchor_id": a["anchor_id"], "beam": b, "demo_ids": [a["candidates"][i]],
                                  "step_scores": [float(scores[i])], "probability": a["base_probability"] + float(scores[i])})
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(sequences), dst / SEQUENCES)
    pq.write_table(pa.Table.from_pylist(anchor_rows), dst / ANCHORS)
    derived = {"anchors": anchors, "best_only": best_only, "length_one": length_one}
    (dst / MANIFEST).write_text(json.dumps({**manifest, "anchors": len(anchor_rows), "sequences": len(sequences),
                                            "derived_from": str(src), "derived": derived}, indent=1))
    return dst


def fixed_files(dm: Path, pool_dir: Path, out: Path, k: int, seeds: int = 3) -> dict[str, Path]:
    """``golden``: D_M's most frequent best sequence, then its most frequent demos to reach ``k``; ``random-s``:
    k pool ids drawn with seed s."""
    import numpy as np

    from icl.lever_lm.data import read_dm
    from icl.pool import Pool

    _, sequences, _ = read_dm(dm)
    best = Counter(tuple(s["demo_ids"]) for s in sequences if s["beam"] == 0).most_common(1)[0][0]
    frequent = [d for d, _ in Counter(d for s in sequences for d in s["demo_ids"]).most_common()]
    golden = list(best) + [d for d in frequent if d not in best]
    out.mkdir(parents=True, exist_ok=True)
    files = {"golden": out / "golden.txt"}
    files["golden"].write_text("\n".join(golden[:k]) + "\n")
    pool = Pool.open(pool_dir)
    for s in range(seeds):
        ids = np.random.default_rng(s).permutation(len(pool))[:k]
        files[f"random-{s}"] = out / f"random-{s}.txt"
        files[f"random-{s}"].write_text("\n".join(pool.examples[i].id for i in ids) + "\n")
    return files


def train(dm: Path, out: Path, layers: int, seed: int, epochs: int) -> Path:
    import torch

    from icl.lever_lm.train import LeverLMTrainConfig, train_lever_lm

    torch.set_num_threads(1)  # a small model: a second thread mostly spins beside the evaluations
    if not (out / "config.json").is_file():
        train_lever_lm(LeverLMTrainConfig(data=[str(dm)], out=str(out), num_layers=layers, seed=seed, epochs=epochs),
                       progress=False)
    return out


def evaluate(run: Path, pool: Path, out: Path, retriever: str, shots: tuple[int, ...], order: str, threads: int,
             model: Path | None = None) -> None:
    """``tuna-eval --bench synth_icl`` of ``model`` (default: the quickstart's TUNA before in-context tuning)."""
    if all((out / "synth_icl" / f"{k}-shot" / "predictions.jsonl").is_file() for k in shots):
        return
    start = time.perf_counter()
    recipe = json.loads((run / "stages.json").read_text())["recipe"]  # the quickstart's evaluation tag settings
    cmd = [str(Path(sys.executable).with_name("tuna-eval")), "--model", str(model or run / "models" / "tuna-stage2"),
           "--bench", "synth_icl", "--data-root", str(run / "world"), "--out", str(out), "--batch-size", "16",
           "--device", "cpu", "--datastore", str(run / "datastore"), "--retrieval-cache", str(run / "tags.parquet"),
           "--min-tag-support", str(recipe["eval_min_tag_support"]), "--k-images", str(recipe["k_images"]), "--shots", ",".join(map(str, shots)),
           "--demo-pool", str(pool), "--retriever", retriever, "--demo-order", order]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    print(f"   {out.name}: {time.perf_counter() - start:.0f} s", flush=True)


def predictions(out: Path, k: int) -> list[dict]:
    path = out / "synth_icl" / f"{k}-shot" / "predictions.jsonl"
    if k == 0 and not path.is_file():  # tuna-eval writes a 0-shot pass without a shots folder
        path = out / "synth_icl" / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def accuracy(out: Path, k: int) -> dict[str, float | None]:
    from pipeline.icl_suite import _accuracy

    records = predictions(out, k)
    return {group: _accuracy(records, keep) for group, keep in GROUPS.items()}


def label_precision(out: Path, k: int, labels: dict[str, str]) -> float | None:
    from pipeline.icl_suite import _demo_precision

    return _demo_precision(predictions(out, k), labels)


def table(title: str, runs: dict[str, Path], shots: tuple[int, ...], labels: dict[str, str]) -> tuple[str, dict]:
    """Markdown: a row per run and group; shot columns, interpolation and extrapolation means, label precision."""
    from eval.kshot import summary_columns

    header = [f"{k}-shot" for k in shots] + ["interp. (1-2)", "extrap. (3-8)", "right-label demos @max K"]
    lines = [f"### {title}", "", "| retriever | group | " + " | ".join(header) + " |", "|---|---|" + "---|" * len(header)]
    data = {}
    for name, out in runs.items():
        per_shot = {k: accuracy(out, k) for k in shots}
        data[name] = {"shots": per_shot, "label_precision": label_precision(out, max(shots), labels)}
        for group in ("novel", "seen", "distractor", "all"):
            values = {k: per_shot[k][group] for k in shots}
            means = summary_columns(values)
            cells = [values[k] for k in shots] + [means["interpolation"], means["extrapolation"]]
            text = ["-" if v is None else f"{v:.1f}" for v in cells]
            precision = data[name]["label_precision"] if group == "novel" else None
            lines.append(f"| {name} | {group} | " + " | ".join(text) + f" | {'' if precision is None else precision} |")
    return "\n".join(lines) + "\n", data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="finished quickstart with its quickstart-icl")
    parser.add_argument("--dm", required=True, type=Path, help="D_M mined with similarity (siir) candidate sets")
    parser.add_argument("--dm-random", type=Path, help="D_M mined with random candidate sets (ablation)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--only", choices=["main", "ablations"], help="one part only (default both)")
    parser.add_argument("--retrievers", default="random,siir,sttr,sitr,sit,oracle",
                        help="retrievers Lever-LM is compared with in the main table")
    parser.add_argument("--shots", default=",".join(map(str, MAIN_SHOTS)), help="shot counts of the main table")
    parser.add_argument("--epochs", type=int, default=10, help="Lever-LM training epochs (validation loss is "
                        "lowest near 6 on a 240-anchor D_M)")
    parser.add_argument("--parallel", type=int, default=2, help="evaluations side by side")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from icl.lever_lm.data import diagnostics
    from icl.pool import Pool

    pool = args.run / "icl" / "pool_all"
    labels = {r["id"]: r["label"] for r in pq.read_table(pool / "examples.parquet", columns=["id", "label"]).to_pylist()}
    models = args.out / "models"
    evals = args.out / "eval"
    jobs: dict[str, tuple[str, tuple[int, ...], str]] = {}  # eval name -> (retriever, shots, order)
    sections: list[tuple[str, list[str], tuple[int, ...]]] = []
    start = time.perf_counter()
    main_shots = tuple(int(k) for k in args.shots.split(","))
    main_model = train(args.dm, models / "lever-lm", 2, args.seed, args.epochs)
    jobs["lever-lm"] = (f"lever-lm:{main_model}", main_shots, "similar-last")  # the ablations' reference too
    if args.only in (None, "main"):
        names = args.retrievers.split(",")
        jobs.update({n: (n, main_shots, "similar-last") for n in names})
        sections.append(("Lever-LM against the retrievers (untuned quickstart TUNA)", names + ["lever-lm"], main_shots))
    if args.only in (None, "ablations"):
        s = ABLATION_SHOTS
        jobs["lever-lm shuffled"] = (f"lever-lm:{main_model}", s, "shuffled")
        sections.append(("Ablation: demo order at inference", ["lever-lm", "lever-lm shuffled"], s))
        half = derive_dm(args.dm, args.out / "dm_half", anchors=120)
        length1 = derive_dm(args.dm, args.out / "dm_l1", length_one=True)
        best = derive_dm(args.dm, args.out / "dm_best", best_only=True)
        for name, dm in (("n=120", half), ("l=1", length1), ("best beam only", best)):
            jobs[f"lever-lm {name}"] = (f"lever-lm:{train(dm, models / name.replace(' ', '_'), 2, args.seed, args.epochs)}",
                                        s, "similar-last")
        sections.append(("Ablation: D_M (n = anchors, l = length, b = beams kept)",
                         ["lever-lm", "lever-lm n=120", "lever-lm l=1", "lever-lm best beam only"], s))
        if args.dm_random:
            jobs["lever-lm random candidates"] = (
                f"lever-lm:{train(args.dm_random, models / 'random_candidates', 2, args.seed, args.epochs)}", s,
                "similar-last")
            sections.append(("Ablation: candidate sets (same anchors)", ["lever-lm n=120", "lever-lm random candidates"], s))
        for layers in (1, 4):
            jobs[f"lever-lm {layers} layer(s)"] = (
                f"lever-lm:{train(args.dm, models / f'layers{layers}', layers, args.seed, args.epochs)}", s, "similar-last")
        sections.append(("Ablation: layers", ["lever-lm 1 layer(s)", "lever-lm", "lever-lm 4 layer(s)"], s))
        fixed = fixed_files(args.dm, pool, args.out / "fixed", max(s), seeds=2)
        for name, path in fixed.items():
            jobs[f"fixed {name}"] = (f"fixed:{path}", s, "similar-last")
        sections.append(("Ablation: one golden sequence for every query vs fixed random sets",
                         ["lever-lm"] + [f"fixed {n}" for n in fixed], s))
    print(f"trained Lever-LM models in {time.perf_counter() - start:.0f} s; {len(jobs)} evaluations", flush=True)
    threads = max(1, (os.cpu_count() or 2) // args.parallel)
    with ThreadPoolExecutor(args.parallel) as ex:
        list(ex.map(lambda item: evaluate(args.run, pool, evals / item[0].replace(" ", "_"),
                                          item[1][0], item[1][1], item[1][2], threads), jobs.items()))
    text = [f"# Lever-LM on the synthetic ICL task ({args.run}, D_M {args.dm})", ""]
    results: dict = {"diagnostics": diagnostics(args.dm, Pool.open(pool))}
    for title, names, shots in sections:
        md, data = table(title, {n: evals / n.replace(" ", "_") for n in names}, shots, labels)
        text.append(md)
        results[title] = data
    text.append("D_M diagnostics: " + json.dumps(results["diagnostics"]))
    if args.dm_random:
        results["diagnostics_random"] = diagnostics(args.dm_random, Pool.open(pool))
        text.append("\nD_M (random candidates) diagnostics: " + json.dumps(results["diagnostics_random"]))
    (args.out / "results.md").write_text("\n".join(text) + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(text))


if __name__ == "__main__":
    main()
