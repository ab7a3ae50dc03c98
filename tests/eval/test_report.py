"""tuna-eval report: the data it collects (join across runs, marks, summary = results.json, thumbnails,
missing images, demonstrations, neighbours), escaping, and the CLI's errors. The browser side is in
test_report_browser.py; both use the run folders made here by the runner's own writer (score_records)."""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
from PIL import Image

from eval.benchmarks import get_benchmark
from eval.kshot import KShotSettings
from eval.report import ReportConfig, ReportError, build_report, collect, render_html
from eval.runner import EvalConfig, _neighbours, score_records

PLANTED = "What is this? <script>window.__pwned = 1</script></script><script>window.__pwned = 2</script>"
GOLD = {"q1": "kelbo", "q2": "zutag", "q3": "drerik", "q4": "kelbo"}
IMAGES = {"q1": "eval/a.jpg", "q2": "eval/a.jpg", "q3": "eval/b.jpg", "q4": "eval/missing.jpg"}  # q1, q2 share one
NOVELTY = {"q1": "seen", "q2": "novel", "q3": "novel", "q4": "seen"}
ANSWERS = {"baseline": {"q1": "kelbo", "q2": "tulbel", "q3": "tulbel", "q4": "kelbo"},
           "tuna": {"q1": "kelbo", "q2": "zutag", "q3": "drerik", "q4": "<img src=x onerror='window.__pwned=3'>"}}
NEIGHBOURS = {"eval/a.jpg": ["n0", "n1"], "eval/b.jpg": ["n1", "n2"], "eval/missing.jpg": ["n3"]}


def _jpeg(colour: tuple[int, int, int], size: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def _datastore(root: Path) -> Path:
    """A real (tiny CLIP) datastore of four images n0..n3."""
    import webdataset as wds

    from datastore.build import BuildConfig, build
    from datastore.clip import ClipSpec
    from datastore.index import IndexConfig
    from datastore.reader import ReaderConfig

    shard = root / "corpus-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(4):
            sink.write({"__key__": f"n{i}", "jpg": _jpeg((60 * i, 120, 200 - 40 * i)), "txt": f"a photo of a kelbo {i}"})
    build(BuildConfig(inputs=[str(shard)], out=str(root / "ds"), clip=ClipSpec(model="tuna-tiny-clip"),
                      reader=ReaderConfig(batch_size=8, num_workers=0), index=IndexConfig(n_eval_queries=2)),
          show_progress=False)
    return root / "ds"


def _pool(root: Path, data_root: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pool = root / "pool"
    pool.mkdir()
    ids = ["d0", "d1", "d2"]
    images = [str(data_root / "images" / "eval" / "c.jpg"), str(data_root / "images" / "eval" / "b.jpg"),
              str(data_root / "images" / "eval" / "c.jpg")]
    pq.write_table(pa.table({"id": ids, "image": images, "question": [f"demo question {i}?" for i in ids],
                             "task": ["vqa"] * 3, "label": ["kelbo"] * 3, "answers": [[f"answer {i}"] for i in ids]}),
                   pool / "examples.parquet")
    return pool


def _write_run(out: Path, data_root: Path, answers: dict[str, str], tags: bool, shots: int = 0,
               pool: Path | None = None) -> dict:
    """A run folder as tuna-eval writes it: score_records' per-sample file, results.json around its entry."""
    bench = get_benchmark("synth_open")
    records = []
    for i, qid in enumerate(GOLD):
        record = {"answers": [GOLD[qid]], "category": "identification", "novelty": NOVELTY[qid], "question_id": qid,
                  "image": IMAGES[qid], "text": PLANTED if qid == "q3" else f"What is object {qid}?", "index": i,
                  "prompt": "<image>\n...", "prediction": answers[qid],
                  "tags": [{"tag": "kelbo", "weight": 0.8}, {"tag": "<b>zutag</b>", "weight": 0.2}] if tags else [],
                  "neighbours": [{"id": k, "similarity": 0.9 - 0.1 * j}
                                 for j, k in enumerate(NEIGHBOURS[IMAGES[qid]])] if tags else []}
        if shots:
            record.update(shots=shots, demos=[{"id": "d2", "score": 0.5}, {"id": "d0", "score": 0.7}])
        records.append(record)
    folder = out / "synth_open" / (f"{shots}-shot" if shots else "")
    folder.mkdir(parents=True)
    entry = {**score_records(bench, records, folder, 0.1), "prompt_suffix_stripped": 0}
    config = EvalConfig(model="m", benches=["synth_open"], data_root=str(data_root), out=str(out), no_tags=not tags,
                        shots=[shots], kshot=KShotSettings(pool=str(pool)) if shots else None)
    results = {"model": "models/x", "flags": {k: v for k, v in asdict(config).items() if k != "extra"},
               "benchmarks": {"synth_open": entry}}
    if shots:
        results["demo_pool"] = {"path": str(pool)}
        results["kshot"] = {"synth_open": {"main_metric": "accuracy", "entries": {shots: entry}}}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


@pytest.fixture(scope="session")
def report_runs(tmp_path_factory) -> dict:
    """Run folders baseline / tuna / kshot over four questions, their data root and datastore."""
    root = tmp_path_factory.mktemp("report_runs")
    data_root = root / "world"
    (data_root / "images" / "eval").mkdir(parents=True)
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200)), ("c", (30, 200, 30))):
        (data_root / "images" / "eval" / f"{name}.jpg").write_bytes(_jpeg(colour, 160))
    pool = _pool(root, data_root)
    runs = {"baseline": _write_run(root / "baseline", data_root, ANSWERS["baseline"], tags=False),
            "tuna": _write_run(root / "tuna", data_root, ANSWERS["tuna"], tags=True),
            "kshot": _write_run(root / "kshot", data_root, ANSWERS["tuna"], tags=True, shots=2, pool=pool)}
    return {"root": root, "data_root": data_root, "datastore": _datastore(root), "results": runs}


