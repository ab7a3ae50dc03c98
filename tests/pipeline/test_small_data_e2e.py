"""Bring your own data, end to end (issue 26's bar): ``scripts/small_data.sh`` on a dataset the project has
never seen, at toy sizes.

The dataset (``tests/pipeline/foreign_data.py``) is not in the synthetic world's layout: its per-sample
JSON says ``color``/``scale`` and has no ``group``, its categories carry ``split`` ("base"/"new") instead of
``novelty``, and three corpus samples are broken (a caption that is not UTF-8, a truncated JPEG, a sample
without caption). The test runs the documented script once -- train-clip, datastore build, text
pretraining, both retrieval caches, deepspeed stage 1 and 2, ``tuna-eval custom_open,custom_yesno`` --
and asserts on what each stage wrote, above all the evaluation's ``results.json``. It also holds
docs/quickstart.md's walk-through ("Your own small dataset on one machine") to the commands the run
printed, so the docs cannot drift from the path that is tested here.

The models learn next to nothing at these sizes, so scores are checked for presence and range, not quality.
About 1.5 minutes on 2 cores (the first deepspeed stage adds ~50 s when DeepSpeed compiles its CPU op).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pipeline.foreign_data import SHORT_ANSWER, ForeignData, make_foreign_dataset
from tests.pipeline.test_small_data_recipe import (
    SCRIPT,
    SCRIPT_VARIABLES,
    commands,
    flags,
)

REPO = Path(__file__).resolve().parents[2]
ARCH = "tuna-quickstart-clip"
SIZES = ["--nproc", "1", "--clip-steps", "20", "--llm-steps", "20", "--llm-induction-steps", "10", "--stage1-steps", "3",
         "--steps", "5", "--batch-size", "4"]
STAGES = ["clip", "datastore", "llm", "cache", "eval-cache", "tuna-stage1", "tuna-stage2", "eval-tuna"]
# flags whose values follow the sizes above (the docs show the defaults' values); all other values must match
SIZE_FLAGS = {"steps", "induction-steps", "threads", "num_gpus", "max_steps", "per_device_train_batch_size", "logging_steps"}


@dataclass
class Run:
    data: ForeignData
    cwd: Path
    out: Path
    args: list[str]
    stdout: str
    seconds: float


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}  # inputs may come from the environment
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=1200, env={**env, "OMP_NUM_THREADS": "1"})


def failure_report(proc: subprocess.CompletedProcess) -> str:
    """The end of the script's output and of the failed stage's log (the script names it on stderr)."""
    report = f"exit {proc.returncode}\n--- stdout (end)\n{proc.stdout[-4000:]}\n--- stderr (end)\n{proc.stderr[-3000:]}"
    log = re.search(r"its output: (\S+\.log)", proc.stderr)
    if log and Path(log.group(1)).is_file():
        report += f"\n--- {log.group(1)} (end)\n{Path(log.group(1)).read_text(errors='replace')[-4000:]}"
    return report


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    cwd = tmp_path_factory.mktemp("byod").resolve()
    data = make_foreign_dataset(cwd / "mine")
    # relative paths, as a user types them (the script makes them absolute)
    args = ["--corpus", "mine/shards/part-{00000..00001}.tar", "--pretrain", "mine/llava/pretrain.json",
            "--instruct", "mine/llava/instruct.json", "--images", "mine/images", "--eval-root", "mine/eval",
            "--names", "mine/names.txt", "--out", "runs/mine", *SIZES]
    start = time.perf_counter()
    proc = run_script(args, cwd)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        pytest.fail(f"scripts/small_data.sh failed on the foreign dataset: {failure_report(proc)}", pytrace=False)
    print(proc.stdout.splitlines()[-2] if proc.stdout else "")  # "stage seconds: ..."
    return Run(data, cwd, cwd / "runs" / "mine", args, proc.stdout, seconds)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------ every stage ran
def test_every_stage_ran_in_order_and_was_timed(run):
    for stage in STAGES:
        assert f"== {stage}: " in run.stdout and "done in an earlier run" not in run.stdout, stage
        assert (run.out / "stages" / f"{stage}.done").read_text().strip().isdigit(), stage
        assert (run.out / "logs" / f"{stage}.log").stat().st_size > 0, stage
    positions = [run.stdout.index(f"== {stage}: ") for stage in STAGES]
    assert positions == sorted(positions)
    assert re.search(r"^stage seconds: clip \d+, .* eval-tuna \d+, this run \d+ s$", run.stdout, re.MULTILINE)
    assert not (run.out / "models" / "baseline-stage2").exists()  # no --baseline


def test_corrupt_samples_are_skipped_and_counted_by_reason(run):
    planted = run.data.corrupt
    assert planted == {"undecodable_text": 1, "corrupt_image": 1, "missing_caption": 1}
    usable = run.data.n_corpus - sum(planted.values())
    manifest = json.loads((run.out / "datastore" / "manifest.json").read_text())
    assert manifest["counts"] == {"read": run.data.n_corpus, "written": usable, "skipped": planted}
    # the CLIP was trained on the same usable samples, the three others named in its log
    assert json.loads((run.out / "clip" / "train.json").read_text())["samples"] == usable
    assert re.search(r"skipped 3 samples: .*img_00040.*img_00080.*img_00120", (run.out / "logs" / "clip.log").read_text())
    # text pretraining reads captions only: the truncated JPEG's caption is kept
    corpus = json.loads((run.out / "llm" / "text_pretrain.json").read_text())["corpus"]
    assert corpus["read"] == run.data.n_corpus and corpus["captions"] == run.data.n_corpus - 2
    assert corpus["skipped"] == {"undecodable_text": 1, "missing_caption": 1}
    assert [w.split()[-1] for w in corpus["skipped_examples"]["undecodable_text"]] == ["img_00040"]


def test_llm_and_its_text_replay(run):
    record = json.loads((run.out / "llm" / "text_pretrain.json").read_text())
    assert record["names"]["n"] == 8 and record["names"]["rejected"] == []  # the names file's labels
    replay = json.loads((run.out / "llm" / "text_replay.json").read_text())
    n_instruct = len(json.loads(run.data.instruct.read_text()))
    assert len(replay) == record["text_replay"]["n"] == round(0.5 * n_instruct)  # the quickstart's ratio
    assert all("image" not in r and r["conversations"][0]["from"] == "human" for r in replay)
    # stage 2 read the instructions and that file
    log = (run.out / "logs" / "tuna-stage2.log").read_text()
    assert f"--data_path {run.data.instruct} {run.out / 'llm' / 'text_replay.json'}" in log


def test_retrieval_caches_cover_training_and_eval_images(run):
    import pyarrow.parquet as pq

    train = pq.read_table(run.out / "tags.parquet").to_pylist()
    images = {r["image"] for f in (run.data.instruct, run.data.pretrain) for r in json.loads(f.read_text())}
    assert {r["image"] for r in train} == images
    evaluated = pq.read_table(run.out / "tags_eval.parquet").to_pylist()
    questions = jsonl(run.data.eval_root / "custom" / "open.jsonl") + jsonl(run.data.eval_root / "custom" / "yesno.jsonl")
    assert {r["image"] for r in evaluated} == {q["image"] for q in questions}
    for row in train + evaluated:  # k_images 5 neighbours from the corpus, never a broken sample
        assert len(row["neighbours"]) == 5 and not {"img_00040", "img_00080", "img_00120"} & set(row["neighbours"])
        assert row["tags"]


def test_both_training_stages_wrote_their_models(run):
    assert (run.out / "models" / "tuna-stage1" / "tuna_trainable.safetensors").is_file()
    config = json.loads((run.out / "models" / "tuna-stage2" / "config.json").read_text())
    assert config["max_tags"] == 6
    for stage, steps in (("tuna-stage1", 3), ("tuna-stage2", 5)):
        state = json.loads((run.out / "models" / stage / "trainer_state.json").read_text())
        assert state["global_step"] == steps, stage
        losses = [e["loss"] for e in state["log_history"] if "loss" in e]
        assert losses and all(float(x) == float(x) for x in losses), stage  # logged and not NaN


# ------------------------------------------------------------------------------------------ the results file
def test_results_file_has_both_benchmarks_with_scores_and_counts(run):
    results = json.loads((run.out / "eval" / "tuna" / "results.json").read_text())
    assert results["model"] == str(run.out / "models" / "tuna-stage2")
    assert set(results["benchmarks"]) == {"custom_open", "custom_yesno"}
    manifest = json.loads((run.out / "datastore" / "manifest.json").read_text())
    assert results["datastore"]["counts"] == manifest["counts"]

    open_, yesno = results["benchmarks"]["custom_open"], results["benchmarks"]["custom_yesno"]
    for entry, n, metric in ((open_, run.data.n_open, "accuracy"), (yesno, run.data.n_yesno, "f1")):
        assert entry["n"] == entry["metrics"]["n"] == n and entry["main_metric"] == metric
        score = entry["metrics"][metric]
        assert isinstance(score, (int, float)) and 0 <= score <= 100, (metric, score)
        groups = entry["groups"]["group"]  # the foreign categories' split, as the questions' group
        assert {g: v["n"] for g, v in groups.items()} == run.data.groups
        assert all(0 <= v[metric] <= 100 for v in groups.values())
        # the instruction is in every prompt exactly once, also where the question already ended with it
        assert entry["example_prompt"].count(SHORT_ANSWER) == 1
    assert open_["prompt_suffix_stripped"] == run.data.n_suffixed and yesno["prompt_suffix_stripped"] == 0
    assert set(open_["metrics"]["per_category"]) == {"naming"}
    assert set(yesno["metrics"]["per_split"]) == {"existence"}
    assert sum(yesno["metrics"][k] for k in ("tp", "fp", "tn", "fn")) == run.data.n_yesno

    for bench, n in (("custom_open", run.data.n_open), ("custom_yesno", run.data.n_yesno)):
        predictions = jsonl(run.out / "eval" / "tuna" / bench / "predictions.jsonl")
        assert len(predictions) == n and all(isinstance(p["prediction"], str) for p in predictions)
        assert all(p["prompt"].count(SHORT_ANSWER) == 1 for p in predictions)
    markdown = (run.out / "eval" / "tuna" / "results.md").read_text()
    assert "custom_open (accuracy)" in markdown and "custom_yesno (f1)" in markdown and "group=new" in markdown


def test_rerun_skips_every_stage(run):
    proc = run_script(run.args, run.cwd)
    assert proc.returncode == 0, failure_report(proc)
    for stage in STAGES:
        assert f"== {stage}: done in an earlier run" in proc.stdout, stage
    assert commands(proc.stdout) == []  # nothing ran


# ------------------------------------------------------------------------------------------ the docs walk it
def documented_walk() -> tuple[str, list[str], list[str], dict[str, str]]:
    """docs/quickstart.md's section: its text, the command lines that run the script, the command lines of its
    numbered walk-through (the code blocks that do not run the script) and the variables it sets (C, R)."""
    text = (REPO / "docs" / "quickstart.md").read_text()
    section = text.split("## Your own small dataset on one machine\n", 1)[1].split("\n## ", 1)[0]
    script, walk, variables = [], [], {}
    for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            assignment = re.fullmatch(r'(\w+)="(.*)"', line)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
            elif line.startswith("bash scripts/small_data.sh"):
                script.append(line)
            elif line:
                walk.append(line)
    assert walk, "no walk-through commands in the section"
    return section, script, walk, variables


def normalised_command(cmd: list[str]) -> list[str]:
    cmd = list(cmd)
    if Path(cmd[0]).name.startswith("python"):
        cmd[0] = "python"
    if "--master_port" in cmd:  # the script draws a free port; the docs leave deepspeed's default
        i = cmd.index("--master_port")
        del cmd[i:i + 2]
    return cmd


def test_docs_walk_through_is_the_tested_path(run):
    section, script, lines, variables = documented_walk()
    n_instruct = len(json.loads(run.data.instruct.read_text()))
    values = {**variables, "S": str(run.cwd / "mine" / "shards" / "part-{00000..00001}.tar"), "OUT": str(run.out),
              "N": str(round(0.5 * n_instruct)), "IMAGES": str(run.data.images), "INSTRUCT": str(run.data.instruct),
              "PRETRAIN": str(run.data.pretrain), "EVAL_ROOT": str(run.data.eval_root)}

    def expand(line: str) -> str:
        for _ in range(2):  # C and R hold $OUT
            line = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], line)
        return line
    documented = [shlex.split(expand(line), comments=True) for line in lines]
    ran = [normalised_command(c) for c in commands(run.stdout) if c[1:2] != ["-c"]]  # not the ds-config writer
    assert len(documented) == len(ran), ([d[:3] for d in documented], [r[:3] for r in ran])

    for doc, cmd in zip(documented, ran):
        head = doc[:next(i for i, a in enumerate(doc) if a.startswith("--"))]  # the program and subcommand
        assert cmd[:len(head)] == head, (head, cmd[:3])
        doc_flags, cmd_flags = flags(doc), flags(cmd)
        cmd_flags.pop("names", None)  # optional: shown as a comment in the docs, passed by this test
        assert set(doc_flags) == set(cmd_flags), (head, set(doc_flags) ^ set(cmd_flags))
        differ = {k for k in doc_flags if doc_flags[k] != cmd_flags[k]}
        assert differ <= SIZE_FLAGS, (head, {k: (doc_flags[k], cmd_flags[k]) for k in differ - SIZE_FLAGS})
    assert "--names names.txt" in section
    # the section shows this test's own invocation, and documents every flag of it
    assert shlex.split(script[-1]) == ["bash", "scripts/small_data.sh", *run.args], script
    assert "tests/pipeline/test_small_data_e2e.py" in section
    for arg in run.args:
        if arg.startswith("--"):
            assert f"`{arg}`" in section.split("tests/pipeline/test_small_data_e2e.py")[0], arg
