"""``tuna quickstart``: the whole TUNA pipeline on the embedded synthetic world, baseline vs TUNA.

Stages (each records its seconds in ``OUT/stages.json``; a re-run skips finished stages):

1. ``world``     synthesize the world (seen + novel categories) and a second, disjoint world for the swap;
2. ``clip``      train a tiny CLIP contrastively on the corpus (all categories) — the stand-in for a web CLIP;
3. ``llm``       pretrain a tiny LLM on text only (corpus captions + copy/reading text with made-up names),
                 and write the text-only copy conversations mixed into instruction tuning; it runs side by
                 side with ``clip``, each in a process of its own on half the cores (``logs/{clip,llm}.log``);
4. ``datastore`` build both worlds' datastores with that CLIP and the retrieval caches;
5. ``train``     ``deepspeed`` (ZeRO-2) stage 1 + stage 2 for the no-tags baseline and for TUNA (same
                 data, budget and seed; stage 2 keeps the LLM's embeddings frozen);
6. ``eval``      ``tuna-eval`` on seen/novel questions: baseline, TUNA, random-tags, uniform-weights, and
                 the zero-shot datastore swap on the second world;
7. ``report``    comparison table, diagnostics, ``results.json``, ``results.md``, ``results.png`` and
                 ``report.html`` (baseline vs TUNA on the novel categories, question by question).

Why the recipe looks the way it does (what failed without each part) is in docs/quickstart.md; the
experiments behind it in docs/experiments.md. The report (metrics, diagnostics, tables) is
:mod:`pipeline.report`.

Training and evaluation run through the real command-line tools (``deepspeed --module train.train``,
``tuna-eval``) in subprocesses, exactly as a user would run them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Callable

from datastore.synth.layout import World
from datastore.synth.world import CATALOGUE_SIZE
from pipeline.processes import (REPO, StageError, console_script, free_port, run_logged, subprocess_env,
                                threads_per_process)
from pipeline.report import identification_records, report, results_markdown
from pipeline.runs import RUNS, TEXT_REFERENCE, Paths


@dataclass
class QuickstartConfig:
    """Sizes and budgets of one quickstart run (defaults: about 15 min on 2 CPU cores).

    Why each default is what it is: docs/quickstart.md, "Why the recipe looks like this"; the
    experiments behind them: docs/experiments.md.

    Attributes:
        out: output directory (re-running continues after the last finished stage).
        seed: seed of the world, every model and every data order.
        corpus_size: datastore corpus images.
        n_instruct: instruction images (seen categories only).
        n_eval: evaluation images (half seen, half novel).
        image_size: image side in pixels.
        n_seen: categories in the instruction data.
        n_novel: categories only in the corpus and the eval set.
        swap: also run the zero-shot datastore swap on a second world of other categories.
        swap_corpus_size: corpus images of the second world.
        swap_categories: categories of the second world (the catalogue entries after the first world's).
        clip_steps: tiny CLIP training steps.
        clip_batch_size: tiny CLIP image-text pairs per step.
        llm_steps: LLM text-pretraining steps.
        llm_hidden: LLM hidden size.
        llm_layers: LLM layers.
        llm_induction_steps: steps of the LLM's induction warm-up (random token runs said twice) before its
            text pretraining; with it the LLM copies names of several tokens, which the datastore swap needs.
        llm_membership_steps, llm_membership_rows: the LLM's membership warm-up steps and the membership
            rows in each of its text steps ("is this token in the list?", pipeline/text_pretrain.py); 0
            (the default) = none. With ``llm_layers`` 3 they teach the text LLM ``tags_exist``, which
            POPE asks of TUNA, at a cost to its copying (docs/experiments.md, section 22).
        text_replay: text-only copy conversations mixed into instruction tuning, per instruction image.
        stage1_steps: connector pretraining steps.
        steps: instruction tuning steps.
        batch_size: per-process training batch.
        stage1_lr: connector pretraining learning rate.
        lr: instruction tuning learning rate.
        freeze_llm_embeddings: stage 2 keeps the LLM's embeddings and LM head frozen.
        image_patch_positions: learned patch positions before the connector.
        rename_p: share of TUNA's instruction samples whose seen names are renamed on the LLM side
            (questions, answers, tag words): the tag block, not the image, gives the name; 0: off.
        rename_to: "fresh": made-up names of several subword tokens, never a category of any world
            (OUT/fresh_names.txt, written by pipeline.quickstart.write_fresh_names); "seen": the seen
            names permuted among each other.
        nproc: training processes (deepspeed --num_gpus).
        ds_config: file in ds_configs/.
        k_images: neighbour images retrieved per query image.
        max_tags: tags in the model's tag block.
        eval_min_tag_support: at evaluation, read only tags whose entity a (similarity-weighted) share of
            at least this of the neighbours names; 0: every retrieved tag.
        eval_batch_size: evaluation batch size.
        threads: torch threads per process; 0: cores / nproc.
        device: cpu or cuda.
        overwrite: delete --out first instead of resuming.
        extra: per-stage overrides ({"clip": {...}, "llm": {...}, "train": {...}}), for experiments.
    """

    out: str = "runs/quickstart"
    seed: int = 0
    corpus_size: int = 20_000
    n_instruct: int = 3_000
    n_eval: int = 160
    image_size: int = 96
    # 16 + 8, not more seen categories: the tiny CLIP separates 48 + 16 poorly (top-1 purity 40 %)
    n_seen: int = 16
    n_novel: int = 8
    swap: bool = True
    swap_corpus_size: int = 8_000
    swap_categories: int = 24
    # 1000, not 600: at 600 the neighbour purity, and with it the novel gain, depends on the seed
    # (docs/experiments.md, "The CLIP needs 1,000 steps")
    clip_steps: int = 1000
    clip_batch_size: int = 128
    # 1500, not 600: at 600 whether the LLM learns to copy from a tag list depends on the seed
    # (docs/experiments.md, "The copy prior needs 1,500 text steps")
    llm_steps: int = 1500
    llm_hidden: int = 128
    llm_layers: int = 2
    # without it no multi-token name is copied and the swap gains 0 (docs/experiments.md, section 19)
    llm_induction_steps: int = 800
    llm_membership_steps: int = 0
    llm_membership_rows: int = 0
    # LLaVA-1.5 mixes 40K text-only conversations into its 665K (pipeline.text_replay)
    text_replay: float = 0.5
    stage1_steps: int = 60
    steps: int = 300
    batch_size: int = 8
    stage1_lr: float = 1e-3
    lr: float = 1e-3
    # with a few seen names as the only answers, a trained LM head learns to prefer them over every
    # other word, novel names included
    freeze_llm_embeddings: bool = True
    # the convnet tower's features do not say where a patch is (a ViT's do), and several-object
    # questions name a position
    image_patch_positions: bool = True
    # stage 2 answers 16 single-token names only: it turns the LLM's copying into "say the tag's last
    # token", and a swapped-in datastore's names of several tokens come out as pieces ("dip" for "drodip").
    # Renaming half of TUNA's samples to names it never saw keeps the copying whole (docs/experiments.md,
    # section 19). Permuting the seen names instead ("seen") helped at some seeds only (section 7).
    rename_p: float = 0.5
    rename_to: str = "fresh"
    nproc: int = 2
    ds_config: str = "zero2.json"
    k_images: int = 5
    max_tags: int = 6
    # a neighbour scene's other objects make up to a third of a block wrong; training reads every tag
    # (docs/experiments.md, "Majority-supported tags at evaluation")
    eval_min_tag_support: float = 0.5
    eval_batch_size: int = 32
    threads: int = 0
    device: str = "cpu"
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("corpus_size", "n_instruct", "n_eval", "clip_steps", "llm_steps", "stage1_steps", "steps",
                     "batch_size", "nproc", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("llm_induction_steps", "llm_membership_steps", "llm_membership_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.rename_to not in ("fresh", "seen"):
            raise ValueError(f"rename_to={self.rename_to!r}: expected 'fresh' or 'seen'")
        for name in ("eval_min_tag_support", "rename_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if self.n_seen < 1 or self.n_novel < 1 or self.text_replay < 0:
            raise ValueError("n_seen and n_novel must be >= 1 and text_replay >= 0")
        if self.swap and self.n_seen + self.n_novel + self.swap_categories > CATALOGUE_SIZE:
            raise ValueError(f"n_seen + n_novel + swap_categories = "
                             f"{self.n_seen + self.n_novel + self.swap_categories} exceeds the catalogue's "
                             f"{CATALOGUE_SIZE} categories (the swap world needs categories of its own)")
        if not (REPO / "ds_configs" / self.ds_config).is_file():
            raise ValueError(f"DeepSpeed config {REPO / 'ds_configs' / self.ds_config} not found "
                             f"(the quickstart runs from a source checkout)")

    @property
    def root(self) -> Path:
        return Path(self.out).resolve()


# ------------------------------------------------------------------------------------------ stage runner
class Pipeline:
    """Runs the stages in order, records their seconds, and skips stages finished by an earlier run."""

    def __init__(self, config: QuickstartConfig, log: Callable[[str], None] = partial(print, flush=True)) -> None:
        self.config, self.log = config, log
        self.root = config.root
        if config.overwrite and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "stages.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        recipe = _recipe(config)
        # a run from before a setting existed ran with its default
        stored = {**_recipe_defaults(config), **self.state.get("recipe", recipe)}
        if stored != recipe:
            raise StageError(f"{self.root} holds a quickstart run with other settings; use --overwrite "
                             f"or another --out")
        self.state["recipe"] = recipe
        self.state.setdefault("seconds", {})

    def run(self, stages: dict[str, Callable[..., None]], side_by_side: tuple[tuple[str, ...], ...] = ()) -> None:
        """Run ``stages`` in order. ``side_by_side`` holds lanes: each lane's stages (picklable callables
        taking ``side_by_side=k``: how many lanes share the cores) run one after the other in a process of
        its own, and the lanes run at once, from where the first of their stages is reached."""
        self.order = list(stages)
        in_lanes = [name for lane in side_by_side for name in lane]
        block = [name for name in self.order if name in in_lanes]
        first = self.order.index(block[0]) if block else 0
        if sorted(block) != sorted(in_lanes) or self.order[first:first + len(block)] != block:
            raise ValueError(f"the side-by-side stages {in_lanes} must be stages, one after the other in {self.order}")
        ran_together: list[str] = []
        for n, (name, fn) in enumerate(stages.items(), 1):
            if name in ran_together:
                continue
            if name in self.state["seconds"] and name != "report":  # the report is cheap: always redone
                self.log(f"== [{n}/{len(stages)}] {name}: done in an earlier run "
                         f"({self.state['seconds'][name]:.0f} s), skipped")
                continue
            lanes = [left for lane in side_by_side
                     if (left := [g for g in lane if g not in self.state["seconds"]])] if name in in_lanes else []
            if len(lanes) > 1:  # with one lane left its stages run here, in order, on every core
                self._run_side_by_side([[(g, stages[g]) for g in lane] for lane in lanes])
                ran_together += [g for lane in lanes for g in lane]
                continue
            self.log(f"== [{n}/{len(stages)}] {name}")
            start = time.perf_counter()
            fn()
            self._finished(name, time.perf_counter() - start)

    def _finished(self, name: str, seconds: float) -> None:
        done = {**self.state["seconds"], name: round(seconds, 1)}  # in stage order, however they finished
        self.state["seconds"] = {k: done[k] for k in [*self.order, *done] if k in done}
        self.state_file.write_text(json.dumps(self.state, indent=2))
        self.log(f"   {name}: {self.state['seconds'][name]:.1f} s")

    def _run_side_by_side(self, lanes: list[list[tuple[str, Callable[..., None]]]]) -> None:
        """Each lane (its stages as (name, callable)) in a spawned process; each stage writes
        ``logs/<name>.log``; a progress line per running stage every 30 s; the first failure stops the
        other lanes. A stage's seconds run from its lane's start or its predecessor's end to its own end,
        so a lane's stages add up to the lane's wall time.
        Why: a tiny model's training uses a second core poorly (1.4-1.5x its one-core speed here), so two
        one-core trainings side by side finish well before the same two one after the other."""
        import multiprocessing
        from multiprocessing.connection import wait

        ctx = multiprocessing.get_context("spawn")  # not fork: the parent's torch/OpenMP state is not fork-safe
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        logs = {name: self.root / "logs" / f"{name}.log" for lane in lanes for name, _ in lane}
        running: dict[int, str] = {}  # lane -> its running stage
        since: dict[int, float] = {}  # lane -> when that stage started
        procs, conns = [], []

        def header(lane: int) -> None:
            name = running[lane]
            others = ", ".join(running[k] for k in sorted(running) if k != lane)
            self.log(f"== [{self.order.index(name) + 1}/{len(self.order)}] {name} ("
                     + (f"side by side with {others}; " if others else "") + f"log: {logs[name]})")

        for k, lane in enumerate(lanes):
            running[k], since[k] = lane[0][0], time.perf_counter()
            receive, send = ctx.Pipe(duplex=False)
            procs.append(ctx.Process(target=_run_lane, args=(lane, len(lanes), {n: str(logs[n]) for n, _ in lane}, send),
                                     name="+".join(n for n, _ in lane)))
            conns.append(receive)
            procs[k].start()
            send.close()  # the child's end: the parent's copy would keep the pipe open after the child exits
        for k in range(len(lanes)):
            header(k)

        def stage_ended(k: int, name: str) -> None:
            now = time.perf_counter()
            self._finished(name, now - since[k])
            names = [n for n, _ in lanes[k]]
            if name != names[-1]:
                running[k], since[k] = names[names.index(name) + 1], now
                header(k)
            else:
                del running[k]

        next_report = time.perf_counter() + 30
        try:
            while running:
                ready = wait([procs[k].sentinel for k in running] + [conns[k] for k in running],
                             timeout=max(0.0, next_report - time.perf_counter()))
                for k in list(running):
                    while k in running and conns[k].poll():  # drain a lane's messages before its exit
                        try:
                            stage_ended(k, conns[k].recv())
                        except EOFError:
                            break
                    if k in running and procs[k].sentinel in ready:
                        procs[k].join()
                        name = running[k]
                        raise StageError(f"stage {name} failed (exit {procs[k].exitcode}); log: {logs[name]}; "
                                         f"last line: {_last_line(logs[name])[-200:]}")
                if time.perf_counter() >= next_report:
                    next_report += 30
                    for k in sorted(running):
                        self.log(f"      {running[k]}: {_last_line(logs[running[k]])[-110:]}")
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                proc.join()


def _run_lane(lane: list[tuple[str, Callable[..., None]]], side_by_side: int, log_files: dict[str, str],
              ended: Any) -> None:
    """A lane's process: each stage's output (Python's and native code's) goes to its log file, and its
    name is sent through ``ended`` when it has finished."""
    import multiprocessing
    import traceback

    from common.log import setup_logging

    # A spawned process makes "spawn" its default start method, so a stage's DataLoader workers would
    # be spawned, each re-importing torch and the datastore (~15 s per loader here, 4 loaders in the
    # datastore stage). The platform's default, as in the parent, forks them.
    multiprocessing.set_start_method(None, force=True)
    sys.stdout.reconfigure(line_buffering=True)  # to a file: block-buffered, the progress lines would lag
    setup_logging()  # its handler writes to fd 2, which each stage points at its own log
    for name, fn in lane:
        with open(log_files[name], "w") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                fn(side_by_side=side_by_side)
            except BaseException:
                traceback.print_exc()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            sys.stdout.flush()
            sys.stderr.flush()
        ended.send(name)


def _last_line(path: Path) -> str:
    """The last non-empty line of a log, the last part of a progress bar's carriage-return updates."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    parts = [p.strip() for p in tail.replace("\r", "\n").split("\n") if p.strip()]
    return parts[-1] if parts else "(no output yet)"


