"""The quickstart's CLIP and text-LLM trainings side by side (1 thread each) against one after the other (2 each).

``tuna quickstart`` runs its two independent training stages, CLIP training (``stage_clip``) and text-LLM
pretraining (``stage_llm``), at once, each in a spawned process on one torch thread
(``Pipeline._run_side_by_side``), instead of one after the other on two threads each. The reason given: a
tiny model's training uses a second core poorly (about 1.4-1.5x its one-thread speed), so two one-thread
trainings at once end well before the same two in a row. This measures that claim in one run, with the
settings of a finished quickstart (``--quickstart``, a ``tuna quickstart --out`` directory) and shorter
trainings (``--clip-steps``, ``--llm-steps``). Every round (``--rounds``; medians are printed) has three
measurements, every job in a fresh spawned process so that thread settings never leak from one to another:

1. one after the other, each on ``--threads`` threads (the baseline, what the quickstart would otherwise do);
2. each job alone on ``--threads // 2`` threads: its multi-thread speed-up, and its speed without a neighbour;
3. side by side: both jobs started at once on ``--threads // 2`` threads each, timed until both have ended.

Three times per job: "wall" (the parent's, from spawn to exit: interpreter start, imports, reading the world,
training), "call" (in the child, around ``train_clip`` / ``pretrain_text_llm``: the trainer's own set-up
included: CLIP reads and decodes the corpus shards, the LLM trains its tokenizer and packs its data) and
"loop" (the training loop alone, as timed by the trainers: ``train.json`` ``seconds.train`` and
``text_pretrain.json`` ``timings.train_s``). The set-up does not shrink with the step counts, so at small
``--*-steps`` it dominates "wall" and "call"; "loop" is the part that the thread count is about. The LLM's
induction warm-up is a second training loop before the main one; it is skipped by default
(``--llm-induction-steps 0``) so that "loop" is the main loop alone. The side-by-side lines also say
for how much of each job's loop the other job was in its loop, and in its training call (loops that barely
overlap say little about contention). "load before" is the 1-minute load average when a measurement
started: other work on the machine slows everything, and a multi-thread job far more than its thread
count suggests (an OpenMP thread waiting for a core holds up the others at every barrier). Only the
training calls are measured: the LLM stage's text-replay records after pretraining are left out. Outputs go to ``--work`` (a temporary folder by default), never to the
quickstart's folder.

    python bench/bench_side_by_side.py --quickstart runs/qs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

JOBS = ("clip", "llm")
MEASUREMENTS = ("after", "alone", "side")
LABELS = {"after": "one after the other, {n} threads each", "alone": "each alone, {n} thread(s)",
          "side": "side by side, {n} thread(s) each"}


def _job(name: str, root: str, threads: int, args: dict, out: str, log: str) -> None:
    """A job's process: train ``name`` ("clip" or "llm") of the quickstart at ``root`` on ``threads``
    threads into ``out``; output to ``log``; the timings to ``out``/timing.json."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # a fresh (spawned) process: torch is not imported yet
    with open(log, "w") as f:  # the trainers' progress bars would interleave on the console
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    import torch

    from datastore.synth.layout import World
    from pipeline.quickstart import llm_pretrain_config, recorded_config
    from pipeline.runs import Paths

    config = recorded_config(Path(root))
    world = World.open(Paths(Path(root)).world)
    out_dir = Path(out)
    if name == "clip":
        from datastore.clip_train import ClipTrainConfig, train_clip

        shards = world.corpus_shards()
        fields = {"batch_size": config.clip_batch_size, "seed": config.seed, **config.extra.get("clip", {}),
                  "steps": args["clip_steps"], "threads": threads, "device": "cpu"}
        call_start, t = time.time(), time.perf_counter()
        result = train_clip(shards, out_dir, ClipTrainConfig(**fields))
        call_s = time.perf_counter() - t
        loop_s = result.seconds["train"]
        loop_end = call_start + call_s - result.seconds.get("save", 0.0)  # the checkpoint is saved after the loop
        loop_start = loop_end - loop_s
    else:
        from pipeline.text_pretrain import pretrain_text_llm

        captions = world.captions()
        llm_config = llm_pretrain_config(config, steps=args["llm_steps"], induction_steps=args["llm_induction_steps"],
                                         threads=threads)
        call_start, t = time.time(), time.perf_counter()
        pretrain_text_llm(captions, out_dir, llm_config)
        call_s = time.perf_counter() - t
        timings = json.loads((out_dir / "text_pretrain.json").read_text())["timings"]
        loop_s = timings["train_s"]
        # tokenizer, data and warm-up precede the loop (the tiny model's construction, untimed, is negligible)
        loop_start = call_start + timings["tokenizer_s"] + timings["data_s"] + timings.get("induction_s", 0.0)
        loop_end = loop_start + loop_s
    record = {"threads": threads, "torch_threads": torch.get_num_threads(), "call_s": call_s, "loop_s": loop_s,
              "loop_at": [loop_start, loop_end], "call_at": [call_start, call_start + call_s]}
    (out_dir / "timing.json").write_text(json.dumps(record))


