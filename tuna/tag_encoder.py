"""Image-aware tag encoder (tag queries cross-attend to CLIP patches) and the adaptive tag weight tuner.

TUNA grounds each retrieved tag in the current image: the tag's CLIP text embedding becomes
``num_queries_per_tag`` queries that cross-attend over the image's patch features Z_v. The result is
projected back to the vision width so it goes through the same connector as the patches:
``H_vt = connector(CrossAttn(Q_t, Z_v, Z_v))``.

The adaptive weight tuner scores each tag by the cosine between its CLIP text embedding and the global
image embedding, softmaxed over the sample's real tags.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

SCALINGS = ("raw", "count")
LOG_WEIGHT_FLOOR = -30.0  # log-bias given to zero weights: exp(-30) ~ 1e-13, finite in bf16/fp16


@dataclass
class TagEncoderConfig:
    """Sizes of the image-aware tag encoder."""

    text_dim: int
    vision_dim: int
    hidden_dim: int = 256
    num_heads: int = 4
    num_layers: int = 1
    num_queries_per_tag: int = 1
    dropout: float = 0.0
    num_patches: int = 0  # > 0: a learned position embedding per patch, added to the keys/values

    def __post_init__(self) -> None:
        for name in ("text_dim", "vision_dim", "hidden_dim", "num_heads", "num_layers", "num_queries_per_tag"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TagEncoderConfig.{name} must be an int >= 1, got {value!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"TagEncoderConfig.hidden_dim={self.hidden_dim} must be divisible by num_heads={self.num_heads}"
            )
        if isinstance(self.num_patches, bool) or not isinstance(self.num_patches, int) or self.num_patches < 0:
            raise ValueError(f"TagEncoderConfig.num_patches must be an int >= 0, got {self.num_patches!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TagEncoderConfig.dropout must be in [0, 1), got {self.dropout!r}")


class _CrossAttentionBlock(nn.Module):
    """Pre-LN block: x + CrossAttn(LN(x), LN(kv)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))
        self.resid_dropout = nn.Dropout(dropout)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)  # (B, H, N, d/H)

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        """x: (B, Q, dim) queries, kv: (B, P, dim) patches -> (B, Q, dim)."""
        q = self._heads(self.q_proj(self.norm_q(x)))  # (B, H, Q, d/H)
        k, v = self.kv_proj(self.norm_kv(kv)).chunk(2, dim=-1)  # 2 x (B, P, dim)
        p = self.dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, self._heads(k), self._heads(v), dropout_p=p)  # (B, H, Q, d/H)
        attn = attn.transpose(1, 2).reshape(x.shape)  # (B, Q, dim)
        x = x + self.resid_dropout(self.out_proj(attn))  # (B, Q, dim)
        return x + self.mlp(self.norm_mlp(x))  # (B, Q, dim)


