"""MMICT's Multi-Modal Hub (M-Hub): a Q-Former that fuses each image with the text around it.

The hub is transformers' BLIP-2 Q-Former (``Blip2QFormerModel``): learned query tokens and the image's guide
text go through self-attention together; only the queries cross-attend to the frozen CLIP patch features.
A fully connected layer maps its outputs to the LLM width. Per image it gives one of two things:

* **a demonstration** (an image followed by a later image in the same prompt): its guide is the demo's
  question and answer, and the hub's outputs at the *text* positions stand in for the image —
  visual-guided textual features (as many tokens as the guide has);
* **the query** (the last image of a prompt): its guide is the question, and the outputs at the *query*
  positions stand in for the image — textual-guided visual features (``num_queries`` tokens).

The guide text is read from the prompt itself (:func:`guide_spans`), as the LLM's own token embeddings
mapped to the hub's width (plus learned positions); it never reaches a labelled token, so the answer the
model is trained or scored on is never part of its own image's features. Differences from MMICT's code,
which builds on LAVIS: the guide is embedded from the LLM's vocabulary rather than BERT's (no second
tokenizer), and the demo's text stays in the prompt after the hub's features.

``load_blip2_qformer`` loads the Q-Former and query tokens of a BLIP-2 checkpoint (``Salesforce/blip2-*``
layout, ``qformer.*`` and ``query_tokens``) when the hub's shape matches it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

logger = logging.getLogger(__name__)

MHUB = "mhub"
_TEXT_FFN = re.compile(r"\.layer\.\d+\.(intermediate|output)\.")  # not intermediate_query / output_query
DEMO_FEATURES = ("text", "visual")


@dataclass
class MHubConfig:
    """Shape of the M-Hub (saved in ``TunaConfig.mhub``).

    Attributes:
        num_queries: learned query tokens (BLIP-2: 32); the query image's token count.
        hidden_size, num_layers, num_heads: the Q-Former's width, depth and attention heads (BLIP-2: 768, 12, 12).
        cross_attention_frequency: a cross-attention to the patches every this many layers (BLIP-2: 2).
        max_text: guide tokens read per image (the rest of a long question is cut).
        demo_features: "text" (MMICT: a demo is its visual-guided textual features) or "visual" (the ablation:
            a demo gets textual-guided visual features like the query, its text only in the prompt: uni-modal
            features side by side).
    """

    num_queries: int = 32
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    cross_attention_frequency: int = 2
    max_text: int = 64
    demo_features: str = "text"

    def __post_init__(self) -> None:
        if self.demo_features not in DEMO_FEATURES:
            raise ValueError(f"mhub demo_features={self.demo_features!r}: expected one of {list(DEMO_FEATURES)}")
        for name in ("num_queries", "hidden_size", "num_layers", "num_heads", "cross_attention_frequency",
                     "max_text"):
            if getattr(self, name) < 1:
                raise ValueError(f"mhub {name}={getattr(self, name)}: must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"mhub hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)


def guide_spans(is_image: Tensor, labelled: Tensor, max_text: int) -> list[tuple[int, int, bool]]:
    """Each image's guide in one row: (start, end, is_demo), the tokens after the image up to the next image,
    the first labelled token or ``max_text`` tokens (end exclusive); a demo is an image a later image follows.

    Args:
        is_image: (L,) bool, the image sentinels of the row's real tokens.
        labelled: (L,) bool, the tokens the loss or the score is taken on (all False when generating).
        max_text: longest guide.
    """
    images = is_image.nonzero().flatten().tolist()
    stops = labelled.nonzero().flatten().tolist()
    spans = []
    for n, pos in enumerate(images):
        end = images[n + 1] if n + 1 < len(images) else is_image.shape[0]
        end = min([end, pos + 1 + max_text] + [s for s in stops if s > pos][:1])
        spans.append((pos + 1, max(end, pos + 1), n + 1 < len(images)))
    return spans


class MHub(nn.Module):
    """The M-Hub: query tokens + guide text through a Q-Former over the patches, then an FC layer to the LLM.

    Args:
        config: its shape.
        vision_dim: width of the CLIP patch features (the cross-attention's keys and values).
        llm_dim: the LLM's hidden size (the guide's embeddings come in at it; the outputs go out at it).
    """

    def __init__(self, config: MHubConfig, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=h, num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            intermediate_size=4 * h, encoder_hidden_size=vision_dim,
            cross_attention_frequency=config.cross_attention_frequency, use_qformer_text_input=True))
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, h))
        self.text_in = nn.Linear(llm_dim, h)  # the LLM's token embeddings -> hub width
        self.text_positions = nn.Embedding(config.max_text, h)
        self.proj = nn.Linear(h, llm_dim)  # MMICT's fully connected layer

    def reset_parameters(self) -> None:
        """BLIP-2's initialisation of the query tokens (std 0.02); the rest is initialised by the owner."""
        nn.init.normal_(self.query_tokens, std=0.02)
        nn.init.normal_(self.text_positions.weight, std=0.02)

    def forward(self, patches: Tensor, guide: Tensor, guide_mask: Tensor, demo: Tensor) -> list[Tensor]:
        """Tokens standing in for each image.

        Args:
            patches: (N, P, Dv) CLIP patch features.
            guide: (N, Lt, H_llm) the guide text's token embeddings (Lt >= 1; padding masked).
            guide_mask: (N, Lt) 1 for real guide tokens.
            demo: (N,) bool, which images are demonstrations.

        Returns:
            N tensors: (n_text, H_llm) for a demo with ``demo_features="text"`` and a non-empty guide, else
            (num_queries, H_llm).
        """
        n, width = guide.shape[0], guide.shape[1]
        dtype = self.query_tokens.dtype
        # through the modules' forwards (not .weight): ZeRO-3 gathers a module's parameters when it is called
        positions = self.text_positions(torch.arange(width, device=guide.device)).to(dtype)
        text = self.text_in(guide.to(dtype)) + positions  # (N, Lt, h)
        queries = self.query_tokens.expand(n, -1, -1)
        nq = queries.shape[1]
        mask = torch.cat([guide_mask.new_ones(n, nq), guide_mask], dim=1)
        out = self.qformer(query_embeds=torch.cat([queries, text], dim=1), query_length=nq, attention_mask=mask,
                           encoder_hidden_states=patches.to(dtype)).last_hidden_state  # (N, nq + Lt, h)
        projected = self.proj(out.to(self.proj.weight.dtype))  # (N, nq + Lt, H_llm)
        tokens = []
        for i in range(n):
            real = guide_mask[i].bool()
            if self.config.demo_features == "text" and bool(demo[i]) and bool(real.any()):
                tokens.append(projected[i, nq:][real])
            else:
                tokens.append(projected[i, :nq])
        return tokens


