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
