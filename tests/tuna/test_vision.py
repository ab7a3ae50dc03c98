"""Vision tower: LLaVA-style patch features, normalised global embedding, frozen, cached tag embeddings."""

from __future__ import annotations

import torch

from datastore.clip import ClipSpec, load_clip
from tuna.vision import VisionTower


def test_patch_features_and_global_embedding():
    clip = load_clip(ClipSpec(model="tuna-tiny-clip"))
    tower = VisionTower(clip)
    pixels = torch.randn(3, 3, 64, 64)
    out = tower(pixels)
    assert out.patches.shape == (3, 16, 64)  # (64/16)^2 patches, CLS dropped, width 64
    assert tower.num_patches == 16 and tower.hidden_size == 64 and tower.embed_dim == 64
    torch.testing.assert_close(out.image_embeds, clip.encode_images(pixels), atol=1e-5, rtol=1e-5)
    last = VisionTower(clip, feature_layer=-1)(pixels).patches
    assert not torch.allclose(last, out.patches)  # the penultimate block differs from the last


def test_frozen_and_tag_cache():
    tower = VisionTower(load_clip(ClipSpec(model="tuna-tiny-clip")))
    tower.train()
    assert not tower.model.training
    assert all(not p.requires_grad for p in tower.parameters())
    emb = tower.embed_tags(["red blorp", "blorp", "red blorp"])
    assert emb.shape == (3, 64)
    torch.testing.assert_close(emb[0], emb[2])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    assert set(tower._tag_cache) == {"red blorp", "blorp"}
    assert tower.embed_tags([]).shape == (0, 64)
