"""TunaForCausalLM: a frozen CLIP tower, a connector and retrieved-tag blocks spliced into any HF causal LM.

Each ``IMAGE_TOKEN_INDEX`` sentinel in ``input_ids`` becomes the image's patch tokens (through the
connector) followed by its tag block::

    [P patch tokens] prefix  [v_1] w_1-tokens  sep  [v_2] w_2-tokens ... suffix      e.g. " Tags: [v] red cube, [v] ball."

where ``[v_j]`` are the tag's image-aware visual tokens (its CLIP text embedding cross-attending over
the patches, then the connector) and ``w_j-tokens`` the LLM word embeddings of the tag. The adaptive
weight w_j (softmax over the image's tags of cos(tag text, image) / tau) acts on both, as configured by
``weight_mode``: "scale" multiplies their embeddings by w_j, "bias" adds log(w_j) to the attention
logits of every query on those key positions (a 4D float mask; survives the LLM's RMSNorm), or both.

The CLIP tower is frozen and not part of the state dict: ``save_pretrained`` records how to load it
(and copies local CLIP files into ``clip/``), ``from_pretrained`` loads it and checks its identity.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from datastore.clip import ClipSpec, LoadedClip, describe_mismatch, load_clip, same_clip, spec_from_dict
from tuna.configuration_tuna import TunaConfig, ablation_policy
from tuna.connector import build_connector
from tuna.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX, stop_token_ids
from tuna.mhub import MHUB, MHub, MHubConfig, guide_spans
from tuna.tag_encoder import AdaptiveWeightTuner, ImageAwareTagEncoder, TagEncoderConfig, log_weight_bias
from tuna.vision import VisionTower

logger = logging.getLogger(__name__)

CLIP_DIR = "clip"
TRAINABLE_FILE = "tuna_trainable.safetensors"
TRAINABLE_PREFIXES = ("connector.", "image_patch_pos", "tag_encoder.")


@dataclass
class TunaCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus ``tag_weights`` (N_images, T), the weights the tag block used."""

    tag_weights: Tensor | None = None


@dataclass
class MultimodalInputs:
    """The LLM's inputs after splicing: (B, L) masks/labels/positions, (B, L, H) embeddings.

    ``key_bias`` (B, L) is the additive attention bias per key position (log w on tag tokens), or None
    when no bias applies; ``tag_weights`` (N_images, T) or None; ``tag_index`` (B, L) the tag each
    position belongs to, as ``image * T + tag`` (-1 outside tag tokens; delimiters are -1 too).
    """

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor | None
    key_bias: Tensor | None
    tag_weights: Tensor | None
    tag_index: Tensor | None = None


@dataclass
class _Tags:
    """A batch's tags as the model reads them: ids/token_mask (N, T, Lt), tag_mask (N, T), CLIP text (N, T, D)."""

    ids: Tensor
    token_mask: Tensor
    tag_mask: Tensor
    text: Tensor
    weights: Tensor | None
    image_aware: bool


@dataclass
class ScoreOutput:
    """Log-likelihoods of the labelled (answer) tokens: ``sum`` (B,), ``n_tokens`` (B,), ``per_token`` list of (n_b,)."""

    sum: Tensor
    n_tokens: Tensor
    per_token: list[Tensor]

    @property
    def mean(self) -> Tensor:
        return self.sum / self.n_tokens.clamp_min(1)


