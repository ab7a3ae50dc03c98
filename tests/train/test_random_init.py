"""--llm_random_init: the LLM is built from its config alone, in the training dtype, on the device asked for."""

from __future__ import annotations

import torch

from pipeline.tiny import tiny_llm_config
from train.arguments import ModelArguments
from train.train import random_init_llm


def test_llm_built_from_config_alone(tmp_path):
    tiny_llm_config(100, "llama", 64, 2, 4, 2).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no weights to load
    margs = ModelArguments(model_name_or_path=str(tmp_path), llm_random_init=True)
    llm = random_init_llm(margs, torch.bfloat16)
    assert llm.config.model_type == "llama" and llm.config.num_hidden_layers == 2
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}
    assert float(llm.model.layers[0].mlp.up_proj.weight.detach().float().std()) > 0  # initialised, not zeros
    on_meta = random_init_llm(margs, torch.float32, torch.device("meta"))  # stands in for the GPU
    assert {p.device.type for p in on_meta.parameters()} == {"meta"}
