"""The quickstart's CUDA settings, checked without a GPU: the device check and the training command."""

from __future__ import annotations

import pytest

from pipeline.processes import StageError
from pipeline.quickstart import QuickstartConfig, check_device


def test_cuda_needs_a_gpu_per_training_process(tmp_path):
    check_device(QuickstartConfig(out=str(tmp_path), device="cpu"), gpus=0)  # CPU runs need none
    check_device(QuickstartConfig(out=str(tmp_path), device="cuda", nproc=1), gpus=1)
    with pytest.raises(StageError, match="--nproc 2 with --device cuda: .* 1 are visible; use --nproc 1"):
        check_device(QuickstartConfig(out=str(tmp_path), device="cuda", nproc=2), gpus=1)
    with pytest.raises(StageError, match="no CUDA GPU is visible"):
        check_device(QuickstartConfig(out=str(tmp_path), device="cuda", nproc=1), gpus=0)


def test_cuda_training_command_runs_on_the_gpu(tmp_path, monkeypatch):
    from pipeline import quickstart
    from pipeline.runs import Paths

    monkeypatch.setattr(quickstart, "clip_args", lambda paths: {"model_config": "c.json", "pretrained": "c.pt"})
    for device, on_cpu in (("cpu", True), ("cuda", False)):
        config = QuickstartConfig(out=str(tmp_path / device), device=device, nproc=1)
        cmd = quickstart.train_command(config, Paths(config.root), "tuna", 1)
        assert ("--use_cpu" in cmd) == on_cpu
        assert cmd[cmd.index("--num_gpus") + 1] == "1"
