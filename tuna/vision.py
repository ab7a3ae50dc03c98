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
        feature_layer: transformer block whose output gives the patch features (LLaVA-1.5: -2, the
            penultimate block; CLS and other prefix tokens are dropped).
    """

    def __init__(self, clip: LoadedClip, feature_layer: int = -2) -> None:
        super().__init__()
        self.clip = clip
        self.model = clip.model.requires_grad_(False).eval()
        self.feature_layer = feature_layer
        self._tag_cache: dict[str, torch.Tensor] = {}
        probe = self.forward(torch.zeros(1, 3, *clip.identity["image_size"]))
        self.num_patches, self.hidden_size = probe.patches.shape[1:]  # P, Dv
        self.embed_dim = probe.image_embeds.shape[-1]  # D

    def train(self, mode: bool = True) -> "VisionTower":
        return super().train(False)  # frozen: dropout/batch-norm behaviour never changes

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> VisionOutput:
        """pixels (B, 3, H, W), preprocessed with ``self.clip.preprocess``."""
        param = next(self.model.parameters())
        out = self.model.visual.forward_intermediates(
            pixels.to(param.device, param.dtype), indices=[self.feature_layer], output_fmt="NLC",
            intermediates_only=False)
        patches = out["image_intermediates"][0]  # (B, P, Dv)
        embeds = nn.functional.normalize(out["image_features"].float(), dim=-1)  # (B, D)
        return VisionOutput(patches=patches, image_embeds=embeds)

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
