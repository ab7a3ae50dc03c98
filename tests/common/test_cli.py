"""Flags derived from a config dataclass (common.cli): names, types, defaults, help, bools, sequences."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from common.cli import add_config_flags, config_from_args, field_docs


@dataclass
class Example:
    """An example config.

    Attributes:
        inputs: shard patterns.
        steps: optimiser steps; batch_size: pairs per
            step, continued on the next line.
        lr, warmup: learning rate and warmup.
        cap: optional limit.
        swap: also do the swap.
        weights: one per task.
    """

    inputs: list[str] = field(default_factory=list)
    steps: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 2
    cap: int | None = None
    swap: bool = True
    weights: tuple[float, ...] = (1.0, 2.0)
    name: str = "x"


def parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_flags(p, Example, **kwargs)
    return p


def test_field_docs_split_shared_and_semicolon_entries():
    docs = field_docs(Example)
    assert docs["steps"] == "optimiser steps"
    assert docs["batch_size"] == "pairs per step, continued on the next line."
    assert docs["lr"] == docs["warmup"] == "learning rate and warmup."
    assert "name" not in docs


def test_defaults_round_trip_to_the_dataclass():
    assert config_from_args(Example, parser().parse_args([])) == Example()


def test_types_bools_sequences_and_renames():
    args = parser(names={"inputs": "input"}).parse_args(
        ["--input", "a.tar", "b.tar", "--steps", "7", "--batch-size", "3", "--lr", "0.5", "--cap", "9",
         "--no-swap", "--weights", "3", "4.5", "--name", "y"])
    config = config_from_args(Example, args)
    assert config == Example(inputs=["a.tar", "b.tar"], steps=7, batch_size=3, lr=0.5, cap=9, swap=False,
                             weights=(3.0, 4.5), name="y")
    assert isinstance(config.steps, int) and isinstance(config.lr, float)
    assert config_from_args(Example, parser().parse_args(["--weights", "25,20", "5"])).weights == (25.0, 20.0, 5.0)
    assert config_from_args(Example, parser().parse_args(["--inputs"])).inputs == []  # empty default: no value is fine


def test_bad_values_and_skipped_fields():
    with pytest.raises(SystemExit):
        parser().parse_args(["--steps", "many"])
    p = parser(skip=("weights",), required=("name",), helps={"steps": "how many"})
    with pytest.raises(SystemExit):
        p.parse_args([])
    assert not hasattr(p.parse_args(["--name", "z"]), "weights")
    assert "how many" in p.format_help() and "optimiser" not in p.format_help()


def test_unsupported_types_must_be_skipped():
    @dataclass
    class WithDict:
        extra: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="WithDict.extra"):
        add_config_flags(argparse.ArgumentParser(), WithDict)
    add_config_flags(argparse.ArgumentParser(), WithDict, skip=("extra",))
