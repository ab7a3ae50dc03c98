"""The quickstart's report: every evaluation run's metrics, the diagnostics that explain them (neighbour
purity, is the right name in the tag block and on top of it, the text-only LLM's reading of the same
blocks), the expected-outcome checks, and ``results.json`` / ``results.md`` / ``results.png``."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datastore.synth.layout import World
from eval.scorers.yesno import pope_label
from pipeline.processes import StageError
from pipeline.runs import RUNS, TEXT_REFERENCE, Paths

if TYPE_CHECKING:
    from pipeline.quickstart import QuickstartConfig

ATTRIBUTES = ("color", "size", "count")
POPE_QUESTION = re.compile(r"Is there an? (.+?) in the image\?")  # POPE's one question form


def names(tag: str, name: str) -> bool:
    """Whether ``tag`` names ``name`` ("large red spolem" names "spolem")."""
    return tag == name or tag.endswith(" " + name)


def eval_image_purity(cache_file: Path, world_dir: Path) -> dict[str, dict[str, float]]:
    """Top-1 / top-5 neighbour category purity (%) of the world's eval images, per novelty.

    A neighbour is pure when it shows one of the query's categories (:mod:`datastore.purity`); the
    neighbours are the datastore's, as recorded in the retrieval cache.
    """
    from datastore.cache import RetrievalCache
    from datastore.purity import purity_from_neighbours

    cache, world = RetrievalCache(cache_file), World.open(world_dir)
    images = world.eval_images("open")
    categories, novelty = world.categories(images)
    neighbours = [cache[image].neighbours for image in images]
    keys = list(dict.fromkeys(k for row in neighbours for k in row))
    of_key = dict(zip(keys, world.categories(keys)[0]))
    report = purity_from_neighbours(categories, [[of_key[k] for k in row] for row in neighbours], novelty)
    return {nov: {k: 100 * report[nov][k] for k in ("top1", "top5")} for nov in ("seen", "novel") if nov in report}


def run_records(run_dir: Path, bench: str) -> list[dict]:
    """The per-sample records ``tuna-eval`` wrote for ``bench`` under ``run_dir``."""
    path = run_dir / bench / "predictions.jsonl"
    if not path.is_file():
        raise StageError(f"missing evaluation output {path}")
    return [json.loads(line) for line in path.read_text().splitlines()]


def identification_records(run_dir: Path) -> list[dict]:
    return [r for r in run_records(run_dir, "synth_open") if r["category"] == "identification"]


def percent(values: list[float]) -> float | None:
    """The mean of 0/1 (or 0-1) values as a percentage; None for no values."""
    return 100 * sum(values) / len(values) if values else None


def run_metrics(run_dir: Path, pope: bool = True) -> dict[str, dict[str, float | None]]:
    """identification / attributes accuracy, POPE F1 and POPE yes-ratio (%), each per novelty (seen, novel)."""
    records = run_records(run_dir, "synth_open")
    out: dict[str, dict[str, float | None]] = {"identification": {}, "attributes": {}}
    for novelty in ("seen", "novel"):
        rows = [r for r in records if r["novelty"] == novelty]
        out["identification"][novelty] = percent([r["score"] for r in rows if r["category"] == "identification"])
        out["attributes"][novelty] = percent([r["score"] for r in rows if r["category"] in ATTRIBUTES])
    if pope:
        groups = json.loads((run_dir / "results.json").read_text())["benchmarks"]["synth_pope"]["groups"]
        out["pope_f1"] = {nov: groups["novelty"][nov]["f1"] for nov in ("seen", "novel")}
        out["pope_yes"] = {nov: groups["novelty"][nov]["yes_ratio"] for nov in ("seen", "novel")}  # already %
    return out


def identification_by_scene(run_dir: Path, world: Path) -> dict[str, dict[str, float | None]]:
    """Identification accuracy split by scene: one object ("What is this object?") or several (the
    question names a position), each per novelty."""
    records = identification_records(run_dir)
    images = list(dict.fromkeys(r["image"] for r in records))
    n_objects = {image: len(scene.objects) for image, scene in zip(images, World.open(world).scenes(images))}
    out: dict[str, dict[str, float | None]] = {"single": {}, "multi": {}}
    for novelty in ("seen", "novel"):
        rows = [r for r in records if r["novelty"] == novelty]
        out["single"][novelty] = percent([r["score"] for r in rows if n_objects[r["image"]] == 1])
        out["multi"][novelty] = percent([r["score"] for r in rows if n_objects[r["image"]] > 1])
    return out


def tag_diagnostics(run_dir: Path) -> dict[str, dict[str, float | None]]:
    """Identification questions: is the right name in the tag block, is it the top-weighted tag, the
    accuracy on the questions whose top-weighted tag names it (how well the model copies what its weights
    point at: for novel objects it never learned to answer with such names), and the accuracy on the
    questions whose block lacks it (there only the model itself can know the name)."""
    out: dict[str, dict[str, float | None]] = {"name_in_tags": {}, "name_top_weighted": {},
                                                "accuracy_when_top_weighted": {}, "accuracy_without_name": {}}
    records = identification_records(run_dir)
    for novelty in ("seen", "novel"):
        rows = [r for r in records if r["novelty"] == novelty]
        found = [any(names(t["tag"], r["answers"][0]) for t in r["tags"]) for r in rows]
        out["name_in_tags"][novelty] = percent([float(f) for f in found])
        top = [max(r["tags"], key=lambda t: t["weight"] or 0.0)["tag"] if r["tags"] else "" for r in rows]
        on_top = [names(t, r["answers"][0]) for t, r in zip(top, rows)]
        out["name_top_weighted"][novelty] = percent([float(o) for o in on_top])
        out["accuracy_when_top_weighted"][novelty] = percent([float(r["score"]) for r, o in zip(rows, on_top) if o])
        out["accuracy_without_name"][novelty] = percent([float(r["score"]) for r, f in zip(rows, found) if not f])
    return out


def pope_block_diagnostics(run_dir: Path) -> dict[str, dict[str, float | None]]:
    """Does the model read its tag block for yes/no? POPE's yes-rate when a tag of the block names the
    asked object and when none does (the label is then "yes" almost always; a model that reads its block
    says "yes" far more often there), and the share of questions with the name in the block. Questions not
    in POPE's form are left out and counted (``unparsed``, as a share)."""
    out: dict[str, dict[str, float | None]] = {"pope_name_in_block": {}, "pope_yes_name_in_block": {},
                                                "pope_yes_name_not_in_block": {}, "pope_unparsed": {}}
    records = run_records(run_dir, "synth_pope")
    for novelty in ("seen", "novel"):
        rows = [r for r in records if r["novelty"] == novelty]
        asked = [POPE_QUESTION.search(r["text"]) for r in rows]
        parsed = [(r, m.group(1)) for r, m in zip(rows, asked) if m]
        listed = [any(names(t["tag"], name) for t in r.get("tags", [])) for r, name in parsed]
        said = [float(pope_label(r["prediction"]) == "yes") for r, _ in parsed]  # as the POPE scorer reads it
        out["pope_unparsed"][novelty] = percent([float(m is None) for m in asked])
        out["pope_name_in_block"][novelty] = percent([float(x) for x in listed])
        out["pope_yes_name_in_block"][novelty] = percent([y for y, x in zip(said, listed) if x])
        out["pope_yes_name_not_in_block"][novelty] = percent([y for y, x in zip(said, listed) if not x])
    return out


