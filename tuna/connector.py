"""Connector (projector) registry mapping vision features into the LLM hidden size, LLaVA-compatible.

Names (see :func:`list_connectors`):

* ``"identity"`` -- ``nn.Identity``; requires ``in_dim == out_dim``; no parameters.
* ``"linear"`` -- a single ``nn.Linear(in_dim, out_dim)``.
* ``"mlp{N}x_gelu"`` for any N >= 1 -- ``nn.Sequential(Linear(in, out), GELU, Linear(out, out), GELU, ...)``
  with N linear layers; the linear layers sit at the even indices 0, 2, ..., 2(N-1).

Key mapping for LLaVA checkpoints (``mm_projector.bin`` or a full state dict's projector slice):
everything up to and including the last ``"mm_projector."`` in a key is stripped, and the rest must be
exactly a key of the connector's own ``state_dict()``:

====================================  ===================  ===================
LLaVA key                             mlp2x_gelu key       linear key
====================================  ===================  ===================
``model.mm_projector.0.weight``       ``0.weight``         --
``model.mm_projector.0.bias``         ``0.bias``           --
``model.mm_projector.2.weight``       ``2.weight``         --
``model.mm_projector.2.bias``         ``2.bias``           --
``model.mm_projector.weight``         --                   ``weight``
``model.mm_projector.bias``           --                   ``bias``
====================================  ===================  ===================

Other prefixes (``base_model.model.model.mm_projector.`` from PEFT, ``mm_projector.``) map the same
way; keys without ``mm_projector.`` are taken as already stripped. Loading is strict: missing,
unexpected or wrongly shaped keys raise ``ValueError``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

_MLP_PATTERN = re.compile(r"^mlp(\d+)x_gelu$")
_MLP_TEMPLATE = "mlp{N}x_gelu"
_PREFIX_MARKER = "mm_projector."


def _identity(in_dim: int, out_dim: int) -> nn.Module:
    if in_dim != out_dim:
        raise ValueError(f"connector 'identity' needs in_dim == out_dim, got in_dim={in_dim} out_dim={out_dim}")
    return nn.Identity()


def _linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


_FIXED: dict[str, Callable[[int, int], nn.Module]] = {"identity": _identity, "linear": _linear}


def _mlp_gelu(depth: int, in_dim: int, out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


def list_connectors() -> list[str]:
    """Valid connector names; ``"mlp{N}x_gelu"`` is a template meaning any N >= 1 (e.g. ``mlp2x_gelu``).

    Returns:
        The fixed names followed by the name templates.
    """
    return sorted(_FIXED) + [_MLP_TEMPLATE]


def build_connector(name: str, in_dim: int, out_dim: int) -> nn.Module:
    """Build the connector called ``name`` mapping ``(..., in_dim)`` features to ``(..., out_dim)``.

    Args:
        name: ``"identity"``, ``"linear"`` or ``"mlp{N}x_gelu"`` with N >= 1.
        in_dim: vision feature size.
        out_dim: LLM hidden size.

    Returns:
        The module, laid out like LLaVA's ``mm_projector`` (see the module docstring).

    Raises:
        ValueError: unknown name, non-positive dims, or identity with ``in_dim != out_dim``.
    """
    for field, value in (("in_dim", in_dim), ("out_dim", out_dim)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{field} must be a positive int, got {value!r}")
    if name in _FIXED:
        return _FIXED[name](in_dim, out_dim)
    match = _MLP_PATTERN.match(name)
    if match and int(match.group(1)) >= 1:
        return _mlp_gelu(int(match.group(1)), in_dim, out_dim)
    raise ValueError(f"unknown connector {name!r}; valid names: {list_connectors()} (N >= 1)")


def _strip_prefix(key: str) -> str:
    cut = key.rfind(_PREFIX_MARKER)
    return key if cut < 0 else key[cut + len(_PREFIX_MARKER) :]


def _strip_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    stripped: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        short = _strip_prefix(key)
        if short in stripped:
            raise ValueError(f"keys {origin[short]!r} and {key!r} both map to connector key {short!r}")
        stripped[short], origin[short] = value, key
    return stripped


def load_llava_projector(connector: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load a LLaVA ``mm_projector`` state dict into ``connector`` in place (strict).

    Args:
        connector: a module from :func:`build_connector`.
        state_dict: LLaVA projector weights; prefixes ending in ``mm_projector.`` are stripped.

    Raises:
        ValueError: keys missing or unexpected (both sets and the expected keys are named), a shape
            mismatch (key, expected and got shapes), a non-tensor value, or two keys colliding after
            prefix stripping.
    """
    if not isinstance(state_dict, dict):
        raise ValueError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    stripped = _strip_state_dict(state_dict)
    expected = {k: tuple(v.shape) for k, v in connector.state_dict().items()}
    missing = sorted(set(expected) - set(stripped))
    unexpected = sorted(set(stripped) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"projector state dict does not match the connector: missing keys {missing}, "
            f"unexpected keys {unexpected}; expected keys {sorted(expected)}, got keys {sorted(stripped)} "
            f"(after stripping prefixes ending in {_PREFIX_MARKER!r})"
        )
    bad = []
    for key, shape in sorted(expected.items()):
        value = stripped[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"projector key {key!r} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != shape:
            bad.append(f"{key!r}: expected {list(shape)}, got {list(value.shape)}")
    if bad:
        raise ValueError("projector shape mismatch: " + "; ".join(bad))
    with torch.no_grad():
        connector.load_state_dict(stripped, strict=True)  # copies (and casts) into the existing params
    logger.info("loaded %d projector tensors into %s", len(stripped), type(connector).__name__)


def load_llava_projector_file(connector: nn.Module, path: str | Path) -> None:
    """Load ``mm_projector.bin`` / ``.pt`` (torch, ``weights_only``) or ``.safetensors`` into ``connector``.

    Args:
        connector: a module from :func:`build_connector`.
        path: the checkpoint file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unsupported suffix, a file that is not a tensor dict, or any
            :func:`load_llava_projector` error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projector checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(str(path), device="cpu")
    elif suffix in (".bin", ".pt", ".pth"):
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    else:
        allowed = ".bin, .pt, .pth, .safetensors"
        raise ValueError(f"unsupported projector file suffix {suffix!r} for {path}; allowed: {allowed}")
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected a dict of tensors")
    load_llava_projector(connector, state_dict)
