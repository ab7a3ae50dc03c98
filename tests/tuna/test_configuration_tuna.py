"""TunaConfig: validation and save/load round trip with a nested LLM config."""

from __future__ import annotations

import pytest

from tuna.configuration_tuna import TunaConfig

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}


def test_round_trip(tmp_path):
    config = TunaConfig(text_config=LLAMA, clip={"model": "tuna-tiny-clip", "pretrained": None},
                        connector_type="mlp2x_gelu", max_tags=7, tag_temperature=0.05, ablation="uniform_weights",
                        tag_score_prior=0.7)
    config.save_pretrained(tmp_path)
    loaded = TunaConfig.from_pretrained(tmp_path)
    assert loaded.text_config.model_type == "llama" and loaded.text_config.hidden_size == 64
    assert loaded.clip == {"model": "tuna-tiny-clip", "pretrained": None}
    assert (loaded.max_tags, loaded.tag_temperature, loaded.ablation) == (7, 0.05, "uniform_weights")
    assert loaded.tag_score_prior == 0.7
    assert loaded.to_dict()["text_config"]["num_key_value_heads"] == 2


@pytest.mark.parametrize("field, value, message", [
    ("ablation", "nope", "ablation='nope': expected one of \\['none', 'no_tags'"),
    ("weight_scaling", "sum", "weight_scaling='sum': expected one of \\['raw', 'count'\\]"),
    ("weight_mode", "x", "weight_mode='x'"),
    ("tag_temperature", 0.0, "tag_temperature=0.0: must be > 0"),
    ("tag_score_prior", -0.5, "tag_score_prior=-0.5: must be a finite number >= 0"),
])
def test_invalid_values_raise(field, value, message):
    with pytest.raises(ValueError, match=message):
        TunaConfig(text_config=LLAMA, **{field: value})


def test_text_config_needs_model_type():
    with pytest.raises(ValueError, match="model_type"):
        TunaConfig(text_config={"hidden_size": 8})
