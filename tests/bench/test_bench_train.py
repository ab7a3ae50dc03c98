"""bench/bench_train.py without launching anything: FLOP model, plan, shapes and arguments (nothing big is allocated)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_train", None)


def test_step_flops_counts_frozen_parameters_without_weight_gradients(bench):
    shape = bench.FlopShape(llm_params=1000, llm_layers=2, llm_hidden=8, vit_params=50, vit_layers=1, vit_width=4,
                            vit_tokens=5, trainable_side_params=10)
    t = 100
    attention = 12 * 2 * 8 * t * t
    vit = 2 * 50 * 5 + 4 * 1 * 4 * 5 * 5
    side = 6 * 10 * 4
    assert bench.step_flops(shape, t, 3, llm_trainable=True) == 3 * (6 * 1000 * t + attention + vit + side)
    assert bench.step_flops(shape, t, 3, llm_trainable=False) == 3 * (4 * 1000 * t + attention + vit + side)


def test_llama_7b_shape_is_counted_on_the_meta_device(bench):
    cfg, _ = bench.parse_args(["--llm-shape", "llama-7b", "--device", "cuda", "--dtype", "bf16", "--clip",
                               "ViT-L-14-336", "--variants", "tuna", "--zero", "2,3", "--no-reference",
                               "--repeats", "1"])
    assert (cfg.llm_type, cfg.llm_hidden, cfg.llm_layers, cfg.kv_heads, cfg.intermediate) == ("llama", 4096, 32, 32,
                                                                                               11008)
    assert cfg.nproc == 1
    # Llama-2-7B without its 32k x 4096 input table (the bench's vocabulary is 1000 here)
    assert bench.llm_matmul_params(cfg) == pytest.approx(6.48e9, rel=0.01)
    params, layers, width, tokens = bench.vit_shape("ViT-L-14-336")
    assert (layers, width, tokens) == (24, 1024, 577) and params == pytest.approx(3.03e8, rel=0.01)
    assert bench.plan(cfg) == [("tuna", 2, "none", "llm"), ("tuna", 3, "none", "llm")]


def test_default_plan_and_mfu_peak(bench):
    cfg, _ = bench.parse_args([])
    assert cfg.device == "cpu" and cfg.nproc == 2 and cfg.stage == "finetune"
    assert [(v, z) for v, z, _, _ in bench.plan(cfg)] == [("tuna", 2), ("baseline", 2), ("baseline", 2), ("tuna", 2),
                                                          ("tuna", 3), ("reference", 2), ("reference", 3)]
    assert bench.peak_tflops(cfg) is None
    gpu, _ = bench.parse_args(["--device", "cuda", "--dtype", "bf16"])
    assert bench.peak_tflops(gpu, "NVIDIA H100 80GB HBM3") == 989.0
    assert bench.peak_tflops(gpu, "Some GPU") is None
    with pytest.raises(ValueError, match="CPU runs train in fp32"):
        bench.parse_args(["--dtype", "bf16"])
    with pytest.raises(ValueError, match="variants"):
        bench.parse_args(["--variants", "tuna,other"])


def test_train_argv_on_cuda_drops_use_cpu_and_sets_precision(bench, tmp_path):
    cfg, _ = bench.parse_args(["--device", "cuda", "--dtype", "bf16", "--stage", "pretrain"])
    world = {k: tmp_path / k for k in ("images", "data", "cache", "tokenizer", "llm", "ref_llm")}
    argv = bench.train_argv(world, cfg, tmp_path / "out", "none", "llm")
    args = dict(zip(argv[::2], argv[1::2]))
    assert "--use_cpu" not in args and args["--bf16"] == "true" and args["--clip_precision"] == "bf16"
    assert args["--stage"] == "pretrain" and args["--llm_random_init"] == "true"
    cpu, _ = bench.parse_args([])
    args = dict(zip(*[iter(bench.train_argv(world, cpu, tmp_path / "out", "none", "llm"))] * 2))
    assert args["--use_cpu"] == "true" and "--bf16" not in args
