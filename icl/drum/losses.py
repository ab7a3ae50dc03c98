"""Ranking losses over one candidate list per query: the retriever's similarities against the model's scores.

All take ``sim`` (B, n) retriever inner products, ``scores`` (B, n) the scoring model's s(z), a ``mask``
(B, n) of real candidates (lists shorter than n are padded) and the retrieval temperature tau_r; they return
the mean over queries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1e4  # a padded candidate's logit: exp() underflows to 0 without inf - inf = nan


def kl_listwise(sim: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor,
                score_temperature: float = 1.0) -> torch.Tensor:
    """DRUM's loss: KL(softmax(s / tau_f) || softmax(sim / tau_r)) over each list."""
    target = F.softmax(scores.masked_fill(~mask, NEG) / score_temperature, dim=-1)
    log_q = F.log_softmax((sim / temperature).masked_fill(~mask, NEG), dim=-1)
    kl = (target * (torch.log(target.clamp_min(1e-12)) - log_q)).masked_fill(~mask, 0.0).sum(-1)
    return kl.mean()


def list_mle(sim: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor,
             score_temperature: float = 1.0) -> torch.Tensor:
    """ListMLE: minus the Plackett-Luce log-likelihood of the order by s under sim / tau_r."""
    order = scores.masked_fill(~mask, float("-inf")).argsort(dim=-1, descending=True)
    logits = (sim / temperature).masked_fill(~mask, NEG).gather(-1, order)
    kept = mask.gather(-1, order)
    # log-sum-exp of each suffix: the normaliser of picking position i among those not yet picked
    suffix = torch.logcumsumexp(logits.flip(-1), dim=-1).flip(-1)
    return ((suffix - logits) * kept).sum(-1).mean()


def epr_contrastive(sim: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, temperature: torch.Tensor,
                    negatives: int = 8) -> torch.Tensor:
    """EPR: the best-scored candidate is the positive, the ``negatives`` worst-scored are the negatives;
    InfoNCE over [positive, negatives] per query."""
    order = scores.masked_fill(~mask, float("-inf")).argsort(dim=-1, descending=True)
    n_real = mask.sum(-1)
    losses = []
    for b in range(sim.shape[0]):
        real = int(n_real[b])
        if real < 2:
            continue
        picked = torch.cat([order[b, :1], order[b, max(1, real - negatives):real]])
        logits = sim[b, picked] / temperature
        losses.append(-F.log_softmax(logits, dim=-1)[0])
    return torch.stack(losses).mean() if losses else sim.sum() * 0.0


LOSSES = {"kl": kl_listwise, "listmle": list_mle, "epr": epr_contrastive}
