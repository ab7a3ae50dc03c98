"""Resume after a kill during checkpoint saving: the newest *complete* checkpoint is used, the half-written one skipped."""

from __future__ import annotations

import json
import shutil

from tests.train.conftest import common_args, launch, step_losses
from train.train import last_complete_checkpoint
from train.trainer import CHECKPOINT_COMPLETE


def _checkpoint(out, step, complete=True, marker=True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if marker:
            (path / CHECKPOINT_COMPLETE).write_text(json.dumps({"global_step": step}))
    return path


def test_newest_complete_checkpoint_is_chosen_and_incomplete_ones_named(tmp_path):
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 8, complete=False)  # killed while saving: weights, no trainer state, no marker
    _checkpoint(tmp_path, 12, marker=False)  # trainer_state.json written, a rank's part (and the marker) not yet
    (tmp_path / "checkpoint-16").write_text("not a folder")
    chosen, incomplete = last_complete_checkpoint(tmp_path)
    assert chosen == str(tmp_path / "checkpoint-4")
    assert incomplete == [str(tmp_path / "checkpoint-12"), str(tmp_path / "checkpoint-8")]


def test_checkpoints_without_markers_fall_back_to_the_trainer_state(tmp_path):
    """Runs saved before the marker existed: a checkpoint with trainer_state.json (written last) counts."""
    _checkpoint(tmp_path, 3, marker=False)
    _checkpoint(tmp_path, 6, complete=False)
    assert last_complete_checkpoint(tmp_path) == (str(tmp_path / "checkpoint-3"), [str(tmp_path / "checkpoint-6")])


def test_no_complete_checkpoint_or_no_folder(tmp_path):
    assert last_complete_checkpoint(tmp_path / "nowhere") == (None, [])
    assert last_complete_checkpoint(tmp_path) == (None, [])
    _checkpoint(tmp_path, 2, complete=False)
    assert last_complete_checkpoint(tmp_path) == (None, [str(tmp_path / "checkpoint-2")])


def test_resume_skips_a_half_written_checkpoint(world, tmp_path):
    out = tmp_path / "out"
    run = launch(common_args(world, out, stop_after_steps=3), deepspeed_config=None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "checkpoint-3" / CHECKPOINT_COMPLETE).is_file()
    # a kill while checkpoint-6 was being written: the weights are there, the trainer state is not
    half = out / "checkpoint-6"
    half.mkdir()
    shutil.copy(out / "checkpoint-3" / "model.safetensors", half / "model.safetensors")
    run = launch(common_args(world, out, resume=True), deepspeed_config=None)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-3'}" in run.stderr
    assert f"skipped incomplete checkpoint(s) {half}" in run.stderr
    assert sorted(step_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-6" / CHECKPOINT_COMPLETE).is_file() and (out / "checkpoint-6" / "trainer_state.json").is_file()
