"""``scripts/small_data.sh``: the quickstart's recipe on a user's own data, checked by its ``--dry-run``.

A real run (CLIP, datastore, LLM, two deepspeed stages, evaluation) takes minutes even at toy sizes, so
these tests read the printed commands: their order, their flags, and that the training and evaluation
flags are the ones ``pipeline.quickstart`` passes (``train_command``, ``eval_command``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from pipeline.quickstart import QuickstartConfig, eval_command, train_command
from pipeline.runs import Paths

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "small_data.sh"
ARCH = "tuna-quickstart-clip"  # the CLIP architecture train-clip writes by default


SCRIPT_VARIABLES = ("CORPUS", "PRETRAIN", "INSTRUCT", "IMAGES", "EVAL_ROOT", "OUT", "LLM", "NAMES", "TEMPLATE",
                    "CLIP_MODEL", "CLIP_PRETRAINED", "NPROC", "DEVICE", "CLIP_STEPS", "LLM_STEPS", "STAGE1_STEPS",
                    "STEPS", "BATCH_SIZE", "SEED", "THREADS", "BASELINE", "DRY_RUN", "MASTER_PORT")


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}  # inputs may come from the environment
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**env, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def data(tmp_path) -> Path:
    """Stand-ins for a user's inputs: two (empty) shards, LLaVA JSONs, an image folder, custom eval files."""
    (tmp_path / "shards").mkdir()
    for i in range(2):
        (tmp_path / "shards" / f"part-{i:05d}.tar").write_bytes(b"")
    (tmp_path / "pretrain.json").write_text("[]")
    (tmp_path / "instruct.json").write_text(json.dumps([{"id": str(i)} for i in range(10)]))
    (tmp_path / "images").mkdir()
    (tmp_path / "evaldata" / "custom").mkdir(parents=True)
    (tmp_path / "evaldata" / "custom" / "open.jsonl").write_text("")
    (tmp_path / "evaldata" / "custom" / "yesno.jsonl").write_text("")
    return tmp_path


INPUTS = ["--corpus", "shards/part-{00000..00001}.tar", "--pretrain", "pretrain.json", "--instruct",
          "instruct.json", "--images", "images", "--out", "run"]


