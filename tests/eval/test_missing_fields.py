"""One-line errors naming the file, line and question for a question without a field the runner reads, and
naming the folder for a model folder without config.json (issue 27, item 10)."""

from __future__ import annotations

import json
import shutil

import pytest

from eval.benchmarks import BENCHMARKS, read_jsonl
from eval.cli import main
from tests.eval.test_bench_llava_choice import _mme, _seed
from tests.eval.test_bench_llava_vqa import _gqa, _pope, _textvqa
from tests.eval.test_runner import model_dir  # noqa: F401  (fixture)


def _llava_wild(root):
    folder = root / "llava-bench-in-the-wild"
    (folder / "images").mkdir(parents=True)
    (folder / "questions.jsonl").write_text(json.dumps({"question_id": 0, "image": "001.jpg", "text": "What?"}) + "\n")
    (folder / "answers_gpt4.jsonl").write_text(json.dumps({"question_id": 0, "text": "A cat."}) + "\n")
    (folder / "context.jsonl").write_text(json.dumps({"image": "001.jpg", "caption": "a cat"}) + "\n")


def _mmvet(root):
    folder = root / "mm-vet"
    (folder / "images").mkdir(parents=True)
    (folder / "llava-mm-vet.jsonl").write_text(json.dumps({"question_id": "v1", "image": "v1.jpg", "text": "Q?"}) + "\n")
    (folder / "mm-vet.json").write_text(json.dumps({"v1": {"answer": "a", "capability": ["rec"]}}))


def _synth_open(root):
    (root / "images").mkdir(parents=True)
    (root / "eval/open").mkdir(parents=True)
    (root / "eval/open/questions.jsonl").write_text(
        "".join(json.dumps({"question_id": f"q{i}", "image": "a.png", "text": "What is it?"}) + "\n" for i in range(3)))
    (root / "eval/open/answers.jsonl").write_text(
        "".join(json.dumps({"question_id": f"q{i}", "answers": ["kelbo"]}) + "\n" for i in range(3)))


LAYOUTS = {"synth_open": _synth_open, "pope": _pope, "gqa": _gqa, "textvqa": _textvqa, "mme": _mme,
           "seed": _seed, "llava_wild": _llava_wild, "mmvet": _mmvet}


def _drop_field(path, line, field):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    del rows[line - 1][field]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows[line - 1].get("question_id")


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("field", ["image", "text"])
def test_a_question_without_a_field_names_the_file_line_and_question(name, field, tmp_path):
    LAYOUTS[name](tmp_path)
    bench = BENCHMARKS[name]
    files = bench.resolve(tmp_path)
    line = 1 if name in ("llava_wild", "mmvet") else 2
    qid = _drop_field(files["questions"], line, field)
    with pytest.raises(ValueError) as info:
        bench.load(files)
    message = str(info.value)
    assert message == f"{files['questions']}:{line}: question {qid!r} lacks field {field!r}"


def test_a_question_without_an_id_or_not_an_object(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"image": "a.png", "text": "Q?"}) + "\n" + "[1, 2]\n")
    with pytest.raises(ValueError, match=rf"^{path}:1: lacks field 'question_id'$"):
        read_jsonl(path, required=("question_id", "image", "text"))
    with pytest.raises(ValueError, match=rf"^{path}:2: expected a JSON object, got list$"):
        read_jsonl(path)


def test_cli_question_without_image_is_a_one_line_error(world, model_dir, tmp_path, capsys):  # noqa: F811
    root = tmp_path / "root"
    _synth_open(root)
    _drop_field(root / "eval/open/questions.jsonl", 3, "image")
    code = main(["--model", str(model_dir), "--bench", "synth_open", "--data-root", str(root), "--no-tags",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == (f"tuna-eval: error: {root / 'eval/open/questions.jsonl'}:3: "
                                     "question 'q2' lacks field 'image'")


def test_model_folder_without_config_json(world, model_dir, tmp_path, capsys):  # noqa: F811
    from tuna.modeling_tuna import TunaForCausalLM

    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError) as info:
        TunaForCausalLM.from_pretrained(broken)
    assert str(info.value).startswith(f"{broken}: no config.json") and "\n" not in str(info.value)
    code = main(["--model", str(broken), "--bench", "synth_open", "--data-root", str(world["data_root"]),
                 "--no-tags", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith(f"tuna-eval: error: {broken}: no config.json")
