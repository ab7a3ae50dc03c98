"""DRUM training: rounds of mine -> score -> train, resumable by round, data parallel over queries.

Round r (0 .. rounds): embed the pool with embedder r and index it; mine the top-n candidates of every
training query (the query, its image and near-copies excluded); score each (query, candidate) with the
scoring model, s(z) = log P(answer | z, query), reusing the feedback cache; log the round's metrics; then,
unless r is the last round, train embedder r on the lists with the ranking loss -> embedder r + 1.

```
OUT/settings.json            what the run was started with (a resume with other settings is refused)
OUT/round-R/                 embedder R (drum_embedder.*), the pool under it, metrics.json once evaluated
OUT/rounds.json              every evaluated round's metrics (the convergence table)
OUT/feedback/part-*.parquet  the score cache (--feedback to share one between runs)
```

Under ``accelerate launch`` / ``torchrun`` / ``deepspeed`` the ranks split the training queries for mining
and scoring (each writes its own cache part), then train data parallel; rank 0 evaluates and writes.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from icl.drum.embedder import SCOPES
from icl.drum.losses import LOSSES

logger = logging.getLogger(__name__)

SETTINGS, ROUNDS, METRICS = "settings.json", "rounds.json", "metrics.json"
NOT_SETTINGS = ("out", "rounds", "feedback", "embed_batch_size", "device")  # may change on resume


@dataclass
class DrumConfig:
    """A DRUM training run.

    Attributes:
        pool: the demonstration pool (demos, and the training / dev queries, leave-one-out).
        out: run directory.
        scope: what trains: head, projection, lora or full (``icl.drum.embedder``).
        loss: kl (DRUM's list-wise KL), listmle, or epr (contrastive: best vs worst scored candidates).
        rounds: training rounds; round r's lists are mined with embedder r.
        candidates: n, candidates mined and scored per query.
        queries: training queries sampled from the pool (0: all but the dev ones).
        dev_queries: held-out pool queries on which each round is evaluated.
        dev_shots: k of the dev k-shot answer log-likelihood.
        epochs, batch_size, lr, weight_decay: AdamW per round (batch_size: queries per step and process).
        score_temperature: tau_f of softmax(s / tau_f), the target of the KL loss.
        temperature: initial tau_r of softmax(sim / tau_r); learn_temperature: train it.
        epr_negatives: worst-scored candidates used as negatives by the epr loss.
        lora_rank: LoRA rank of the lora scope.
        seed: query split, data order and initialisation.
        feedback: score cache folder (default OUT/feedback).
        embed_batch_size: examples per embedding call.
        device: torch device of the embedder ("auto": this rank's GPU if any).
    """

    pool: str
    out: str
    scope: str = "head"
    loss: str = "kl"
    rounds: int = 3
    candidates: int = 32
    queries: int = 1000
    dev_queries: int = 200
    dev_shots: int = 4
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    score_temperature: float = 1.0
    temperature: float = 0.05
    learn_temperature: bool = True
    epr_negatives: int = 8
    lora_rank: int = 8
    seed: int = 0
    feedback: str | None = None
    embed_batch_size: int = 256
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: expected one of {', '.join(SCOPES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.candidates < 2:
            raise ValueError(f"candidates={self.candidates}: a ranking needs at least 2")
        for name in ("rounds", "queries", "dev_queries", "lora_rank", "epr_negatives"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.epochs < 1 or self.batch_size < 1 or self.dev_shots < 1 or self.embed_batch_size < 1:
            raise ValueError(f"epochs={self.epochs}, batch_size={self.batch_size}, dev_shots={self.dev_shots}, "
                             f"embed_batch_size={self.embed_batch_size}: all must be >= 1")
        if not (self.lr > 0 and self.score_temperature > 0 and self.temperature > 0):
            raise ValueError(f"lr={self.lr}, score_temperature={self.score_temperature}, temperature="
                             f"{self.temperature}: all must be > 0")

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in NOT_SETTINGS}


@dataclass
class Lists:
    """Mined candidate lists: pool rows of the queries, (Q, n) candidate rows (-1: none) and their scores."""

    queries: np.ndarray
    candidates: np.ndarray
    scores: np.ndarray


def split_queries(n_pool: int, config: DrumConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, dev rows) of the pool: a seeded permutation, dev first."""
    order = np.random.default_rng(config.seed).permutation(n_pool)
    if config.dev_queries >= n_pool:
        raise ValueError(f"dev_queries={config.dev_queries} leaves no training query in a pool of {n_pool}")
    dev = order[:config.dev_queries]
    rest = order[config.dev_queries:]
    return (rest[:config.queries] if config.queries else rest), dev


def mine_and_score(retriever: Any, rows: np.ndarray, depth: int, scorer: Any, cache: Any,
                   progress: bool = False) -> dict[str, float]:
    """Top-``depth`` candidates of each query row, scored where the cache lacks them. Returns counts and
    timings; the scores land in ``cache``."""
    from tqdm import tqdm

    pool = retriever.pool
    start = time.perf_counter()
    queries = [pool.examples[int(r)] for r in rows]
    ranked = retriever.retrieve(queries, depth, {k: v[rows] for k, v in pool.vectors.items()}) if len(rows) else []
    mined = time.perf_counter() - start
    pairs = [(q.id, d) for q, r in zip(queries, ranked) for d, _ in r]
    todo = cache.missing(pairs)
    by_query: dict[str, list[str]] = {}
    for q, d in todo:
        by_query.setdefault(q, []).append(d)
    start = time.perf_counter()
    rows_out = []
    bar = tqdm(total=len(todo), desc="score", unit="pair", disable=not progress)
    for q, demos in by_query.items():
        query = pool.examples[pool.position[q]]
        result = scorer.loglik(query, [[pool.examples[pool.position[d]]] for d in demos])
        rows_out += [(q, d, float(s), float(m), int(n))
                     for d, s, m, n in zip(demos, result.sum, result.mean, result.n_tokens)]
        bar.update(len(demos))
        if len(rows_out) >= 4096:  # a crash loses at most this many scores
            cache.add(rows_out)
            rows_out = []
    bar.close()
    cache.add(rows_out)
    scored = time.perf_counter() - start
    return {"pairs": len(pairs), "scored": len(todo), "mine_seconds": round(mined, 2),
            "score_seconds": round(scored, 2), "pairs_per_second": round(len(todo) / scored, 2) if todo else None}


def collect_lists(retriever: Any, rows: np.ndarray, depth: int, cache: Any) -> Lists:
    """The candidate lists of ``rows`` with their cached scores (after :func:`mine_and_score` on every rank)."""
    pool = retriever.pool
    queries = [pool.examples[int(r)] for r in rows]
    ranked = retriever.retrieve(queries, depth, {k: v[rows] for k, v in pool.vectors.items()}) if len(rows) else []
    candidates = np.full((len(rows), depth), -1, np.int64)
    scores = np.zeros((len(rows), depth), np.float32)
    for i, (q, r) in enumerate(zip(queries, ranked)):
        for j, (d, _) in enumerate(r):
            candidates[i, j] = pool.position[d]
            scores[i, j] = cache.score(q.id, d)
    return Lists(np.asarray(rows, np.int64), candidates, scores)


def evaluate_round(retriever: Any, lists: Lists, dev_rows: np.ndarray, scorer: Any, cache: Any,
                   shots: int) -> dict[str, Any]:
    """A round's metrics: mean s of the top-1 mined candidate (training queries); on the dev queries the
    mean s of the top-1 demo, the k-shot answer log-likelihood (per token and summed) with the top-k in the
    default order, and how often the top-1 / top-k demos carry the query's label (labelled queries only)."""
    from icl.retrievers import label_precision, order_demos

    pool = retriever.pool
    has = lists.candidates[:, 0] >= 0
    out: dict[str, Any] = {"train_top1_score": round(float(lists.scores[has, 0].mean()), 4) if has.any() else None}
    train_labels = [(pool.examples[int(q)].label, pool.examples[int(c)].label)
                    for q, c in zip(lists.queries[has], lists.candidates[has, 0])]
    out["train_top1_same_label"] = _share([a == b for a, b in train_labels if a is not None])
    if not len(dev_rows):
        return out
    queries = [pool.examples[int(r)] for r in dev_rows]
    ranked = retriever.retrieve(queries, shots, {k: v[dev_rows] for k, v in pool.vectors.items()})
    top1 = [(q.id, r[0][0]) for q, r in zip(queries, ranked) if r]
    missing = cache.missing(top1)
    rows = []
    for q, d in missing:
        result = scorer.loglik(pool.examples[pool.position[q]], [[pool.examples[pool.position[d]]]])
        rows.append((q, d, float(result.sum[0]), float(result.mean[0]), int(result.n_tokens[0])))
    cache.add(rows)
    sums, means = [], []
    for q, r in zip(queries, ranked):
        demos = [pool.examples[pool.position[d]] for d, _ in order_demos(r)]
        result = scorer.loglik(q, [demos])
        sums.append(float(result.sum[0]))
        means.append(float(result.mean[0]))
    out.update({"dev_top1_score": round(float(np.mean([cache.score(q, d) for q, d in top1])), 4) if top1 else None,
                f"dev_{shots}shot_loglik": round(float(np.mean(sums)), 4),
                f"dev_{shots}shot_token_loglik": round(float(np.mean(means)), 4),
                "dev_top1_same_label": _share([pool.examples[pool.position[r[0][0]]].label == q.label
                                               for q, r in zip(queries, ranked) if r and q.label is not None]),
                f"dev_top{shots}_same_label": _round(label_precision(pool, queries, ranked))})
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _share(hits: list[bool]) -> float | None:
    return round(100.0 * sum(hits) / len(hits), 2) if hits else None


def fit(embedder: Any, lists: Lists, pool: Any, config: DrumConfig, accelerator: Any, progress: bool = False
        ) -> list[dict[str, float]]:
    """Train ``embedder`` in place on the lists for ``config.epochs``; returns per-epoch mean losses."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    keep = (lists.candidates >= 0).sum(1) >= 2  # a ranking needs two candidates
    items = np.flatnonzero(keep).tolist()
    if not items:
        raise ValueError("no training query has 2 or more candidates: the pool is too small for --candidates")
    loss_fn = LOSSES[config.loss]
    extra = ({"negatives": config.epr_negatives} if config.loss == "epr"
             else {"score_temperature": config.score_temperature})
    params = [p for p in embedder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    loader = DataLoader(items, batch_size=config.batch_size, shuffle=True, collate_fn=lambda b: b,
                        generator=torch.Generator().manual_seed(config.seed))
    model, optimizer, loader = accelerator.prepare(embedder, optimizer, loader)
    log = []
    bar = tqdm(total=config.epochs * len(loader), desc="train", unit="step",
               disable=not (progress and accelerator.is_main_process))
    model.train()
    for epoch in range(1, config.epochs + 1):
        total = torch.zeros(2, device=accelerator.device)
        for batch in loader:
            cand = lists.candidates[batch]
            mask = torch.from_numpy(cand >= 0).to(accelerator.device)
            demo_rows = np.unique(cand[cand >= 0])
            rows = np.concatenate([lists.queries[batch], demo_rows])
            # one forward for queries and demos: DDP expects one forward per backward
            embedded = model([pool.examples[int(r)] for r in rows], pool.vectors["image"][rows],
                             pool.vectors["question"][rows])
            q, d = embedded[:len(batch)], embedded[len(batch):]
            where = torch.from_numpy(np.searchsorted(demo_rows, np.maximum(cand, demo_rows[0]))).to(q.device)
            sim = (q[:, None, :] * d[where]).sum(-1)
            scores = torch.from_numpy(lists.scores[batch]).to(q.device)
            temperature = accelerator.unwrap_model(model).temperature
            loss = loss_fn(sim, scores, mask, temperature, **extra)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            total += torch.stack([loss.detach() * len(batch), torch.tensor(float(len(batch)), device=total.device)])
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
        total = accelerator.reduce(total, "sum")
        log.append({"epoch": epoch, "loss": round(float(total[0] / total[1]), 5),
                    "temperature": round(float(accelerator.unwrap_model(model).temperature.detach()), 5)})
    bar.close()
    return log


def train_drum(config: DrumConfig, scorer: Any, identity: dict[str, Any], progress: bool = True) -> list[dict]:
    """Run (or resume) the rounds of ``config``; returns the evaluated rounds' metrics.

    Raises:
        ValueError: the run folder holds a run with other settings, scoring model or pool.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from common.distributed import dist_env
    from icl.drum.embedder import DrumEmbedder
    from icl.drum.feedback import FeedbackCache, model_key
    from icl.drum.retriever import DrumRetriever
    from icl.pool import Pool

    rank, world, _ = dist_env()
    accelerator = Accelerator(cpu=True) if world > 1 and not torch.cuda.is_available() else Accelerator()
    out = Path(config.out)
    pool = Pool.open(config.pool)
    record = {"config": config.settings(), "scorer": identity, "pool": str(pool.root),
              "pool_fingerprint": pool.fingerprint}
    if (out / SETTINGS).is_file():
        previous = json.loads((out / SETTINGS).read_text())
        if previous != json.loads(json.dumps(record, default=str)):
            changed = sorted(k for k in record if previous.get(k) != json.loads(json.dumps(record[k], default=str)))
            raise ValueError(f"{out} holds a DRUM run with other {', '.join(changed)}; use another --out")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / SETTINGS).write_text(json.dumps(record, indent=1, default=str))
    key = model_key(identity, pool.fingerprint)
    cache_dir = Path(config.feedback) if config.feedback else out / "feedback"
    train_rows, dev_rows = split_queries(len(pool), config)
    start_round = _last_saved_round(out)
    if start_round is None:
        set_seed(config.seed)
        embedder = DrumEmbedder.for_pool(pool, scope=config.scope, temperature=config.temperature,
                                         learn_temperature=config.learn_temperature, lora_rank=config.lora_rank)
        start_round = 0
    else:
        embedder = DrumEmbedder.load(out / f"round-{start_round}")
        logger.info("drum %s: resuming at round %d", out, start_round)
    from common.distributed import resolve_device

    embedder.to(accelerator.device if config.device == "auto" else resolve_device(config.device))
    history = _read_rounds(out)
    for r in range(start_round, config.rounds + 1):
        folder = out / f"round-{r}"
        if (folder / METRICS).is_file() and r == config.rounds:
            break
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        if accelerator.is_main_process and not (folder / "drum_embedder.json").is_file():
            accelerator.unwrap_model(embedder).save(folder)
        retriever = DrumRetriever(pool, embedder=accelerator.unwrap_model(embedder), seed=config.seed)
        timings["embed_pool"] = time.perf_counter() - clock
        if accelerator.is_main_process:
            retriever.save_pool_embeddings(folder)
        cache = FeedbackCache(cache_dir, key)
        counts = mine_and_score(retriever, train_rows[rank::world], config.candidates, scorer, cache,
                                progress=progress)
        accelerator.wait_for_everyone()
        cache = FeedbackCache(cache_dir, key)  # every rank's new scores
        lists = collect_lists(retriever, train_rows, config.candidates, cache)
        clock = time.perf_counter()
        metrics = {"round": r, **counts, "cache_size": len(cache), "processes": world}
        if accelerator.is_main_process:
            metrics.update(evaluate_round(retriever, lists, dev_rows, scorer, cache, config.dev_shots))
        timings["evaluate"] = time.perf_counter() - clock
        if r < config.rounds:
            clock = time.perf_counter()
            metrics["train_log"] = fit(embedder, lists, pool, config, accelerator, progress)
            timings["train"] = time.perf_counter() - clock
            embedder = accelerator.unwrap_model(embedder)
            if accelerator.is_main_process:
                embedder.save(out / f"round-{r + 1}")
        metrics["seconds"] = {k: round(v, 2) for k, v in timings.items()}
        metrics["seconds"].update(mine=counts["mine_seconds"], score=counts["score_seconds"])
        if accelerator.is_main_process:
            (folder / METRICS).write_text(json.dumps(metrics, indent=1))
            history = [h for h in history if h["round"] != r] + [metrics]
            (out / ROUNDS).write_text(json.dumps(history, indent=1))
            logger.info("drum round %d: %s", r, ", ".join(f"{k} {v}" for k, v in metrics.items()
                                                          if k not in ("train_log", "seconds", "round")))
        accelerator.wait_for_everyone()
    return history


def _last_saved_round(out: Path) -> int | None:
    rounds = [int(p.parent.name.split("-")[1]) for p in out.glob("round-*/drum_embedder.json")]
    return max(rounds) if rounds else None


def _read_rounds(out: Path) -> list[dict]:
    return json.loads((out / ROUNDS).read_text()) if (out / ROUNDS).is_file() else []


# --------------------------------------------------------------------------------------------------- CLI
HELP = {
    "pool": "demonstration pool: the demos, and the training and dev queries (leave-one-out)",
    "out": "run directory (round-R/ embedders, rounds.json, feedback/); rerun to resume",
    "scope": "what trains: head (linear heads on stored CLIP embeddings), projection (CLIP's projections), "
             "lora (peft) or full",
    "loss": "kl (DRUM: KL between the score and similarity softmaxes), listmle, or epr (best vs worst)",
    "rounds": "mining rounds; round r mines with the embedder of round r",
    "candidates": "n: candidates mined and scored per training query",
    "queries": "training queries sampled from the pool (0: all but the dev queries)",
    "dev_queries": "held-out pool queries on which every round is evaluated",
    "dev_shots": "k of the dev k-shot answer log-likelihood",
    "epochs": "passes over the lists per round",
    "batch_size": "queries per step and process",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "score_temperature": "tau_f: temperature of the scores' softmax (the KL target)",
    "temperature": "initial tau_r: temperature of the similarities' softmax",
    "epr_negatives": "worst-scored candidates taken as negatives by --loss epr",
    "lora_rank": "LoRA rank (--scope lora)",
    "seed": "seed of the query split, data order and initialisation",
    "feedback": "score cache folder, shareable between runs (default: OUT/feedback)",
    "embed_batch_size": "examples per embedding call",
    "device": "device of the embedder: cpu, cuda, cuda:N or auto (this rank's GPU if any)",
}


def add_train_args(parser: Any) -> Any:
    """One flag per :class:`DrumConfig` field, same defaults (``--fixed-temperature`` turns learning tau_r off)."""
    defaults = {f.name: f.default for f in fields(DrumConfig)}
    parser.add_argument("--pool", required=True, help=HELP["pool"])
    parser.add_argument("--out", required=True, help=HELP["out"])
    parser.add_argument("--scope", default=defaults["scope"], choices=SCOPES, help=HELP["scope"])
    parser.add_argument("--loss", default=defaults["loss"], choices=sorted(LOSSES), help=HELP["loss"])
    for name, kind in (("rounds", int), ("candidates", int), ("queries", int), ("dev_queries", int),
                       ("dev_shots", int), ("epochs", int), ("batch_size", int), ("lr", float),
                       ("weight_decay", float), ("score_temperature", float), ("temperature", float),
                       ("epr_negatives", int), ("lora_rank", int), ("seed", int), ("embed_batch_size", int)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=defaults[name], help=HELP[name])
    parser.add_argument("--fixed-temperature", action="store_true", help="keep tau_r at --temperature")
    parser.add_argument("--feedback", default=None, help=HELP["feedback"])
    parser.add_argument("--embedder-device", dest="embedder_device", default="auto", help=HELP["device"])
    return parser


def config_from_args(args: Any) -> DrumConfig:
    names = {f.name for f in fields(DrumConfig)} - {"learn_temperature", "device"}
    return DrumConfig(**{n: getattr(args, n) for n in names}, learn_temperature=not args.fixed_temperature,
                      device=args.embedder_device)
