"""Load an open_clip model from a name + pretrained tag, a local checkpoint or a local config JSON.

This is the one place CLIP models are loaded in tuna (the datastore and the TUNA model share it).
A model's *identity* (architecture, weights source and a sha256 of its weights) is recorded in
every artefact built with it, so a datastore can refuse a query encoder that differs from the
encoder it was built with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.files import sha256_file

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
BUILTIN_CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass
class ClipSpec:
    """Which open_clip model to load.

    Attributes:
        model: open_clip architecture name ("ViT-B-32", "ViT-L-14-336", "local-dir:/path"); optional
            when ``model_config`` is given (the config file's stem is the name).
        pretrained: an open_clip pretrained tag ("laion2b_s34b_b79k", "openai") or a local checkpoint
            file (.pt / .bin / .safetensors). None = deterministic random init (seed 0), for tests.
        model_config: a local open_clip model-config JSON for custom architectures.
        device: torch device for inference.
        precision: "fp32", "fp16" or "bf16".
    """

    model: str | None = None
    pretrained: str | None = None
    model_config: str | None = None
    device: str = "cpu"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: expected one of {PRECISIONS}")
        if self.model_config is not None:
            self.model_config = os.path.abspath(self.model_config)
            stem = Path(self.model_config).stem
            if not Path(self.model_config).is_file():
                raise ValueError(f"model_config {self.model_config!r} is not a file")
            if self.model not in (None, stem):
                raise ValueError(
                    f"model={self.model!r} but model_config {self.model_config!r} registers "
                    f"architecture {stem!r}; give one of them or make them agree"
                )
            self.model = stem
        if not self.model:
            raise ValueError("a CLIP model is needed: give an open_clip architecture name or a model_config JSON")
        if self.pretrained and _looks_like_path(self.pretrained) and os.path.isfile(self.pretrained):
            # manifests store the spec: a relative checkpoint path would break them from any other folder
            self.pretrained = os.path.abspath(self.pretrained)

    def to_dict(self) -> dict[str, Any]:
        """Portable description (no device/precision) stored in manifests."""
        return {"model": self.model, "pretrained": self.pretrained, "model_config": self.model_config}


@dataclass
class LoadedClip:
    """An open_clip model ready for inference, with its preprocessing, tokenizer and identity."""

    model: Any
    preprocess: Callable
    tokenizer: Callable
    spec: ClipSpec
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.identity["embed_dim"])

    def encode_images(self, pixels):  # (B, 3, H, W) -> (B, D) float32, L2-normalised
        import torch

        with torch.inference_mode():
            pixels = pixels.to(self.spec.device, dtype=next(self.model.parameters()).dtype)
            return self.model.encode_image(pixels, normalize=True).float()

    def encode_texts(self, texts: list[str]):  # -> (B, D) float32, L2-normalised
        import torch

        with torch.inference_mode():
            tokens = self.tokenizer(texts).to(self.spec.device)
            return self.model.encode_text(tokens, normalize=True).float()


def weights_sha256(model) -> str:
    """sha256 over parameter/buffer names, dtypes, shapes and bytes, in state-dict order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def register_model_config(path: str | Path) -> str:
    """Register an open_clip model-config JSON under its file stem; returns the architecture name.

    Raises:
        ValueError: another, different config is already registered under that name (open_clip's
            registry is process-global, so silently replacing it would change other models).
    """
    import open_clip

    name = Path(path).stem
    config = json.loads(Path(path).read_text())
    existing = open_clip.get_model_config(name)
    if existing is None:
        open_clip.add_model_config(path)
    elif existing != config:
        raise ValueError(f"model_config {str(path)!r} defines architecture {name!r}, but a different config "
                         f"is already registered under that name; rename the file")
    return name


def register_builtin_configs() -> None:
    """Make tuna's bundled architectures (e.g. ``tuna-tiny-clip``) known to open_clip."""
    for path in sorted(BUILTIN_CONFIG_DIR.glob("*.json")):
        register_model_config(path)


def load_clip(spec: ClipSpec) -> LoadedClip:
    """Build the model in ``spec`` with open_clip, in eval mode with gradients off.

    Returns:
        LoadedClip whose ``identity`` holds model name, pretrained source, config and checkpoint
        hashes, the weights' sha256 and the embedding dimension.

    Raises:
        ValueError: unknown architecture (the message lists where names come from) or a
            checkpoint file that does not exist.
    """
    import open_clip
    import torch

    register_builtin_configs()
    if spec.model_config is not None:
        register_model_config(spec.model_config)
    if spec.model not in open_clip.list_models() and not spec.model.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(
            f"unknown open_clip architecture {spec.model!r}: use a name from open_clip.list_models() "
            "(e.g. ViT-B-32), 'local-dir:PATH', or pass --model-config with a JSON config"
        )
    checkpoint = _local_checkpoint(spec.pretrained)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random init (tests) must be reproducible: its hash is its identity
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model,
            pretrained=spec.pretrained,
            pretrained_text=spec.pretrained is not None,
            weights_only=True,
        )
    model.eval().requires_grad_(False)
    identity = _identity(spec, model, checkpoint)
    model = model.to(device=spec.device, dtype=_torch_dtype(spec.precision))
    tokenizer = open_clip.get_tokenizer(spec.model)
    logger.info("loaded CLIP %s (pretrained=%s, dim %d)", spec.model, spec.pretrained, identity["embed_dim"])
    return LoadedClip(model=model, preprocess=preprocess, tokenizer=tokenizer, spec=spec, identity=identity)