def process_threads(config: QuickstartConfig) -> int:
    """Torch threads of each of the run's processes."""
    return threads_per_process(config.threads, config.nproc)


def process_env(config: QuickstartConfig) -> dict[str, str]:
    """The environment the run's training and evaluation subprocesses get."""
    return subprocess_env(process_threads(config))


# ------------------------------------------------------------------------------------------ stages
def stage_world(config: QuickstartConfig, paths: Paths) -> None:
    from datastore.synth.generate import SynthConfig, generate_world

    workers = max(1, min(os.cpu_count() or 1, 8))
    generate_world(SynthConfig(out=str(paths.world), seed=config.seed, n_corpus=config.corpus_size,
                               n_instruct=config.n_instruct, n_eval=config.n_eval, image_size=config.image_size,
                               n_seen=config.n_seen, n_novel=config.n_novel, workers=workers, overwrite=True))
    paths.seen_names.write_text("".join(name + "\n" for name in World.open(paths.world).names("seen")))
    if config.swap:  # the catalogue entries after the first world's: none of its categories
        half = config.swap_categories // 2  # its seen/novel labels mean nothing here: all are new to the model
        generate_world(SynthConfig(out=str(paths.world2), seed=config.seed + 1, n_corpus=config.swap_corpus_size,
                                   n_instruct=1, n_eval=config.n_eval, image_size=config.image_size,
                                   n_seen=config.swap_categories - half, n_novel=half,
                                   category_offset=config.n_seen + config.n_novel, workers=workers,
                                   overwrite=True))


