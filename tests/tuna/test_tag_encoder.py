"""Tests for tuna.tag_encoder: the image-aware tag encoder, the adaptive weight tuner and the log-weight bias."""

from __future__ import annotations

import math

import pytest
import torch

from tuna.tag_encoder import (
    LOG_WEIGHT_FLOOR,
    AdaptiveWeightTuner,
    ImageAwareTagEncoder,
    TagEncoderConfig,
    log_weight_bias,
)

TEXT, VISION, P = 16, 24, 9


def encoder(nq: int = 2, layers: int = 2, seed: int = 0) -> ImageAwareTagEncoder:
    torch.manual_seed(seed)
    cfg = TagEncoderConfig(text_dim=TEXT, vision_dim=VISION, hidden_dim=32, num_heads=4, num_layers=layers,
                           num_queries_per_tag=nq)
    return ImageAwareTagEncoder(cfg).eval()


def inputs(b: int = 2, t: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, TEXT, generator=g), torch.randn(b, P, VISION, generator=g)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden_dim=30, num_heads=4), "hidden_dim=30"),
        (dict(num_layers=0), "num_layers"),
        (dict(num_queries_per_tag=0), "num_queries_per_tag"),
        (dict(text_dim=-1), "text_dim"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_config_validation(kwargs, field):
    base = dict(text_dim=TEXT, vision_dim=VISION)
    with pytest.raises(ValueError, match=field):
        TagEncoderConfig(**{**base, **kwargs})


# ---------------------------------------------------------------- encoder


@pytest.mark.parametrize("nq, layers", [(1, 1), (3, 2)])
def test_output_shape(nq, layers):
    tags, patches = inputs(b=3, t=5)
    out = encoder(nq, layers)(tags, patches, torch.ones(3, 5, dtype=torch.bool))
    assert out.shape == (3, 5, nq, VISION)
    assert torch.isfinite(out).all()


def test_padding_does_not_change_real_tags_and_is_finite():
    enc = encoder()
    tags, patches = inputs(b=2, t=3)
    alone = [enc(tags[i : i + 1, : n], patches[i : i + 1], torch.ones(1, n, dtype=torch.bool)) for i, n in
             enumerate((3, 1))]
    padded = torch.cat([tags, torch.zeros(2, 3, TEXT)], dim=1)  # T=6
    padded[1, 1:] = float("nan")  # garbage / NaN in padded slots must not leak
    padded[0, 4] = 1e6
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = enc(padded, patches, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :3], alone[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :1], alone[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))


def test_all_padded_sample_is_finite():
    tags, patches = inputs(b=2, t=3)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = encoder()(tags, patches, mask)
    assert torch.isfinite(out).all() and out[1].abs().sum() == 0 and out[0, :2].abs().sum() > 0


def test_gradients_reach_all_params():
    enc = encoder().train()
    tags, patches = inputs()
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    tags[0, 2:] = float("nan")  # NaN padding must not poison the weight gradients either
    enc(tags, patches, mask).pow(2).sum().backward()
    for name, param in enc.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


