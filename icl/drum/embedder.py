"""DRUM's embedder: an example's CLIP image and question embeddings -> one unit vector, [image; question] / sqrt(2).

Untrained, it is exactly the ``sit`` retriever (inner product = mean of the image and question cosines). The
training scope decides what learns:

- ``head``: an image and a question head (square linear maps, initialised to the identity) on the pool's
  stored CLIP embeddings. No image is re-encoded, so a round costs seconds; any CLIP architecture.
- ``projection``: CLIP's own projection matrices (``visual.proj`` of a ViT, ``visual.attnpool.c_proj`` of a
  ModifiedResNet, ``visual.head`` of a timm tower; ``text_projection``), the towers frozen.
- ``lora``: LoRA adapters (peft) on the towers' MLP / convolution layers.
- ``full``: every CLIP weight.

The retrieval temperature tau_r is a parameter too (``learn_temperature``). A saved embedder holds its config
and its trainable weights only; the frozen CLIP is reloaded from the spec and checked against its sha256.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from icl.formats import Example

SCOPES = ("head", "projection", "lora", "full")
CONFIG, WEIGHTS = "drum_embedder.json", "drum_embedder.safetensors"
# CLIP's projection parameters by architecture (ViT, ModifiedResNet, timm tower; text tower)
IMAGE_PROJECTIONS = ("visual.proj", "visual.attnpool.c_proj.weight", "visual.attnpool.c_proj.bias",
                     "visual.head.proj.weight", "visual.head.proj.bias")
TEXT_PROJECTIONS = ("text_projection", "text_projection.weight", "text_projection.bias")
# layers whose forward calls the module (open_clip's attention pools and nn.MultiheadAttention read the raw
# weights, which a LoRA wrapper would not change): the transformers' MLPs and the ResNets' convolutions
LORA_TARGETS = r".*(mlp\.c_fc|mlp\.c_proj|mlp\.fc1|mlp\.fc2|layer\d\.\d+\.conv\d)$"


@dataclass
class EmbedderConfig:
    """A DRUM embedder.

    Attributes:
        clip: the pool's CLIP spec (``ClipSpec.to_dict()``) and its weights' sha256.
        scope: what trains (module docstring).
        temperature: initial retrieval temperature tau_r of the ranking loss.
        learn_temperature: train tau_r with the rest.
        lora_rank, lora_alpha: LoRA settings of the ``lora`` scope.
        pixel_cache: preprocessed images kept in memory by the image-encoding scopes.
    """

    clip: dict[str, Any]
    clip_weights_sha256: str
    scope: str = "head"
    temperature: float = 0.05
    learn_temperature: bool = True
    lora_rank: int = 8
    lora_alpha: int = 16
    pixel_cache: int = 4096
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: pool, training run, round

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: expected one of {', '.join(SCOPES)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank={self.lora_rank}: must be >= 1")


class DrumEmbedder(nn.Module):
    """Embeds examples for retrieval; see the module docstring. Build with :meth:`for_pool` or :meth:`load`."""

    def __init__(self, config: EmbedderConfig, dim: int, clip: Any = None) -> None:
        super().__init__()
        self.config = config
        self.log_temperature = nn.Parameter(torch.tensor(math.log(config.temperature)),
                                            requires_grad=config.learn_temperature)
        self.clip = None
        if config.scope == "head":
            self.image_head, self.question_head = nn.Linear(dim, dim), nn.Linear(dim, dim)
            for head in (self.image_head, self.question_head):
                nn.init.eye_(head.weight)
                nn.init.zeros_(head.bias)
            return
        if clip is None:
            raise ValueError(f"scope {config.scope!r} re-encodes images: give the pool's CLIP")
        self._preprocess, self._tokenizer = clip.preprocess, clip.tokenizer
        self._pixels: OrderedDict[str, torch.Tensor] = OrderedDict()
        model = clip.model
        model.requires_grad_(config.scope == "full")
        if config.scope == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            model = inject_adapter_in_model(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                                       target_modules=LORA_TARGETS), model)
        elif config.scope == "projection":
            names = dict(model.named_parameters())
            image = [n for n in IMAGE_PROJECTIONS if n in names]
            text = [n for n in TEXT_PROJECTIONS if n in names]
            if not image or not text:
                raise ValueError(f"CLIP {config.clip.get('model')}: no image or text projection found "
                                 f"(looked for {IMAGE_PROJECTIONS + TEXT_PROJECTIONS}); use --scope lora or full")
            for n in image + text:
                names[n].requires_grad_(True)
        self.clip = model

    @classmethod
    def for_pool(cls, pool: Any, scope: str = "head", **settings: Any) -> DrumEmbedder:
        """The untrained embedder of ``pool``'s CLIP (identical to the ``sit`` retriever)."""
        clip_entry = pool.manifest["clip"]
        config = EmbedderConfig(clip={k: clip_entry.get(k) for k in ("model", "pretrained", "model_config")},
                                clip_weights_sha256=clip_entry["weights_sha256"], scope=scope, **settings)
        return cls(config, int(pool.manifest["dim"]), clip=None if scope == "head" else _fresh_clip(config))

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp()

    def embed(self, examples: Sequence[Example], image: np.ndarray, question: np.ndarray) -> torch.Tensor:
        """(n, 2d) unit rows for ``examples``; ``image``/``question`` are their stored CLIP embeddings (what
        the ``head`` scope reads; the other scopes re-encode the image files and question texts)."""
        if self.clip is None:
            device = self.image_head.weight.device
            img = self.image_head(torch.as_tensor(np.asarray(image, np.float32), device=device))
            txt = self.question_head(torch.as_tensor(np.asarray(question, np.float32), device=device))
        else:
            device = next(self.clip.parameters()).device
            pixels = torch.stack([self._pixel(e.image) for e in examples]).to(device)
            img = self.clip.encode_image(pixels)
            txt = self.clip.encode_text(self._tokenizer([e.question for e in examples]).to(device))
        img, txt = nn.functional.normalize(img.float(), dim=-1), nn.functional.normalize(txt.float(), dim=-1)
        return torch.cat([img, txt], dim=-1) / math.sqrt(2.0)

    def forward(self, examples: Sequence[Example], image: np.ndarray, question: np.ndarray) -> torch.Tensor:
        return self.embed(examples, image, question)

    def _pixel(self, path: str) -> torch.Tensor:
        from PIL import Image

        if path in self._pixels:
            self._pixels.move_to_end(path)
            return self._pixels[path]
        try:
            with Image.open(path) as image:
                pixels = self._preprocess(image.convert("RGB"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc
        self._pixels[path] = pixels
        if len(self._pixels) > self.config.pixel_cache:
            self._pixels.popitem(last=False)
        return pixels

    def embed_rows(self, examples: Sequence[Example], vectors: dict[str, np.ndarray], batch_size: int = 256,
                   progress: bool = False) -> np.ndarray:
        """Inference: (n, 2d) float32 embeddings of ``examples`` in batches (``vectors``: their CLIP rows)."""
        from tqdm import tqdm

        was_training = self.training
        self.eval()
        out = []
        with torch.no_grad():
            for s in tqdm(range(0, len(examples), batch_size), desc="embed", unit="batch", disable=not progress):
                out.append(self.embed(examples[s:s + batch_size], vectors["image"][s:s + batch_size],
                                      vectors["question"][s:s + batch_size]).cpu().numpy())
        self.train(was_training)
        return np.concatenate(out) if out else np.zeros((0, 2 * vectors["image"].shape[1]), np.float32)

    def save(self, folder: str | Path) -> None:
        """``drum_embedder.json`` + the trainable weights (safetensors)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().contiguous() for n, p in self.named_parameters()
                 if p.requires_grad or n == "log_temperature"}
        save_file(state, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(asdict(self.config), indent=1))

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> DrumEmbedder:
        """A saved embedder; its frozen CLIP must still have the recorded weights.

        Raises:
            ValueError: no embedder in ``folder``, another CLIP, or weights that do not fit the config.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise ValueError(f"{folder}: no {CONFIG} / {WEIGHTS} (not a DRUM embedder folder)")
        config = EmbedderConfig(**json.loads((folder / CONFIG).read_text()))
        state = load_file(folder / WEIGHTS)
        if config.scope == "head":
            model = cls(config, state["image_head.weight"].shape[0])
        else:
            model = cls(config, 0, clip=_fresh_clip(config))
        _, unexpected = model.load_state_dict(state, strict=False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad or n == "log_temperature"}
        if unexpected or trainable - set(state):
            raise ValueError(f"{folder}: weights do not fit a {config.scope!r} embedder (unexpected "
                             f"{sorted(unexpected)[:3]}, missing {sorted(trainable - set(state))[:3]})")
        return model.to(device)


def _fresh_clip(config: EmbedderConfig) -> Any:
    """The pool's CLIP, loaded anew (training changes its weights), checked against the recorded sha256."""
    from datastore.clip import load_clip, spec_from_dict

    clip = load_clip(spec_from_dict(config.clip))
    if clip.identity["weights_sha256"] != config.clip_weights_sha256:
        raise ValueError(f"CLIP {config.clip.get('model')} ({config.clip.get('pretrained')}): its weights are not "
                         "the ones this embedder was built on (sha256 differs)")
    return clip