def launch(jobs: dict[str, int], args: argparse.Namespace, work: Path) -> dict:
    """Run ``jobs`` (name -> threads) at once, each in a spawned process; their timings and the wall time."""
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")  # as the quickstart: no torch/OpenMP state inherited
    child_args = {k: getattr(args, k) for k in ("clip_steps", "llm_steps", "llm_induction_steps")}
    procs, outs, ended = {}, {}, {}
    load = os.getloadavg()[0]  # other work on the machine skews everything, multi-thread jobs most
    start = time.perf_counter()
    for name, threads in jobs.items():
        outs[name] = work / name
        outs[name].mkdir(parents=True, exist_ok=True)
        procs[name] = ctx.Process(target=_job, name=name, args=(name, str(args.quickstart), threads, child_args,
                                                                str(outs[name]), str(work / f"{name}.log")))
        procs[name].start()
    try:
        while len(ended) < len(procs):
            running = {procs[n].sentinel: n for n in procs if n not in ended}
            for sentinel in wait(list(running)):
                name = running[sentinel]
                procs[name].join()
                ended[name] = time.perf_counter() - start
                if procs[name].exitcode != 0:
                    log = work / f"{name}.log"  # in a temporary --work it is gone afterwards: quote its end
                    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
                    raise RuntimeError(f"{name} job failed (exit {procs[name].exitcode}); log: {log}; "
                                       f"last line: {''.join(tail)[-200:]}")
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()
            proc.join()
    result = {"wall_s": time.perf_counter() - start, "load_before": load, "jobs": {}}
    for name in jobs:
        result["jobs"][name] = {**json.loads((outs[name] / "timing.json").read_text()), "wall_s": ended[name]}
    return result


def overlap(side: dict, name: str, other: str) -> float:
    """Share of ``name``'s training loop during which the other job was in its ``other`` ("loop" or "call")."""
    a, b = side["jobs"][name]["loop_at"]
    shared = sum(max(0.0, min(b, e) - max(a, s))
                 for n, j in side["jobs"].items() if n != name for s, e in [j[f"{other}_at"]])
    return shared / max(b - a, 1e-9)


