"""error_line: the one-line reason CLIs print, also for errors raised inside DataLoader worker processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.log import error_line

REPO = Path(__file__).resolve().parents[2]


class _FailsAtThird(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from (0, 1)
        raise ValueError("sample 'k7' in shard-000003.tar: caption is not UTF-8\n  (second line of the reason)")


def test_worker_exception_becomes_the_original_reason():
    loader = torch.utils.data.DataLoader(_FailsAtThird(), batch_size=None, num_workers=1)
    with pytest.raises(ValueError) as caught:
        list(loader)
    assert "Original Traceback" in str(caught.value)  # what torch re-raises: the worker's whole traceback
    assert error_line(caught.value) == ("sample 'k7' in shard-000003.tar: caption is not UTF-8 "
                                        "(second line of the reason)")


def test_other_messages_are_unchanged():
    assert error_line(ValueError("bad --k: 0")) == "bad --k: 0"
    assert error_line(KeyError("image")) == "'image'"
    assert error_line(RuntimeError()) == "RuntimeError"


def test_build_with_workers_prints_one_line_naming_the_shard(tmp_path):
    from tests.datastore.conftest import write_shards

    shards = write_shards(tmp_path / "in", n_shards=2, per_shard=4)
    junk = tmp_path / "in" / "shard-000002.tar"
    junk.write_bytes(b"not a tar archive, only some junk bytes")
    cmd = [sys.executable, "-m", "datastore.cli", "build", "--input", *shards, str(junk), "--out",
           str(tmp_path / "ds"), "--model", "tuna-tiny-clip", "--device", "cpu", "--batch-size", "4",
           "--num-workers", "2"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [f"tuna-datastore build: error: cannot read shard {junk}: ReadError: truncated header"], \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    verbose = subprocess.run([*cmd[:3], "-v", *cmd[3:]], cwd=REPO, capture_output=True, text=True)
    assert verbose.returncode == 1 and "Original Traceback" in verbose.stderr  # the traceback is behind -v
