"""tuna-datastore / tuna-synth command lines: help, query output, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from datastore.cli import main
from tests.datastore.conftest import sample_jpeg

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("module", ["datastore.cli", "datastore.synth.cli"])
def test_help_explains_itself(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage:" in result.stdout and len(result.stdout) > 300


def test_build_help_lists_encoder_options(capsys):
    with pytest.raises(SystemExit):
        main(["build", "--help"])
    out = capsys.readouterr().out
    for flag in ("--pretrained", "--model-config", "--max-index-memory", "--index-factory", "--image-key"):
        assert flag in out


def test_query_prints_neighbours_and_tags(built, tmp_path, capsys):
    root, _ = built
    image = tmp_path / "q.jpg"
    image.write_bytes(sample_jpeg(37))
    assert main(["query", "--datastore", str(root), "--image", str(image), "-k", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "neighbour 1: s000037" in out and "tags: " in out and "zinnet" in out


def test_errors_are_one_line_with_nonzero_exit(tmp_path, capsys):
    assert main(["query", "--datastore", str(tmp_path), "--image", "x.jpg"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuna-datastore query: error:") and "no manifest.json" in err and "\n" not in err
    assert main(["build", "--input", str(tmp_path / "missing-{0..1}.tar"), "--out", str(tmp_path / "o"),
                 "--model", "tuna-tiny-clip"]) == 1
    assert "input shard not found" in capsys.readouterr().err


def test_info_prints_counts_index_and_timings(built, capsys):
    root, _ = built
    assert main(["info", "--datastore", str(root)]) == 0
    out = capsys.readouterr().out
    assert "120 images written of 120 read (skipped: none); 4 parts; dim 64" in out
    assert "index Flat" in out and "recall@10 vs exact 1.0000" in out and "encode" in out


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A 2-part datastore (2 × 8 samples) that tests may damage: each test gets a fresh copy."""
    from datastore.build import build
    from tests.datastore.conftest import build_config, write_shards

    root = tmp_path_factory.mktemp("small")
    build(build_config(write_shards(root / "in", n_shards=2, per_shard=8), root / "ds"), show_progress=False)
    return root / "ds"


def _copy(store, tmp_path):
    import shutil

    return Path(shutil.copytree(store, tmp_path / "ds"))


def test_truncated_embeddings_are_named_by_info_query_and_merge(small_store, tmp_path, capsys):
    from datastore.merge import MergeError, merge

    root = _copy(small_store, tmp_path)
    assert main(["info", "--datastore", str(root), "--verify"]) == 0
    assert "verify: 6 files match the manifest's sizes and sha256" in capsys.readouterr().out
    emb = root / "img_emb" / "img_emb_000001.npy"
    emb.write_bytes(emb.read_bytes()[:-128])
    for argv in (["info", "--datastore", str(root)], ["info", "--datastore", str(root), "--verify"],
                 ["query", "--datastore", str(root), "--image", "x.jpg", "--device", "cpu"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert "img_emb_000001.npy" in err and "recorded (truncated or replaced)" in err and "\n" not in err
    with pytest.raises(MergeError, match=r"img_emb_000001\.npy: .*recorded.*delete parts/part_000001\.json"):
        merge(root)


def test_info_verify_checks_checksums(small_store, tmp_path, capsys):
    root = _copy(small_store, tmp_path)
    meta = root / "metadata" / "metadata_000000.parquet"
    data = bytearray(meta.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum notices
    meta.write_bytes(bytes(data))
    assert main(["info", "--datastore", str(root), "--verify"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuna-datastore info: error: verify: 1 damaged file(s):")
    assert "metadata_000000.parquet: sha256 differs" in err and "\n" not in err


@pytest.mark.parametrize("text,problem", [
    ("[]", "expected a JSON object, got a list"),
    ('{"format_version": 1, "clip": {}}', "missing 'created', 'dim', 'counts', 'parts', 'index'"),
    ('{"format_version": 1, "parts": ', "not valid JSON"),
])
def test_bad_manifest_is_a_one_line_error_naming_the_file(tmp_path, capsys, text, problem):
    (tmp_path / "manifest.json").write_text(text)
    for argv in (["info", "--datastore", str(tmp_path)], ["info", "--datastore", str(tmp_path), "--verify"],
                 ["query", "--datastore", str(tmp_path), "--image", "x.jpg", "--device", "cpu"]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert f"{tmp_path / 'manifest.json'}: {problem}" in err and "\n" not in err


@pytest.mark.parametrize("name,text,problem", [
    ("build.json", "[]", "build.json: expected a JSON object, got a list"),
    ("build.json", '{"clip": {}}', "build.json: missing 'parser', 'reader', 'shards'"),
    ("parts/part_000000.json", "{", "part_000000.json: not valid JSON"),
])
def test_bad_build_record_is_a_one_line_merge_error(small_store, tmp_path, capsys, name, text, problem):
    root = _copy(small_store, tmp_path)
    (root / name).write_text(text)
    assert main(["merge", "--out", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert problem in err and str(root) in err and "\n" not in err