def weighting_diagnostics(run_dir: Path, world: Path) -> dict[str, dict[str, float | None]]:
    """What adaptive weights could fix: the share of identification blocks holding an entity that is not in
    the image (a wrong tag to weigh down), and in those blocks how often the top-weighted tag names an
    object that is in the image (the weights' job) against how often the top-retrieved tag does. Weights
    score a tag against the image, not the question, so blocks whose entities are all in the image (a
    scene of several objects) leave them nothing to decide."""
    from datastore.store import entity_of

    records = identification_records(run_dir)
    images = list(dict.fromkeys(r["image"] for r in records))
    shown = dict(zip(images, World.open(world).categories(images)[0]))
    out: dict[str, dict[str, float | None]] = {"wrong_entity_in_block": {}, "top_weighted_in_image": {},
                                                "top_retrieved_in_image": {}}
    for novelty in ("seen", "novel"):
        rows = [(r, shown[r["image"]], {entity_of(t["tag"]) for t in r["tags"]}) for r in records
                if r["novelty"] == novelty]
        out["wrong_entity_in_block"][novelty] = percent([float(bool(block - image)) for _, image, block in rows])
        mixed = [(r, image) for r, image, block in rows if block - image and block & image]
        out["top_weighted_in_image"][novelty] = percent([float(entity_of(max(
            r["tags"], key=lambda t: t["weight"] or 0.0)["tag"]) in image) for r, image in mixed])
        out["top_retrieved_in_image"][novelty] = percent([float(entity_of(r["tags"][0]["tag"]) in image)
                                                          for r, image in mixed])
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def report(config: QuickstartConfig, paths: Paths) -> dict[str, Any]:
    """Collect every run's metrics and diagnostics; write results.json, results.md, results.png and report.html."""
    runs = {run: run_metrics(paths.eval / run) for run in RUNS}
    diagnostics = {"purity": eval_image_purity(paths.cache, paths.world), **tag_diagnostics(paths.eval / "tuna"),
                   **weighting_diagnostics(paths.eval / "tuna", paths.world),
                   **pope_block_diagnostics(paths.eval / "tuna"),
                   "random_tags": tag_diagnostics(paths.eval / "tuna_random_tags")}
    by_scene = {run: identification_by_scene(paths.eval / run, paths.world) for run in RUNS}
    reference = identification_records(paths.eval / TEXT_REFERENCE)
    diagnostics["text_llm_tags"] = {
        "identification": {nov: percent([r["score"] for r in reference if r["novelty"] == nov])
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
    results["report_html"] = write_eval_report(paths)
    (paths.root / "results.json").write_text(json.dumps(results, indent=2))
    (paths.root / "results.md").write_text(results_markdown(results))
    write_chart(results, paths.root / "results.png")
    return results


REPORT_HTML = "report.html"


def write_eval_report(paths: Paths) -> str:
    """``tuna-eval report`` of the main comparison, baseline vs TUNA on the novel categories, sample by sample
    (``OUT/report.html``); returns its name, relative to ``OUT``."""
    from eval.report import ReportConfig, build_report

    runs = ("baseline", "tuna")
    build_report(ReportConfig(runs=[str(paths.eval / run) for run in runs], out=str(paths.root / REPORT_HTML),
                              datastore=str(paths.datastore), names=[RUNS[run].label for run in runs],
                              group="novelty=novel", title="tuna quickstart: baseline vs TUNA, novel categories"),
                 progress=False)
    return REPORT_HTML


def _swap_id(results: dict, run: str) -> float | None:
    ident = results["swap"][run]["identification"]
    return percent([v / 100 for v in ident.values() if v is not None])


def expected_outcome(results: dict) -> dict[str, Any]:
    """The issues' expected outcome, checked (never tuned for): TUNA vs the baseline, random tags, uniform
    weights, POPE and the datastore swap."""
    runs = results["runs"]
    ident = {run: m["identification"] for run, m in runs.items()}
    novel_gain = ident["tuna"]["novel"] - ident["baseline"]["novel"]
    seen_diff = ident["tuna"]["seen"] - ident["baseline"]["seen"]
    random_diff = ident["tuna_random_tags"]["novel"] - ident["baseline"]["novel"]
    adaptive = ident["tuna"]["novel"] - ident["tuna_uniform_weights"]["novel"]
    checks = {
        "novel_gain": {"value": novel_gain, "goal": ">= 30 points", "met": novel_gain >= 30},
        "seen_difference": {"value": seen_diff, "goal": "within 2 points (or better)", "met": seen_diff >= -2},
        "random_tags_vs_baseline_novel": {"value": random_diff, "goal": "about 0 (within 5 points)",
                                          "met": abs(random_diff) <= 5},
        "adaptive_vs_uniform_novel": {"value": adaptive, "goal": ">= 5 points", "met": adaptive >= 5},
    }
    if "pope_f1" in runs["tuna"]:
        f1 = {run: runs[run]["pope_f1"] for run in ("baseline", "tuna")}
        worst = min(f1["tuna"][nov] - f1["baseline"][nov] for nov in ("seen", "novel"))
        checks["pope_f1_vs_baseline"] = {"value": worst, "goal": ">= 0 on seen and novel (the smaller shown)",
                                         "met": worst >= 0}
        novel = f1["tuna"]["novel"] - f1["baseline"]["novel"]
        checks["pope_f1_gain_novel"] = {"value": novel, "goal": ">= 5 points", "met": novel >= 5}
        yes = [runs[run]["pope_yes"][nov] for run in ("baseline", "tuna") for nov in ("seen", "novel")]
        off = max(yes, key=lambda y: abs(y - 50))  # the yes-ratio furthest from balanced
        checks["pope_yes_ratio"] = {"value": off, "goal": "30-70 % for both models (the furthest shown)",
                                    "met": all(30 <= y <= 70 for y in yes)}
    if "swap" in results:
        gain = _swap_id(results, "tuna") - _swap_id(results, "baseline")
        checks["swap_gain"] = {"value": gain, "goal": ">= 20 points", "met": gain >= 20}
    return checks


def results_markdown(results: dict) -> str:
    lines = ["| run | id seen | id novel | attr seen | attr novel | POPE F1 seen | POPE F1 novel |",
             "|---|---|---|---|---|---|---|"]
    for run, m in results["runs"].items():
        lines.append(f"| {RUNS[run].label} | " + " | ".join(
            _fmt(m[metric][nov]) for metric in ("identification", "attributes", "pope_f1")
            for nov in ("seen", "novel")) + " |")
    if "identification_by_scene" in results:
        lines += ["", "| identification by scene | one object, seen | one object, novel | several, seen | "
                      "several, novel |", "|---|---|---|---|---|"]
        for run, m in results["identification_by_scene"].items():
            lines.append(f"| {RUNS[run].label} | " + " | ".join(_fmt(m[scene][nov]) for scene in ("single", "multi")
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
    if "wrong_entity_in_block" in d:  # what the adaptive weights have to work on
        lines += [f"| block holds an object not in the image | {_fmt(d['wrong_entity_in_block']['seen'])} | "
                  f"{_fmt(d['wrong_entity_in_block']['novel'])} |",
                  f"| in those (and with one in it): top-weighted / top-retrieved tag is in the image | "
                  f"{_fmt(d['top_weighted_in_image']['seen'])} / {_fmt(d['top_retrieved_in_image']['seen'])} | "
                  f"{_fmt(d['top_weighted_in_image']['novel'])} / {_fmt(d['top_retrieved_in_image']['novel'])} |"]
    if "pope_yes_name_in_block" in d:  # does TUNA read its block for yes/no?
        lines += [f"| POPE: asked object named in the tag block | {_fmt(d['pope_name_in_block']['seen'])} | "
                  f"{_fmt(d['pope_name_in_block']['novel'])} |",
                  f"| POPE yes-rate, object in the block / not | {_fmt(d['pope_yes_name_in_block']['seen'])} / "
                  f"{_fmt(d['pope_yes_name_not_in_block']['seen'])} | {_fmt(d['pope_yes_name_in_block']['novel'])} / "
                  f"{_fmt(d['pope_yes_name_not_in_block']['novel'])} |"]
        if any(d["pope_unparsed"].values()):  # not "Is there a X in the image?": left out of the two rows above
            lines += [f"| POPE questions not in POPE's form (left out) | {_fmt(d['pope_unparsed']['seen'])} | "
                      f"{_fmt(d['pope_unparsed']['novel'])} |"]
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
            attr = percent([v / 100 for v in s[run]["attributes"].values() if v is not None])
            purity = percent([p["top1"] / 100 for p in s["purity"].values()]) if run == "tuna" else None
            in_tags = percent([v / 100 for v in s["name_in_tags"].values() if v is not None]) if run == "tuna" else None
            label = "baseline (no tags)" if run == "baseline" else "TUNA + swapped datastore"
            lines.append(f"| {label} | {_fmt(ident)} | {_fmt(attr)} | {_fmt(purity)} | {_fmt(in_tags)} |")
    lines += ["", "| expected outcome | value | goal | met |", "|---|---|---|---|"]
    for name, c in results["checks"].items():
        lines.append(f"| {name} | {c['value']:+.1f} | {c['goal']} | {'yes' if c['met'] else 'NO'} |")
    if "report_html" in results:  # results of an older version lack it
        lines += ["", f"Baseline vs TUNA on the novel categories, question by question (images, tags, neighbours): "
                      f"[{results['report_html']}]({results['report_html']})"]
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
        ax.bar(xs, values, width, label=RUNS[run].label)
    ax.set_xticks(range(len(groups)), [f"{m.replace('_', ' ')}\n{nov}" for m, nov in groups])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title("tuna quickstart: baseline vs TUNA on seen and novel categories")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