class ImageAwareTagEncoder(nn.Module):
    """Encode each tag's CLIP text embedding into image-grounded features of the vision width.

    Tags never attend to each other (only to patches), so a tag's output depends only on its own
    embedding and its image; padding tags therefore cannot change real tags' outputs. Padded tags'
    inputs are replaced by zeros (so NaN/garbage padding cannot leak into outputs or weight gradients)
    and their outputs are exactly 0.
    """

    def __init__(self, config: TagEncoderConfig) -> None:
        super().__init__()
        self.config = config
        h, nq = config.hidden_dim, config.num_queries_per_tag
        self.text_proj = nn.Linear(config.text_dim, h * nq)
        self.query_offsets = nn.Parameter(torch.randn(nq, h) * 0.02)  # (nq, hidden) learned per-query offsets
        self.vision_proj = nn.Linear(config.vision_dim, h)
        # Where each patch is: convolutional towers' features carry no absolute position, so without it a
        # tag's output could say what it matched but not where (e.g. which object is on the left).
        self.patch_pos = nn.Parameter(torch.randn(config.num_patches, h) * 0.02) if config.num_patches else None
        self.blocks = nn.ModuleList(
            _CrossAttentionBlock(h, config.num_heads, config.dropout) for _ in range(config.num_layers)
        )
        self.norm_out = nn.LayerNorm(h)
        self.out_proj = nn.Linear(h, config.vision_dim)

    def forward(self, tag_text_emb: Tensor, patch_feats: Tensor, tag_mask: Tensor) -> Tensor:
        """Cross-attend tag queries over patches.

        Args:
            tag_text_emb: (B, T, text_dim) CLIP text embeddings of the tags.
            patch_feats: (B, P, vision_dim) patch features Z_v of the same images.
            tag_mask: (B, T) bool, True for real tags.

        Returns:
            (B, T, num_queries_per_tag, vision_dim); zeros at padded tags.

        Raises:
            ValueError: on shape or dtype mismatches.
        """
        self._check_inputs(tag_text_emb, patch_feats, tag_mask)
        b, t, _ = tag_text_emb.shape
        nq, h = self.config.num_queries_per_tag, self.config.hidden_dim
        mask = tag_mask[..., None]  # (B, T, 1)
        text = torch.where(mask, tag_text_emb, torch.zeros((), dtype=tag_text_emb.dtype))  # (B, T, text_dim)
        queries = self.text_proj(text).view(b, t, nq, h) + self.query_offsets  # (B, T, nq, hidden)
        x = queries.reshape(b, t * nq, h)  # (B, T*nq, hidden)
        kv = self.vision_proj(patch_feats)  # (B, P, hidden)
        if self.patch_pos is not None:
            kv = kv + self.patch_pos  # (B, P, hidden)
        for block in self.blocks:
            x = block(x, kv)  # (B, T*nq, hidden)
        out = self.out_proj(self.norm_out(x)).view(b, t, nq, self.config.vision_dim)  # (B, T, nq, vision_dim)
        return out.masked_fill(~mask[..., None], 0.0)  # (B, T, nq, vision_dim)

    def _check_inputs(self, tag_text_emb: Tensor, patch_feats: Tensor, tag_mask: Tensor) -> None:
        cfg = self.config
        if tag_text_emb.dim() != 3 or tag_text_emb.shape[-1] != cfg.text_dim:
            raise ValueError(f"tag_text_emb must be (B, T, {cfg.text_dim}), got {tuple(tag_text_emb.shape)}")
        if patch_feats.dim() != 3 or patch_feats.shape[-1] != cfg.vision_dim:
            raise ValueError(f"patch_feats must be (B, P, {cfg.vision_dim}), got {tuple(patch_feats.shape)}")
        if cfg.num_patches and patch_feats.dim() == 3 and patch_feats.shape[1] != cfg.num_patches:
            raise ValueError(f"patch_feats has {patch_feats.shape[1]} patches; this encoder's position "
                             f"embedding has {cfg.num_patches}")
        if patch_feats.shape[0] != tag_text_emb.shape[0] or patch_feats.shape[1] == 0:
            raise ValueError(
                f"patch_feats {tuple(patch_feats.shape)} must have batch {tag_text_emb.shape[0]} and >= 1 patch"
            )
        if tag_mask.dtype != torch.bool or tuple(tag_mask.shape) != tuple(tag_text_emb.shape[:2]):
            raise ValueError(
                f"tag_mask must be bool {tuple(tag_text_emb.shape[:2])}, got {tag_mask.dtype} {tuple(tag_mask.shape)}"
            )


def _check_scaling(scaling: str) -> None:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {list(SCALINGS)}, got {scaling!r}")


def _check_mask(tag_mask: Tensor) -> None:
    if tag_mask.dtype != torch.bool or tag_mask.dim() != 2:
        raise ValueError(f"tag_mask must be a (B, T) bool tensor, got {tag_mask.dtype} {tuple(tag_mask.shape)}")


def _count(tag_mask: Tensor) -> Tensor:
    return tag_mask.sum(dim=-1, keepdim=True).to(torch.float32)  # (B, 1) number of real tags


_MIN_SCORE = 1e-6  # scores at or below it (no evidence) share one prior