def _config(report_runs, names=("baseline", "tuna"), **kw) -> ReportConfig:
    return ReportConfig(runs=[str(report_runs["root"] / n) for n in names], out=str(report_runs["root"] / "r.html"),
                        **kw)


@pytest.fixture(scope="module")
def collected(report_runs):
    return collect(_config(report_runs, datastore=str(report_runs["datastore"])), progress=False)[0]


def test_samples_join_runs_with_marks(collected):
    samples = {s["id"]: s for s in collected["samples"]}
    assert list(samples) == ["q1", "q2", "q3", "q4"]
    assert [c["label"] for c in collected["columns"]] == ["baseline", "tuna"]
    marks = {q: [a["mark"] for a in s["answers"]] for q, s in samples.items()}
    assert marks == {"q1": ["right", "right"], "q2": ["wrong", "right"], "q3": ["wrong", "right"],
                     "q4": ["right", "wrong"]}
    assert samples["q2"]["answers"][0]["prediction"] == "tulbel" and samples["q2"]["gold"] == "zutag"
    assert samples["q3"]["question"] == PLANTED and samples["q2"]["groups"] == ["novelty=novel"]
    assert samples["q1"]["answers"][0]["tags"] == [] and samples["q1"]["answers"][1]["tags"][0] == ["kelbo", 0.8]


def test_summary_equals_results_json(collected, report_runs):
    rows = {(r["bench"], r["group"]): r for r in collected["summary"]}
    for c, name in enumerate(("baseline", "tuna")):
        entry = report_runs["results"][name]["benchmarks"]["synth_open"]
        assert rows[("synth_open", None)]["values"][c] == entry["metrics"]["accuracy"]
        for value in ("seen", "novel"):
            assert rows[("synth_open", f"novelty={value}")]["values"][c] == entry["groups"]["novelty"][value]["accuracy"]
    assert rows[("synth_open", None)]["values"] == [50.0, 75.0]  # the planted answers: 2 of 4 and 3 of 4


def test_thumbnails_deduplicated_and_missing_counted(collected):
    samples = {s["id"]: s for s in collected["samples"]}
    assert samples["q1"]["image"] == samples["q2"]["image"] != samples["q3"]["image"]
    images = collected["images"]
    assert images[samples["q1"]["image"]].startswith("data:image/jpeg;base64,")
    assert images[samples["q4"]["image"]] is None and collected["missing_images"] == 1
    # neighbour n1 is retrieved for a.jpg and b.jpg: one thumbnail
    n1 = {n["image"] for s in samples.values() for n in s["answers"][1]["neighbours"] if n["id"] == "n1"}
    assert len(n1) == 1 and images[n1.pop()].startswith("data:image/jpeg")
    # 3 question images (one missing) + 4 neighbours, each once
    assert len(images) == 7
    thumb = Image.open(io.BytesIO(__import__("base64").b64decode(images[samples["q1"]["image"]].split(",", 1)[1])))
    assert max(thumb.size) == 112  # downscaled from 160


