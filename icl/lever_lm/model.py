"""Lever-LM (NeurIPS 2024): a small causal transformer whose vocabulary is the demonstration pool.

The sequence is ``[BOS, Q, d1, ..., dL]``: Q carries the query's CLIP image and question features, each demo
token its id embedding plus its CLIP image, question and answer features. The hidden state at Q predicts d1,
at d_i predicts d_{i+1}, at dL predicts EOS. Generation order is prompt order (d1 farthest from the query).

Vocabulary: pool rows ``0 .. n_pool - 1``, then BOS = n_pool, EOS = n_pool + 1, QUERY = n_pool + 2. The pool's
CLIP features are persistent buffers, so a saved model is self-contained; ``pool_fingerprint`` ties it to
the pool whose rows its ids are (:attr:`icl.pool.Pool.fingerprint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GPT2Config, GPT2Model, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

IGNORE = -100  # padding of demo_ids and of the targets


class LeverLMConfig(PretrainedConfig):
    """Configuration of :class:`LeverLM` (saved as ``config.json``).

    Args:
        n_pool: pool size = number of demo ids (filled by :meth:`LeverLM.for_pool`).
        clip_dim: CLIP embedding width of the pool's features.
        hidden_size, num_layers, num_heads: the GPT-2 backbone (the paper: 2 layers).
        max_positions: longest sequence, ``[BOS, Q]`` included: at most ``max_positions - 2`` demos.
        dropout: embedding, attention and residual dropout of the backbone.
        adapter: a residual MLP on the frozen CLIP features before the projections (starts as the identity).
        pool_fingerprint: sha256 of the pool's ids in row order; retrievers refuse other pools.
        pool_path: where that pool was (informational: the model does not need it).
    """

    model_type = "tuna_lever_lm"

    def __init__(self, n_pool: int = 0, clip_dim: int = 0, hidden_size: int = 512, num_layers: int = 2,
                 num_heads: int = 8, max_positions: int = 64, dropout: float = 0.1, adapter: bool = False,
                 pool_fingerprint: str = "", pool_path: str = "", **kwargs: Any) -> None:
        if hidden_size < 1 or num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size}, num_heads={num_heads}: hidden_size must be a positive "
                             "multiple of num_heads")
        if num_layers < 1 or max_positions < 3:
            raise ValueError(f"num_layers={num_layers}, max_positions={max_positions}: need >= 1 layer and >= 3 "
                             "positions ([BOS, Q] and one demo)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout}: must be in [0, 1)")
        self.n_pool, self.clip_dim = n_pool, clip_dim
        self.hidden_size, self.num_layers, self.num_heads = hidden_size, num_layers, num_heads
        self.max_positions, self.dropout, self.adapter = max_positions, dropout, adapter
        self.pool_fingerprint, self.pool_path = pool_fingerprint, pool_path
        super().__init__(**kwargs)


@dataclass
class LeverLMOutput(ModelOutput):
    """Output of :meth:`LeverLM.forward`.

    Attributes:
        loss: mean cross-entropy over the real targets (each demo and the EOS after the last), or None.
        logits: (B, L + 2, n_pool + 2); column = vocabulary id (pool ids, BOS, EOS). BOS is never predicted
            (its column is the dtype's minimum) and QUERY has no column.
        targets: (B, L + 2) the id each position predicts, IGNORE (-100) where none.
    """

    loss: Tensor | None = None
    logits: Tensor | None = None
    targets: Tensor | None = None


@dataclass
class GeneratedDemos:
    """Greedy generation of :meth:`LeverLM.generate`, all (B, k), in generation (= prompt) order.

    Attributes:
        ids: pool ids, distinct per query.
        logprobs: the model's log-probability of each id at its step (over the whole vocabulary, not
            renormalised over the allowed ids).
        hit_excluded: the model's first choice (repeats masked) was an excluded id.
        preferred: that first choice (equals ``ids`` where ``hit_excluded`` is false).
    """

    ids: Tensor
    logprobs: Tensor
    hit_excluded: Tensor
    preferred: Tensor


class FeatureAdapter(nn.Module):
    """``x + MLP(x)`` on frozen CLIP features; the last layer starts at zero, so the adapter starts as identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.down(self.act(self.up(x)))


