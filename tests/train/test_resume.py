"""Resume after a kill during checkpoint saving: the newest *complete* checkpoint is used, the half-written one skipped;
its files are checked against the sha256 recorded at save time before anything is loaded."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.train.conftest import common_args, launch, step_losses
from train.train import last_complete_checkpoint
from train.trainer import (
    CHECKPOINT_COMPLETE,
    CheckpointChanged,
    checkpoint_hashes,
    verify_checkpoint,
)


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
    assert f"checkpoint {out / 'checkpoint-3'}: every file matches the sha256 recorded when it was saved" in run.stderr
    assert sorted(step_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-6" / CHECKPOINT_COMPLETE).is_file() and (out / "checkpoint-6" / "trainer_state.json").is_file()


def test_verify_checkpoint_names_the_first_changed_missing_or_added_file(tmp_path):
    path = _checkpoint(tmp_path, 2, marker=False)
    (path / "global_step2").mkdir()
    (path / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"pickle")
    assert verify_checkpoint(path) is False  # no marker: nothing to check against
    (path / CHECKPOINT_COMPLETE).write_text(json.dumps({"global_step": 2}))
    assert verify_checkpoint(path) is False  # a marker from before hashes were recorded
    hashes = checkpoint_hashes(path)
    assert sorted(hashes) == ["global_step2/mp_rank_00_model_states.pt", "model.safetensors", "trainer_state.json"]
    (path / CHECKPOINT_COMPLETE).write_text(json.dumps({"global_step": 2, "sha256": hashes}))
    assert verify_checkpoint(path) is True
    pt = path / "global_step2" / "mp_rank_00_model_states.pt"
    pt.write_bytes(b"pickle!")
    with pytest.raises(CheckpointChanged, match=rf"^checkpoint {path}: {pt} changed since the checkpoint was saved"):
        verify_checkpoint(path)
    pt.write_bytes(b"pickle")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointChanged, match=rf"{path / 'model.safetensors'} is missing"):
        verify_checkpoint(path)
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "global_step2" / "zero_pp_rank_9_mp_rank_00_optim_states.pt").write_bytes(b"extra")
    with pytest.raises(CheckpointChanged, match=r"zero_pp_rank_9_mp_rank_00_optim_states.pt was not there"):
        verify_checkpoint(path)


def test_resume_refuses_a_tampered_deepspeed_checkpoint_before_loading_anything(world, tmp_path):
    """Issue 27 item 3: a checkpoint file changed after the save stops --resume with a one-line error naming it."""
    out = tmp_path / "out"
    run = launch(common_args(world, out, max_steps=2, save_steps=2, stop_after_steps=2))
    assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = out / "checkpoint-2"
    recorded = json.loads((checkpoint / CHECKPOINT_COMPLETE).read_text())["sha256"]
    assert {"trainer_state.json", "global_step2/mp_rank_00_model_states.pt",
            "global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "global_step2/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(recorded)
    assert checkpoint_hashes(checkpoint) == recorded
    tampered = checkpoint / "global_step2" / "mp_rank_00_model_states.pt"
    with tampered.open("ab") as f:
        f.write(b"\0")
    run = launch(common_args(world, out, max_steps=2, save_steps=2, resume=True))
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("train: error:")]
    expected = (f"train: error: checkpoint {checkpoint}: {tampered} changed since the checkpoint was saved "
                "(sha256 differs); refusing to resume (its .pt files are pickles that run code when loaded; "
                "--verify_checkpoint false skips this check)")
    assert errors and set(errors) == {expected}, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert "trainable parameters" not in run.stderr  # stopped before the model was built, let alone loaded