def test_output_depends_on_patches_and_tags():
    enc = encoder()
    tags, patches = inputs()
    mask = torch.ones(2, 4, dtype=torch.bool)
    base = enc(tags, patches, mask)
    new_patches = patches.clone()
    new_patches[0, 3] += 1.0  # one patch of image 0
    moved = enc(tags, new_patches, mask)
    assert (moved[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(moved[1], base[1])  # image 1 untouched
    new_tags = tags.clone()
    new_tags[1, 2] += 1.0  # one tag of sample 1
    moved = enc(new_tags, patches, mask)
    assert (moved[1, 2] - base[1, 2]).abs().max() > 1e-4
    torch.testing.assert_close(moved[1, [0, 1, 3]], base[1, [0, 1, 3]])  # tags are independent
    torch.testing.assert_close(moved[0], base[0])


def test_patch_positions_make_the_output_depend_on_where_patches_are():
    text, patches = inputs()
    mask = torch.ones(2, 4, dtype=torch.bool)
    flipped = patches.flip(1)  # the same patch features, in mirrored positions
    plain = encoder()
    with torch.no_grad():  # without positions, attention pooling cannot tell where a patch was
        assert torch.allclose(plain(text, patches, mask), plain(text, flipped, mask), atol=1e-5)
    torch.manual_seed(0)
    cfg = TagEncoderConfig(text_dim=TEXT, vision_dim=VISION, hidden_dim=32, num_heads=4, num_layers=2,
                           num_queries_per_tag=2, num_patches=P)
    positioned = ImageAwareTagEncoder(cfg).eval()
    assert positioned.patch_pos.shape == (P, 32)
    with torch.no_grad():
        assert not torch.allclose(positioned(text, patches, mask), positioned(text, flipped, mask), atol=1e-3)
    with pytest.raises(ValueError, match=f"has {P - 1} patches; this encoder's position embedding has {P}"):
        positioned(text, patches[:, 1:], mask)
    with pytest.raises(ValueError, match="num_patches"):
        TagEncoderConfig(text_dim=TEXT, vision_dim=VISION, num_patches=-1)


def test_queries_per_tag_differ():
    out = encoder(nq=3)(*inputs(), torch.ones(2, 4, dtype=torch.bool))
    assert (out[:, :, 0] - out[:, :, 1]).abs().max() > 1e-4


def test_encoder_input_validation():
    enc = encoder()
    tags, patches = inputs()
    with pytest.raises(ValueError, match="tag_mask must be bool"):
        enc(tags, patches, torch.ones(2, 4))
    with pytest.raises(ValueError, match="patch_feats must be"):
        enc(tags, patches[..., :5], torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------- weight tuner


def with_cosines(cosines: list[list[float]], d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image embeddings e0 and tag embeddings at the given cosines to them (scaled arbitrarily)."""
    c = torch.tensor(cosines)
    b, t = c.shape
    image = torch.zeros(b, d)
    image[:, 0] = 1.0
    tags = torch.zeros(b, t, d)
    tags[..., 0] = c
    tags[..., 1] = (1 - c**2).sqrt()
    return tags * 3.0, image * 0.5


COS = [[0.9, 0.1, 0.5, -0.3], [0.2, 0.7, 0.0, 0.0]]
MASK = torch.tensor([[True, True, True, True], [True, True, False, False]])


def test_weights_match_softmax_and_sum():
    tags, image = with_cosines(COS)
    tuner = AdaptiveWeightTuner()
    raw = tuner.tag_weights(tags, image, MASK, temperature=0.5, scaling="raw")
    expect0 = torch.softmax(torch.tensor(COS[0]) / 0.5, dim=0)
    expect1 = torch.softmax(torch.tensor(COS[1][:2]) / 0.5, dim=0)
    torch.testing.assert_close(raw[0], expect0)
    torch.testing.assert_close(raw[1, :2], expect1)
    assert raw[1, 2:].eq(0).all()
    torch.testing.assert_close(raw.sum(-1), torch.ones(2))
    count = tuner(tags, image, MASK, 0.5, "count")
    torch.testing.assert_close(count.sum(-1), torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(count, raw * torch.tensor([[4.0], [2.0]]))


def test_weights_follow_cosine_order():
    tags, image = with_cosines(COS)
    w = AdaptiveWeightTuner.tag_weights(tags, image, MASK, 0.1, "raw")
    assert w[0].argsort(descending=True).tolist() == [0, 2, 1, 3]
    assert w[1, 1] > w[1, 0]


def test_score_prior_adds_lambda_log_score_to_the_logits():
    tags, image = with_cosines(COS)
    scores = torch.tensor([[1.0, 8.0, 0.5, 2.0], [3.0, 1.0, 0.0, 0.0]])
    w = AdaptiveWeightTuner.tag_weights(tags, image, MASK, 0.5, "raw", scores, score_prior=0.8)
    logits0 = torch.tensor(COS[0]) / 0.5 + 0.8 * scores[0].log()
    torch.testing.assert_close(w[0], torch.softmax(logits0, 0))
    torch.testing.assert_close(w[1, :2], torch.softmax(torch.tensor(COS[1][:2]) / 0.5 + 0.8 * scores[1, :2].log(), 0))
    assert w[1, 2:].eq(0).all()
    assert w[0].argmax() == 1  # the best-supported tag now leads, though its cosine is the lowest but one
    plain = AdaptiveWeightTuner.tag_weights(tags, image, MASK, 0.5, "raw")
    torch.testing.assert_close(AdaptiveWeightTuner.tag_weights(tags, image, MASK, 0.5, "raw", scores), plain)  # λ = 0
    no_evidence = torch.zeros(2, 4)  # e.g. random tags: every tag the same prior, the cosine decides
    torch.testing.assert_close(AdaptiveWeightTuner.tag_weights(tags, image, MASK, 0.5, "raw", no_evidence, 2.0), plain)
    with pytest.raises(ValueError, match=r"tag_scores \(2, 3\) do not match the tags \(2, 4\)"):
        AdaptiveWeightTuner.tag_weights(tags, image, MASK, 0.5, "raw", scores[:, :3], 1.0)


def test_temperature_limits():
    tags, image = with_cosines(COS)
    cold = AdaptiveWeightTuner.tag_weights(tags, image, MASK, 1e-4, "raw")
    torch.testing.assert_close(cold, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    hot = AdaptiveWeightTuner.tag_weights(tags, image, MASK, 1e4, "count")
    torch.testing.assert_close(hot, MASK.float(), atol=1e-3, rtol=0)


def test_zero_tag_sample_and_nan_padding():
    tags, image = with_cosines(COS)
    tags[1] = float("nan")  # fully padded sample with garbage embeddings
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    for scaling in ("raw", "count"):
        w = AdaptiveWeightTuner.tag_weights(tags, image, mask, 0.07, scaling)
        assert torch.isfinite(w).all() and w[1].eq(0).all() and w[0, 2:].eq(0).all()
        assert w[0].sum().item() == pytest.approx(1.0 if scaling == "raw" else 2.0, abs=1e-6)


def test_uniform_weights():
    mask = torch.tensor([[True, True, True, False], [False] * 4, [True, False, False, False]])
    raw = AdaptiveWeightTuner.uniform_weights(mask, "raw")
    torch.testing.assert_close(raw, torch.tensor([[1 / 3] * 3 + [0.0], [0.0] * 4, [1.0, 0, 0, 0]]))
    torch.testing.assert_close(AdaptiveWeightTuner.uniform_weights(mask, "count"), mask.float())


def test_tuner_validation():
    tags, image = with_cosines(COS)
    with pytest.raises(ValueError, match=r"scaling must be one of \['raw', 'count'\], got 'sum'"):
        AdaptiveWeightTuner.tag_weights(tags, image, MASK, 0.1, "sum")
    with pytest.raises(ValueError, match="scaling must be one of"):
        AdaptiveWeightTuner.uniform_weights(MASK, "Raw")
    for temp in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature"):
            AdaptiveWeightTuner.tag_weights(tags, image, MASK, temp, "raw")
    with pytest.raises(ValueError, match="image_emb"):
        AdaptiveWeightTuner.tag_weights(tags, image[:, :4], MASK, 0.1, "raw")


# ---------------------------------------------------------------- log weight bias


def test_log_bias_uniform_is_zero_and_zeros_are_floored():
    mask = torch.tensor([[True, True, True, False], [False] * 4])
    count = AdaptiveWeightTuner.uniform_weights(mask, "count")
    bias = log_weight_bias(count, "count")
    assert torch.equal(bias[mask], torch.zeros(3))
    assert torch.equal(bias[~mask], torch.full((5,), LOG_WEIGHT_FLOOR))
    raw_bias = log_weight_bias(AdaptiveWeightTuner.uniform_weights(mask, "raw"), "raw", mask)
    torch.testing.assert_close(raw_bias, bias)


def test_log_bias_values_and_raw_count_agree():
    tags, image = with_cosines(COS)
    raw = AdaptiveWeightTuner.tag_weights(tags, image, MASK, 0.3, "raw")
    count = AdaptiveWeightTuner.tag_weights(tags, image, MASK, 0.3, "count")
    bias = log_weight_bias(count, "count")
    torch.testing.assert_close(bias[MASK], torch.log(count[MASK]))
    torch.testing.assert_close(log_weight_bias(raw, "raw", MASK), bias)
    with pytest.raises(ValueError, match="needs tag_mask"):
        log_weight_bias(raw, "raw")


def test_log_bias_gradient_finite_at_zero():
    w = torch.tensor([[0.0, 2.0, 1e-40]], requires_grad=True)
    bias = log_weight_bias(w, "count")
    assert bias[0, 0].item() == LOG_WEIGHT_FLOOR and bias[0, 2].item() == LOG_WEIGHT_FLOOR
    bias.sum().backward()
    assert torch.isfinite(w.grad).all() and w.grad[0, 1].item() == pytest.approx(0.5)
