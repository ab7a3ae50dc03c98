"""Issue 27 item 12: every benchmark's questions and images are checked before the model loads; a bad one
is a one-line error, or skipped and counted with --on-bad-sample skip; results.json keeps finished
benchmarks when a later one fails."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

import eval.runner as runner
from eval.cli import main
from eval.runner import EvalConfig, evaluate
from eval.validate import prepare_benchmarks
from tests.eval.test_missing_fields import _synth_open
from tests.eval.test_runner import model_dir  # noqa: F401  (fixture)


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def root(tmp_path):
    """synth_open with q0 fine, q1's image missing, q2's image 12000x12000 (a 17 KB PNG)."""
    root = tmp_path / "root"
    _synth_open(root)
    (root / "images/a.png").write_bytes(_png((8, 8)))
    (root / "images/huge.png").write_bytes(_png((12000, 12000), "1"))
    path = root / "eval/open/questions.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[1]["image"], rows[2]["image"] = "gone.png", "huge.png"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_bad_questions_stop_the_run_before_the_model_loads(root, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match=r"^synth_open: question 'q1': image '.*gone.png' not found \(--on-bad"):
        prepare_benchmarks(["synth_open"], str(root))

    def no_model(config):
        raise AssertionError("the model was loaded before the questions were checked")

    monkeypatch.setattr(runner, "load_model", no_model)
    code = main(["--model", "unused", "--bench", "synth_open", "--data-root", str(root), "--no-tags",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("tuna-eval: error: synth_open: question 'q1': image")


def test_skip_policy_drops_and_counts_each_reason(root):
    [item] = prepare_benchmarks(["synth_open"], str(root), on_bad_sample="skip")
    assert [s["question_id"] for s in item.samples] == ["q0"]
    report = item.skip_report()
    assert report["n"] == 2 and report["reasons"] == {"missing_image": 1, "oversized_image": 1}
    assert report["examples"][1].startswith("q2: image") and "12000x12000, over the 64,000,000-pixel cap" in \
        report["examples"][1]


def test_skipped_questions_are_recorded_in_results(root, model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "o"
    code = main(["--model", str(model_dir), "--bench", "synth_open", "--data-root", str(root), "--no-tags",
                 "--out", str(out), "--on-bad-sample", "skip"])
    results = json.loads((out / "results.json").read_text())
    entry = results["benchmarks"]["synth_open"]
    assert code == 0 and results["complete"] is True
    assert entry["n"] == 1 and entry["skipped"]["reasons"] == {"missing_image": 1, "oversized_image": 1}


def test_a_failing_benchmark_keeps_the_finished_ones(world, model_dir, tmp_path, monkeypatch):  # noqa: F811
    original = runner.answer_batch

    def fails_on_pope(model, tokenizer, processor, bench, *args, **kw):
        if bench.name == "synth_pope":
            raise RuntimeError("simulated failure in the second benchmark")
        return original(model, tokenizer, processor, bench, *args, **kw)

    monkeypatch.setattr(runner, "answer_batch", fails_on_pope)
    out = tmp_path / "o"
    config = EvalConfig(model=str(model_dir), benches=["synth_open", "synth_pope"], data_root=str(world["data_root"]),
                        out=str(out), no_tags=True, limit=4)
    with pytest.raises(RuntimeError, match="simulated failure"):
        evaluate(config)
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and list(results["benchmarks"]) == ["synth_open"]
    assert results["benchmarks"]["synth_open"]["n"] == 4