class TunaForCausalLM(PreTrainedModel):
    """LLaVA-style multimodal causal LM reading retrieved, image-grounded and weighted tags.

    Build one with :meth:`from_components` (an LLM, a CLIP spec and the tokenizer), reload with
    :meth:`from_pretrained`. Batches come from :class:`tuna.processing_tuna.TunaProcessor`.
    """

    config_class = TunaConfig
    base_model_prefix = "tuna"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def __init__(self, config: TunaConfig, language_model: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if not config.vision_hidden_size or not config.clip_embed_dim:
            raise ValueError("TunaConfig needs vision_hidden_size and clip_embed_dim (use "
                             "TunaForCausalLM.from_components to fill them from the CLIP tower)")
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        hidden = config.text_config.hidden_size
        if config.connector_type == MHUB:  # MMICT: images become the hub's text- or image-side features
            self.connector = MHub(MHubConfig(**config.mhub), config.vision_hidden_size, hidden)
        else:
            self.connector = build_connector(config.connector_type, config.vision_hidden_size, hidden)
        # (P, Dv) learned positions added to the patch features before the connector (see TunaConfig)
        self.image_patch_pos = nn.Parameter(torch.zeros(config.num_image_tokens, config.vision_hidden_size)
                                            ) if config.image_patch_positions else None
        self.tag_encoder = ImageAwareTagEncoder(TagEncoderConfig(
            text_dim=config.clip_embed_dim, vision_dim=config.vision_hidden_size, hidden_dim=config.tag_hidden_dim,
            num_heads=config.tag_num_heads, num_layers=config.tag_num_layers,
            num_queries_per_tag=config.tag_queries,
            num_patches=config.num_image_tokens if config.tag_patch_positions else 0))
        self.post_init()
        if config.lora:  # a checkpoint saved with LoRA active: rebuild the adapters so its keys load
            self._wrap_language_model_lora(config.lora)

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the connector and tag encoder (the LLM keeps its own or its loaded weights)."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, TunaForCausalLM) and module.image_patch_pos is not None:
            nn.init.normal_(module.image_patch_pos, std=0.02)
        elif isinstance(module, MHub):
            module.reset_parameters()
        elif isinstance(module, ImageAwareTagEncoder):
            nn.init.normal_(module.query_offsets, std=0.02)
            if module.patch_pos is not None:
                nn.init.normal_(module.patch_pos, std=0.02)

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def from_components(cls, llm: str | os.PathLike | PreTrainedModel, clip: ClipSpec | LoadedClip, tokenizer: Any,
                        dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                        **config_kwargs: Any) -> "TunaForCausalLM":
        """A new TUNA model around a pretrained (or given) LLM and a CLIP tower.

        Args:
            llm: an ``AutoModelForCausalLM`` hub name or local path, or an already built model.
            clip: how to load the CLIP tower (or the loaded tower); its identity is stored in the config.
            tokenizer: the LLM's tokenizer (tag delimiters are tokenized with it).
            dtype: parameter dtype of the LLM, connector and tag encoder (bf16 for real training).
            attn_implementation: "sdpa", "eager" or "flash_attention_2" (no attention bias: use
                ``weight_mode="scale"`` with flash attention).
            **config_kwargs: further :class:`TunaConfig` fields (connector_type, tag_*, weight_mode, ...).
        """
        if not isinstance(llm, PreTrainedModel):
            _require_config(llm, "an LLM or a saved TUNA model folder")
            llm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype, attn_implementation=attn_implementation)
        loaded = clip if isinstance(clip, LoadedClip) else load_clip(clip)
        tower = VisionTower(loaded, feature_layer=config_kwargs.get("vision_feature_layer", -2))
        config = TunaConfig(text_config=llm.config, clip=_clip_recipe(loaded.spec), clip_identity=loaded.identity,
                            vision_hidden_size=tower.hidden_size, clip_embed_dim=tower.embed_dim,
                            num_image_tokens=tower.num_patches, **config_kwargs)
        encode = lambda text: list(tokenizer.encode(text, add_special_tokens=False)) if text else []  # noqa: E731
        config.tag_prefix_ids = encode(config.tag_prefix)
        config.tag_separator_ids = encode(config.tag_separator)
        config.tag_suffix_ids = encode(config.tag_suffix)
        if not config.stop_token_ids:
            config.stop_token_ids = stop_token_ids(tokenizer, config.template)
        model = cls(config, language_model=llm)
        model.set_attn_implementation(attn_implementation)
        model.connector.to(dtype)
        model.tag_encoder.to(dtype)
        model.attach_vision(tower)
        return model.eval()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        clip_precision: str | None = None, **kwargs: Any) -> "TunaForCausalLM":
        """Load a saved TUNA model and its CLIP tower (checked against the saved identity).

        ``clip_precision`` ("fp32", "bf16", "fp16") overrides the tower precision saved with the model
        (tag weights come from CLIP similarities, so they shift slightly with precision).

        Raises:
            FileNotFoundError: a local folder without ``config.json`` (named, one line).
        """
        if kwargs.get("config") is None:  # else a default TunaConfig fails with "needs vision_hidden_size ..."
            _require_config(pretrained_model_name_or_path, "a saved TUNA model folder")
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        spec = _resolve_clip_spec(model.config.clip, Path(pretrained_model_name_or_path))
        spec.precision = clip_precision or spec.precision
        model.attach_vision(load_clip(spec))
        return model

    def attach_vision(self, clip: LoadedClip | VisionTower) -> None:
        """Give the model its frozen CLIP tower (kept outside the state dict), checking identity and sizes.

        Raises:
            ValueError: a different CLIP than the config records, or mismatched dimensions.
        """
        tower = clip if isinstance(clip, VisionTower) else VisionTower(clip, self.config.vision_feature_layer)
        expected = self.config.clip_identity
        if expected and not same_clip(expected, tower.clip.identity):
            raise ValueError(f"CLIP tower does not match this model: {describe_mismatch(expected, tower.clip.identity)}")
        got = (tower.hidden_size, tower.embed_dim)
        if got != (self.config.vision_hidden_size, self.config.clip_embed_dim):
            raise ValueError(f"CLIP tower has (patch width, embed dim) {got}, the model expects "
                             f"{(self.config.vision_hidden_size, self.config.clip_embed_dim)}")
        self.__dict__["_vision"] = tower  # plain attribute: not a submodule, so not saved or partitioned

    @property
    def vision(self) -> VisionTower:
        tower = self.__dict__.get("_vision")
        if tower is None:
            raise RuntimeError("this TunaForCausalLM has no CLIP tower: load it with from_pretrained / "
                               "from_components, or call attach_vision()")
        return tower

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save config + weights (safetensors) and the CLIP tower's recipe; local CLIP files go to ``clip/``."""
        save_directory = Path(save_directory)
        if kwargs.get("is_main_process", True):
            save_directory.mkdir(parents=True, exist_ok=True)
            self.config.clip = _save_clip_files(self.vision.clip.spec, save_directory)
        super().save_pretrained(save_directory, *args, **kwargs)

    # ------------------------------------------------------------------------ trainable parts
    def set_llm_trainable(self, trainable: bool) -> None:
        """Stage 1 (connector pretraining): False; stage 2 (instruction tuning): True."""
        self.language_model.requires_grad_(trainable)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Connector + tag encoder weights on CPU, gathered from ZeRO-3 partitions when partitioned."""
        params = [(n, p) for n, p in self.named_parameters() if n.startswith(TRAINABLE_PREFIXES)]
        with _gathered([p for _, p in params]):
            return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in params}

    def save_trainable(self, directory: str | os.PathLike) -> Path:
        """Write the stage-1 checkpoint (connector + tag encoder) as ``tuna_trainable.safetensors``."""
        from safetensors.torch import save_file

        path = Path(directory) / TRAINABLE_FILE
        state = self.trainable_state_dict()  # collective under ZeRO-3: every rank takes part
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"connector_type": self.config.connector_type, "weights_of": "connector+tag_encoder"}
            save_file(state, str(path), metadata=meta)
        return path

    def load_trainable(self, path: str | os.PathLike) -> None:
        """Load a stage-1 checkpoint (file or directory holding it) into this model, ZeRO-3-safe.

        Raises:
            FileNotFoundError: no checkpoint there.
            ValueError: missing/unexpected keys or shape mismatches (all listed).
        """
        from safetensors.torch import load_file

        path = Path(path)
        path = path / TRAINABLE_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no stage-1 checkpoint at {path} (expected {TRAINABLE_FILE})")
        state = load_file(str(path))
        params = dict((n, p) for n, p in self.named_parameters() if n.startswith(TRAINABLE_PREFIXES))
        with _gathered(list(params.values()), modifier_rank=0):
            problems = [f"missing {k}" for k in params if k not in state]
            problems += [f"unexpected {k}" for k in state if k not in params]
            problems += [f"{k}: shape {tuple(state[k].shape)} vs {tuple(p.shape)}" for k, p in params.items()
                         if k in state and state[k].shape != p.shape]
            if problems:
                raise ValueError(f"stage-1 checkpoint {path} does not fit this model: " + "; ".join(problems))
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(state[name].to(param.dtype))

    def enable_lora(self, r: int = 128, alpha: int = 256, dropout: float = 0.05,
                    target_modules: str | list[str] = "all-linear") -> None:
        """Wrap the LLM with peft LoRA adapters (LLM base weights frozen; connector/tag encoder untouched).

        The settings go into ``config.lora``, so ``save_pretrained`` checkpoints (e.g. mid-training)
        reload with the adapters in place; :meth:`merge_lora` before the final export.
        """
        if self.config.lora:
            raise ValueError("LoRA is already enabled on this model")
        self.config.lora = {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules}
        self._wrap_language_model_lora(self.config.lora)

    def _wrap_language_model_lora(self, settings: dict[str, Any]) -> None:
        """Wrap the LLM with peft adapters and re-derive the tied-weight names under the wrapper (peft
        forwards attribute lookups, so the pre-computed names would point at the unwrapped LLM: tied
        embeddings, e.g. Qwen2-0.5B's, then fail to load)."""
        self.language_model = _wrap_lora(self.language_model, settings)
        self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=True)

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the LLM weights (for export as a plain TUNA checkpoint)."""
        from peft import PeftModel

        if isinstance(self.language_model, PeftModel):
            self.language_model = self.language_model.merge_and_unload()
        self.config.lora = None

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # ------------------------------------------------------------------------------ splicing
    def tag_weights(self, image_embeds: Tensor, tag_text: Tensor, tag_mask: Tensor,
                    tag_scores: Tensor | None = None) -> Tensor | None:
        """(N, T) weights of the tags under the configured ablation; None for unweighted text tags."""
        weighting = ablation_policy(self.config.ablation).weighting
        if weighting == "adaptive":
            return AdaptiveWeightTuner.tag_weights(tag_text, image_embeds, tag_mask, self.config.tag_temperature,
                                                   self.config.weight_scaling, tag_scores,
                                                   self.config.tag_score_prior)
        if weighting == "uniform":
            return AdaptiveWeightTuner.uniform_weights(tag_mask, self.config.weight_scaling)
        return None

    @torch.no_grad()
    def weights_for(self, pixel_values: Tensor, tags: list[list[str]], tag_scores: Tensor | None = None
                    ) -> list[list[float]]:
        """The weights each image's tags get under the configured ablation (empty lists when unweighted)."""
        width = max((len(t) for t in tags), default=0)
        tag_mask = torch.tensor([[j < len(t) for j in range(width)] for t in tags], dtype=torch.bool)
        if width == 0 or not ablation_policy(self.config.ablation).use_tags:
            return [[] for _ in tags]
        image_embeds = self._vision_on(self.device)(pixel_values).image_embeds.cpu()
        weights = self.tag_weights(image_embeds, self._tag_text_embeddings(tags, tag_mask), tag_mask,
                                   None if tag_scores is None else tag_scores.cpu())
        return [[] if weights is None else weights[n, :len(t)].tolist() for n, t in enumerate(tags)]

    def _tag_text_embeddings(self, tags: list[list[str]], tag_mask: Tensor) -> Tensor:
        counts = tag_mask.sum(-1).tolist()
        if len(tags) != len(counts) or [len(t) for t in tags] != counts:
            raise ValueError(f"tags per image {[len(t) for t in tags]} do not match tag_attention_mask {counts}")
        out = torch.zeros(*tag_mask.shape, self.config.clip_embed_dim)  # (N, T, D)
        flat = self.vision.embed_tags([t for row in tags for t in row])  # (M, D)
        out[tag_mask.cpu()] = flat
        return out.to(tag_mask.device)

    def _tag_inputs(self, image_embeds: Tensor | None, tags: list[list[str]] | None, tag_input_ids: Tensor | None,
                    tag_attention_mask: Tensor | None, tag_scores: Tensor | None = None) -> _Tags | None:
        """The batch's tags, their CLIP text embeddings and weights; None when the block is off or empty."""
        if tag_input_ids is None or tag_attention_mask is None:
            if tags is not None and any(len(t) for t in tags):
                raise ValueError("tags were given without tag_input_ids / tag_attention_mask (build batches "
                                 "with TunaProcessor)")
            return None
        policy = ablation_policy(self.config.ablation)
        if not policy.use_tags or image_embeds is None or tag_input_ids.shape[1] == 0:
            return None
        if tags is None:
            raise ValueError("tag_input_ids need the tag strings (tags) for their CLIP text embeddings")
        token_mask = tag_attention_mask.bool()  # (N, T, Lt)
        tag_mask = token_mask.any(-1)  # (N, T)
        text = self._tag_text_embeddings(tags, tag_mask)  # (N, T, D)
        scores = None if tag_scores is None else tag_scores.to(tag_mask.device)
        weights = self.tag_weights(image_embeds, text, tag_mask, scores)  # (N, T) or None
        return _Tags(ids=tag_input_ids, token_mask=token_mask, tag_mask=tag_mask, text=text, weights=weights,
                     image_aware=policy.image_aware)

    def _visual_tokens(self, patches: Tensor | None, tags: _Tags | None, hidden_dtype: torch.dtype
                       ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """Patch tokens (N, P, H) and image-aware tag tokens (N, T, nq, H) through one connector call.

        The tag encoder and the connector run exactly once per forward, on a zero probe when the batch
        does not need them (no images, no tags, an ablation without image-aware tokens); the probe
        enters the output as ``0 * sum`` (the returned anchor). DDP and ZeRO-3 need every rank to use
        the same modules at every step, otherwise reductions and parameter gathers fall out of step.
        """
        dtype, width = self.connector_dtype, self.config.vision_hidden_size
        device = self.connector_device
        probes = []
        encoded = None
        if tags is not None and tags.image_aware:
            encoded = self.tag_encoder(tags.text.to(dtype), patches, tags.tag_mask)  # (N, T, nq, Dv)
        else:
            probes.append(self._tag_encoder_probe())
        if patches is not None and self.image_patch_pos is not None:
            patches = patches + self.image_patch_pos.to(patches.dtype)  # (N, P, Dv); after the tag encoder
        rows = [x.reshape(-1, width) for x in (patches, encoded) if x is not None]
        projected = self.connector(torch.cat(rows) if rows else torch.zeros(1, width, dtype=dtype, device=device))
        if not rows:
            probes.append(projected)
        projected = projected.to(hidden_dtype)
        n_patch_rows = 0 if patches is None else patches.shape[0] * patches.shape[1]
        images = None if patches is None else projected[:n_patch_rows].view(*patches.shape[:2], -1)
        visual = None if encoded is None else projected[n_patch_rows:].view(*encoded.shape[:3], -1)
        anchor = sum(p.float().sum() for p in probes) * 0.0 if probes else torch.zeros((), device=device)
        return images, visual, anchor.to(hidden_dtype)

    def _tag_encoder_probe(self) -> Tensor:
        """The tag encoder on a zero input: a batch that does not use it still runs it (see _visual_tokens)."""
        dtype, device, width = self.connector_dtype, self.connector_device, self.config.vision_hidden_size
        n_patches = self.tag_encoder.config.num_patches or 1
        return self.tag_encoder(torch.zeros(1, 1, self.config.clip_embed_dim, dtype=dtype, device=device),
                                torch.zeros(1, n_patches, width, dtype=dtype, device=device),
                                torch.ones(1, 1, dtype=torch.bool, device=device))

    def _hub_tokens(self, patches: Tensor | None, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None,
                    text: Tensor) -> tuple[list[Tensor], Tensor]:
        """M-Hub tokens per image (sentinel order) and the zero anchor of the modules the batch leaves unused.

        Each image's guide is the text after it in its row (tuna.mhub.guide_spans: up to the next image or the
        first labelled token), as the LLM's embeddings ``text`` (B, L, H). A batch without images runs the hub
        on a zero probe, and the tag encoder always runs on one (the hub reads no tags): every rank uses
        every module at every step (see _visual_tokens).
        """
        hub: MHub = self.connector
        guides, demo = [], []
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids, emb = input_ids[b][keep], text[b][keep]
            labelled = labels[b][keep] != IGNORE_INDEX if labels is not None else torch.zeros_like(ids, dtype=torch.bool)
            for start, end, is_demo in guide_spans(ids == IMAGE_TOKEN_INDEX, labelled, hub.config.max_text):
                guides.append(emb[start:end])
                demo.append(is_demo)
        probes = [self._tag_encoder_probe()]
        dtype, device = self.connector_dtype, self.connector_device
        if patches is None:
            n_patches = max(1, self.config.num_image_tokens)
            probe = hub(torch.zeros(1, n_patches, self.config.vision_hidden_size, dtype=dtype, device=device),
                        text.new_zeros(1, 1, text.shape[-1]), torch.ones(1, 1, dtype=torch.long, device=device),
                        torch.zeros(1, dtype=torch.bool))
            probes += probe
            tokens = []
        else:
            width = max(1, max(len(g) for g in guides))  # >= 1: the text path runs in every batch
            guide = text.new_zeros(len(guides), width, text.shape[-1])
            mask = torch.zeros(len(guides), width, dtype=torch.long, device=text.device)
            for i, g in enumerate(guides):
                guide[i, :len(g)], mask[i, :len(g)] = g, 1
            tokens = [t.to(text.dtype) for t in hub(patches, guide, mask, torch.tensor(demo))]
        anchor = sum(p.float().sum() for p in probes) * 0.0
        return tokens, anchor.to(text.dtype)

    def _tag_blocks(self, tags: _Tags | None, visual: Tensor | None, n_images: int
                    ) -> list[tuple[Tensor, Tensor, Tensor] | None]:
        """Per image its tag block (embeddings (Lb, H), key bias (Lb,), tag index (Lb,)), or None."""
        if tags is None:
            return [None] * n_images
        embed = self.get_input_embeddings()
        tokens = embed(tags.ids.clamp_min(0))  # (N, T, Lt, H)
        token_mask, tag_mask, weights = tags.token_mask, tags.tag_mask, tags.weights
        if visual is not None:
            tokens = torch.cat([visual.to(tokens.dtype), tokens], dim=2)  # (N, T, nq + Lt, H)
            token_mask = torch.cat([tag_mask[..., None].expand(-1, -1, visual.shape[2]), token_mask], dim=2)
        bias = torch.zeros(tag_mask.shape, device=tokens.device)  # (N, T)
        if weights is not None:
            mode = self.config.weight_mode
            if mode in ("scale", "scale_and_bias"):
                tokens = tokens * weights[..., None, None].to(tokens.dtype)
            if mode in ("bias", "scale_and_bias"):
                bias = log_weight_bias(weights, self.config.weight_scaling, tag_mask)
        delims = [torch.tensor(ids, dtype=torch.long, device=tokens.device) for ids in
                  (self.config.tag_prefix_ids, self.config.tag_separator_ids, self.config.tag_suffix_ids)]
        delim_embeds = embed(torch.cat(delims))  # (Ld, H)
        table = torch.cat([delim_embeds, tokens.reshape(-1, tokens.shape[-1])])  # rows a block gathers from
        table_bias = torch.cat([bias.new_zeros(len(delim_embeds)),
                                bias[..., None].expand(token_mask.shape).reshape(-1)])
        table_tag = torch.cat([torch.full((len(delim_embeds),), -1, device=tokens.device),
                               torch.arange(tag_mask.numel(), device=tokens.device)[:, None]
                               .expand(-1, token_mask.shape[-1]).reshape(-1)])
        index = _block_indices(tag_mask.cpu(), token_mask.cpu(), [len(d) for d in delims])
        return [None if idx is None else tuple(t[idx.to(table.device)] for t in (table, table_bias, table_tag))
                for idx in index]

    @property
    def connector_dtype(self) -> torch.dtype:
        return next(self.tag_encoder.parameters()).dtype

    @property
    def connector_device(self) -> torch.device:
        return next(self.tag_encoder.parameters()).device

    def prepare_inputs(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                       pixel_values: Tensor | None = None, tags: list[list[str]] | None = None,
                       tag_input_ids: Tensor | None = None, tag_attention_mask: Tensor | None = None,
                       padding_side: str = "right", tag_scores: Tensor | None = None) -> MultimodalInputs:
        """Replace every image sentinel by patch tokens + tag block; re-pad on ``padding_side``.

        Args:
            input_ids: (B, L) with ``IMAGE_TOKEN_INDEX`` sentinels, padded on either side.
            attention_mask: (B, L), 1 for real tokens (default: all real).
            labels: (B, L) or None; image and tag positions get ``IGNORE_INDEX``.
            pixel_values: (N, 3, H, W), the images in sentinel order (row by row).
            tags: N lists of tag strings; tag_input_ids / tag_attention_mask: (N, T, Lt) their
                LLM token ids and mask (from the processor).
            padding_side: "right" (training) or "left" (generation).
            tag_scores: (N, T) the tags' retrieval scores (the processor's, from its tag source), for the
                weights' score prior (``config.tag_score_prior``); None: no prior.

        Raises:
            ValueError: sentinel count != number of images, or inconsistent tag inputs.
        """
        device = input_ids.device
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        n_sentinels = int((input_ids[attention_mask.bool()] == IMAGE_TOKEN_INDEX).sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_sentinels != n_images:
            raise ValueError(f"the batch has {n_sentinels} image markers but {n_images} images")
        text = self.get_input_embeddings()(input_ids.clamp_min(0))  # (B, L, H)
        patches = image_embeds = None
        if n_images:
            out = self._vision_on(device)(pixel_values)
            patches, image_embeds = out.patches.to(self.connector_dtype), out.image_embeds.to(device)
        tag_inputs = self._tag_inputs(image_embeds, tags, tag_input_ids, tag_attention_mask, tag_scores)
        if self.config.connector_type == MHUB:
            if tag_inputs is not None:
                raise ValueError("connector 'mhub' reads no tags: use ablation 'no_tags' (--ablation no_tags)")
            if patches is not None and self.image_patch_pos is not None:
                patches = patches + self.image_patch_pos.to(patches.dtype)
            images, anchor = self._hub_tokens(patches, input_ids, attention_mask, labels, text)
            blocks = [None] * n_images
        else:
            images, visual, anchor = self._visual_tokens(patches, tag_inputs, text.dtype)
            blocks = self._tag_blocks(tag_inputs, visual, n_images)
        weights = None if tag_inputs is None else tag_inputs.weights
        text = text + anchor  # exactly 0; keeps unused modules in the graph
        rows, image_i = [], 0
        for b in range(input_ids.shape[0]):
            keep = attention_mask[b].bool()
            ids, emb = input_ids[b][keep], text[b][keep]
            lab = labels[b][keep] if labels is not None else None
            pieces, start = [], 0
            for pos in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist() + [len(ids)]:
                pieces.append((emb[start:pos], None if lab is None else lab[start:pos], None, None))
                if pos < len(ids):
                    pieces.append((images[image_i], None, None, None))
                    if blocks[image_i] is not None:
                        block_embeds, block_bias, block_tags = blocks[image_i]
                        pieces.append((block_embeds.to(text.dtype), None, block_bias, block_tags))
                    image_i += 1
                start = pos + 1
            rows.append(pieces)
        has_bias = weights is not None and self.config.weight_mode in ("bias", "scale_and_bias")
        return _pad_rows(rows, padding_side, has_bias, labels is not None, weights)

    def _vision_on(self, device: torch.device) -> VisionTower:
        vision = self.vision
        if next(vision.model.parameters()).device != device:
            vision.model.to(device)
        return vision

    def attention_inputs(self, prepared: MultimodalInputs, query_start: int = 0) -> Tensor:
        """2D mask, or the 4D float mask (B, 1, Lq, L) with causal + padding masking and the tag key bias."""
        if prepared.key_bias is None:
            return prepared.attention_mask
        impl = self.language_model.config._attn_implementation or ""
        if "flash" in impl:
            raise ValueError(f"weight_mode={self.config.weight_mode!r} needs an attention bias, which "
                             f"{impl} cannot take: use attn_implementation='sdpa' or weight_mode='scale'")
        return bias_attention_mask(prepared.attention_mask, prepared.key_bias, prepared.inputs_embeds.dtype,
                                   query_start)

    # ------------------------------------------------------------------------------- forward
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                labels: Tensor | None = None, pixel_values: Tensor | None = None,
                tags: list[list[str]] | None = None, tag_input_ids: Tensor | None = None,
                tag_attention_mask: Tensor | None = None, tag_scores: Tensor | None = None,
                loss_only: bool = False, **kwargs: Any) -> TunaCausalLMOutput:
        """Training / scoring forward pass; the loss covers only labelled (answer) tokens.

        ``loss_only=True`` (with ``labels``; the trainer sets it) computes the LM head and the loss at the
        labelled positions only and returns no logits: the same loss, without the (B, L, V) logits, which
        for short answers after long prompts are most of the LM head's time and memory.

        Raises:
            ValueError: ``labels`` without a single answer token (a zero-loss batch), or bad inputs.
        """
        prepared = self.prepare_inputs(input_ids, attention_mask, labels, pixel_values, tags, tag_input_ids,
                                       tag_attention_mask, padding_side="right", tag_scores=tag_scores)
        if prepared.labels is not None and not bool((prepared.labels != IGNORE_INDEX).any()):
            raise ValueError("every label in this batch is IGNORE_INDEX: the batch would train on nothing")
        for ignored in ("position_ids", "use_cache", "return_dict", "past_key_values"):
            kwargs.pop(ignored, None)  # positions come from the splice; generation has its own loop
        if loss_only and prepared.labels is not None:
            return TunaCausalLMOutput(loss=self._labelled_loss(prepared, kwargs.get("num_items_in_batch")),
                                      tag_weights=prepared.tag_weights)
        out = self.language_model(inputs_embeds=prepared.inputs_embeds, attention_mask=self.attention_inputs(prepared),
                                  position_ids=prepared.position_ids, labels=prepared.labels, use_cache=False,
                                  return_dict=True, **kwargs)
        return TunaCausalLMOutput(loss=out.loss, logits=out.logits, hidden_states=out.hidden_states,
                                  attentions=out.attentions, tag_weights=prepared.tag_weights)

    def _labelled_logits(self, prepared: MultimodalInputs) -> tuple[Tensor, Tensor, Tensor]:
        """LM-head logits (M, V) at the M labelled positions, their targets (M,) and the mask (B, L-1)."""
        hidden = self.language_model.get_decoder()(
            inputs_embeds=prepared.inputs_embeds, attention_mask=self.attention_inputs(prepared),
            position_ids=prepared.position_ids, use_cache=False).last_hidden_state  # (B, L, H)
        target = prepared.labels[:, 1:]  # (B, L-1): token t+1 is predicted at position t
        valid = target != IGNORE_INDEX
        logits = self.get_output_embeddings()(hidden[:, :-1][valid]).float()  # (M, V)
        return _postprocess_logits(logits, self.config.text_config), target[valid], valid

    def _labelled_loss(self, prepared: MultimodalInputs, num_items_in_batch: Tensor | int | None) -> Tensor:
        """The causal-LM loss of the labelled tokens: their mean, or their sum / ``num_items_in_batch`` (the
        Trainer's count over gradient-accumulation steps), as the HF LM loss computes it."""
        logits, target, _ = self._labelled_logits(prepared)
        if num_items_in_batch is None:
            return F.cross_entropy(logits, target)
        return F.cross_entropy(logits, target, reduction="sum") / num_items_in_batch

    @torch.no_grad()
    def score(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
              pixel_values: Tensor | None = None, tags: list[list[str]] | None = None,
              tag_input_ids: Tensor | None = None, tag_attention_mask: Tensor | None = None,
              tag_scores: Tensor | None = None) -> ScoreOutput:
        """Log-likelihood of the labelled tokens of each row (answers), per token and summed.

        Computes the LM head only at labelled positions, so long prompts with large vocabularies fit.
        """
        prepared = self.prepare_inputs(input_ids, attention_mask, labels, pixel_values, tags, tag_input_ids,
                                       tag_attention_mask, padding_side="right", tag_scores=tag_scores)
        logits, target, valid = self._labelled_logits(prepared)
        token_logp = torch.log_softmax(logits, -1).gather(-1, target[:, None]).squeeze(-1)  # (M,)
        counts = valid.sum(-1)
        per_token = list(token_logp.split(counts.tolist()))
        sums = torch.stack([t.sum() for t in per_token]) if per_token else token_logp.new_zeros(0)
        return ScoreOutput(sum=sums, n_tokens=counts, per_token=per_token)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, pixel_values: Tensor | None = None,
                 tags: list[list[str]] | None = None, tag_input_ids: Tensor | None = None,
                 tag_attention_mask: Tensor | None = None, tag_scores: Tensor | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, stop_token_ids: list[int] | None = None,
                 pad_token_id: int = 0, generator: torch.Generator | None = None,
                 return_tag_weights: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """Decode answers for a batch (any padding; re-padded on the left), with a KV cache.

        The tag key bias stays in the attention mask at every step, so cached and uncached decoding
        agree. Greedy decoding gives the same tokens whatever the batch size.

        Returns:
            (B, n) new token ids; positions after a stop token hold ``pad_token_id``. With
            ``return_tag_weights``, also the (N_images, T) tag weights used (None when unweighted).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stops = torch.tensor(stop_token_ids if stop_token_ids is not None else self.config.stop_token_ids,
                             dtype=torch.long, device=input_ids.device)
        prepared = self.prepare_inputs(input_ids, attention_mask, None, pixel_values, tags, tag_input_ids,
                                       tag_attention_mask, padding_side="left", tag_scores=tag_scores)
        lm = self.language_model
        cache = DynamicCache(config=lm.config)
        out = lm(inputs_embeds=prepared.inputs_embeds, attention_mask=self.attention_inputs(prepared),
                 position_ids=prepared.position_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        batch = input_ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        positions = prepared.position_ids[:, -1:]  # (B, 1)
        new_tokens = []
        for step in range(max_new_tokens):
            picked = _pick(out.logits[:, -1].float(), do_sample, temperature, top_p, generator)  # (B,)
            token = picked.masked_fill(finished, pad_token_id)
            new_tokens.append(token)
            finished |= torch.isin(token, stops)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            prepared = _extend(prepared)
            positions = positions + 1
            # finished rows are fed any valid id (their outputs are discarded)
            out = lm(input_ids=picked[:, None], position_ids=positions, past_key_values=out.past_key_values,
                     attention_mask=self.attention_inputs(prepared, prepared.attention_mask.shape[1] - 1),
                     use_cache=True)
        tokens = torch.stack(new_tokens, dim=1)
        return (tokens, prepared.tag_weights) if return_tag_weights else tokens


# ------------------------------------------------------------------------------------ helpers
def bias_attention_mask(attention_mask: Tensor, key_bias: Tensor, dtype: torch.dtype, query_start: int = 0) -> Tensor:
    """(B, 1, Lq, L) additive mask: ``key_bias`` where causal and not padding, the dtype's minimum elsewhere.

    Args:
        attention_mask: (B, L) 1 for real tokens.
        key_bias: (B, L) additive bias per key position (0 = plain attention).
        dtype: the attention dtype.
        query_start: first query position (L - 1 for one decoding step with a KV cache).
    """
    length = attention_mask.shape[1]
    query = torch.arange(query_start, length, device=attention_mask.device)[:, None]  # (Lq, 1)
    key = torch.arange(length, device=attention_mask.device)[None, :]  # (1, L)
    allowed = (key <= query)[None] & attention_mask.bool()[:, None, :]  # (B, Lq, L)
    minimum = torch.finfo(dtype).min
    return torch.where(allowed, key_bias[:, None, :].to(dtype), torch.tensor(minimum, dtype=dtype,
                                                                             device=key_bias.device))[:, None]


def _block_indices(tag_mask: Tensor, token_mask: Tensor, delim_lengths: list[int]) -> list[Tensor | None]:
    """Per image the rows of [delimiters; all tag tokens flat] forming its block (None: no tags)."""
    n_prefix, n_sep, n_suffix = delim_lengths
    prefix = list(range(n_prefix))
    sep = list(range(n_prefix, n_prefix + n_sep))
    suffix = list(range(n_prefix + n_sep, n_prefix + n_sep + n_suffix))
    base = n_prefix + n_sep + n_suffix
    n_tags, width = token_mask.shape[1], token_mask.shape[2]
    out = []
    for n in range(tag_mask.shape[0]):
        real = tag_mask[n].nonzero().flatten().tolist()
        if not real:
            out.append(None)
            continue
        rows = list(prefix)
        for k, j in enumerate(real):
            rows += sep if k else []
            rows += (token_mask[n, j].nonzero().flatten() + base + (n * n_tags + j) * width).tolist()
        out.append(torch.tensor(rows + suffix, dtype=torch.long))
    return out


def _pad_rows(rows: list[list[tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]]], side: str,
              has_bias: bool, has_labels: bool, weights: Tensor | None) -> MultimodalInputs:
    """Concatenate each row's (embeddings, labels, bias, tag index) pieces and pad the batch on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    lengths = [sum(p[0].shape[0] for p in row) for row in rows]
    batch, length = len(rows), max(lengths)
    some = rows[0][0][0]
    embeds = torch.stack([_padded(torch.cat([p[0] for p in row]), length, side) for row in rows])  # (B, L, H)
    mask = torch.zeros(batch, length, dtype=torch.long, device=some.device)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long, device=some.device)
    bias = torch.zeros(batch, length, device=some.device)
    tag_index = torch.full((batch, length), -1, dtype=torch.long, device=some.device)
    for b, row in enumerate(rows):
        at = length - lengths[b] if side == "left" else 0
        mask[b, at:at + lengths[b]] = 1
        for emb, lab, key_bias, tags in row:
            n = emb.shape[0]
            if lab is not None:
                labels[b, at:at + n] = lab
            if key_bias is not None:
                bias[b, at:at + n] = key_bias
            if tags is not None:
                tag_index[b, at:at + n] = tags
            at += n
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return MultimodalInputs(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                            labels=labels if has_labels else None, key_bias=bias if has_bias else None,
                            tag_weights=weights, tag_index=tag_index)