class AdaptiveWeightTuner(nn.Module):
    """Per-tag weights from tag/image CLIP similarity (parameter-free).

    ``"raw"`` weights sum to 1 over a sample's real tags; ``"count"`` weights are raw x n (uniform -> 1.0).
    Padded tags get weight 0; a sample without tags gets all zeros.
    """

    def forward(self, tag_text_emb: Tensor, image_emb: Tensor, tag_mask: Tensor, temperature: float,
                scaling: str, tag_scores: Tensor | None = None, score_prior: float = 0.0) -> Tensor:
        """Same as :meth:`tag_weights`."""
        return self.tag_weights(tag_text_emb, image_emb, tag_mask, temperature, scaling, tag_scores, score_prior)

    @staticmethod
    def tag_weights(tag_text_emb: Tensor, image_emb: Tensor, tag_mask: Tensor, temperature: float,
                    scaling: str, tag_scores: Tensor | None = None, score_prior: float = 0.0) -> Tensor:
        """Softmax over real tags of cos(tag, image) / temperature [+ score_prior · log(tag_scores)].

        Args:
            tag_text_emb: (B, T, D) CLIP text embeddings of the tags.
            image_emb: (B, D) CLIP image embeddings.
            tag_mask: (B, T) bool, True for real tags.
            temperature: softmax temperature, finite and > 0.
            scaling: ``"raw"`` or ``"count"``.
            tag_scores: (B, T) retrieval scores of the tags (> 0; values <= 0, e.g. random tags, count
                as equal), used when ``score_prior`` > 0.
            score_prior: λ of the log-score prior (0: the cosine alone).

        Returns:
            (B, T) float32 weights, 0 at padded tags and for tag-less samples.

        Raises:
            ValueError: bad scaling, temperature or shapes.
        """
        _check_scaling(scaling)
        _check_mask(tag_mask)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        b, t = tag_mask.shape
        if tag_text_emb.shape[:2] != (b, t) or tuple(image_emb.shape) != (b, tag_text_emb.shape[-1]):
            raise ValueError(
                f"expected tag_text_emb (B, T, D) and image_emb (B, D) with (B, T)={(b, t)}, got "
                f"{tuple(tag_text_emb.shape)} and {tuple(image_emb.shape)}"
            )
        cos = F.cosine_similarity(tag_text_emb.float(), image_emb.float()[:, None, :], dim=-1)  # (B, T)
        logits = cos / temperature
        if score_prior and tag_scores is not None:
            if tuple(tag_scores.shape) != (b, t):
                raise ValueError(f"tag_scores {tuple(tag_scores.shape)} do not match the tags {(b, t)}")
            logits = logits + score_prior * tag_scores.float().clamp_min(_MIN_SCORE).log()
        logits = logits.masked_fill(~tag_mask, torch.finfo(torch.float32).min)  # (B, T)
        weights = torch.softmax(logits, dim=-1) * tag_mask  # (B, T); tag-less rows -> 0
        return weights * _count(tag_mask) if scaling == "count" else weights  # (B, T)

    @staticmethod
    def uniform_weights(tag_mask: Tensor, scaling: str) -> Tensor:
        """Uniform weights for the ablation: 1/n per real tag (``"raw"``) or 1.0 (``"count"``).

        Args:
            tag_mask: (B, T) bool, True for real tags.
            scaling: ``"raw"`` or ``"count"``.

        Returns:
            (B, T) float32 weights, 0 at padded tags and for tag-less samples.

        Raises:
            ValueError: bad scaling or mask.
        """
        _check_scaling(scaling)
        _check_mask(tag_mask)
        ones = tag_mask.to(torch.float32)  # (B, T)
        return ones if scaling == "count" else ones / _count(tag_mask).clamp_min(1.0)  # (B, T)


def log_weight_bias(weights: Tensor, scaling: str, tag_mask: Tensor | None = None) -> Tensor:
    """Additive attention bias log(w_raw * n) for tag tokens, floored at ``LOG_WEIGHT_FLOOR``.

    Why a bias: pre-norm LLMs RMS-normalise every token before attention, so multiplying a tag's
    embedding by its weight is (almost) undone. Adding log(w * n) to the attention logits of the tag's
    tokens instead multiplies their attention mass by w * n before renormalisation; uniform weights give
    a bias of 0 (no change), zero weights a large finite negative bias (no -inf, so no NaN rows).

    Args:
        weights: (B, T) weights as returned by :class:`AdaptiveWeightTuner` with the same ``scaling``.
        scaling: ``"raw"`` (weights sum to 1; needs ``tag_mask`` to know n) or ``"count"`` (weights
            already equal w * n).
        tag_mask: (B, T) bool, True for real tags; required for ``"raw"``, ignored for ``"count"``.

    Returns:
        (B, T) bias in ``[LOG_WEIGHT_FLOOR, inf)``, same dtype as ``weights``; padded tags get the floor.

    Raises:
        ValueError: bad scaling, or ``"raw"`` without a matching ``tag_mask``.
    """
    _check_scaling(scaling)
    if weights.dim() != 2:
        raise ValueError(f"weights must be (B, T), got {tuple(weights.shape)}")
    scaled = weights.float()  # (B, T)
    if scaling == "raw":
        if tag_mask is None:
            raise ValueError("log_weight_bias with scaling='raw' needs tag_mask to know the number of tags")
        _check_mask(tag_mask)
        if tag_mask.shape != weights.shape:
            raise ValueError(f"tag_mask {tuple(tag_mask.shape)} must match weights {tuple(weights.shape)}")
        scaled = scaled * _count(tag_mask)  # (B, T) w * n
    bias = torch.log(scaled.clamp_min(1e-30)).clamp_min(LOG_WEIGHT_FLOOR)  # (B, T); no -inf, no NaN grads
    return bias.to(weights.dtype)  # (B, T)