# Lanes of stages: the lanes run at once, each on its share of the cores (Pipeline._run_side_by_side says
# why). The datastore needs only the CLIP, so it starts when the CLIP ends, while the LLM trains on.
SIDE_BY_SIDE = (("clip", "datastore"), ("llm",))


def total_seconds(seconds: dict[str, float], lanes: tuple[tuple[str, ...], ...] = SIDE_BY_SIDE) -> float:
    """Wall seconds of a run's stages: the side-by-side lanes count once, by the longest."""
    lane_seconds = [sum(seconds.get(name, 0.0) for name in lane) for lane in lanes]
    return sum(seconds.values()) - sum(lane_seconds) + max(lane_seconds, default=0.0)


def stage_threads(config: QuickstartConfig, side_by_side: int = 1) -> int:
    """Torch threads of an in-process stage that shares the cores with ``side_by_side - 1`` others."""
    return max(1, process_threads(config) * config.nproc // side_by_side)


def stage_clip(config: QuickstartConfig, paths: Paths, side_by_side: int = 1) -> None:
    from datastore.clip_train import ClipTrainConfig, train_clip

    train_clip(World.open(paths.world).corpus_shards(), str(paths.clip),
               ClipTrainConfig(steps=config.clip_steps, batch_size=config.clip_batch_size, seed=config.seed,
                               threads=stage_threads(config, side_by_side), device=config.device,
                               **config.extra.get("clip", {})))


def clip_args(paths: Paths) -> dict[str, str]:
    """The trained CLIP as (model config JSON, checkpoint) — how every later stage loads it."""
    from datastore.clip_train import trained_clip_files

    model_config, checkpoint = trained_clip_files(str(paths.clip))
    return {"model_config": model_config, "pretrained": checkpoint}


def llm_pretrain_config(config: QuickstartConfig, **changes: Any):
    """The quickstart's ``TextPretrainConfig`` (``changes`` override its fields, e.g. ``seed``, ``steps``)."""
    from pipeline.text_pretrain import TextPretrainConfig

    fields = {"steps": config.llm_steps, "hidden_size": config.llm_hidden, "num_layers": config.llm_layers,
              "induction_steps": config.llm_induction_steps, "membership_steps": config.llm_membership_steps,
              "membership_rows": config.llm_membership_rows,
              "seed": config.seed, "threads": stage_threads(config), **config.extra.get("llm", {})}
    return TextPretrainConfig(**{**fields, **changes})


def stage_llm(config: QuickstartConfig, paths: Paths, side_by_side: int = 1) -> None:
    """Text-only LLM pretraining, and the text-only conversations mixed into instruction tuning."""
    from pipeline.text_pretrain import pretrain_text_llm
    from pipeline.text_replay import text_replay_records

    captions = World.open(paths.world).captions()  # only these: never eval images or questions
    llm_config = llm_pretrain_config(config, threads=stage_threads(config, side_by_side))
    pretrain_text_llm(captions, str(paths.llm), llm_config)
    if config.rename_p > 0 and config.rename_to == "fresh":  # the pool depends on the LLM's tokenizer
        write_fresh_names(paths, captions, config.seed)
    records = text_replay_records(captions, round(config.text_replay * config.n_instruct), llm_config,
                                  seed=config.seed + 1)
    paths.text_replay.write_text(json.dumps(records, indent=1))
    print(f"   {len(records)} text-only conversations for instruction tuning -> {paths.text_replay}", flush=True)


def stage_datastore(config: QuickstartConfig, paths: Paths, side_by_side: int = 1) -> None:
    import torch

    from datastore.build import BuildConfig, build
    from datastore.cache import CacheConfig, build_cache
    from datastore.clip import ClipSpec
    from datastore.reader import ReaderConfig

    torch.set_num_threads(stage_threads(config, side_by_side))
    clip = ClipSpec(**clip_args(paths), device=config.device)
    world = World.open(paths.world)
    worlds = [(world, paths.datastore, paths.cache, [world.instruct_json, world.pretrain_json])]
    if config.swap:
        worlds.append((World.open(paths.world2), paths.datastore2, paths.cache2, []))
    for world, store, cache, train_files in worlds:
        build(BuildConfig(inputs=world.corpus_shards(), out=str(store), clip=clip, overwrite=True,
                          reader=ReaderConfig(batch_size=256, num_workers=1)))
        build_cache(CacheConfig(datastore=str(store), out=str(cache), image_folder=str(world.images),
                                llava_json=[str(f) for f in train_files + world.eval_question_files()],
                                k_images=config.k_images, max_tags=32, num_workers=1, device=config.device))
    write_random_tags_vocab(paths)


RANDOM_VOCAB_NAMES = 20_000
FRESH_NAMES = 1000


def write_fresh_names(paths: Paths, captions: list[str], seed: int, n: int = FRESH_NAMES) -> list[str]:
    """``n`` made-up names that the LLM's tokenizer splits into two or more pieces (names it never saw,
    like a swapped-in datastore's) and that are no caption word and no category of the synthetic catalogue
    (so no world's eval name): the pool TUNA's stage 2 renames seen names into (``rename_to="fresh"``)."""
    from transformers import AutoTokenizer

    from datastore.synth.world import CATALOGUE_SIZE, catalogue_entry
    from pipeline.copy_text import make_lexicon
    from pipeline.text_pretrain import known_words

    tokenizer = AutoTokenizer.from_pretrained(str(paths.llm))
    known = known_words(captions, (catalogue_entry(i).name for i in range(CATALOGUE_SIZE)))
    names = [name for name in make_lexicon(104_729 + seed, 8 * n, known)
             if len(tokenizer.tokenize(" " + name)) > 2][:n]  # " " + name: the space is a token of its own
    if len(names) < n:
        raise StageError(f"only {len(names)} of {n} made-up names are split by the LLM's tokenizer")
    paths.fresh_names.write_text("".join(name + "\n" for name in names))
    return names


def write_random_tags_vocab(paths: Paths) -> None:
    """The random-tags ablation's vocabulary: the datastore's 1,000-odd tags plus 20,000 made-up names.

    The world's datastore names 24 entities, ~44 tags each, so a random block of five of its tags holds
    the right entity ~20 % of the time and random tags score well above chance. A real datastore's
    vocabulary (millions of tags) makes that negligible; this one brings it to ~3 % (measured, seeds 0-1).
    """
    from datastore.store import Datastore
    from pipeline.copy_text import caption_words, make_lexicon

    tags = Datastore.open(paths.datastore).vocabulary()
    known = caption_words(tags) | caption_words(World.open(paths.world).names())
    names = make_lexicon(7919, RANDOM_VOCAB_NAMES, known)
    paths.random_vocab.write_text("\n".join(tags + names) + "\n")


# DeepSpeed's own defaults for the bucket sizes that HF's "auto" derives from the LLM's hidden size (hidden²
# elements). For the quickstart's 128-wide LLM "auto" is 16,384 elements, so ZeRO-2 reduces the gradients in
# dozens of tiny gloo calls per step: 60 TUNA steps take 1.3x as long on 2 CPU cores (bench/bench_ds_buckets.py,
# docs/benchmarks.md). Real checkpoints
# (hidden 4096: 16.7M elements) keep "auto" through ds_configs/ as they are.
SMALL_LLM_BUCKETS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000}