def _padded(x: Tensor, length: int, side: str) -> Tensor:
    """(n, H) -> (length, H) with zero rows on ``side`` (a cat: its backward is a slice, no scatter)."""
    pad = x.new_zeros(length - x.shape[0], x.shape[1])
    return torch.cat([pad, x] if side == "left" else [x, pad])


def _extend(prepared: MultimodalInputs) -> MultimodalInputs:
    """Append one real key position (a generated token, bias 0) to the masks."""
    ones = prepared.attention_mask.new_ones(prepared.attention_mask.shape[0], 1)
    bias = None if prepared.key_bias is None else torch.cat([prepared.key_bias, prepared.key_bias.new_zeros(ones.shape)], 1)
    return MultimodalInputs(inputs_embeds=prepared.inputs_embeds, attention_mask=torch.cat([prepared.attention_mask, ones], 1),
                            position_ids=prepared.position_ids, labels=None, key_bias=bias,
                            tag_weights=prepared.tag_weights)


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_p: float,
          generator: torch.Generator | None) -> Tensor:
    """Next token per row: argmax, or a nucleus sample at ``temperature``."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits / max(temperature, 1e-5), -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters (a no-op for ordinary ones)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def _save_clip_files(spec: ClipSpec, directory: Path) -> dict[str, Any]:
    """Copy local CLIP files (checkpoint, model config) into ``directory/clip``; return the portable spec."""
    portable = _clip_recipe(spec)
    for key in ("pretrained", "model_config"):
        source = portable[key]
        if source and os.path.isfile(source):
            target = directory / CLIP_DIR / Path(source).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(source).resolve() != target.resolve():
                shutil.copyfile(source, target)
            portable[key] = f"{CLIP_DIR}/{target.name}"
    return portable


def _wrap_lora(language_model: PreTrainedModel, settings: dict[str, Any]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=settings["target_modules"], task_type="CAUSAL_LM")
    return get_peft_model(language_model, config)


def _postprocess_logits(logits: Tensor, text_config: Any) -> Tensor:
    """The LM-head post-processing some architectures apply inside their forward (for the
    labelled-position logits of ``score`` and of the loss-only forward)."""
    scale = getattr(text_config, "logit_scale", None)  # Cohere: multiply
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(text_config, "logits_scaling", None)  # Granite: divide
    if isinstance(divisor, (int, float)) and divisor != 1:
        logits = logits / divisor
    cap = getattr(text_config, "final_logit_softcapping", None)  # Gemma 2/3: soft-cap
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _clip_recipe(spec: ClipSpec) -> dict[str, Any]:
    return {**spec.to_dict(), "precision": spec.precision}


def _require_config(path: str | os.PathLike, what: str) -> None:
    """A one-line FileNotFoundError naming ``path`` if it is a local folder without ``config.json``."""
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json, so not {what} (save_pretrained writes config.json "
                                "next to the weights)")


def _resolve_clip_spec(clip: dict[str, Any], directory: Path) -> ClipSpec:
    """The saved CLIP recipe with ``clip/...`` paths resolved inside the model directory."""
    if not clip:
        raise ValueError(f"{directory}: config.json has no 'clip' entry; cannot load the CLIP tower")
    resolved = dict(clip)
    for key in ("pretrained", "model_config"):
        value = resolved.get(key)
        if value and value.startswith(f"{CLIP_DIR}/"):
            resolved[key] = str(directory / value)
    return spec_from_dict(resolved)


AutoModelForCausalLM.register(TunaConfig, TunaForCausalLM, exist_ok=True)
