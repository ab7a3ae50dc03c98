"""``tuna quickstart``: the whole TUNA pipeline on the embedded synthetic world, baseline vs TUNA.

Stages (each records its seconds in ``OUT/stages.json``; a re-run skips finished stages):

1. ``world``     synthesize the world (seen + novel categories) and a second, disjoint world for the swap;
2. ``clip``      train a tiny CLIP contrastively on the corpus (all categories) — the stand-in for a web CLIP;
3. ``llm``       pretrain a tiny LLM on text only (corpus captions + copy/reading text with made-up names),
                 and write the text-only copy conversations mixed into instruction tuning;
4. ``datastore`` build both worlds' datastores with that CLIP and the retrieval caches;
5. ``train``     ``deepspeed`` (ZeRO-2) stage 1 + stage 2 for the no-tags baseline and for TUNA (same
                 data, budget and seed; stage 2 keeps the LLM's embeddings frozen);
6. ``eval``      ``tuna-eval`` on seen/novel questions: baseline, TUNA, random-tags, uniform-weights, and
                 the zero-shot datastore swap on the second world;
7. ``report``    comparison table, diagnostics, ``results.json``, ``results.md`` and ``results.png``.

Why the recipe looks the way it does (what failed without each part) is in docs/quickstart.md.

Training and evaluation run through the real command-line tools (``deepspeed --module train.train``,
``tuna-eval``) in subprocesses, exactly as a user would run them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from datastore.synth.world import CATALOGUE_SIZE

REPO = Path(__file__).resolve().parents[1]
RUNS = {  # evaluation run -> (trained model, flags)
    "baseline": ("baseline", ["--no-tags"]),
    "tuna": ("tuna", []),
    "tuna_random_tags": ("tuna", ["--ablation", "random_tags"]),
    "tuna_uniform_weights": ("tuna", ["--ablation", "uniform_weights"]),
}
LABELS = {"baseline": "baseline (no tags)", "tuna": "TUNA", "tuna_random_tags": "TUNA, random tags",
          "tuna_uniform_weights": "TUNA, uniform weights"}
ATTRIBUTES = ("color", "size", "count")
TEXT_REFERENCE = "llm_tags_as_text"  # eval folder of the text-only LLM reading TUNA's tag blocks


class QuickstartError(RuntimeError):
    """A stage failed; the message names the stage and where its log is."""


@dataclass
class QuickstartConfig:
    """Sizes and budgets of one quickstart run (defaults: ≤ 15 min on 2 CPU cores)."""

    out: str = "runs/quickstart"
    seed: int = 0
    corpus_size: int = 20_000
    n_instruct: int = 3_000
    n_eval: int = 160
    image_size: int = 96
    # categories (the swap world takes the next swap_categories catalogue entries). More seen categories
    # would make name memorisation harder, but the tiny CLIP then separates them poorly (48 + 16: top-1
    # purity 40 %, against 92 % for 16 + 8; docs/quickstart.md)
    n_seen: int = 16
    n_novel: int = 8
    swap: bool = True
    swap_corpus_size: int = 8_000
    swap_categories: int = 24
    # tiny CLIP (datastore.clip_train). 1000 steps, not 600: at 600 the novel eval images' top-1 neighbour
    # purity is 79-96 % depending on the seed, at 1000 92-99 % (seeds 0-3), and seed 3's novel gain went
    # 25.0 -> 43.1 (docs/quickstart.md, "Measured"). It costs ~100 s on 2 cores
    clip_steps: int = 1000
    clip_batch_size: int = 128
    # tiny LLM text pretraining (tuna.text_pretrain). Whether the 2-layer LLM learns to copy a name from a
    # tag list within 600 steps depends on the seed (on one VM: 5-46 % of the novel names read from TUNA's
    # blocks at seeds 0-3); after 1500 steps every seed reads 51-54 % (docs/quickstart.md, "Measured")
    llm_steps: int = 1500
    llm_hidden: int = 128
    llm_layers: int = 2
    # text-only copy conversations mixed into instruction tuning, per instruction image (LLaVA-1.5 mixes
    # 40K text-only ShareGPT conversations into its 665K; see tuna.text_pretrain.text_replay_records)
    text_replay: float = 0.5
    # multimodal training (both stages, both models)
    stage1_steps: int = 60
    steps: int = 300
    batch_size: int = 8
    stage1_lr: float = 1e-3
    lr: float = 1e-3
    # stage 2 keeps the LLM's embeddings / LM head frozen: with a few seen names as the only answers, a
    # trained LM head learns to prefer them over every other word (novel names included)
    freeze_llm_embeddings: bool = True
    # learned patch positions before the connector: the convnet tower's features do not say where a patch
    # is (a ViT's do), and the questions about several-object scenes name a position
    image_patch_positions: bool = True
    # TUNA's stage 2 may permute the seen names among each other in this share of its samples, on the
    # LLM side only (questions, answers, tag words; CLIP still reads the real tag: train/rename.py), so a
    # name memorised from the image is wrong and the tag block right. Off: at p = 0.5 it helped at seed
    # 1 (+10.9 novel) and hurt at seed 2 (-5.1) (docs/quickstart.md, "Name permutation")
    rename_p: float = 0.0
    nproc: int = 2
    ds_config: str = "zero2.json"
    # retrieval and evaluation
    k_images: int = 5
    max_tags: int = 6
    # at evaluation TUNA reads only the tags of entities a majority of the neighbours name (similarity-
    # weighted; datastore.store.filter_by_support): the other objects of neighbour scenes are what makes
    # up to a third of a block wrong. Training reads every retrieved tag (filtered training blocks did
    # not help). docs/quickstart.md, "Majority-supported tags at evaluation"
    eval_min_tag_support: float = 0.5
    eval_batch_size: int = 32
    threads: int = 0  # torch threads per process; 0 = cores / nproc
    device: str = "cpu"
    overwrite: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("corpus_size", "n_instruct", "n_eval", "clip_steps", "llm_steps", "stage1_steps", "steps",
                     "batch_size", "nproc", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
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

    def __init__(self, config: QuickstartConfig, log: Callable[[str], None] = print) -> None:
        self.config, self.log = config, log
        self.root = config.root
        if config.overwrite and self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file = self.root / "stages.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        recipe = {k: v for k, v in asdict(config).items() if k not in ("out", "overwrite", "threads", "device")}
        if self.state.get("recipe", recipe) != recipe:
            raise QuickstartError(f"{self.root} holds a quickstart run with other settings; use --overwrite "
                                  f"or another --out")
        self.state["recipe"] = recipe
        self.state.setdefault("seconds", {})

    def run(self, stages: dict[str, Callable[[], None]]) -> None:
        for n, (name, fn) in enumerate(stages.items(), 1):
            if name in self.state["seconds"] and name != "report":  # the report is cheap: always redone
                self.log(f"== [{n}/{len(stages)}] {name}: done in an earlier run "
                         f"({self.state['seconds'][name]:.0f} s), skipped")
                continue
            self.log(f"== [{n}/{len(stages)}] {name}")
            start = time.perf_counter()
            fn()
            self.state["seconds"][name] = round(time.perf_counter() - start, 1)
            self.state_file.write_text(json.dumps(self.state, indent=2))
            self.log(f"   {name}: {self.state['seconds'][name]:.1f} s")


def _threads(config: QuickstartConfig) -> int:
    return config.threads or max(1, (os.cpu_count() or 1) // config.nproc)


def _env(config: QuickstartConfig) -> dict[str, str]:
    threads = str(_threads(config))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this environment (deepspeed, tuna-eval)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise QuickstartError(f"{name!r} not found next to {sys.executable} or on PATH")
    return found


def run_logged(cmd: list[str], log_file: Path, env: dict[str, str], what: str,
               echo: Callable[[str], str | None] | None = None) -> None:
    """Run ``cmd`` writing its output to ``log_file``; print what ``echo`` makes of a line (when not None);
    one-line error on failure."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=str(REPO), bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            shown = echo(line) if echo is not None else None
            if shown:
                print("      " + shown, flush=True)
        code = proc.wait()
    if code != 0:
        tail = [ln for ln in log_file.read_text().splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise QuickstartError(f"{what} failed (exit {code}); log: {log_file}; last line: {tail[0][-200:]}")


# ------------------------------------------------------------------------------------------ paths
class Paths:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.world, self.world2 = root / "world", root / "world_swap"
        self.clip = root / "clip"
        self.llm = root / "llm"
        self.text_replay = root / "text_replay.json"
        self.seen_names = root / "seen_names.txt"  # the names TUNA's stage 2 permutes (rename_p)
        self.datastore, self.datastore2 = root / "datastore", root / "datastore_swap"
        self.cache, self.cache2 = root / "tags.parquet", root / "tags_swap.parquet"
        self.models = root / "models"
        self.eval = root / "eval"
        self.logs = root / "logs"

    def model(self, name: str, stage: int) -> Path:
        return self.models / f"{name}-stage{stage}"


# ------------------------------------------------------------------------------------------ stages
def stage_world(config: QuickstartConfig, paths: Paths) -> None:
    from datastore.synth.generate import SynthConfig, generate_world

    workers = max(1, min(os.cpu_count() or 1, 8))
    generate_world(SynthConfig(out=str(paths.world), seed=config.seed, n_corpus=config.corpus_size,
                               n_instruct=config.n_instruct, n_eval=config.n_eval, image_size=config.image_size,
                               n_seen=config.n_seen, n_novel=config.n_novel, workers=workers, overwrite=True))
    categories = json.loads((paths.world / "world.json").read_text())["categories"]
    paths.seen_names.write_text("".join(c["name"] + "\n" for c in categories if c["novelty"] == "seen"))
    if config.swap:  # the catalogue entries after the first world's: none of its categories
        half = config.swap_categories // 2  # its seen/novel labels mean nothing here: all are new to the model
        generate_world(SynthConfig(out=str(paths.world2), seed=config.seed + 1, n_corpus=config.swap_corpus_size,
                                   n_instruct=1, n_eval=config.n_eval, image_size=config.image_size,
                                   n_seen=config.swap_categories - half, n_novel=half,
                                   category_offset=config.n_seen + config.n_novel, workers=workers,
                                   overwrite=True))


def corpus_shards(world: Path) -> list[str]:
    shards = sorted(str(p) for p in (world / "corpus").glob("corpus-*.tar"))
    if not shards:
        raise QuickstartError(f"no corpus shards under {world / 'corpus'}")
    return shards


def stage_clip(config: QuickstartConfig, paths: Paths) -> None:
    from datastore.clip_train import ClipTrainConfig, train_clip

    train_clip(corpus_shards(paths.world), str(paths.clip),
               ClipTrainConfig(steps=config.clip_steps, batch_size=config.clip_batch_size, seed=config.seed,
                               threads=_threads(config) * config.nproc, device=config.device,
                               **config.extra.get("clip", {})))


def clip_args(paths: Paths) -> dict[str, str]:
    """The trained CLIP as (model config JSON, checkpoint) — how every later stage loads it."""
    from datastore.clip_train import trained_clip_files

    model_config, checkpoint = trained_clip_files(str(paths.clip))
    return {"model_config": model_config, "pretrained": checkpoint}


def llm_pretrain_config(config: QuickstartConfig, **changes: Any):
    """The quickstart's ``TextPretrainConfig`` (``changes`` override its fields, e.g. ``seed``, ``steps``)."""
    from tuna.text_pretrain import TextPretrainConfig

    fields = {"steps": config.llm_steps, "hidden_size": config.llm_hidden, "num_layers": config.llm_layers,
              "seed": config.seed, "threads": _threads(config) * config.nproc, **config.extra.get("llm", {})}
    return TextPretrainConfig(**{**fields, **changes})


def stage_llm(config: QuickstartConfig, paths: Paths) -> None:
    """Text-only LLM pretraining, and the text-only conversations mixed into instruction tuning."""
    from tuna.text_pretrain import pretrain_text_llm, read_world_captions, text_replay_records

    captions = read_world_captions(paths.world)  # text pretraining reads only these, never eval images or questions
    llm_config = llm_pretrain_config(config)
    pretrain_text_llm(captions, str(paths.llm), llm_config)
    records = text_replay_records(captions, round(config.text_replay * config.n_instruct), llm_config,
                                  seed=config.seed + 1)
    paths.text_replay.write_text(json.dumps(records, indent=1))
    print(f"   {len(records)} text-only conversations for instruction tuning -> {paths.text_replay}", flush=True)


def eval_question_files(world: Path) -> list[str]:
    return [str(world / "eval" / task / "questions.jsonl") for task in ("open", "pope", "mc")]


def stage_datastore(config: QuickstartConfig, paths: Paths) -> None:
    from datastore.build import BuildConfig, build
    from datastore.cache import CacheConfig, build_cache
    from datastore.clip import ClipSpec
    from datastore.reader import ReaderConfig

    clip = ClipSpec(**clip_args(paths), device=config.device)
    worlds = [(paths.world, paths.datastore, paths.cache, [str(paths.world / "llava" / "instruct.json"),
                                                           str(paths.world / "llava" / "pretrain.json")])]
    if config.swap:
        worlds.append((paths.world2, paths.datastore2, paths.cache2, []))
    for world, store, cache, train_files in worlds:
        build(BuildConfig(inputs=corpus_shards(world), out=str(store), clip=clip, overwrite=True,
                          reader=ReaderConfig(batch_size=256, num_workers=1)))
        build_cache(CacheConfig(datastore=str(store), out=str(cache), image_folder=str(world / "images"),
                                llava_json=train_files + eval_question_files(world), k_images=config.k_images,
                                max_tags=32, num_workers=1, device=config.device))


# DeepSpeed's own defaults for the bucket sizes that HF's "auto" derives from the LLM's hidden size (hidden²
# elements). For the quickstart's 128-wide LLM "auto" is 16,384 elements, so ZeRO-2 reduces the gradients in
# dozens of tiny gloo calls per step: 60 TUNA steps take 1.3x as long on 2 CPU cores (bench/bench_ds_buckets.py,
# docs/benchmarks.md). Real checkpoints
# (hidden 4096: 16.7M elements) keep "auto" through ds_configs/ as they are.
SMALL_LLM_BUCKETS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000}


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
    clip = clip_args(paths)
    steps = config.stage1_steps if stage == 1 else config.steps
    args = {
        "deepspeed": str(ds_config_file(config, paths)),
        "model_name_or_path": str(paths.llm), "stage": "pretrain" if stage == 1 else "finetune",
        "clip_model_config": clip["model_config"], "clip_pretrained": clip["pretrained"],
        "data_path": [str(paths.world / "llava" / "pretrain.json")] if stage == 1 else
                     [str(paths.world / "llava" / "instruct.json")]
                     + ([str(paths.text_replay)] if config.text_replay else []),
        "image_folder": str(paths.world / "images"),
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
            args.update(rename_p=config.rename_p, rename_names=str(paths.seen_names),
                        rename_pool=str(paths.seen_names))
    args["image_patch_positions"] = str(config.image_patch_positions).lower()
    if config.device == "cpu":
        args["use_cpu"] = "true"
    cmd = [_bin("deepspeed"), "--num_gpus", str(config.nproc), "--master_port", str(_free_port()),
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
                       _env(config), f"training {name} stage {stage}", echo=_train_progress)
            print(f"   {name} stage {stage}: {time.perf_counter() - start:.1f} s", flush=True)


def eval_runs(config: QuickstartConfig, paths: Paths) -> dict[str, tuple[str, Path, list[str], list[str]]]:
    """run name -> (model, data root, benches, tag flags)."""
    support = ["--min-tag-support", str(config.eval_min_tag_support)]
    tags = ["--retrieval-cache", str(paths.cache), "--datastore", str(paths.datastore), *support]
    runs = {run: (model, paths.world, ["synth_open", "synth_pope"], flags if "--no-tags" in flags else tags + flags)
            for run, (model, flags) in RUNS.items()}
    if config.swap:
        runs["swap_baseline"] = ("baseline", paths.world2, ["synth_open"], ["--no-tags"])
        runs["swap_tuna"] = ("tuna", paths.world2, ["synth_open"],
                             ["--retrieval-cache", str(paths.cache2), "--datastore", str(paths.datastore2), *support])
    return runs


def eval_command(config: QuickstartConfig, model_dir: Path, data_root: Path, benches: list[str], out: Path,
                 flags: list[str], side_by_side: int = 1) -> tuple[list[str], dict[str, str]]:
    """``tuna-eval`` of ``model_dir`` on ``benches`` (tag flags in ``flags``), and its environment (its share
    of the cores when ``side_by_side`` evaluations run at once)."""
    cmd = [_bin("tuna-eval"), "--model", str(model_dir), "--bench", ",".join(benches), "--data-root", str(data_root),
           "--out", str(out), "--batch-size", str(config.eval_batch_size), "--device", config.device,
           "--k-images", str(config.k_images), *flags]
    threads = max(1, _threads(config) * config.nproc // side_by_side)
    return cmd, {**_env(config), "OMP_NUM_THREADS": str(threads)}


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
        raise QuickstartError(f"not a ChatML prompt: {prompt[:80]!r}")
    return prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def text_llm_reference(paths: Paths, llm: Path | None = None, out: Path | None = None) -> Path:
    """The text-only LLM (before any image) on TUNA's identification questions, the image replaced by the
    tag block TUNA read, as text (" Tags: a, b."). It is the copy prior the multimodal training starts
    from: TUNA should name novel objects at least this well. Scored like ``synth_open`` (the gold name
    as a whole word of the answer). ``llm`` (default: the run's) reads the blocks; the predictions go to
    ``out`` (default: ``eval/llm_tags_as_text``), which is returned."""
    import re

    from tuna.conversation import IMAGE_MARKER
    from tuna.text_pretrain import greedy_answers

    records = _identification_records(paths.eval / "tuna")
    cfg = json.loads((paths.model("tuna", 2) / "config.json").read_text())  # the tag block's delimiters
    blocks = [cfg["tag_prefix"] + " " + f"{cfg['tag_separator']} ".join(t["tag"] for t in r["tags"]) + cfg["tag_suffix"]
              for r in records]
    users = [_user_message(r["prompt"]).replace(IMAGE_MARKER, block, 1) for r, block in zip(records, blocks)]
    rows = []
    for r, user, prediction in zip(records, users, greedy_answers(llm or paths.llm, users, max_new_tokens=8)):
        hit = any(re.search(rf"(?<!\w){re.escape(a.lower())}(?!\w)", prediction.lower()) for a in r["answers"])
        rows.append({k: r[k] for k in ("question_id", "image", "category", "novelty", "answers", "text")}
                   | {"prompt": user, "prediction": prediction, "score": float(hit)})
    run_dir = out or paths.eval / TEXT_REFERENCE
    (run_dir / "synth_open").mkdir(parents=True, exist_ok=True)
    (run_dir / "synth_open" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


# ------------------------------------------------------------------------------------------ report
def eval_image_purity(cache_file: Path, world: Path) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 neighbour category purity (%) of the world's eval images, per novelty.

    A neighbour is pure when it shows one of the query's categories (:mod:`datastore.purity`); the
    neighbours are the datastore's, as recorded in the retrieval cache.
    """
    from datastore.cache import RetrievalCache
    from datastore.purity import purity_from_neighbours, world_categories

    cache = RetrievalCache(cache_file)
    questions = world / "eval" / "open" / "questions.jsonl"
    images = list(dict.fromkeys(json.loads(line)["image"] for line in questions.read_text().splitlines()))
    categories, novelty = world_categories(world, images)
    neighbours = [cache[image].neighbours for image in images]
    keys = list(dict.fromkeys(k for row in neighbours for k in row))
    of_key = dict(zip(keys, world_categories(world, keys)[0]))
    report = purity_from_neighbours(categories, [[of_key[k] for k in row] for row in neighbours], novelty)
    return {nov: {k: 100 * report[nov][k] for k in ("top1", "top5")} for nov in ("seen", "novel") if nov in report}


def _records(run_dir: Path, bench: str) -> list[dict]:
    path = run_dir / bench / "predictions.jsonl"
    if not path.is_file():
        raise QuickstartError(f"missing evaluation output {path}")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _identification_records(run_dir: Path) -> list[dict]:
    return [r for r in _records(run_dir, "synth_open") if r["category"] == "identification"]


def _mean(values: list[float]) -> float | None:
    return 100 * sum(values) / len(values) if values else None


def run_metrics(run_dir: Path, pope: bool = True) -> dict[str, dict[str, float | None]]:
    """identification / attributes accuracy and POPE F1, each per novelty (seen, novel)."""
    records = _records(run_dir, "synth_open")
    out: dict[str, dict[str, float | None]] = {"identification": {}, "attributes": {}}
    for novelty in ("seen", "novel"):
        rows = [r for r in records if r["novelty"] == novelty]
        out["identification"][novelty] = _mean([r["score"] for r in rows if r["category"] == "identification"])
        out["attributes"][novelty] = _mean([r["score"] for r in rows if r["category"] in ATTRIBUTES])
    if pope:
        groups = json.loads((run_dir / "results.json").read_text())["benchmarks"]["synth_pope"]["groups"]
        out["pope_f1"] = {nov: groups["novelty"][nov]["f1"] for nov in ("seen", "novel")}
    return out


def identification_by_scene(run_dir: Path, world: Path) -> dict[str, dict[str, float | None]]:
    """Identification accuracy split by scene: one object ("What is this object?") or several (the
    question names a position), each per novelty."""
    from datastore.purity import world_scenes

    records = _identification_records(run_dir)
    images = list(dict.fromkeys(r["image"] for r in records))
    n_objects = {image: len(scene.objects) for image, scene in zip(images, world_scenes(world, images))}
    out: dict[str, dict[str, float | None]] = {"single": {}, "multi": {}}
    for novelty in ("seen", "novel"):
        rows = [r for r in records if r["novelty"] == novelty]
        out["single"][novelty] = _mean([r["score"] for r in rows if n_objects[r["image"]] == 1])
        out["multi"][novelty] = _mean([r["score"] for r in rows if n_objects[r["image"]] > 1])
    return out


def tag_diagnostics(run_dir: Path) -> dict[str, dict[str, float | None]]:
    """Identification questions: is the right name in the tag block, is it the top-weighted tag, the
    accuracy on the questions whose top-weighted tag names it (how well the model copies what its weights
    point at: for novel objects it never learned to answer with such names), and the accuracy on the
    questions whose block lacks it (there only the model itself can know the name)."""
    def has(tag: str, name: str) -> bool:
        return tag == name or tag.endswith(" " + name)

    out: dict[str, dict[str, float | None]] = {"name_in_tags": {}, "name_top_weighted": {},
                                                "accuracy_when_top_weighted": {}, "accuracy_without_name": {}}
    records = _identification_records(run_dir)
    for novelty in ("seen", "novel"):
        rows = [r for r in records if r["novelty"] == novelty]
        found = [any(has(t["tag"], r["answers"][0]) for t in r["tags"]) for r in rows]
        out["name_in_tags"][novelty] = _mean([float(f) for f in found])
        top = [max(r["tags"], key=lambda t: t["weight"] or 0.0)["tag"] if r["tags"] else "" for r in rows]
        on_top = [has(t, r["answers"][0]) for t, r in zip(top, rows)]
        out["name_top_weighted"][novelty] = _mean([float(o) for o in on_top])
        out["accuracy_when_top_weighted"][novelty] = _mean([float(r["score"]) for r, o in zip(rows, on_top) if o])
        out["accuracy_without_name"][novelty] = _mean([float(r["score"]) for r, f in zip(rows, found) if not f])
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def report(config: QuickstartConfig, paths: Paths) -> dict[str, Any]:
    """Collect every run's metrics and diagnostics; write results.json, results.md and results.png."""
    runs = {run: run_metrics(paths.eval / run) for run in RUNS}
    diagnostics = {"purity": eval_image_purity(paths.cache, paths.world), **tag_diagnostics(paths.eval / "tuna"),
                   "random_tags": tag_diagnostics(paths.eval / "tuna_random_tags")}
    by_scene = {run: identification_by_scene(paths.eval / run, paths.world) for run in RUNS}
    if not (paths.eval / TEXT_REFERENCE / "synth_open" / "predictions.jsonl").is_file():
        text_llm_reference(paths)  # an eval stage of an older version did not write it
    reference = _identification_records(paths.eval / TEXT_REFERENCE)
    diagnostics["text_llm_tags"] = {
        "identification": {nov: _mean([r["score"] for r in reference if r["novelty"] == nov])
                           for nov in ("seen", "novel")},
        **identification_by_scene(paths.eval / TEXT_REFERENCE, paths.world)}
    results: dict[str, Any] = {"config": asdict(config), "runs": runs, "identification_by_scene": by_scene,
                               "diagnostics": diagnostics,
                               "seconds": json.loads((paths.root / "stages.json").read_text())["seconds"]}
    if config.swap:
        swap = {run: run_metrics(paths.eval / f"swap_{run}", pope=False) for run in ("baseline", "tuna")}
        results["swap"] = {**swap, "purity": eval_image_purity(paths.cache2, paths.world2),
                           **tag_diagnostics(paths.eval / "swap_tuna")}
    results["checks"] = expected_outcome(results)
    (paths.root / "results.json").write_text(json.dumps(results, indent=2))
    (paths.root / "results.md").write_text(results_markdown(results))
    write_chart(results, paths.root / "results.png")
    return results


def _swap_id(results: dict, run: str) -> float | None:
    ident = results["swap"][run]["identification"]
    return _mean([v / 100 for v in ident.values() if v is not None])


def expected_outcome(results: dict) -> dict[str, Any]:
    """The issue's expected outcome, checked (never tuned for): TUNA vs baseline and random tags."""
    ident = {run: m["identification"] for run, m in results["runs"].items()}
    novel_gain = ident["tuna"]["novel"] - ident["baseline"]["novel"]
    seen_diff = ident["tuna"]["seen"] - ident["baseline"]["seen"]
    random_diff = ident["tuna_random_tags"]["novel"] - ident["baseline"]["novel"]
    checks = {
        "novel_gain": {"value": novel_gain, "goal": ">= 30 points", "met": novel_gain >= 30},
        "seen_difference": {"value": seen_diff, "goal": "within 2 points (or better)", "met": seen_diff >= -2},
        "random_tags_vs_baseline_novel": {"value": random_diff, "goal": "about 0 (within 5 points)",
                                          "met": abs(random_diff) <= 5},
    }
    if "swap" in results:
        gain = _swap_id(results, "tuna") - _swap_id(results, "baseline")
        checks["swap_gain"] = {"value": gain, "goal": "> 0 (reported)", "met": gain > 0}
    return checks


def results_markdown(results: dict) -> str:
    lines = ["| run | id seen | id novel | attr seen | attr novel | POPE F1 seen | POPE F1 novel |",
             "|---|---|---|---|---|---|---|"]
    for run, m in results["runs"].items():
        lines.append(f"| {LABELS[run]} | " + " | ".join(
            _fmt(m[metric][nov]) for metric in ("identification", "attributes", "pope_f1")
            for nov in ("seen", "novel")) + " |")
    if "identification_by_scene" in results:
        lines += ["", "| identification by scene | one object, seen | one object, novel | several, seen | "
                      "several, novel |", "|---|---|---|---|---|"]
        for run, m in results["identification_by_scene"].items():
            lines.append(f"| {LABELS[run]} | " + " | ".join(_fmt(m[scene][nov]) for scene in ("single", "multi")
                                                            for nov in ("seen", "novel")) + " |")
    d = results["diagnostics"]
    lines += ["", "| diagnostic (TUNA, eval images) | seen | novel |", "|---|---|---|"]
    lines += [f"| neighbour purity top-1 | {_fmt(d['purity'].get('seen', {}).get('top1'))} | "
              f"{_fmt(d['purity'].get('novel', {}).get('top1'))} |",
              f"| neighbour purity top-5 | {_fmt(d['purity'].get('seen', {}).get('top5'))} | "
              f"{_fmt(d['purity'].get('novel', {}).get('top5'))} |",
              f"| right name in the tag block | {_fmt(d['name_in_tags']['seen'])} | {_fmt(d['name_in_tags']['novel'])} |",
              f"| right name is the top-weighted tag | {_fmt(d['name_top_weighted']['seen'])} | "
              f"{_fmt(d['name_top_weighted']['novel'])} |"]
    if "accuracy_when_top_weighted" in d:  # results of an older version lack it
        lines += [f"| identification when it is (the copy rate) | {_fmt(d['accuracy_when_top_weighted']['seen'])} | "
                  f"{_fmt(d['accuracy_when_top_weighted']['novel'])} |"]
    if "text_llm_tags" in d:  # the copy prior TUNA starts from
        t = d["text_llm_tags"]
        lines += [f"| text-only LLM, TUNA's tag block as text (no image): identification | "
                  f"{_fmt(t['identification']['seen'])} | {_fmt(t['identification']['novel'])} |",
                  f"| the same, one object / several objects | {_fmt(t['single']['seen'])} / "
                  f"{_fmt(t['multi']['seen'])} | {_fmt(t['single']['novel'])} / {_fmt(t['multi']['novel'])} |"]
    if "random_tags" in d:  # a small world's random tags often hold the right name by chance
        r = d["random_tags"]
        lines += [f"| random tags: right name in the block by chance | {_fmt(r['name_in_tags']['seen'])} | "
                  f"{_fmt(r['name_in_tags']['novel'])} |",
                  f"| random tags: identification when it is not | {_fmt(r['accuracy_without_name']['seen'])} | "
                  f"{_fmt(r['accuracy_without_name']['novel'])} |"]
    if "swap" in results:
        s = results["swap"]
        lines += ["", "| zero-shot datastore swap (second world, categories never trained on) | identification | "
                      "attributes | purity top-1 | name in tags |", "|---|---|---|---|---|"]
        for run in ("baseline", "tuna"):
            ident = _swap_id(results, run)
            attr = _mean([v / 100 for v in s[run]["attributes"].values() if v is not None])
            purity = _mean([p["top1"] / 100 for p in s["purity"].values()]) if run == "tuna" else None
            in_tags = _mean([v / 100 for v in s["name_in_tags"].values() if v is not None]) if run == "tuna" else None
            label = "baseline (no tags)" if run == "baseline" else "TUNA + swapped datastore"
            lines.append(f"| {label} | {_fmt(ident)} | {_fmt(attr)} | {_fmt(purity)} | {_fmt(in_tags)} |")
    lines += ["", "| expected outcome | value | goal | met |", "|---|---|---|---|"]
    for name, c in results["checks"].items():
        lines.append(f"| {name} | {c['value']:+.1f} | {c['goal']} | {'yes' if c['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_chart(results: dict, path: Path) -> None:
    """Grouped bars: every run on identification / attributes / POPE F1, seen and novel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(m, nov) for m in ("identification", "attributes", "pope_f1") for nov in ("seen", "novel")]
    runs = list(results["runs"])
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        values = [results["runs"][run][m][nov] or 0.0 for m, nov in groups]
        xs = [g + (i - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=LABELS[run])
    ax.set_xticks(range(len(groups)), [f"{m.replace('_', ' ')}\n{nov}" for m, nov in groups])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title("tuna quickstart: baseline vs TUNA on seen and novel categories")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ entry point
def run_quickstart(config: QuickstartConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns the results dict also written to ``OUT/results.json``."""
    paths = Paths(config.root)
    pipeline = Pipeline(config)
    print(f"tuna quickstart -> {paths.root}", flush=True)
    holder: dict[str, Any] = {}  # the report stage always runs (it is never skipped)
    pipeline.run({
        "world": lambda: stage_world(config, paths),
        "clip": lambda: stage_clip(config, paths),
        "llm": lambda: stage_llm(config, paths),
        "datastore": lambda: stage_datastore(config, paths),
        "train": lambda: stage_train(config, paths),
        "eval": lambda: stage_eval(config, paths),
        "report": lambda: holder.update(results=report(config, paths)),
    })
    results = holder["results"]
    print()
    print(results_markdown(results))
    seconds = pipeline.state["seconds"]
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
          + f"; total {sum(seconds.values()):.0f} s")
    print(f"written: {paths.root / 'results.json'}, {paths.root / 'results.md'}, {paths.root / 'results.png'}; "
          f"models {paths.models}; eval outputs {paths.eval}; datastores {paths.datastore}"
          + (f", {paths.datastore2}" if config.swap else "") + f"; logs {paths.logs}")
    return results
