"""Frozen CLIP vision tower: LLaVA-style patch features, the global image embedding, tag text embeddings.

The CLIP model comes from :func:`datastore.clip.load_clip` (the one loader in tuna), so the tower
has the same identity rules as the datastore: architecture + pretrained tag, local checkpoint, or
local config JSON, and an identity hash that must match the datastore's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from datastore.clip import LoadedClip


@dataclass
class VisionOutput:
    """Per image: ``patches`` (B, P, Dv) from ``feature_layer`` without CLS; ``image_embeds`` (B, D), L2-normalised."""

    patches: torch.Tensor
    image_embeds: torch.Tensor


class VisionTower(nn.Module):
    """A frozen open_clip model; stays in eval mode and never receives gradients.

    Args:
        clip: the loaded CLIP (see datastore.clip.load_clip).
        feature_layer: block whose output gives the patch features (LLaVA-1.5: -2, the penultimate
            block; CLS and other prefix tokens are dropped). Convolutional towers (open_clip's
            ModifiedResNet, timm convnets) only give NCHW feature maps: their H×W positions become the
            tokens, row-major (ModifiedResNet blocks are stem, layer1..4: -2 is layer3, stride 16).
    """

    def __init__(self, clip: LoadedClip, feature_layer: int = -2) -> None:
        super().__init__()
        self.clip = clip
        self.model = clip.model.requires_grad_(False).eval()
        self.feature_layer = feature_layer
        self._tag_cache: dict[str, torch.Tensor] = {}
        zeros = torch.zeros(1, 3, *clip.identity["image_size"])
        self.token_format = self._probe_token_format(zeros)  # "NLC" (transformers) or "NCHW" (convnets)
        probe = self.forward(zeros)
        self.num_patches, self.hidden_size = probe.patches.shape[1:]  # P, Dv
        self.embed_dim = probe.image_embeds.shape[-1]  # D

    def train(self, mode: bool = True) -> "VisionTower":
        return super().train(False)  # frozen: dropout/batch-norm behaviour never changes

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> VisionOutput:
        """pixels (B, 3, H, W), preprocessed with ``self.clip.preprocess``."""
        param = next(self.model.parameters())
        pixels = pixels.to(param.device, param.dtype)
        visual = self.model.visual
        if self.token_format == "NLC":
            out = visual.forward_intermediates(pixels, indices=[self.feature_layer], output_fmt="NLC",
                                               intermediates_only=False)
            patches, features = out["image_intermediates"][0], out["image_features"]  # (B, P, Dv), (B, D)
        else:  # the global embedding comes from a full forward: open_clip 3.3's ModifiedResNet
            # .forward_intermediates pools the last *requested* block instead of layer4
            out = visual.forward_intermediates(pixels, indices=[self.feature_layer], output_fmt="NCHW",
                                               intermediates_only=True)
            patches = out["image_intermediates"][0].flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
            features = visual(pixels)
        embeds = nn.functional.normalize(features.float(), dim=-1)  # (B, D)
        return VisionOutput(patches=patches, image_embeds=embeds)

    @torch.no_grad()
    def _probe_token_format(self, pixels: torch.Tensor) -> str:
        """"NLC" when the tower yields token sequences at ``feature_layer``, "NCHW" for feature maps."""
        param = next(self.model.parameters())
        try:
            out = self.model.visual.forward_intermediates(
                pixels.to(param.device, param.dtype), indices=[self.feature_layer], output_fmt="NLC",
                intermediates_only=True)
        except (AssertionError, ValueError, NotImplementedError):  # convnets accept only NCHW
            return "NCHW"
        return "NLC" if out["image_intermediates"][0].ndim == 3 else "NCHW"

    @torch.no_grad()
    def embed_tags(self, tags: list[str]) -> torch.Tensor:
        """CLIP text embeddings (N, D), L2-normalised, of tag strings (cached per tag)."""
        missing = [t for t in dict.fromkeys(tags) if t not in self._tag_cache]
        if missing:  # on the tower's current device (the model may have been moved since loading)
            tokens = self.clip.tokenizer(missing).to(next(self.model.parameters()).device)
            embeds = self.model.encode_text(tokens, normalize=True).float().cpu()
            self._tag_cache.update(zip(missing, embeds))
        if not tags:
            return torch.zeros(0, self.embed_dim)
        return torch.stack([self._tag_cache[t] for t in tags])
