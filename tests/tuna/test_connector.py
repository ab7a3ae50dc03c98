"""Tests for tuna.connector: the registry, layer layout, and loading LLaVA mm_projector weights."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tuna.connector import build_connector, list_connectors, load_llava_projector, load_llava_projector_file

IN, OUT = 12, 20


def llava_mlp2x(seed: int = 0, prefix: str = "model.mm_projector.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"0.weight": (OUT, IN), "0.bias": (OUT,), "2.weight": (OUT, OUT), "2.bias": (OUT,)}
    return {prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}


def manual_mlp2x(sd: dict[str, torch.Tensor], x: torch.Tensor, prefix: str = "model.mm_projector.") -> torch.Tensor:
    h = x @ sd[prefix + "0.weight"].T + sd[prefix + "0.bias"]
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU
    return h @ sd[prefix + "2.weight"].T + sd[prefix + "2.bias"]


def test_list_connectors_names():
    assert list_connectors() == ["identity", "linear", "mlp{N}x_gelu"]


@pytest.mark.parametrize("depth", [1, 2, 3, 5])
def test_mlp_layout_and_shape(depth):
    conn = build_connector(f"mlp{depth}x_gelu", IN, OUT)
    assert isinstance(conn, nn.Sequential) and len(conn) == 2 * depth - 1
    for i, layer in enumerate(conn):
        if i % 2 == 0:
            assert isinstance(layer, nn.Linear)
            assert (layer.in_features, layer.out_features) == ((IN if i == 0 else OUT), OUT)
        else:
            assert isinstance(layer, nn.GELU)
    assert sorted(conn.state_dict()) == sorted(f"{2 * j}.{p}" for j in range(depth) for p in ("weight", "bias"))
    assert conn(torch.randn(2, 7, IN)).shape == (2, 7, OUT)


def test_linear_and_identity():
    lin = build_connector("linear", IN, OUT)
    assert isinstance(lin, nn.Linear) and sorted(lin.state_dict()) == ["bias", "weight"]
    assert lin(torch.randn(3, 5, IN)).shape == (3, 5, OUT)
    ident = build_connector("identity", IN, IN)
    x = torch.randn(2, 4, IN)
    assert torch.equal(ident(x), x) and not list(ident.parameters())
    with pytest.raises(ValueError, match=r"in_dim=12 out_dim=20"):
        build_connector("identity", IN, OUT)
    load_llava_projector(ident, {})  # nothing to load
    with pytest.raises(ValueError, match=r"unexpected keys \['weight'\]"):
        load_llava_projector(ident, {"model.mm_projector.weight": torch.zeros(IN, IN)})


@pytest.mark.parametrize("name", ["mlp0x_gelu", "mlp2x_relu", "mlpx_gelu", "Linear", ""])
def test_unknown_name_lists_valid(name):
    with pytest.raises(ValueError) as err:
        build_connector(name, IN, OUT)
    msg = str(err.value)
    assert repr(name) in msg
    for valid in ("identity", "linear", "mlp{N}x_gelu"):
        assert valid in msg


def test_bad_dims():
    with pytest.raises(ValueError, match="in_dim"):
        build_connector("linear", 0, OUT)


@pytest.mark.parametrize("prefix", ["model.mm_projector.", "base_model.model.model.mm_projector.", "mm_projector.", ""])
def test_load_llava_mlp2x_matches_manual(prefix):
    sd = llava_mlp2x(prefix=prefix)
    conn = build_connector("mlp2x_gelu", IN, OUT)
    load_llava_projector(conn, sd)
    x = torch.randn(4, IN)
    torch.testing.assert_close(conn(x), manual_mlp2x(sd, x, prefix))


def test_load_llava_linear_and_casts_half():
    sd = {"model.mm_projector.weight": torch.randn(OUT, IN).half(), "model.mm_projector.bias": torch.randn(OUT).half()}
    conn = build_connector("linear", IN, OUT)
    load_llava_projector(conn, sd)
    assert conn.weight.dtype == torch.float32
    x = torch.randn(3, IN)
    torch.testing.assert_close(conn(x), x @ sd["model.mm_projector.weight"].float().T + sd["model.mm_projector.bias"].float())


def test_wrong_shape_names_key_and_shapes():
    sd = llava_mlp2x()
    sd["model.mm_projector.2.weight"] = torch.randn(OUT, OUT + 1)
    conn = build_connector("mlp2x_gelu", IN, OUT)
    before = conn.state_dict()["2.weight"].clone()
    with pytest.raises(ValueError, match=re.escape("'2.weight': expected [20, 20], got [20, 21]")):
        load_llava_projector(conn, sd)
    assert torch.equal(conn.state_dict()["2.weight"], before)  # nothing partially loaded


def test_missing_and_unexpected_keys_named():
    sd = llava_mlp2x()
    del sd["model.mm_projector.2.bias"]
    sd["model.mm_projector.4.weight"] = torch.zeros(OUT, OUT)
    with pytest.raises(ValueError) as err:
        load_llava_projector(build_connector("mlp2x_gelu", IN, OUT), sd)
    msg = str(err.value)
    assert "missing keys ['2.bias']" in msg and "unexpected keys ['4.weight']" in msg
    assert "expected keys ['0.bias', '0.weight', '2.bias', '2.weight']" in msg
    assert "got keys ['0.bias', '0.weight', '2.weight', '4.weight']" in msg


def test_linear_checkpoint_into_mlp_fails():
    sd = {"model.mm_projector.weight": torch.randn(OUT, IN), "model.mm_projector.bias": torch.randn(OUT)}
    with pytest.raises(ValueError, match=r"missing keys \['0.bias', '0.weight', '2.bias', '2.weight'\]"):
        load_llava_projector(build_connector("mlp2x_gelu", IN, OUT), sd)


def test_colliding_prefixes_rejected():
    sd = {**llava_mlp2x(), **llava_mlp2x(prefix="mm_projector.")}
    with pytest.raises(ValueError, match="both map to connector key"):
        load_llava_projector(build_connector("mlp2x_gelu", IN, OUT), sd)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_file_round_trip(tmp_path, suffix):
    sd = llava_mlp2x(seed=3)
    path = tmp_path / f"mm_projector{suffix}"
    if suffix == ".bin":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    conn = build_connector("mlp2x_gelu", IN, OUT)
    load_llava_projector_file(conn, path)
    for key, value in conn.state_dict().items():
        assert torch.equal(value, sd["model.mm_projector." + key])


def test_file_errors(tmp_path):
    conn = build_connector("linear", IN, OUT)
    with pytest.raises(FileNotFoundError):
        load_llava_projector_file(conn, tmp_path / "nope.bin")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unsupported projector file suffix '.npz'"):
        load_llava_projector_file(conn, tmp_path / "w.npz")
    torch.save([torch.zeros(1)], tmp_path / "list.bin")
    with pytest.raises(ValueError, match="holds a list"):
        load_llava_projector_file(conn, tmp_path / "list.bin")