def load_blip2_qformer(hub: MHub, path: str | Path) -> int:
    """Load a BLIP-2 checkpoint's Q-Former (``qformer.*``) and ``query_tokens`` into ``hub``; returns the count.

    ``path``: a ``.safetensors`` file, or a checkpoint folder (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``). Only the needed tensors are read.

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        ValueError: the checkpoint's Q-Former does not fit the hub (missing keys or other shapes, listed).
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir() and (path / "model.safetensors.index.json").is_file():
        weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        key_files = {key: path / name for key, name in weight_map.items()}
    else:
        file = path / "model.safetensors" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"BLIP-2 checkpoint not found: {file} (nor a model.safetensors.index.json)")
        with safe_open(str(file), framework="pt") as f:
            key_files = dict.fromkeys(f.keys(), file)
    wanted = {f"qformer.{k}": v for k, v in hub.qformer.state_dict().items()}
    wanted["query_tokens"] = hub.query_tokens
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        if key in key_files:
            by_file.setdefault(key_files[key], []).append(key)
    state = {}
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in keys})
    # BLIP-2's captioning checkpoints have no feed-forward for text positions (its ITM ones do): those start fresh
    text_ffn = {k for k in wanted if _TEXT_FFN.search(k)}
    fresh = sorted(k for k in text_ffn if k not in state)
    problems = [f"missing {k}" for k in wanted if k not in state and k not in text_ffn]
    problems += [f"{k}: shape {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in wanted.items()
                 if k in state and state[k].shape != v.shape]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"{path}: the BLIP-2 Q-Former does not fit this M-Hub ({shown})")
    with torch.no_grad():
        hub.query_tokens.copy_(state.pop("query_tokens").to(hub.query_tokens.dtype))
        missing, _ = hub.qformer.load_state_dict({k[len("qformer."):]: v for k, v in state.items()}, strict=False)
    assert sorted(f"qformer.{k}" for k in missing) == fresh, (missing, fresh)
    logger.info("loaded %d BLIP-2 Q-Former tensors from %s%s", len(state) + 1, path,
                f" ({len(fresh)} text feed-forward tensors not in it start fresh)" if fresh else "")
    return len(state) + 1