def round_(args: argparse.Namespace, work: Path, order: tuple[str, ...]) -> dict:
    """One round: the three measurements in ``order``."""
    many, few = args.threads, max(1, args.threads // 2)
    out = {}
    for m in order:
        if m == "side":
            out[m] = launch(dict.fromkeys(JOBS, few), args, work / m)
        else:  # one job after the other: the sum of the two runs
            runs = {name: launch({name: many if m == "after" else few}, args, work / m) for name in JOBS}
            out[m] = {"wall_s": sum(r["wall_s"] for r in runs.values()),
                      "load_before": max(r["load_before"] for r in runs.values()),
                      "jobs": {name: r["jobs"][name] for name, r in runs.items()}}
        print(f"  {m}: {out[m]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    out["overlap"] = {name: {other: overlap(out["side"], name, other) for other in ("loop", "call")}
                      for name in JOBS}
    return out


def summarize(rounds: list[dict]) -> dict:
    """Medians over the rounds, and the ratios."""
    med = {m: {"wall_s": statistics.median(r[m]["wall_s"] for r in rounds),
               "load_before": max(r[m]["load_before"] for r in rounds),
               "jobs": {name: {k: statistics.median(r[m]["jobs"][name][k] for r in rounds)
                               for k in ("wall_s", "call_s", "loop_s")} for name in JOBS}} for m in MEASUREMENTS}
    job = {m: med[m]["jobs"] for m in MEASUREMENTS}
    ratios = {
        "side_over_after_wall": med["side"]["wall_s"] / med["after"]["wall_s"],
        "one_over_two_threads": {name: {k: job["alone"][name][k] / job["after"][name][k]
                                        for k in ("wall_s", "call_s", "loop_s")} for name in JOBS},
        "side_over_alone": {name: {k: job["side"][name][k] / job["alone"][name][k]
                                   for k in ("wall_s", "call_s", "loop_s")} for name in JOBS},
        "overlap": {name: {other: statistics.median(r["overlap"][name][other] for r in rounds)
                           for other in ("loop", "call")} for name in JOBS},
    }
    return {"medians": med, "ratios": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quickstart", type=Path, required=True, help="a finished `tuna quickstart --out` directory")
    parser.add_argument("--clip-steps", type=int, default=150, help="CLIP training steps per job")
    parser.add_argument("--llm-steps", type=int, default=300, help="text-LLM main-loop steps per job")
    parser.add_argument("--llm-induction-steps", type=int, default=0,
                        help="LLM induction warm-up steps (0: none, so that its loop time is the main loop's)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads per job one after the other (the cores); alone and side by side: half")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the three measurements (medians printed)")
    parser.add_argument("--work", type=Path, default=None, help="output folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    root = args.quickstart.resolve()
    if not (root / "stages.json").is_file() or not (root / "world" / "world.json").is_file():
        print(f"error: {root} is not a finished quickstart run (no stages.json or no world/world.json)",
              file=sys.stderr)
        return 2
    if min(args.clip_steps, args.llm_steps, args.rounds, args.threads) < 1 or args.llm_induction_steps < 0:
        print("error: --clip-steps, --llm-steps, --rounds and --threads must be >= 1, --llm-induction-steps >= 0",
              file=sys.stderr)
        return 2
    args.quickstart = root
    from pipeline.quickstart import recorded_config

    config = recorded_config(root)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench_side_by_side_") as tmp:
        work = (args.work or Path(tmp)).resolve()
        if work == root or root in work.parents:
            print(f"error: --work {work} is inside the quickstart run {root}", file=sys.stderr)
            return 2
        for i in range(args.rounds):  # alternate the order, so that no measurement always runs first
            order = MEASUREMENTS if i % 2 == 0 else MEASUREMENTS[::-1]
            print(f"round {i + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr, flush=True)
            try:
                rounds.append(round_(args, work / f"round{i + 1}", order))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
    summary = summarize(rounds)
    med, ratios = summary["medians"], summary["ratios"]
    few = max(1, args.threads // 2)
    print(f"{root}: CLIP {args.clip_steps} steps (batch {config.clip_batch_size}), text LLM {args.llm_steps} steps "
          f"(induction {args.llm_induction_steps}), {args.rounds} round(s), medians; {os.cpu_count()} cores")
    print("| measurement | CLIP wall s | CLIP call s | CLIP loop s | LLM wall s | LLM call s | LLM loop s | wall s "
          "| load before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in MEASUREMENTS:
        cells = [f"{med[m]['jobs'][n][k]:.1f}" for n in JOBS for k in ("wall_s", "call_s", "loop_s")]
        label = LABELS[m].format(n=args.threads if m == "after" else few)
        print(f"| {label} | {' | '.join(cells)} | {med[m]['wall_s']:.1f} | {med[m]['load_before']:.1f} |")
    headline = ratios["side_over_after_wall"]
    print(f"\nside by side / one after the other, wall: {headline:.3f} ({1 / headline:.2f}x faster)")
    for n in JOBS:
        r1, r2 = ratios["one_over_two_threads"][n], ratios["side_over_alone"][n]
        print(f"{n}: {few}-thread / {args.threads}-thread time: loop {r1['loop_s']:.2f}, call {r1['call_s']:.2f}, "
              f"wall {r1['wall_s']:.2f}; side by side / alone: loop {r2['loop_s']:.2f}, call {r2['call_s']:.2f}, "
              f"wall {r2['wall_s']:.2f}; its side-by-side loop ran {ratios['overlap'][n]['loop']:.0%} beside the "
              f"other's loop, {ratios['overlap'][n]['call']:.0%} beside its training call")
    if args.json:
        args.json.write_text(json.dumps({"quickstart": str(root), "clip_steps": args.clip_steps,
                                         "llm_steps": args.llm_steps, "llm_induction_steps": args.llm_induction_steps,
                                         "threads": args.threads, "rounds": rounds, **summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
