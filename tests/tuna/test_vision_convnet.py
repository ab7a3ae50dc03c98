"""Vision tower on convolutional CLIPs (open_clip ModifiedResNet): NCHW feature maps become patch tokens."""

from __future__ import annotations

import torch

from datastore.clip import ClipSpec, load_clip
from tuna.vision import VisionTower


def test_resnet_feature_map_tokens_and_embedding():
    clip = load_clip(ClipSpec(model="tuna-quickstart-clip"))  # ModifiedResNet, width 8, 96 px
    tower = VisionTower(clip)
    assert tower.token_format == "NCHW"
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    out = tower(pixels)
    visual = clip.model.visual
    with torch.no_grad():  # layer3 (stride 16) by hand: 6x6 positions, 4 * 4 * width channels
        fmap = visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels))))
    assert fmap.shape == (2, 128, 6, 6)
    assert out.patches.shape == (2, 36, 128) and tower.num_patches == 36 and tower.hidden_size == 128
    torch.testing.assert_close(out.patches, fmap.flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(out.patches[:, 6 + 2], fmap[:, :, 1, 2])  # row-major: token r * W + c
    torch.testing.assert_close(out.image_embeds, clip.encode_images(pixels), atol=1e-6, rtol=1e-6)
    assert tower.embed_dim == 128
    last = VisionTower(clip, feature_layer=-1)(pixels).patches
    assert last.shape == (2, 9, 256)  # layer4: 3x3 positions


def test_vit_path_unchanged():
    clip = load_clip(ClipSpec(model="tuna-tiny-clip"))
    tower = VisionTower(clip)
    assert tower.token_format == "NLC"
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = clip.model.visual.forward_intermediates(pixels, indices=[-2], output_fmt="NLC", intermediates_only=False)
    out = tower(pixels)
    assert torch.equal(out.patches, ref["image_intermediates"][0])
    assert torch.equal(out.image_embeds, torch.nn.functional.normalize(ref["image_features"].float(), dim=-1))
