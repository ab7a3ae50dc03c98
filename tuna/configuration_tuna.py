"""TunaConfig: the HF config of a TUNA model (LLM + frozen CLIP + connector + tag encoder + weighting)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from tuna.mhub import MHUB, MHubConfig


@dataclass(frozen=True)
class AblationPolicy:
    """What an ablation changes: which tags the model reads (TagSource) and how it reads them (the model)."""

    tags: str = "retrieved"  # "retrieved", "random" (vocabulary words, as many as retrieved) or "none"
    image_aware: bool = True  # image-aware visual tokens next to the word tokens
    weighting: str = "adaptive"  # "adaptive", "uniform" or "none" (unweighted plain text)

    @property
    def use_tags(self) -> bool:
        return self.tags != "none"


# The one table of ablations: TunaConfig, TunaForCausalLM and TagSource all read it.
ABLATION_POLICIES = {
    "none": AblationPolicy(),
    "no_tags": AblationPolicy(tags="none"),  # plain LLaVA
    "random_tags": AblationPolicy(tags="random"),
    "uniform_weights": AblationPolicy(weighting="uniform"),
    "no_image_aware": AblationPolicy(image_aware=False),  # tag word embeddings only
    "text_tags": AblationPolicy(image_aware=False, weighting="none"),  # tags as plain prompt text
}
ABLATIONS = tuple(ABLATION_POLICIES)
WEIGHT_SCALINGS = ("raw", "count")
WEIGHT_MODES = ("scale", "scale_and_bias", "bias")


class TunaConfig(PretrainedConfig):
    """Configuration of :class:`tuna.TunaForCausalLM` (saved as ``config.json`` with the checkpoint).

    Args:
        text_config: the LLM's config (a dict or PretrainedConfig with ``model_type``), e.g. Llama/Qwen2.
        clip: how to load the CLIP tower: {"model", "pretrained", "model_config"} (datastore.clip.ClipSpec).
        clip_identity: the tower's identity (weights sha256 ...), checked against datastores.
        vision_feature_layer: CLIP block whose patch tokens feed the connector (LLaVA-1.5: -2).
        connector_type: "linear", "identity", "mlp{N}x_gelu", or "mhub" (MMICT's M-Hub, tuna/mhub.py; reads
            no tags).
        mhub: the M-Hub's shape (tuna.mhub.MHubConfig fields) when connector_type is "mhub", else None.
        image_patch_positions: add a learned position embedding to the patch features before the
            connector (what a ViT's features carry already; for convolutional towers, whose features do
            not say where a patch is). Off by default, as in LLaVA.
        tag_hidden_dim, tag_num_heads, tag_num_layers, tag_queries: image-aware tag encoder shape.
        tag_patch_positions: add a learned position embedding to the patches the tags attend over (so a
            tag's visual token says where it matched; needed with convolutional towers).
        max_tags: tags read per image.
        tag_temperature: τ of the adaptive weight softmax over cos(tag text, image).
        tag_score_prior: λ of the retrieval-score prior in that softmax: the logits are
            cos / τ + λ · log(score), the score being the tag's summed neighbour similarity from the
            datastore (how many of the retrieved images name it, and how close they are). 0: the cosine
            alone, the paper's rule; tags without scores (given by the caller) get an equal prior.
        weight_scaling: "raw" (weights sum to 1) or "count" (× number of tags; uniform = 1).
        weight_mode: how weights act on a tag's tokens: "scale" (multiply embeddings, the literal
            TUNA rule), "bias" (additive attention bias log(w·n)), or both.
        ablation: "none", "no_tags" (plain LLaVA), "random_tags", "uniform_weights",
            "no_image_aware" (tag word embeddings only), "text_tags" (tags as plain prompt text); what
            each changes is its :data:`ABLATION_POLICIES` entry.
        template: conversation template name ("plain", "vicuna_v1", "chat_template").
        vision_hidden_size, clip_embed_dim, num_image_tokens: the CLIP tower's patch width, embedding
            dimension and patch tokens per image (filled in by ``TunaForCausalLM.from_components``).
        tag_prefix, tag_separator, tag_suffix: text delimiting the tag block ("Tags: a, b."), and their
            token ids (``*_ids``, filled in from the tokenizer); max_tag_tokens: word tokens kept per tag.
        stop_token_ids: tokens that end an answer (EOS and the template's end of turn).
        lora: peft LoRA settings {"r", "alpha", "dropout", "target_modules"} while adapters are active
            (set by ``enable_lora``, cleared by ``merge_lora``), else None.

    Raises:
        ValueError: an enum-like field has a value outside its allowed set (listed in the message).
    """

    model_type = "tuna"
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config: dict | PretrainedConfig | None = None, clip: dict | None = None,
                 clip_identity: dict | None = None, vision_feature_layer: int = -2,
                 connector_type: str = "mlp2x_gelu", image_patch_positions: bool = False,
                 tag_hidden_dim: int = 256, tag_num_heads: int = 4,
                 tag_num_layers: int = 1, tag_queries: int = 1, tag_patch_positions: bool = True, max_tags: int = 10,
                 tag_temperature: float = 0.1, tag_score_prior: float = 0.0, weight_scaling: str = "count",
                 weight_mode: str = "scale_and_bias",
                 ablation: str = "none", template: str = "vicuna_v1", vision_hidden_size: int = 0,
                 clip_embed_dim: int = 0, num_image_tokens: int = 0, tag_prefix: str = " Tags:",
                 tag_separator: str = ",", tag_suffix: str = ".", tag_prefix_ids: list[int] | None = None,
                 tag_separator_ids: list[int] | None = None, tag_suffix_ids: list[int] | None = None,
                 max_tag_tokens: int = 8, stop_token_ids: list[int] | None = None,
                 lora: dict | None = None, mhub: dict | None = None, **kwargs: Any) -> None:
        if isinstance(text_config, dict):
            text_config = dict(text_config)
            if "model_type" not in text_config:
                raise ValueError("text_config needs a 'model_type' (e.g. 'llama', 'qwen2')")
            text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.text_config = text_config
        self.clip = clip or {}
        self.clip_identity = clip_identity or {}
        self.vision_feature_layer = vision_feature_layer
        self.connector_type = connector_type
        self.image_patch_positions = image_patch_positions
        self.tag_hidden_dim, self.tag_num_heads = tag_hidden_dim, tag_num_heads
        self.tag_num_layers, self.tag_queries = tag_num_layers, tag_queries
        self.tag_patch_positions = tag_patch_positions
        self.max_tags, self.tag_temperature = max_tags, tag_temperature
        self.tag_score_prior = tag_score_prior
        self.weight_scaling, self.weight_mode = weight_scaling, weight_mode
        self.ablation, self.template = ablation, template
        self.vision_hidden_size, self.clip_embed_dim = vision_hidden_size, clip_embed_dim
        self.num_image_tokens, self.max_tag_tokens = num_image_tokens, max_tag_tokens
        self.tag_prefix, self.tag_separator, self.tag_suffix = tag_prefix, tag_separator, tag_suffix
        self.tag_prefix_ids = list(tag_prefix_ids or [])
        self.tag_separator_ids = list(tag_separator_ids or [])
        self.tag_suffix_ids = list(tag_suffix_ids or [])
        self.stop_token_ids = list(stop_token_ids or [])
        self.lora = lora
        self.mhub = MHubConfig(**(mhub or {})).to_dict() if connector_type == MHUB else None
        _check_choice("weight_scaling", weight_scaling, WEIGHT_SCALINGS)
        _check_choice("weight_mode", weight_mode, WEIGHT_MODES)
        _check_choice("ablation", ablation, ABLATIONS)
        if tag_temperature <= 0:
            raise ValueError(f"tag_temperature={tag_temperature}: must be > 0")
        if not (math.isfinite(tag_score_prior) and tag_score_prior >= 0):
            raise ValueError(f"tag_score_prior={tag_score_prior}: must be a finite number >= 0")
        if max_tag_tokens < 1:
            raise ValueError(f"max_tag_tokens={max_tag_tokens}: must be >= 1")
        if max_tags < 0:
            raise ValueError(f"max_tags={max_tags}: must be >= 0")
        super().__init__(**kwargs)


def ablation_policy(name: str) -> AblationPolicy:
    """The policy of ablation ``name``; ValueError (listing :data:`ABLATIONS`) for an unknown name."""
    _check_choice("ablation", name, ABLATIONS)
    return ABLATION_POLICIES[name]


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {list(allowed)}")


AutoConfig.register("tuna", TunaConfig, exist_ok=True)
