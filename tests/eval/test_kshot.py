"""tuna-eval --shots: retrieved demonstrations before each question, a pass per shot count, the k-shot table."""

from __future__ import annotations

import json

import pytest

from eval.kshot import KShotSettings, kshot_table, summary_columns
from eval.runner import EvalConfig, evaluate
from tests.eval.test_runner import model_dir  # noqa: F401  (module fixture: a saved tiny TUNA model)


@pytest.fixture(scope="module")
def pool_dir(world, tmp_path_factory):
    from datastore.clip import ClipSpec
    from datastore.index import IndexConfig
    from icl.pool import PoolConfig, build_pool

    out = tmp_path_factory.mktemp("kshot") / "pool"
    build_pool(PoolConfig(format="synth", inputs=[str(world["data_root"])], out=str(out),
                          clip=ClipSpec(model="tuna-tiny-clip"), index=IndexConfig(n_eval_queries=10)), progress=False)
    return out


def kshot_config(world, model_dir, pool_dir, out, **kw):  # noqa: F811
    settings = {"pool": str(pool_dir), "retriever": "siir", **kw.pop("kshot", {})}
    return EvalConfig(model=str(model_dir), benches=["synth_open"], data_root=str(world["data_root"]), out=str(out),
                      datastore=kw.pop("datastore", str(world["datastore"])), limit=8, shots=kw.pop("shots", [0, 1, 2]),
                      kshot=KShotSettings(**settings), **kw)


def records(out, shots):
    folder = out / "synth_open" / (f"{shots}-shot" if shots else "")
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(world, model_dir, pool_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("kshot_eval") / "run"
    return evaluate(kshot_config(world, model_dir, pool_dir, out, batch_size=4)), out


def test_a_pass_per_shot_count_with_demos_in_the_records(run, pool_dir):
    from icl.pool import Pool

    results, out = run
    entry = results["kshot"]["synth_open"]
    assert set(map(int, entry["shots"])) == {0, 1, 2} and entry["retriever"] == "siir"
    assert entry["interpolation"] == pytest.approx((entry["shots"][1] + entry["shots"][2]) / 2)
    assert entry["extrapolation"] is None
    assert results["benchmarks"]["synth_open"] == entry["entries"][0]
    pool = Pool.open(pool_dir)
    zero, two = records(out, 0), records(out, 2)
    assert all("demos" not in r and r["prompt"].count("<image>") == 1 for r in zero)
    for r in two:
        assert r["shots"] == 2 and len(r["demos"]) == 2 and r["prompt"].count("<image>") == 3
        demo_images = {pool.examples[pool.position[d["id"]]].image for d in r["demos"]}
        assert r["question_id"] not in {d["id"] for d in r["demos"]}
        assert not any(image.endswith(r["image"]) for image in demo_images)  # never a demo on the query's image
        first_demo = pool.examples[pool.position[r["demos"][0]["id"]]]
        suffix = "\nAnswer the question using a single word or phrase."  # the benchmark's, as on the question
        assert f"{first_demo.question}{suffix} ASSISTANT: {first_demo.answers[0]}</s>" in r["prompt"]
        assert r["prompt"].count(suffix) == 3
    assert r["demos"][0]["score"] <= r["demos"][1]["score"]  # similar-last: the nearest next to the question
    table = (out / "results.md").read_text()
    assert "| 0-shot | 1-shot | 2-shot | interp. (1-2) | extrap. (3-8) |" in table


def test_kshot_answers_do_not_depend_on_the_batch(run, world, model_dir, pool_dir, tmp_path):  # noqa: F811
    _, out = run
    evaluate(kshot_config(world, model_dir, pool_dir, tmp_path / "b1", batch_size=1, shots=[2]))
    assert [r["prediction"] for r in records(tmp_path / "b1", 2)] == [r["prediction"] for r in records(out, 2)]
    assert [r["demos"] for r in records(tmp_path / "b1", 2)] == [r["demos"] for r in records(out, 2)]


def test_demo_tags_off_and_random_retriever(world, model_dir, pool_dir, tmp_path):  # noqa: F811
    results = evaluate(kshot_config(world, model_dir, pool_dir, tmp_path / "r", shots=[1],
                                    kshot={"retriever": "random", "demo_tags": False}))
    assert results["demo_pool"]["demo_tags"] is False and results["kshot"]["synth_open"]["retriever"] == "random"
    assert all(r["tags"] for r in records(tmp_path / "r", 1))  # the question's image keeps its tags


def test_settings_errors_and_summary():
    with pytest.raises(ValueError, match="needs --demo-pool"):
        EvalConfig(model="m", benches=["synth_open"], data_root="d", out="o", shots=[0, 4])
    with pytest.raises(ValueError, match="distinct shot counts"):
        EvalConfig(model="m", benches=["synth_open"], data_root="d", out="o", shots=[1, 1],
                   kshot=KShotSettings(pool="p"))
    assert summary_columns({0: 10.0, 1: 20.0, 2: 30.0, 4: 50.0, 8: 70.0}) == {"interpolation": 25.0,
                                                                               "extrapolation": 60.0}
    assert kshot_table([{"benchmarks": {}}], ["x"]) == ""


def test_cli_shots_and_compare(world, model_dir, pool_dir, tmp_path, capsys):  # noqa: F811
    from eval.cli import main

    out = tmp_path / "cli"
    code = main(["--model", str(model_dir), "--bench", "synth_open", "--data-root", str(world["data_root"]),
                 "--datastore", str(world["datastore"]), "--out", str(out), "--limit", "4", "--shots", "0,1",
                 "--demo-pool", str(pool_dir), "--retriever", "sttr", "--device", "cpu"])
    assert code == 0
    assert main(["compare", str(out)]) == 0
    assert "| cli (sttr) | synth_open (accuracy) |" in capsys.readouterr().out
    assert main(["--model", str(model_dir), "--bench", "synth_open", "--data-root", str(world["data_root"]),
                 "--no-tags", "--out", str(tmp_path / "x"), "--shots", "2", "--device", "cpu"]) == 1


def test_query_tags_come_from_the_retrieval_cache_by_the_image_field(world, model_dir, pool_dir, tmp_path):  # noqa: F811
    """The k-shot query image is looked up by the benchmark's ``image`` field, as in 0-shot and as the
    cache keys it (it was looked up by its full path: a cache miss, an error without a datastore)."""
    from datastore.cache import CacheConfig, build_cache
    from eval.benchmarks import get_benchmark

    files = get_benchmark("synth_open").resolve(world["data_root"])
    cache = tmp_path / "eval_cache.parquet"
    build_cache(CacheConfig(datastore=str(world["datastore"]), out=str(cache), llava_json=[str(files["questions"])],
                            image_folder=str(files["images"]), k_images=3, num_workers=0), show_progress=False)
    config = kshot_config(world, model_dir, pool_dir, tmp_path / "run", shots=[0, 1], datastore=None,
                          retrieval_cache=str(cache), kshot={"demo_tags": False})
    evaluate(config)
    zero, one = records(tmp_path / "run", 0), records(tmp_path / "run", 1)
    assert [r["question_id"] for r in zero] == [r["question_id"] for r in one]
    assert all(r["tags"] for r in zero)
    for a, b in zip(zero, one):
        assert [t["tag"] for t in a["tags"]] == [t["tag"] for t in b["tags"]]
        assert a["neighbours"] == b["neighbours"] and a["neighbours"]
