"""tuna-eval end to end on the synthetic-world benchmarks: records, groups, batch invariance, ranks, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from eval.benchmarks import MissingBenchmarkFile, get_benchmark
from eval.cli import main
from eval.runner import EvalConfig, evaluate

BENCHES = ["synth_open", "synth_pope", "synth_mc"]


@pytest.fixture(scope="module")
def model_dir(world, tmp_path_factory):
    from transformers import AutoTokenizer

    from datastore.clip import ClipSpec
    from tuna.modeling_tuna import TunaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(world["llm"])
    model = TunaForCausalLM.from_components(str(world["llm"]), ClipSpec(model="tuna-tiny-clip"), tokenizer,
                                            tag_hidden_dim=32, tag_num_heads=2, max_tags=5)
    out = tmp_path_factory.mktemp("eval_model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def config(world, model_dir, out, **kw):
    return EvalConfig(model=str(model_dir), benches=BENCHES, data_root=str(world["data_root"]), out=str(out),
                      datastore=str(world["datastore"]), limit=12, **kw)


@pytest.fixture(scope="module")
def batched_run(world, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ev") / "b4"
    return evaluate(config(world, model_dir, out, batch_size=4)), out


@pytest.fixture(scope="module")
def batched(batched_run):
    return batched_run[0]


def predictions(out, bench):
    return [json.loads(line) for line in (out / bench / "predictions.jsonl").read_text().splitlines()]


def test_results_records_and_groups(batched_run, world):
    batched, run = batched_run
    assert set(batched["benchmarks"]) == set(BENCHES)
    pope = batched["benchmarks"]["synth_pope"]
    assert pope["main_metric"] == "f1" and set(pope["metrics"]) >= {"accuracy", "precision", "recall", "f1"}
    assert pope["groups"]["novelty"] and set(pope["groups"]["novelty"]) <= {"seen", "novel"}
    assert batched["model_config"]["ablation"] == "none" and batched["datastore"]["path"] == str(world["datastore"])
    records = predictions(run, "synth_open")
    assert len(records) == 12 and [r["index"] for r in records] == list(range(12))
    first = records[0]
    assert first["prompt"].count("<image>") == 1 and first["prompt"].endswith("ASSISTANT:")
    assert "Answer the question using a single word or phrase." in first["prompt"]
    assert first["tags"] and all(t["weight"] is not None for t in first["tags"])
    assert sum(t["weight"] for t in first["tags"]) == pytest.approx(len(first["tags"]), rel=1e-4)
    assert {"prediction", "score", "answers", "novelty"} <= set(first)
    assert "synth_open (accuracy)" in (run / "results.md").read_text()


def test_batch_size_one_gives_the_same_answers(batched_run, world, model_dir, tmp_path):
    batched, run = batched_run
    single = evaluate(config(world, model_dir, tmp_path / "b1", batch_size=1))
    for bench in BENCHES:
        assert single["benchmarks"][bench]["metrics"] == batched["benchmarks"][bench]["metrics"]
    for bench in BENCHES:
        assert [r["prediction"] for r in predictions(tmp_path / "b1", bench)] == \
               [r["prediction"] for r in predictions(run, bench)]


def test_two_processes_merge_to_the_single_process_result(batched, world, model_dir, tmp_path):
    from tests.train.conftest import free_port

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = tmp_path / "two"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "eval.cli",
           "--model", str(model_dir), "--bench", ",".join(BENCHES), "--data-root", str(world["data_root"]),
           "--datastore", str(world["datastore"]), "--limit", "12", "--batch-size", "4", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    merged = json.loads((out / "results.json").read_text())
    for bench in BENCHES:
        assert merged["benchmarks"][bench]["metrics"] == batched["benchmarks"][bench]["metrics"]
        assert not list((out / bench).glob("predictions.rank*.jsonl"))


def test_no_tags_baseline_and_compare(batched, world, model_dir, tmp_path, capsys):
    base = evaluate(EvalConfig(model=str(model_dir), benches=["synth_open"], data_root=str(world["data_root"]),
                               out=str(tmp_path / "base"), no_tags=True, limit=4))
    assert base["model_config"]["ablation"] == "no_tags"
    assert all(r["tags"] == [] for r in predictions(tmp_path / "base", "synth_open"))
    assert "Tags:" not in predictions(tmp_path / "base", "synth_open")[0]["prompt"]
    code = main(["compare", str(tmp_path / "base"), str(tmp_path / "base")])
    table = capsys.readouterr().out
    assert code == 0 and table.startswith("| benchmark | base | base |") and "synth_open novelty=" in table


def test_missing_files_and_bad_flags(world, model_dir, tmp_path, capsys):
    with pytest.raises(MissingBenchmarkFile, match=r"synth_open: questions file expected at .*eval/open/questions.jsonl"):
        get_benchmark("synth_open").resolve(tmp_path)
    code = main(["--model", str(model_dir), "--bench", "synth_open", "--data-root", str(tmp_path), "--no-tags",
                 "--out", str(tmp_path / "o")])
    assert code == 1 and "tuna-eval: error: synth_open: questions file expected at" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        EvalConfig(model="m", benches=["nope"], data_root=".", out=".")


def test_live_retrieval_is_one_datastore_call_per_batch(world, model_dir, tmp_path, monkeypatch):
    from datastore.store import Datastore
    from tuna.tag_source import TagSource

    n, b = 16, 8
    calls: list[int] = []  # images per retrieve_tags call
    original = Datastore.retrieve_tags

    def counting(self, images=None, **kw):
        calls.append(len(images))
        return original(self, images=images, **kw)

    monkeypatch.setattr(Datastore, "retrieve_tags", counting)
    bench = get_benchmark("synth_mc")
    images = [s["image"] for s in bench.load(bench.resolve(world["data_root"]))[:n]]

    def run(name):
        calls.clear()
        evaluate(EvalConfig(model=str(model_dir), benches=["synth_mc"], data_root=str(world["data_root"]),
                            out=str(tmp_path / name), datastore=str(world["datastore"]), limit=n, batch_size=b))
        return list(calls), predictions(tmp_path / name, "synth_mc")

    batched_calls, batched_records = run("batched")
    monkeypatch.setattr(TagSource, "prefetch", lambda self, ids, ims: 0)  # the one-by-one path
    single_calls, single_records = run("single")
    assert len(set(images)) > -(-n // b)  # the per-image path needs more calls than there are batches
    assert single_calls == [1] * len(set(images))
    new_per_batch = [len(set(images[k:k + b]) - set(images[:k])) for k in range(0, n, b)]
    assert batched_calls == [c for c in new_per_batch if c] and len(batched_calls) <= -(-n // b)
    assert batched_records == single_records


def test_unreadable_image_is_a_one_line_error(tmp_path):
    from eval.runner import _image_of

    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"^question 3: cannot read image '.*bad.jpg': "):
        _image_of({"question_id": 3, "image": "bad.jpg"}, tmp_path)


def test_min_tag_support_flag_filters_the_blocks_read(world, model_dir, tmp_path):
    from datastore.store import Datastore, filter_by_support

    code = main(["--model", str(model_dir), "--bench", "synth_open", "--data-root", str(world["data_root"]),
                 "--datastore", str(world["datastore"]), "--limit", "8", "--min-tag-support", "0.5",
                 "--out", str(tmp_path / "s")])
    assert code == 0
    assert json.loads((tmp_path / "s" / "results.json").read_text())["flags"]["min_tag_support"] == 0.5
    store = Datastore.open(world["datastore"])
    records = predictions(tmp_path / "s", "synth_open")
    full = store.retrieve_tags(images=[world["images"] / r["image"] for r in records], k_images=5)
    expected = [filter_by_support(f, 0.5).tags[:5] for f in full]
    assert [[t["tag"] for t in r["tags"]] for r in records] == expected
    assert any(e != f.tags[:5] for e, f in zip(expected, full))  # the filter removed something here


def test_questions_that_already_end_with_the_prompt_suffix_read_it_once(world, model_dir, tmp_path, caplog):
    """A synthetic-layout question file written with LLaVA-1.5's short-answer instruction already on its last
    line: the runner strips it before appending its own, says so, and records how many it stripped."""
    import shutil

    from common.prompts import SHORT_ANSWER

    root = tmp_path / "root"
    shutil.copytree(world["data_root"], root, symlinks=True)
    questions = root / "eval" / "open" / "questions.jsonl"
    rows = [json.loads(line) for line in questions.read_text().splitlines()]
    questions.write_text("".join(json.dumps({**r, "text": r["text"] + "\n" + SHORT_ANSWER}) + "\n" for r in rows))
    with caplog.at_level("WARNING", logger="eval.runner"):
        results = evaluate(EvalConfig(model=str(model_dir), benches=["synth_open"], data_root=str(root),
                                      out=str(tmp_path / "out"), datastore=str(world["datastore"]), limit=6))
    assert results["benchmarks"]["synth_open"]["prompt_suffix_stripped"] == 6
    assert "6 of 6 questions already end with the prompt suffix" in caplog.text
    assert all(r["prompt"].count(SHORT_ANSWER) == 1 for r in predictions(tmp_path / "out", "synth_open"))


def _cache_with_meta(src, dst, **changes):
    """A copy of retrieval cache ``src`` at ``dst`` whose metadata has ``changes``."""
    import pyarrow.parquet as pq

    from datastore.cache import CACHE_META_KEY

    table = pq.read_table(src)
    meta = {**json.loads(table.schema.metadata[CACHE_META_KEY]), **changes}
    pq.write_table(table.replace_schema_metadata({CACHE_META_KEY: json.dumps(meta)}), dst)
    return dst


def test_results_record_the_retrieval_cache(world, model_dir, tmp_path):
    from datastore.cache import RetrievalCache

    results = evaluate(EvalConfig(model=str(model_dir), benches=["synth_open"], data_root=str(world["data_root"]),
                                  out=str(tmp_path / "out"), retrieval_cache=str(world["cache"]),
                                  datastore=str(world["datastore"]), limit=4))
    recorded = json.loads((tmp_path / "out" / "results.json").read_text())["retrieval_cache"]
    manifest = json.loads((world["datastore"] / "manifest.json").read_text())
    assert recorded == results["retrieval_cache"] == RetrievalCache(world["cache"]).identity()
    assert recorded["path"] == str(world["cache"].resolve()) and recorded["rows"] == len(RetrievalCache(world["cache"]))
    assert recorded["clip"]["weights_sha256"] == results["clip_identity"]["weights_sha256"]
    assert recorded["datastore"] == str(world["datastore"].resolve())
    assert recorded["datastore_created"] == manifest["created"]
    base = evaluate(EvalConfig(model=str(model_dir), benches=["synth_open"], data_root=str(world["data_root"]),
                               out=str(tmp_path / "base"), no_tags=True, limit=2))
    assert base["retrieval_cache"] is None


def _error_line(stderr: str) -> str:
    """The one error line of a failed run (stderr also holds model-loading progress bars); it is complete: the
    line after it, if any, is not part of a traceback."""
    lines = [line for line in stderr.splitlines() if "tuna-eval: error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0][lines[0].index("tuna-eval: error:"):]


def test_a_cache_of_another_clip_or_datastore_is_a_one_line_error(world, model_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    from datastore.cache import CACHE_META_KEY

    meta = json.loads(pq.read_schema(world["cache"]).metadata[CACHE_META_KEY])
    other_clip = _cache_with_meta(world["cache"], tmp_path / "other_clip.parquet",
                                  clip={**meta["clip"], "weights_sha256": "0" * 64})
    other_build = _cache_with_meta(world["cache"], tmp_path / "other_build.parquet", datastore_rows=7)
    args = ["--model", str(model_dir), "--bench", "synth_open", "--data-root", str(world["data_root"]), "--limit", "2"]
    code = main(args + ["--retrieval-cache", str(other_clip), "--out", str(tmp_path / "a")])
    err = _error_line(capsys.readouterr().err)
    assert code == 1 and err.startswith(f"tuna-eval: error: retrieval cache {other_clip} was built with a different CLIP than the "
                          "model: expected tuna-tiny-clip")
    assert "weights 000000000000" in err and not (tmp_path / "a" / "results.json").exists()
    code = main(args + ["--retrieval-cache", str(other_build), "--datastore", str(world["datastore"]),
                        "--out", str(tmp_path / "b")])
    err = _error_line(capsys.readouterr().err)
    assert code == 1 and err.startswith(f"tuna-eval: error: retrieval cache {other_build} was built from another datastore than "
                          f"{world['datastore']}: from {world['datastore'].resolve()} with 7 images")