class LeverLM(PreTrainedModel):
    """The demonstration generator. New: :meth:`for_pool`; saved: ``save_pretrained`` / ``from_pretrained``."""

    config_class = LeverLMConfig
    base_model_prefix = "lever_lm"
    _no_split_modules: ClassVar[list[str]] = ["GPT2Block"]

    def __init__(self, config: LeverLMConfig) -> None:
        super().__init__(config)
        n, d, h = config.n_pool, config.clip_dim, config.hidden_size
        if n < 1 or d < 1:
            raise ValueError(f"n_pool={n}, clip_dim={d}: both must be >= 1 (build with LeverLM.for_pool(pool))")
        self.bos, self.eos, self.query = n, n + 1, n + 2
        self.backbone = GPT2Model(GPT2Config(
            vocab_size=1, n_embd=h, n_layer=config.num_layers, n_head=config.num_heads,
            n_positions=config.max_positions, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
            attn_pdrop=config.dropout, bos_token_id=None, eos_token_id=None))
        # fed inputs_embeds only: freeze the unused token table so DDP does not wait for its gradient
        self.backbone.wte.requires_grad_(False)
        # plain parameters rather than nn.Embedding: read whole, never indexed through a module call, which
        # ZeRO-3 would need to gather them
        self.id_embed = nn.Parameter(torch.empty(n, h))
        self.bos_embed = nn.Parameter(torch.empty(h))
        self.query_embed = nn.Parameter(torch.empty(h))
        self.eos_out = nn.Parameter(torch.empty(h))  # output vector of EOS (pool items use their demo embedding)
        self.proj_image, self.proj_question, self.proj_answer = (nn.Linear(d, h) for _ in range(3))
        self.image_adapter = FeatureAdapter(d) if config.adapter else None
        self.text_adapter = FeatureAdapter(d) if config.adapter else None
        for kind in ("image", "question", "answer"):
            self.register_buffer(f"pool_{kind}", torch.zeros(n, d), persistent=True)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, LeverLM):  # runs after all children
            for param in (module.id_embed, module.bos_embed, module.query_embed, module.eos_out):
                init.normal_(param, std=0.02)
            # here, not on FeatureAdapter itself: transformers skips custom modules without own parameters
            for adapter in (module.image_adapter, module.text_adapter):
                if adapter is not None:
                    init.zeros_(adapter.down.weight)
                    init.zeros_(adapter.down.bias)
        else:
            super()._init_weights(module)

    @classmethod
    def for_pool(cls, pool: Any, **config_kwargs: Any) -> LeverLM:
        """A new model over ``pool`` (an :class:`icl.pool.Pool`, or anything with ``vectors``, ``fingerprint``
        and ``root``): its features become the buffers, its fingerprint and path go into the config."""
        arrays = {kind: np.asarray(pool.vectors[kind], np.float32) for kind in ("image", "question", "answer")}
        n, d = arrays["image"].shape
        if any(a.shape != (n, d) for a in arrays.values()):
            raise ValueError(f"pool vectors: image {arrays['image'].shape}, question {arrays['question'].shape}, "
                             f"answer {arrays['answer'].shape}: need one common (n, d) shape")
        config = LeverLMConfig(n_pool=n, clip_dim=d, pool_fingerprint=pool.fingerprint,
                               pool_path=str(Path(pool.root).resolve()), **config_kwargs)
        model = cls(config)
        with torch.no_grad():
            for kind, array in arrays.items():
                getattr(model, f"pool_{kind}").copy_(torch.from_numpy(array))
        return model

    # ------------------------------------------------------------------------------------------ embeddings
    def _image(self, x: Tensor) -> Tensor:
        return self.proj_image(self.image_adapter(x) if self.image_adapter is not None else x)

    def _text(self, proj: nn.Linear, x: Tensor) -> Tensor:
        return proj(self.text_adapter(x) if self.text_adapter is not None else x)

    def demo_table(self) -> Tensor:
        """(n_pool, hidden) embedding of every pool item: the input of a demo token and the output head.

        Computed whole at each call (three (n_pool, d) x (d, hidden) products: cheap for pools up to ~1e5)
        because the projections and adapters change during training."""
        return (self.id_embed + self._image(self.pool_image) + self._text(self.proj_question, self.pool_question)
                + self._text(self.proj_answer, self.pool_answer))

    def _prefix(self, query_image: Tensor, query_question: Tensor) -> Tensor:
        """(B, 2, hidden): ``[BOS, QUERY + P_img(image) + P_q(question)]``."""
        query = self.query_embed + self._image(query_image) + self._text(self.proj_question, query_question)
        return torch.stack([self.bos_embed.expand_as(query), query], dim=1)

    def _logits(self, hidden: Tensor, table: Tensor) -> Tensor:
        """(..., n_pool + 2) scores of pool ids, BOS (never) and EOS.

        The head is tied to the demo embeddings: an untied (hidden, n_pool) head could not score pool items
        that never appear as targets in a small D_M; the tied one ranks every item by its CLIP features."""
        eos = hidden @ self.eos_out
        bos = torch.full_like(eos, torch.finfo(eos.dtype).min)
        return torch.cat([hidden @ table.T, bos[..., None], eos[..., None]], dim=-1)

    # ------------------------------------------------------------------------------------------ training
    def forward(self, query_image: Tensor, query_question: Tensor, demo_ids: Tensor | None = None,
                labels: bool | None = None, **kwargs: Any) -> LeverLMOutput:
        """Scores of each next demo for ``[BOS, Q, d1, ..., dL]``.

        Args:
            query_image, query_question: (B, clip_dim) CLIP features of the queries (never their answers).
            demo_ids: (B, L) long pool ids in prompt order, right-padded with -100; None: no demos.
            labels: true to compute the loss (targets come from ``demo_ids``: each demo, then EOS).

        Example::

            out = model(img, q, torch.tensor([[4, 9], [7, -100]]), labels=True)
            out.loss.backward()
        """
        batch = query_image.shape[0]
        # the buffers carry the model's dtype (DeepSpeed casts the whole model, inputs stay float32)
        query_image, query_question = query_image.to(self.pool_image.dtype), query_question.to(self.pool_image.dtype)
        if demo_ids is None:
            demo_ids = torch.full((batch, 0), IGNORE, dtype=torch.long, device=query_image.device)
        length = demo_ids.shape[1]
        if length + 2 > self.config.max_positions:
            raise ValueError(f"demo_ids: {length} demos need {length + 2} positions, the model has "
                             f"{self.config.max_positions}")
        real = demo_ids != IGNORE
        if ((demo_ids < 0) & real).any() or (demo_ids >= self.config.n_pool).any():
            raise ValueError(f"demo_ids: ids must be in [0, {self.config.n_pool}) or -100 (padding)")
        if (real[:, 1:] & ~real[:, :-1]).any():
            raise ValueError("demo_ids: pad at the end (right padding with -100)")
        table = self.demo_table()
        embeds = torch.cat([self._prefix(query_image, query_question), table[demo_ids.clamp_min(0)]], dim=1)
        # causal attention and right padding: real positions never see the padded ones, so no mask is needed
        hidden = self.backbone(inputs_embeds=embeds).last_hidden_state
        logits = self._logits(hidden, table)
        targets = torch.full((batch, length + 2), IGNORE, dtype=torch.long, device=demo_ids.device)
        targets[:, 1:length + 1] = demo_ids
        targets[torch.arange(batch, device=demo_ids.device), real.sum(1) + 1] = self.eos
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE) if labels else None
        return LeverLMOutput(loss=loss, logits=logits, targets=targets)

    # ------------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, query_image: Tensor, query_question: Tensor, k: int, exclude: Tensor | None = None
                 ) -> GeneratedDemos:
        """Greedy ``k`` distinct pool ids per query, batched over queries, in prompt order.

        EOS and the specials are never emitted (``k`` demos are asked for, even beyond the trained lengths);
        ``exclude`` (B, n_pool) bool masks ids per query.

        Raises:
            ValueError: ``k`` < 0, ``k`` over ``max_positions - 2``, or over the ids a query allows.
        """
        n, batch = self.config.n_pool, query_image.shape[0]
        if k < 0 or k + 2 > self.config.max_positions:
            raise ValueError(f"k={k}: this model generates 0 to {self.config.max_positions - 2} demos "
                             f"(max_positions={self.config.max_positions})")
        device = self.pool_image.device
        exclude = (torch.zeros(batch, n, dtype=torch.bool, device=device) if exclude is None
                   else exclude.to(device=device, dtype=torch.bool))
        if exclude.shape != (batch, n):
            raise ValueError(f"exclude: shape {tuple(exclude.shape)}, expected ({batch}, {n})")
        allowed = n - exclude.sum(1)
        if batch and k > int(allowed.min()):
            q = int(allowed.argmin())
            raise ValueError(f"k={k}: query {q} of the batch allows only {int(allowed[q])} pool ids")
        query_image = query_image.to(device=device, dtype=self.pool_image.dtype)
        query_question = query_question.to(device=device, dtype=self.pool_image.dtype)
        was_training = self.training
        self.eval()
        try:
            table = self.demo_table()
            embeds = self._prefix(query_image, query_question)
            used = torch.zeros_like(exclude)
            rows = torch.arange(batch, device=device)
            steps = []
            past = None  # key/value cache: each step feeds only the newest demo
            for _ in range(k):
                out = self.backbone(inputs_embeds=embeds, past_key_values=past, use_cache=True)
                hidden, past = out.last_hidden_state[:, -1], out.past_key_values
                logprobs = self._logits(hidden, table).float().log_softmax(-1)[:, :n]
                scores = logprobs.masked_fill(used, -torch.inf)
                preferred = scores.argmax(-1)
                ids = scores.masked_fill(exclude, -torch.inf).argmax(-1)
                used[rows, ids] = True
                steps.append((ids, logprobs[rows, ids], exclude[rows, preferred], preferred))
                embeds = table[ids][:, None]
        finally:
            self.train(was_training)
        if not steps:
            empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
            return GeneratedDemos(empty, empty.float(), empty.bool(), empty)
        ids, logprobs, hits, preferred = (torch.stack(column, dim=1) for column in zip(*steps))
        return GeneratedDemos(ids=ids, logprobs=logprobs, hit_excluded=hits, preferred=preferred)


__all__ = ["IGNORE", "GeneratedDemos", "LeverLM", "LeverLMConfig", "LeverLMOutput"]