def _looks_like_path(pretrained: str) -> bool:
    """A checkpoint file rather than an open_clip pretrained tag ("openai", "laion2b_s34b_b79k")."""
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def _local_checkpoint(pretrained: str | None) -> str | None:
    if pretrained is None:
        return None
    if _looks_like_path(pretrained) and not os.path.isfile(pretrained):
        raise ValueError(f"pretrained checkpoint file {pretrained!r} does not exist")
    return pretrained if os.path.isfile(pretrained) else None


def _identity(spec: ClipSpec, model, checkpoint: str | None) -> dict[str, Any]:
    embed_dim = _embed_dim(model)
    return {
        "model": spec.model,
        "pretrained": spec.pretrained,
        "model_config_sha256": sha256_file(spec.model_config) if spec.model_config else None,
        "checkpoint_sha256": sha256_file(checkpoint) if checkpoint else None,
        "weights_sha256": weights_sha256(model),
        "embed_dim": embed_dim,
        "image_size": list(_image_size(model)),
    }


def _embed_dim(model) -> int:
    import torch

    size = _image_size(model)
    with torch.inference_mode():
        return int(model.encode_image(torch.zeros(1, 3, *size)).shape[-1])


def _image_size(model) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def _torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def same_clip(identity_a: dict[str, Any], identity_b: dict[str, Any]) -> bool:
    """Two identities denote the same encoder when architecture and weights agree."""
    return identity_a["model"] == identity_b["model"] and identity_a["weights_sha256"] == identity_b["weights_sha256"]


def describe_mismatch(expected: dict[str, Any], got: dict[str, Any]) -> str:
    """One line naming the two encoders, for mismatch errors."""
    def short(identity: dict[str, Any]) -> str:
        return f"{identity['model']} (pretrained={identity['pretrained']}, weights {identity['weights_sha256'][:12]})"

    return f"expected {short(expected)}, got {short(got)}"


def save_checkpoint(loaded: LoadedClip, path: str) -> str:
    """Save the model's state dict as an open_clip-loadable ``.safetensors`` (or torch) checkpoint."""
    state = {k: v.detach().cpu().float().contiguous() for k, v in loaded.model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        import torch

        torch.save(state, path)
    return path


def spec_from_dict(data: dict[str, Any], **overrides: Any) -> ClipSpec:
    """Rebuild a ClipSpec from a manifest's ``clip`` entry (plus device/precision overrides)."""
    fields = {f.name for f in dataclasses.fields(ClipSpec)}
    return ClipSpec(**{k: v for k, v in {**data, **overrides}.items() if k in fields})

