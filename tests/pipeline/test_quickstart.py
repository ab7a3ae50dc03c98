"""``tuna quickstart`` end to end at reduced sizes (the CI-sized run of README command #1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.quickstart import QuickstartConfig
from pipeline.report import expected_outcome, results_markdown
from pipeline.runs import RUNS

# Plumbing sizes: every stage, tool and report field runs, in ~6 min on 2 cores; the models learn
# little at these budgets, so nothing here asserts quality.
SMOKE = ["--corpus-size", "2000", "--n-instruct", "400", "--n-eval", "48", "--swap-corpus-size", "600",
         "--clip-steps", "60", "--llm-steps", "60", "--llm-induction-steps", "30", "--stage1-steps", "8", "--steps", "30"]
# Quality sizes: smaller corpora and eval sets, the defaults' training budgets (with half of them the
# CLIP's purity falls to ~60 % and stage 2 learns no copying: novel naming 0 %). ~45 min on 2 cores, so
# opt-in (TUNA_QUALITY_TESTS=1); the full run's figures: docs/quickstart.md.
QUALITY = ["--corpus-size", "10000", "--n-eval", "96", "--swap-corpus-size", "3000"]
QUALITY_OPT_IN = "TUNA_QUALITY_TESTS"


def run_quickstart(out: Path, flags: list[str], timeout: int) -> str:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "quickstart", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    return out, run_quickstart(out, SMOKE, timeout=2400)


def test_every_stage_ran_and_was_timed(run):
    out, stdout = run
    seconds = json.loads((out / "stages.json").read_text())["seconds"]
    assert list(seconds) == ["world", "clip", "llm", "datastore", "train", "eval", "report"]
    for n, stage in enumerate(seconds, 1):
        assert f"== [{n}/7] {stage}" in stdout
    assert "stage seconds: world" in stdout and f"written: {out / 'results.json'}" in stdout
    for name in ("baseline", "tuna"):
        for stage in (1, 2):
            assert (out / "logs" / f"train-{name}-stage{stage}.log").is_file()
    assert (out / "models" / "tuna-stage2" / "config.json").is_file()


def test_results_table_json_and_chart(run):
    out, stdout = run
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == set(RUNS)
    for metrics in results["runs"].values():
        assert set(metrics) == {"identification", "attributes", "pope_f1", "pope_yes"}
        assert all(set(v) == {"seen", "novel"} for v in metrics.values())
        assert all(0 <= x <= 100 for v in metrics.values() for x in v.values() if x is not None)
    by_scene = results["identification_by_scene"]
    assert set(by_scene) == set(RUNS) and all(set(m) == {"single", "multi"} for m in by_scene.values())
    diagnostics = results["diagnostics"]
    assert set(diagnostics) >= {"purity", "name_in_tags", "name_top_weighted"}
    assert set(diagnostics["purity"]) == {"seen", "novel"}
    text_llm = diagnostics["text_llm_tags"]  # the text-only LLM reading TUNA's tag blocks, no image
    assert set(text_llm) == {"identification", "single", "multi"}
    assert all(0 <= x <= 100 for v in text_llm.values() for x in v.values() if x is not None)
    reference = [json.loads(line) for line in (out / "eval" / "llm_tags_as_text" / "synth_open" /
                                               "predictions.jsonl").read_text().splitlines()]
    assert len(reference) == sum(r["category"] == "identification" for r in map(json.loads, (
        out / "eval" / "tuna" / "synth_open" / "predictions.jsonl").read_text().splitlines()))
    assert all(r["prompt"].startswith(" Tags: ") and "<image>" not in r["prompt"] for r in reference)
    assert set(results["swap"]) >= {"baseline", "tuna", "purity"}
    # random tags come from the datastore's tags plus 20,000 made-up names: the right one only by rare chance
    assert all(v <= 5 for v in diagnostics["random_tags"]["name_in_tags"].values())
    assert set(diagnostics) >= {"wrong_entity_in_block", "top_weighted_in_image", "top_retrieved_in_image",
                                "pope_name_in_block", "pope_yes_name_in_block", "pope_yes_name_not_in_block"}
    assert diagnostics["pope_unparsed"] == {"seen": 0.0, "novel": 0.0}  # every synth_pope question is POPE's form
    assert set(results["checks"]) == {"novel_gain", "seen_difference", "random_tags_vs_baseline_novel",
                                      "adaptive_vs_uniform_novel", "pope_f1_vs_baseline", "pope_f1_gain_novel",
                                      "pope_yes_ratio", "swap_gain"}
    table = (out / "results.md").read_text()
    assert table == results_markdown(results) and table in stdout
    lines = table.splitlines()
    assert lines[0] == "| run | id seen | id novel | attr seen | attr novel | POPE F1 seen | POPE F1 novel |"
    assert [line.split(" | ")[0] for line in lines[2:6]] == [
        "| baseline (no tags)", "| TUNA", "| TUNA, random tags", "| TUNA, uniform weights"]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the per-sample page of baseline vs TUNA on the novel split, linked from results.md
    assert results["report_html"] == "report.html" and "](report.html)" in table
    assert "tuna quickstart: baseline vs TUNA" in (out / "report.html").read_text()


@pytest.mark.skipif(os.environ.get(QUALITY_OPT_IN) != "1",
                    reason=f"quality run of the quickstart (~45 min on 2 cores): set {QUALITY_OPT_IN}=1")
def test_tuna_names_novel_objects_the_baseline_cannot(tmp_path):
    out = tmp_path / "qs"
    run_quickstart(out, QUALITY, timeout=4800)
    ident = {run: m["identification"] for run, m in json.loads((out / "results.json").read_text())["runs"].items()}
    assert ident["tuna"]["novel"] > ident["baseline"]["novel"] + 5


def test_rerun_skips_finished_stages(run):
    out, _ = run
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "quickstart", "--out", str(out), *SMOKE],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("done in an earlier run") == 6  # every stage but the (cheap) report
    other = subprocess.run([sys.executable, "-m", "pipeline.cli", "quickstart", "--out", str(out), "--seed", "3"],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 1 and "holds a quickstart run with other settings" in other.stderr
    state = json.loads((out / "stages.json").read_text())
    del state["recipe"]["llm_membership_rows"]  # a run from before the setting existed: its default
    (out / "stages.json").write_text(json.dumps(state))
    again = subprocess.run([sys.executable, "-m", "pipeline.cli", "quickstart", "--out", str(out), *SMOKE],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done in an earlier run") == 6, again.stderr[-2000:]
    changed = subprocess.run([sys.executable, "-m", "pipeline.cli", "quickstart", "--out", str(out), *SMOKE,
                              "--llm-membership-rows", "4"], capture_output=True, text=True, timeout=300)
    assert changed.returncode == 1 and "other settings" in changed.stderr


def test_expected_outcome_checks():
    def run(seen: float, novel: float, f1: tuple[float, float] = (60.0, 60.0), yes: tuple[float, float] = (50.0, 50.0)):
        return {"identification": {"seen": seen, "novel": novel}, "pope_f1": dict(zip(("seen", "novel"), f1)),
                "pope_yes": dict(zip(("seen", "novel"), yes))}

    runs = {"baseline": run(50.0, 2.0, (60.0, 50.0)), "tuna": run(49.0, 40.0, (62.0, 56.0), (45.0, 71.0)),
            "tuna_random_tags": run(10.0, 4.0), "tuna_uniform_weights": run(49.0, 36.0)}
    swap = {run: {"identification": {"seen": None, "novel": novel}} for run, novel in (("baseline", 0.0),
                                                                                       ("tuna", 19.0))}
    checks = expected_outcome({"runs": runs, "swap": swap})
    assert checks["novel_gain"] == {"value": 38.0, "goal": ">= 30 points", "met": True}
    assert checks["seen_difference"]["value"] == -1.0 and checks["seen_difference"]["met"]
    assert checks["random_tags_vs_baseline_novel"]["value"] == 2.0 and checks["random_tags_vs_baseline_novel"]["met"]
    assert checks["adaptive_vs_uniform_novel"]["value"] == 4.0 and not checks["adaptive_vs_uniform_novel"]["met"]
    assert checks["pope_f1_vs_baseline"]["value"] == 2.0 and checks["pope_f1_vs_baseline"]["met"]
    assert checks["pope_f1_gain_novel"]["value"] == 6.0 and checks["pope_f1_gain_novel"]["met"]
    assert checks["pope_yes_ratio"]["value"] == 71.0 and not checks["pope_yes_ratio"]["met"]
    assert checks["swap_gain"]["value"] == 19.0 and not checks["swap_gain"]["met"]
    runs["tuna"]["identification"]["seen"] = 45.0
    assert not expected_outcome({"runs": runs})["seen_difference"]["met"]


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="steps=0"):
        QuickstartConfig(steps=0)
    with pytest.raises(ValueError, match="exceeds the catalogue"):
        QuickstartConfig(n_seen=60, n_novel=40)
    with pytest.raises(ValueError, match="eval_min_tag_support=1.5"):
        QuickstartConfig(eval_min_tag_support=1.5)
    with pytest.raises(ValueError, match="rename_p=-0.1"):
        QuickstartConfig(rename_p=-0.1)
    with pytest.raises(ValueError, match="rename_to='lexicon'"):
        QuickstartConfig(rename_to="lexicon")
    with pytest.raises(ValueError, match="llm_induction_steps=-1"):
        QuickstartConfig(llm_induction_steps=-1)


def test_only_tunas_instruction_tuning_renames_the_seen_names(run):
    from transformers import AutoTokenizer

    from pipeline.quickstart import Paths, ds_config_file, train_command

    out, _ = run
    paths = Paths(out)
    logged = (out / "logs" / "train-tuna-stage2.log").read_text().splitlines()[0]
    assert f"--deepspeed {ds_config_file(QuickstartConfig(out=str(out)), paths)} " in logged
    world = json.loads((out / "world" / "world.json").read_text())["categories"]
    assert paths.seen_names.read_text().split() == [c["name"] for c in world if c["novelty"] == "seen"]
    for p, to in ((0.0, "fresh"), (0.5, "fresh"), (0.3, "seen")):
        for name in ("baseline", "tuna"):
            for stage in (1, 2):
                cmd = train_command(QuickstartConfig(out=str(out), rename_p=p, rename_to=to), paths, name, stage)
                renames = (name, stage) == ("tuna", 2) and p > 0
                assert ("--rename_p" in cmd) == renames, (p, name, stage)
                if renames:
                    pool = paths.fresh_names if to == "fresh" else paths.seen_names
                    assert [cmd[cmd.index(f"--{k}") + 1] for k in ("rename_p", "rename_names", "rename_pool")] == [
                        str(p), str(paths.seen_names), str(pool)]
    # the run itself trained with the default: fresh names that the LLM never saw whole, and no world's names
    assert QuickstartConfig().rename_p > 0 and f"--rename_pool {paths.fresh_names}" in logged
    fresh = paths.fresh_names.read_text().split()
    tokenizer = AutoTokenizer.from_pretrained(str(paths.llm))
    assert len(fresh) == len(set(fresh)) == 1000 and all(len(tokenizer.tokenize(" " + n)) > 2 for n in fresh)
    names = {c["name"] for c in world} | {c["name"] for c in json.loads(
        (out / "world_swap" / "world.json").read_text())["categories"]}
    assert not names & set(fresh)


def test_every_tuna_evaluation_reads_majority_supported_tags(tmp_path):
    from pipeline.quickstart import Paths, eval_runs

    runs = eval_runs(QuickstartConfig(out=str(tmp_path)), Paths(tmp_path))
    for name, (model, _, _, flags) in runs.items():
        if model == "tuna":
            assert flags[flags.index("--min-tag-support") + 1] == "0.5", name
        else:
            assert flags == ["--no-tags"], name
    assert {"tuna", "tuna_random_tags", "tuna_uniform_weights", "swap_tuna"} <= set(runs)


def test_tag_diagnostics_count_the_copy_rate(tmp_path):
    from pipeline.report import tag_diagnostics

    def q(novelty, answer, tags, prediction):
        return {"category": "identification", "novelty": novelty, "answers": [answer], "prediction": prediction,
                "score": float(prediction == answer), "tags": [{"tag": t, "weight": w} for t, w in tags]}

    records = [
        q("novel", "spolem", [("red spolem", 2.0), ("pavik", 1.0)], "spolem"),  # top-weighted right, copied
        q("novel", "spolem", [("spolem", 1.5), ("large spolem", 0.5)], "pavik"),  # top-weighted right, not copied
        q("novel", "woodag", [("pavik", 1.5), ("woodag", 0.5)], "pavik"),  # in the block, not on top
        q("novel", "wevor", [("zutag", 1.0)], "zutag"),  # not in the block
        q("seen", "tulbel", [("tulbel", 1.0)], "tulbel"),
        {"category": "color", "novelty": "seen", "answers": ["red"], "prediction": "red", "score": 1.0, "tags": []},
    ]
    (tmp_path / "synth_open").mkdir()
    (tmp_path / "synth_open" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    d = tag_diagnostics(tmp_path)
    assert d["name_in_tags"]["novel"] == 75.0 and d["name_top_weighted"]["novel"] == 50.0
    assert d["accuracy_when_top_weighted"] == {"seen": 100.0, "novel": 50.0}
    assert d["accuracy_without_name"]["novel"] == 0.0
    results = {"runs": {}, "diagnostics": {"purity": {}, **d}, "checks": {}}
    assert "| identification when it is (the copy rate) | 100.0 | 50.0 |" in results_markdown(results)


def test_pope_block_diagnostics_split_the_yes_rate_by_the_asked_object_in_the_block(tmp_path):
    from pipeline.report import pope_block_diagnostics

    def q(novelty, name, tags, prediction, text="Is there a {} in the image?"):
        return {"novelty": novelty, "text": text.format(name), "prediction": prediction, "label": "yes",
                "tags": [{"tag": t, "weight": 1.0} for t in tags]}

    records = [
        q("novel", "spolem", ["red spolem", "pavik"], "Yes"),  # named in the block (as an entity), yes
        q("novel", "spolem", ["spolem"], "No"),  # named, no
        q("novel", "woodag", ["pavik"], "Yes, it is"),  # not named, yes (the POPE scorer's reading)
        q("novel", "wevor", ["wevorak"], "No."),  # a longer name is not the asked one
        q("novel", "apple", ["apple"], "Yes", text="Can you see an {}?"),  # not POPE's form: left out, counted
        q("seen", "tulbel", ["tulbel"], "There is not one"),  # POPE reads "not" as no
        q("seen", "owl", ["big owl"], "yes", text="Is there an {} in the image?"),
    ]
    (tmp_path / "synth_pope").mkdir()
    (tmp_path / "synth_pope" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    d = pope_block_diagnostics(tmp_path)
    assert d["pope_name_in_block"] == {"seen": 100.0, "novel": 50.0}
    assert d["pope_yes_name_in_block"] == {"seen": 50.0, "novel": 50.0}
    assert d["pope_yes_name_not_in_block"] == {"seen": None, "novel": 50.0}
    assert d["pope_unparsed"] == {"seen": 0.0, "novel": 20.0}
    table = results_markdown({"runs": {}, "diagnostics": {"purity": {}, "name_in_tags": {"seen": 1, "novel": 1},
                                                          "name_top_weighted": {"seen": 1, "novel": 1}, **d},
                              "checks": {}})
    assert "| POPE yes-rate, object in the block / not | 50.0 / – | 50.0 / 50.0 |" in table
    assert "| POPE questions not in POPE's form (left out) | 0.0 | 20.0 |" in table


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_training_uses_deepspeeds_bucket_sizes_not_the_tiny_llms_auto(tmp_path, ds_config):
    from pipeline.quickstart import SMALL_LLM_BUCKETS, Paths, ds_config_file

    written = json.loads(ds_config_file(QuickstartConfig(out=str(tmp_path), ds_config=ds_config),
                                        Paths(tmp_path)).read_text())
    shipped = json.loads((Path(__file__).parents[2] / "ds_configs" / ds_config).read_text())
    zero = written.pop("zero_optimization")
    assert written == {k: v for k, v in shipped.items() if k != "zero_optimization"}
    assert zero["reduce_bucket_size"] == SMALL_LLM_BUCKETS["reduce_bucket_size"] == 500_000_000
    assert zero.get("stage3_prefetch_bucket_size") == (50_000_000 if "3" in ds_config else None)
    assert {k: v for k, v in zero.items() if k not in SMALL_LLM_BUCKETS} == {
        k: v for k, v in shipped["zero_optimization"].items() if k not in SMALL_LLM_BUCKETS}


def test_icl_suite_on_the_finished_quickstart(run):
    """tuna quickstart-icl end to end at plumbing sizes: task, pools, in-context tuning, k-shot eval, report."""
    out, _ = run
    icl = out / "icl"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "quickstart-icl", "--quickstart", str(out),
                           "--support-per-category", "2", "--queries", "16", "--steps", "4", "--icl-p", "1.0",
                           "--train-shots", "1", "2", "--shots", "0", "1", "2", "--retrievers", "random", "oracle"],
                          capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((icl / "results_icl.json").read_text())
    assert set(results["retrievers"]) == {"random", "oracle", "oracle (before tuning)"}
    assert set(results["retrievers"]["oracle"]) == set(results["retrievers"]["oracle (before tuning)"]) == {"0", "1", "2"}
    assert results["label_precision"]["oracle"] == 100.0 and results["label_precision"]["random"] < 50
    assert results["label_precision"]["oracle (before tuning)"] == 100.0
    assert (icl / "results_icl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| oracle | novel |" in (icl / "results_icl.md").read_text()
    counts = json.loads((icl / "tuna-icl" / "icl_counts.json").read_text())
    assert counts, "in-context tuning wrote no counts"
    again = subprocess.run([sys.executable, "-m", "pipeline.cli", "quickstart-icl", "--quickstart", str(out),
                            "--support-per-category", "2", "--queries", "16", "--steps", "4", "--icl-p", "1.0",
                            "--train-shots", "1", "2", "--shots", "0", "1", "2", "--retrievers", "random", "oracle"],
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0 and again.stdout.count("done in an earlier run") == 4