RUN_ONLY = ("out", "overwrite", "threads", "device")  # how a run goes, not what it makes


def _as_stored(settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe settings among ``settings``, as stages.json holds them (tuples are lists there)."""
    return json.loads(json.dumps({k: v for k, v in settings.items() if k not in RUN_ONLY}))


def _recipe(config: Any) -> dict[str, Any]:
    """The settings that make a run what it is."""
    return _as_stored(asdict(config))


def _recipe_defaults(config: Any) -> dict[str, Any]:
    """The defaults of ``config``'s recipe settings (those that have one)."""
    return _as_stored({f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(config)
                       if f.default is not MISSING or f.default_factory is not MISSING})


def recorded_config(root: Path) -> QuickstartConfig:
    """The settings the finished quickstart at ``root`` ran with (the recipe in its ``stages.json``)."""
    return QuickstartConfig(**{**json.loads((root / "stages.json").read_text())["recipe"], "out": str(root)})


def ds_config_file(config: QuickstartConfig, paths: Paths) -> Path:
    """``OUT/ds_<name>``: ``ds_configs/<config.ds_config>`` with :data:`SMALL_LLM_BUCKETS` where it says "auto"."""
    ds = json.loads((REPO / "ds_configs" / config.ds_config).read_text())
    zero = ds.get("zero_optimization", {})
    for key, value in SMALL_LLM_BUCKETS.items():
        if zero.get(key) == "auto":
            zero[key] = value
    path = paths.root / f"ds_{config.ds_config}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds, indent=1) + "\n")
    return path


def train_command(config: QuickstartConfig, paths: Paths, name: str, stage: int) -> list[str]:
    """``deepspeed --module train.train ...`` for model ``name`` ("baseline" or "tuna") and stage 1 or 2."""
    clip, world = clip_args(paths), World(paths.world)
    steps = config.stage1_steps if stage == 1 else config.steps
    args = {
        "deepspeed": str(ds_config_file(config, paths)),
        "model_name_or_path": str(paths.llm), "stage": "pretrain" if stage == 1 else "finetune",
        "clip_model_config": clip["model_config"], "clip_pretrained": clip["pretrained"],
        "data_path": [str(world.pretrain_json)] if stage == 1 else [str(world.instruct_json)]
                     + ([str(paths.text_replay)] if config.text_replay else []),
        "image_folder": str(world.images),
        "template": "plain" if stage == 1 else "chat_template",
        "output_dir": str(paths.model(name, stage)), "max_steps": steps,
        "per_device_train_batch_size": config.batch_size,
        "learning_rate": config.stage1_lr if stage == 1 else config.lr,
        "lr_scheduler_type": "cosine", "warmup_steps": 0.03, "weight_decay": 0.0,
        "logging_steps": max(1, steps // 10), "save_strategy": "no", "report_to": "none",
        "seed": config.seed, "dataloader_num_workers": 0, "disable_tqdm": "true",
        "max_tags": config.max_tags, "tag_hidden_dim": 128, "tag_num_heads": 4,
        "max_length": 512,
    }
    if name == "baseline":
        args["ablation"] = "no_tags"
    else:
        args["retrieval_cache"] = str(paths.cache)
    if stage == 2:
        args["stage1_checkpoint"] = str(paths.model(name, 1))
        args["freeze_llm_embeddings"] = str(config.freeze_llm_embeddings).lower()
        if name == "tuna" and config.rename_p > 0:  # the baseline has no tag block to read another name from
            pool = paths.fresh_names if config.rename_to == "fresh" else paths.seen_names
            args.update(rename_p=config.rename_p, rename_names=str(paths.seen_names), rename_pool=str(pool))
    args["image_patch_positions"] = str(config.image_patch_positions).lower()
    if config.device == "cpu":
        args["use_cpu"] = "true"
    cmd = [console_script("deepspeed"), "--num_gpus", str(config.nproc), "--master_port", str(free_port()),
           "--module", "train.train"]
    for key, value in {**args, **config.extra.get("train", {})}.items():
        cmd += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    return cmd


def _train_progress(line: str) -> str | None:
    """A short progress line from a training log line (the Trainer's log dicts), else None."""
    import ast

    if line.startswith("{'loss'"):
        try:
            logs = ast.literal_eval(line.strip())
        except (ValueError, SyntaxError):
            return None
        return (f"epoch {float(logs['epoch']):.2f}  loss {float(logs['loss']):.3f}  "
                f"{float(logs.get('samples_per_second', 0)):.0f} samples/s")
    return None


def stage_train(config: QuickstartConfig, paths: Paths) -> None:
    for name in ("baseline", "tuna"):
        for stage in (1, 2):
            print(f"   {name} stage {stage} ({config.stage1_steps if stage == 1 else config.steps} steps, "
                  f"{config.nproc} processes, {config.ds_config})", flush=True)
            start = time.perf_counter()
            run_logged(train_command(config, paths, name, stage), paths.logs / f"train-{name}-stage{stage}.log",
                       process_env(config), f"training {name} stage {stage}", echo=_train_progress)
            print(f"   {name} stage {stage}: {time.perf_counter() - start:.1f} s", flush=True)


def eval_runs(config: QuickstartConfig, paths: Paths) -> dict[str, tuple[str, Path, list[str], list[str]]]:
    """run name -> (model, data root, benches, tag flags)."""
    support = ["--min-tag-support", str(config.eval_min_tag_support)]
    tags = ["--retrieval-cache", str(paths.cache), "--datastore", str(paths.datastore), *support]
    runs = {name: (run.model, paths.world, ["synth_open", "synth_pope"],
                   list(run.flags) if "--no-tags" in run.flags else tags + list(run.flags))
            for name, run in RUNS.items()}
    for flags in (flags for _, _, _, flags in runs.values() if "random_tags" in flags):
        flags += ["--random-tags-vocab", str(paths.random_vocab)]
    if config.swap:
        runs["swap_baseline"] = ("baseline", paths.world2, ["synth_open"], ["--no-tags"])
        runs["swap_tuna"] = ("tuna", paths.world2, ["synth_open"],
                             ["--retrieval-cache", str(paths.cache2), "--datastore", str(paths.datastore2), *support])
    return runs


def eval_command(config: QuickstartConfig, model_dir: Path, data_root: Path, benches: list[str], out: Path,
                 flags: list[str], side_by_side: int = 1) -> tuple[list[str], dict[str, str]]:
    """``tuna-eval`` of ``model_dir`` on ``benches`` (tag flags in ``flags``), and its environment (its share
    of the cores when ``side_by_side`` evaluations run at once)."""
    cmd = [console_script("tuna-eval"), "--model", str(model_dir), "--bench", ",".join(benches), "--data-root", str(data_root),
           "--out", str(out), "--batch-size", str(config.eval_batch_size), "--device", config.device,
           "--k-images", str(config.k_images), *flags]
    threads = max(1, process_threads(config) * config.nproc // side_by_side)
    return cmd, {**process_env(config), "OMP_NUM_THREADS": str(threads)}


def stage_eval(config: QuickstartConfig, paths: Paths) -> None:
    # On CPU the evaluations run nproc at a time, each on its share of the cores: most of a small one is
    # start-up (imports, model and datastore loading), which is single-threaded.
    side_by_side = config.nproc if config.device == "cpu" else 1

    def evaluate(item: tuple[str, tuple[str, Path, list[str], list[str]]]) -> None:
        run, (model, root, benches, flags) = item
        start = time.perf_counter()
        cmd, env = eval_command(config, paths.model(model, 2), root, benches, paths.eval / run, flags, side_by_side)
        run_logged(cmd, paths.logs / f"eval-{run}.log", env, f"evaluation {run}")
        print(f"   {run}: {time.perf_counter() - start:.1f} s", flush=True)

    with ThreadPoolExecutor(side_by_side) as pool:
        list(pool.map(evaluate, eval_runs(config, paths).items()))  # re-raises the first failure
    start = time.perf_counter()
    text_llm_reference(paths)
    print(f"   {TEXT_REFERENCE} (the text-only LLM reading TUNA's tag blocks): {time.perf_counter() - start:.1f} s",
          flush=True)


def _user_message(prompt: str) -> str:
    """The user turn of a rendered ChatML prompt."""
    if "<|im_start|>user\n" not in prompt:
        raise StageError(f"not a ChatML prompt: {prompt[:80]!r}")
    return prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def text_llm_reference(paths: Paths, llm: Path | None = None, out: Path | None = None) -> Path:
    """The text-only LLM (before any image) on TUNA's identification questions, the image replaced by the
    tag block TUNA read, as text (" Tags: a, b."). It is the copy prior the multimodal training starts
    from: TUNA should name novel objects at least this well. Scored like ``synth_open`` (the gold name
    as a whole word of the answer). ``llm`` (default: the run's) reads the blocks; the predictions go to
    ``out`` (default: ``eval/llm_tags_as_text``), which is returned."""
    from eval.scorers.open import contains_answer
    from pipeline.copy_eval import greedy_answers
    from tuna.conversation import IMAGE_MARKER

    records = identification_records(paths.eval / "tuna")
    cfg = json.loads((paths.model("tuna", 2) / "config.json").read_text())  # the tag block's delimiters
    blocks = [cfg["tag_prefix"] + " " + f"{cfg['tag_separator']} ".join(t["tag"] for t in r["tags"]) + cfg["tag_suffix"]
              for r in records]
    users = [_user_message(r["prompt"]).replace(IMAGE_MARKER, block, 1) for r, block in zip(records, blocks)]
    rows = []
    for r, user, prediction in zip(records, users, greedy_answers(llm or paths.llm, users, max_new_tokens=8)):
        rows.append({k: r[k] for k in ("question_id", "image", "category", "novelty", "answers", "text")}
                   | {"prompt": user, "prediction": prediction, "score": float(contains_answer(prediction, r["answers"]))})
    run_dir = out or paths.eval / TEXT_REFERENCE
    (run_dir / "synth_open").mkdir(parents=True, exist_ok=True)
    (run_dir / "synth_open" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


# ------------------------------------------------------------------------------------------ entry point
def check_device(config: QuickstartConfig, gpus: int | None = None) -> None:
    """Fail before the first stage when ``--device cuda`` cannot run: no GPU, or fewer GPUs than ``--nproc``
    (the DeepSpeed launcher would start a rank per requested GPU and the extra ranks would fail at their first
    CUDA call, minutes into the run). ``gpus``: the visible GPU count (default: ask torch)."""
    if not config.device.startswith("cuda"):
        return
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise StageError(f"--device {config.device}: no CUDA GPU is visible")
    if config.nproc > gpus:
        raise StageError(f"--nproc {config.nproc} with --device {config.device}: each training process takes one "
                         f"GPU and {gpus} are visible; use --nproc {gpus}")


def run_quickstart(config: QuickstartConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns the results dict also written to ``OUT/results.json``."""
    check_device(config)
    paths = Paths(config.root)
    pipeline = Pipeline(config)
    print(f"tuna quickstart -> {paths.root}", flush=True)
    holder: dict[str, Any] = {}  # the report stage always runs (it is never skipped)

    def report_stage() -> None:
        if not (paths.eval / TEXT_REFERENCE / "synth_open" / "predictions.jsonl").is_file():
            text_llm_reference(paths)  # an eval stage of an older version did not write it
        holder["results"] = report(config, paths)

    pipeline.run({
        "world": lambda: stage_world(config, paths),
        "clip": partial(stage_clip, config, paths),  # side by side with the LLM, in processes of their own
        "llm": partial(stage_llm, config, paths),
        "datastore": partial(stage_datastore, config, paths),  # after the CLIP, in its process
        "train": lambda: stage_train(config, paths),
        "eval": lambda: stage_eval(config, paths),
        "report": report_stage,
    }, side_by_side=SIDE_BY_SIDE)
    results = holder["results"]
    print()
    print(results_markdown(results))
    seconds = pipeline.state["seconds"]
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
          + f"; total {total_seconds(seconds):.0f} s ("
          + " side by side with ".join(" then ".join(lane) for lane in SIDE_BY_SIDE) + ")")
    print(f"written: {paths.root / 'results.json'}, {paths.root / 'results.md'}, {paths.root / 'results.png'}, "
          f"{paths.root / results['report_html']}; "
          f"models {paths.models}; eval outputs {paths.eval}; datastores {paths.datastore}"
          + (f", {paths.datastore2}" if config.swap else "") + f"; logs {paths.logs}")
    return results