def test_neighbours_carry_caption_and_similarity(collected):
    q1 = next(s for s in collected["samples"] if s["id"] == "q1")
    assert [(n["id"], n["similarity"], n["caption"]) for n in q1["answers"][1]["neighbours"]] == [
        ("n0", 0.9, "a photo of a kelbo 0"), ("n1", 0.8, "a photo of a kelbo 1")]


def test_without_datastore_neighbours_by_key(report_runs):
    data = collect(_config(report_runs), progress=False)[0]
    q1 = next(s for s in data["samples"] if s["id"] == "q1")
    assert [n["id"] for n in q1["answers"][1]["neighbours"]] == ["n0", "n1"]
    assert "image" not in q1["answers"][1]["neighbours"][0] and len(data["images"]) == 3


def test_kshot_demonstrations_in_prompt_order(report_runs):
    data = collect(_config(report_runs, names=("kshot",)), progress=False)[0]
    assert data["columns"][0]["label"] == "kshot 2-shot" and data["columns"][0]["shots"] == 2
    demos = data["samples"][0]["answers"][0]["demos"]
    assert [(d["id"], d["question"], d["answer"]) for d in demos] == [("d2", "demo question d2?", "answer d2"),
                                                                       ("d0", "demo question d0?", "answer d0")]
    assert demos[0]["image"] == demos[1]["image"]  # d0 and d2 show the same file: one thumbnail
    assert data["images"][demos[0]["image"]].startswith("data:image/jpeg")
    assert data["summary"][0]["values"] == [report_runs["results"]["kshot"]["benchmarks"]["synth_open"]["metrics"]["accuracy"]]


def test_group_option_keeps_matching_samples(report_runs):
    data = collect(_config(report_runs, group="novelty=novel"), progress=False)[0]
    assert [s["id"] for s in data["samples"]] == ["q2", "q3"]
    with pytest.raises(ReportError, match="novelty = 'unknown'"):
        collect(_config(report_runs, group="novelty=unknown"), progress=False)


def test_html_escapes_data_and_json_blob(collected):
    page = render_html(collected)
    assert "window.__pwned" in page  # the data is there ...
    assert "<script>window.__pwned" not in page and "<img src=x" not in page and "<b>zutag" not in page
    # ... and no string of it closes the data tag: the only "</script>" are the template's own two
    assert page.count("</script>") == 2
    blob = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.DOTALL).group(1)
    data = json.loads(blob)
    assert next(s for s in data["samples"] if s["id"] == "q3")["question"] == PLANTED


def test_build_report_writes_one_file(report_runs, tmp_path):
    stats = build_report(_config(report_runs, datastore=str(report_runs["datastore"])), progress=False)
    assert (stats.samples, stats.columns, stats.images, stats.missing_images) == (4, 2, 7, 1)
    assert Path(stats.path).stat().st_size == stats.bytes > 0


def test_cli_one_line_errors(report_runs, tmp_path, capsys):
    from eval.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"tuna-eval report: error: {tmp_path / 'empty' / 'results.json'}: not found; is " \
                  f"{tmp_path / 'empty'} a tuna-eval --out folder?"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{}")
    assert main(["report", str(tmp_path / "bad"), "--out", str(tmp_path / "r.html")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    out = tmp_path / "ok.html"
    assert main(["report", str(report_runs["root"] / "tuna"), "--out", str(out), "--names", "T"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out


def test_cli_help(capsys):
    from eval.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["report", "--help"])
    assert exit_.value.code == 0
    assert "self-contained HTML" in capsys.readouterr().out


def test_runner_records_the_neighbours_the_tags_came_from():
    from datastore.store import RetrievedTags

    found = RetrievedTags(tags=["kelbo"], scores=[1.7], neighbours=["n0", "n1", "n2"],
                          neighbour_scores=[0.91234567, 0.8, float("-inf")])
    seen = []

    def source(image_id, image):
        seen.append(image_id)
        return found

    assert _neighbours(source, "eval/a.jpg", None) == [{"id": "n0", "similarity": 0.912346},
                                                       {"id": "n1", "similarity": 0.8}]
    assert seen == ["eval/a.jpg"] and _neighbours(None, "eval/a.jpg", None) == []