def commands(stdout: str) -> list[list[str]]:
    """The printed commands ("+ CMD"), split as a shell would, without the leading ``env VAR=...``."""
    cmds = []
    for cmd in (shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")):
        while cmd[0] == "env" or "=" in cmd[0]:
            cmd = cmd[1:]
        cmds.append(cmd)
    return cmds


def flags(cmd: list[str]) -> dict[str, list[str]]:
    """--flag -> its values (what follows it up to the next --flag)."""
    out: dict[str, list[str]] = {}
    key = None
    for arg in cmd:
        if arg.startswith("--"):
            key = arg[2:]
            out[key] = []
        elif key is not None:
            out[key].append(arg)
    return out


def normalised(values: dict[str, list[str]]) -> dict[str, list]:
    def one(v: str):
        try:
            return float(v)  # "1e-3" and "0.001" are the same learning rate
        except ValueError:
            return v
    return {k: [one(v) for v in vs] for k, vs in values.items()}


def test_help_explains_inputs_and_outputs(tmp_path):
    proc = run_script("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for word in ("--corpus", "CORPUS", "--pretrain", "--instruct", "--images", "--eval-root", "custom/open.jsonl",
                 "--clip-model", "--llm", "--nproc", "--steps", "--dry-run", "outputs (OUT)", "models/tuna-stage2"):
        assert word in proc.stdout, word


@pytest.mark.parametrize("drop, change, message", [
    ("--corpus", None, "--corpus (CORPUS) not given"),
    ("--pretrain", None, "--pretrain (PRETRAIN) not given"),
    ("--images", None, "--images (IMAGES) not given"),
    (None, ("--instruct", "missing.json"), "--instruct (INSTRUCT): file not found"),
    (None, ("--corpus", "shards/part-{00000..00002}.tar"), "--corpus (CORPUS): shard not found"),
    (None, ("--images", "nowhere"), "--images (IMAGES): folder not found"),
    (None, ("--instruct", "shards/part-00000.tar"), "--instruct (INSTRUCT)"),
])
def test_missing_input_is_one_line_naming_it(data, drop, change, message):
    args = list(INPUTS)
    if drop:
        i = args.index(drop)
        del args[i:i + 2]
    if change:
        args[args.index(change[0]) + 1] = change[1]
    proc = run_script(*args, "--dry-run", cwd=data)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
    assert not (data / "run").exists()


def test_dry_run_prints_every_stage_in_order(data):
    proc = run_script(*INPUTS, "--eval-root", "evaldata", "--baseline", "--dry-run", "--", "--bf16", "true",
                      cwd=data)
    assert proc.returncode == 0, proc.stderr
    assert not (data / "run").exists()  # a dry run writes nothing
    out, cmds = data / "run", commands(proc.stdout)
    shards = str(data / "shards" / "part-{00000..00001}.tar")

    def what(cmd: list[str]) -> str:
        if cmd[0] == "deepspeed":
            f = flags(cmd)
            return f"deepspeed {f['stage'][0]} {Path(f['output_dir'][0]).name}"
        if "-m" in cmd:
            return cmd[cmd.index("-m") + 1]
        return " ".join(Path(c).name for c in cmd[:2] if not c.startswith("-"))
    assert [what(c) for c in cmds] == [
        "tuna-datastore train-clip", "tuna-datastore build", "tuna-datastore info", "pipeline.text_pretrain",
        "tuna-datastore cache", "tuna-datastore cache", "python",  # the last one writes OUT/ds_zero2.json
        "deepspeed pretrain baseline-stage1", "deepspeed finetune baseline-stage2",
        "deepspeed pretrain tuna-stage1", "deepspeed finetune tuna-stage2",
        "tuna-eval", "tuna-eval", "tuna-eval compare"]
    clip, build, _, llm, cache, eval_cache, _, _, _, stage1, stage2, eval_base, eval_tuna, _ = map(flags, cmds)
    recipe = QuickstartConfig()
    assert clip["input"] == [shards] and clip["out"] == [str(out / "clip")] and clip["text-mode"] == ["caption"]
    assert clip["steps"] == [str(recipe.clip_steps)] and clip["batch-size"] == [str(recipe.clip_batch_size)]
    assert build["input"] == [shards] and build["model-config"] == [str(out / "clip" / f"{ARCH}.json")]
    assert build["pretrained"] == [str(out / "clip" / f"{ARCH}.safetensors")]
    assert llm["input"] == [shards] and llm["out"] == [str(out / "llm")]
    assert llm["steps"] == [str(recipe.llm_steps)] and llm["hidden-size"] == [str(recipe.llm_hidden)]
    assert llm["num-layers"] == [str(recipe.llm_layers)]
    assert llm["induction-steps"] == [str(recipe.llm_induction_steps)]
    assert llm["text-replay"] == [str(round(recipe.text_replay * 10))]  # 10 instruction records
    assert cache["llava-json"] == [str(data / "instruct.json"), str(data / "pretrain.json")]
    assert cache["image-folder"] == [str(data / "images")] and cache["out"] == [str(out / "tags.parquet")]
    assert eval_cache["llava-json"] == [str(data / "evaldata" / "custom" / n) for n in ("open.jsonl", "yesno.jsonl")]
    assert eval_cache["image-folder"] == [str(data / "evaldata" / "custom")]
    assert stage1["data_path"] == [str(data / "pretrain.json")] and stage1["retrieval_cache"] == [str(out / "tags.parquet")]
    assert stage2["data_path"] == [str(data / "instruct.json"), str(out / "llm" / "text_replay.json")]
    assert stage2["stage1_checkpoint"] == [str(out / "models" / "tuna-stage1")] and stage2["bf16"] == ["true"]
    assert eval_base["bench"] == ["custom_open,custom_yesno"] and "no-tags" in eval_base
    assert eval_tuna["retrieval-cache"] == [str(out / "tags_eval.parquet")]
    assert eval_tuna["datastore"] == [str(out / "datastore")]
    assert eval_tuna["min-tag-support"] == [str(recipe.eval_min_tag_support)]


def test_training_and_eval_flags_are_the_quickstarts(data):
    """Apart from the data (the user's instead of the world's), each deepspeed and tuna-eval command is the one
    pipeline.quickstart builds for the same output folder."""
    proc = run_script(*INPUTS, "--eval-root", "evaldata", "--baseline", "--dry-run", cwd=data)
    assert proc.returncode == 0, proc.stderr
    out = data / "run"
    ours = {(flags(c)["output_dir"][0] if c[0] == "deepspeed" else flags(c)["out"][0]): c
            for c in commands(proc.stdout) if c[0] in ("deepspeed", "tuna-eval") and c[1] != "compare"}
    # what train_command reads from a finished CLIP stage
    (out / "clip").mkdir(parents=True)
    (out / "clip" / "train.json").write_text(json.dumps({"architecture": ARCH}))
    for suffix in (".json", ".safetensors"):
        (out / "clip" / f"{ARCH}{suffix}").write_text("")
    config, paths = QuickstartConfig(out=str(out)), Paths(out)
    for name in ("baseline", "tuna"):
        for stage in (1, 2):
            theirs = train_command(config, paths, name, stage)
            mine = ours[str(paths.model(name, stage))]
            theirs, mine = (c[c.index("--module"):] for c in (theirs, mine))  # launcher path and port differ
            theirs, mine = normalised(flags(theirs)), normalised(flags(mine))
            for key in ("data_path", "image_folder"):
                theirs.pop(key), mine.pop(key)
            for key in ("rename_p", "rename_names", "rename_pool"):  # world-only: renaming into made-up names
                theirs.pop(key, None)
            assert mine == theirs, (name, stage)
        eval_flags = ["--no-tags"] if name == "baseline" else [
            "--retrieval-cache", str(out / "tags_eval.parquet"), "--datastore", str(paths.datastore),
            "--min-tag-support", str(config.eval_min_tag_support)]
        theirs, _ = eval_command(config, paths.model(name, 2), data / "evaldata", ["custom_open", "custom_yesno"],
                                 out / "eval" / name, eval_flags)
        assert ours[str(out / "eval" / name)][1:] == theirs[1:], name


def test_given_clip_and_llm_skip_their_training(data):
    llm = data / "my-llm"
    llm.mkdir()
    (llm / "config.json").write_text("{}")
    proc = run_script(*INPUTS, "--clip-model", "ViT-B-32", "--clip-pretrained", "laion2b_s34b_b79k", "--llm", "my-llm",
                      "--template", "vicuna_v1", "--dry-run", cwd=data)
    assert proc.returncode == 0, proc.stderr
    cmds = commands(proc.stdout)
    assert not any("train-clip" in c or "pipeline.text_pretrain" in c for c in cmds)
    assert "== clip: given (ViT-B-32, laion2b_s34b_b79k)" in proc.stdout and f"== llm: given ({llm})" in proc.stdout
    build = flags(next(c for c in cmds if "build" in c))
    assert build["model"] == ["ViT-B-32"] and build["pretrained"] == ["laion2b_s34b_b79k"]
    stage1, stage2 = (flags(c) for c in cmds if c[0] == "deepspeed")
    assert stage1["clip_model"] == ["ViT-B-32"] and stage2["model_name_or_path"] == [str(llm)]
    assert stage2["data_path"] == [str(data / "instruct.json")]  # the LLM folder has no text_replay.json
    assert stage2["template"] == ["vicuna_v1"] and not any(c[0] == "tuna-eval" for c in cmds)  # no --eval-root


def test_resume_skips_finished_stages_and_refuses_other_settings(data):
    out = data / "run"
    (out / "stages").mkdir(parents=True)
    (out / "clip").mkdir()
    (out / "clip" / "train.json").write_text("{}")
    (out / "stages" / "clip.done").write_text("42\n")
    (out / "stages" / "datastore.done").write_text("7\n")  # its output (manifest.json) is gone: redone
    proc = run_script(*INPUTS, "--dry-run", cwd=data)
    assert proc.returncode == 0, proc.stderr
    assert "== clip: done in an earlier run (42 s), skipped" in proc.stdout
    assert "== datastore: tuna-datastore build" in proc.stdout
    assert not any("train-clip" in c for c in commands(proc.stdout))
    (out / "settings.txt").write_text("STEPS=5\n")
    proc = run_script(*INPUTS, "--dry-run", cwd=data)
    assert proc.returncode != 0 and "holds a run with other settings" in proc.stderr


def test_inputs_from_environment_variables(data):
    by_flags = run_script(*INPUTS, "--steps", "7", "--dry-run", cwd=data)
    env = {"CORPUS": INPUTS[1], "PRETRAIN": "pretrain.json", "INSTRUCT": "instruct.json", "IMAGES": "images",
           "OUT": "run", "STEPS": "7", "DRY_RUN": "1", "MASTER_PORT": "29500"}
    by_env = subprocess.run(["bash", str(SCRIPT)], check=False, cwd=data, capture_output=True, text=True, timeout=60,
                            env={**{k: v for k, v in os.environ.items() if k not in SCRIPT_VARIABLES}, **env})
    assert by_flags.returncode == by_env.returncode == 0, by_env.stderr

    def without_port(cmds: list[list[str]]) -> list[list[str]]:  # a free port is drawn per training command
        return [c[:c.index("--master_port")] + c[c.index("--master_port") + 2:] if "--master_port" in c else c
                for c in cmds]
    assert without_port(commands(by_env.stdout)) == without_port(commands(by_flags.stdout))
    assert "--max_steps 7" in by_env.stdout
