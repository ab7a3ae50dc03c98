"""Induction warm-up: random token runs said twice, trained before the text pretraining.

Copying a name of several tokens from a tag list needs an induction head (attend to the token after the
previous occurrence of the current token, and say it). In the quickstart's 1,500 text steps such a head
never formed, even with 10 % of the samples built for it (docs/experiments.md, section 12). Runs of
uniformly random tokens repeated once are the cleanest signal for it: nothing but copying predicts the
second run, so the loss on it drops only when the head forms (a sudden drop, the "phase change").
With the text LLM's 8 heads it comes within 800 steps at every seed tried, with 4 at some seeds only
(docs/experiments.md, section 19).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch


@dataclass
class InductionResult:
    """What the warm-up did: ``copy_rate`` is the share of held-out repeated tokens predicted (after each
    run's first token, which cannot be), measured every ``every`` steps."""

    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    copy_rate: list[tuple[int, float]] = field(default_factory=list)
    membership: list[tuple[int, float]] = field(default_factory=list)  # held-out yes/no accuracy, when trained


def _packed_rows(batch_size: int, length: int, bos: int, segment: Callable[[int], tuple[torch.Tensor, ...] | None],
                 channels: int = 1) -> tuple[torch.Tensor, ...]:
    """Rows of ``bos`` then segments packed one after another while ``segment(room)`` returns one that fits
    in ``room`` tokens and not None: the ids and ``channels`` per-token float tensors (the loss weights
    first), all of one length. ``bos`` fills the rest of the ids, zeros the rest of the channels."""
    rows = [torch.full((batch_size, length), bos, dtype=torch.long)]
    rows += [torch.zeros(batch_size, length) for _ in range(channels)]
    for row in range(batch_size):
        pos = 1
        while (made := segment(length - pos)) is not None:
            for out, part in zip(rows, made, strict=True):
                out[row, pos:pos + len(part)] = part
            pos += len(made[0])
    return tuple(rows)


def repeat_batch(token_ids: torch.Tensor, batch_size: int, length: int, separator: int, bos: int,
                 generator: torch.Generator, min_run: int = 3, max_run: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``bos`` then packed ``run SEP run`` segments of random tokens from ``token_ids`` (``bos`` fills
    the rest); the weights mark the second run's tokens after its first (the only predictable ones).
    Returns (ids, weights), (B, L) each."""

    def segment(room: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        n = int(torch.randint(min_run, max_run + 1, (1,), generator=generator))
        if 2 * n + 1 > room:
            return None
        run = token_ids[torch.randint(len(token_ids), (n,), generator=generator)]
        return torch.cat([run, torch.tensor([separator]), run]), torch.cat([torch.zeros(n + 2), torch.ones(n - 1)])

    return _packed_rows(batch_size, length, bos, segment)


@dataclass(frozen=True)
class MembershipRows:
    """What the membership rows hold: ``mark`` comes before the asked token (as " a" before the name in
    "Is there a grekib"; one token or several), ``yes`` / ``no`` answer whether it is in the list; between
    the asked token and the answer come one of ``fillers`` (drawn per row segment), or (none given)
    0-``max_gap`` random ones. ``item_prefix`` comes before each listed token: the
    space token, where the tokenizer makes spaces tokens of their own, so that a row looks like a tag
    list and a question do (the mark then ends with it too). ``question_first`` puts the question before
    the list (``mark asked gap SEP list answer``), as a tag block placed after the question would read."""

    mark: int | tuple[int, ...]
    yes: int
    no: int
    max_gap: int = 4
    fillers: tuple[tuple[int, ...], ...] = ()
    item_prefix: tuple[int, ...] = ()
    question_first: bool = False

    @property
    def mark_ids(self) -> tuple[int, ...]:
        return (self.mark,) if isinstance(self.mark, int) else tuple(self.mark)

    def segment_length(self, n_listed: int, gap: int) -> int:
        """Tokens of one row segment: the listed tokens (each after ``item_prefix``), the separator, the mark,
        the asked token, ``gap`` tokens and the answer."""
        return n_listed * (1 + len(self.item_prefix)) + len(self.mark_ids) + gap + 3

    def gap(self, token_ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The tokens between one segment's asked token and its answer."""
        if self.fillers:  # one filler takes no draw: the rows are those of a fixed gap
            pick = int(torch.randint(len(self.fillers), (1,), generator=generator)) if len(self.fillers) > 1 else 0
            return torch.tensor(self.fillers[pick], dtype=torch.long)
        return token_ids[torch.randint(len(token_ids), (int(torch.randint(0, self.max_gap + 1, (1,),
                                                                          generator=generator)),),
                                       generator=generator)]


class MembershipBatch(NamedTuple):
    """Membership rows, (B, L) each: the token ids, the loss weights (1 on the answers) and 1 on the listed
    tokens (their prefixes included), e.g. for a segment embedding that marks the list."""

    ids: torch.Tensor
    weights: torch.Tensor
    listed: torch.Tensor


def membership_batch(token_ids: torch.Tensor, batch_size: int, length: int, separator: int, bos: int,
                     spec: MembershipRows, generator: torch.Generator, min_run: int = 2,
                     max_run: int = 8) -> MembershipBatch:
    """Rows of ``bos`` then packed ``list SEP mark asked gap answer`` segments (``mark asked gap SEP list
    answer`` with ``spec.question_first``): a list of random tokens, a token asked about (from the list
    half of the time), the gap (``spec``), and ``yes`` or ``no``. The weights mark the answers. Answering
    (list first) needs the asked token's earlier occurrence found (a duplicate-token head) and that
    finding carried to the answer past the gap (a head reading the token after ``mark``): the two steps
    of "is the name in the tag block?"."""
    if len(token_ids.unique()) < 2:
        raise ValueError("membership_batch needs at least 2 distinct tokens (an absent one is drawn for 'no')")
    longest = max((len(f) for f in spec.fillers), default=spec.max_gap)
    if spec.segment_length(min_run, longest) > length - 1:  # the room after bos
        raise ValueError(f"membership rows of {length} tokens cannot hold a {min_run}-token list and the longest "
                         f"gap ({longest} tokens)")

    def segment(room: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        n = int(torch.randint(min_run, max_run + 1, (1,), generator=generator))
        between = spec.gap(token_ids, generator)
        if spec.segment_length(n, len(between)) > room:
            return None
        run = token_ids[torch.randint(len(token_ids), (n,), generator=generator)]
        present = bool(torch.rand(1, generator=generator) < 0.5)
        if present:
            asked = run[int(torch.randint(n, (1,), generator=generator))]
        else:
            asked = run[0]
            while bool((run == asked).any()):
                asked = token_ids[int(torch.randint(len(token_ids), (1,), generator=generator))]
        listed = run
        if spec.item_prefix:
            prefix = torch.tensor(spec.item_prefix, dtype=torch.long)
            listed = torch.cat([torch.cat([prefix, t[None]]) for t in run])
        question = torch.cat([torch.tensor([*spec.mark_ids, int(asked)]), between])
        said = torch.tensor([spec.yes if present else spec.no])
        parts = ([question, torch.tensor([separator]), listed, said] if spec.question_first
                 else [listed, torch.tensor([separator]), question, said])
        ids = torch.cat(parts)
        answer = torch.cat([torch.zeros(len(ids) - 1), torch.ones(1)])
        start = len(question) + 1 if spec.question_first else 0
        in_list = torch.zeros(len(ids))
        in_list[start:start + len(listed)] = 1
        return ids, answer, in_list

    return MembershipBatch(*_packed_rows(batch_size, length, bos, segment, channels=2))


def _next_token_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """The logits predicting tokens 1.. of ``ids`` (eval mode, no gradients; the mode is restored)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    model.train(was_training)
    return logits


def membership_accuracy(model: Any, token_ids: torch.Tensor, separator: int, bos: int, spec: MembershipRows,
                        seed: int, rows: int = 32, length: int = 64) -> float:
    """Share of held-out membership answers whose yes/no logit comparison is right."""
    ids, weights, _ = membership_batch(token_ids, rows, length, separator, bos, spec,
                                       torch.Generator().manual_seed(seed))
    logits = _next_token_logits(model, ids)
    said_yes = logits[..., spec.yes] > logits[..., spec.no]
    right = (said_yes == (ids[:, 1:] == spec.yes)).float() * weights[:, 1:]
    return float(right.sum() / weights[:, 1:].sum())


def copy_rate(model: Any, token_ids: torch.Tensor, separator: int, bos: int, seed: int, rows: int = 32,
              length: int = 64) -> float:
    """Share of the predictable tokens of held-out repeats that greedy next-token prediction gets right."""
    ids, weights = repeat_batch(token_ids, rows, length, separator, bos, torch.Generator().manual_seed(seed))
    predicted = _next_token_logits(model, ids).argmax(-1)
    hit = (predicted == ids[:, 1:]).float() * weights[:, 1:]
    return float(hit.sum() / weights[:, 1:].sum())


def induction_warmup(model: Any, token_ids: torch.Tensor, separator: int, bos: int, steps: int, loss_fn: Callable,
                     batch_size: int = 16, length: int = 64, lr: float = 3e-3, warmup_steps: int = 30,
                     weight_decay: float = 0.01, seed: int = 0, every: int = 100,
                     say: Callable[[str], None] = print, membership: MembershipRows | None = None,
                     membership_rows: int = 0) -> InductionResult:
    """Train ``model`` on :func:`repeat_batch` rows for ``steps`` steps (AdamW, linear warm-up then constant
    ``lr``; its own optimizer state). ``loss_fn(model, ids, positions, weights)`` is the weighted LM loss.
    Weight decay brought the phase change sooner in a bare loop (docs/experiments.md, section 18).
    With ``membership`` and ``membership_rows`` > 0, each step adds that many :func:`membership_batch` rows
    and the held-out membership accuracy is recorded next to the copy rate."""
    membership = membership if membership_rows > 0 else None
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    positions = torch.arange(length).expand(batch_size, length)
    result, start = InductionResult(steps, 0.0), time.perf_counter()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_steps))
        ids, weights = repeat_batch(token_ids, batch_size, length, separator, bos, generator)
        loss = loss_fn(model, ids, positions, weights)
        if membership is not None:
            ids, weights, _ = membership_batch(token_ids, membership_rows, length, separator, bos, membership,
                                               generator)
            loss = loss + loss_fn(model, ids, positions[:membership_rows], weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        result.losses.append(loss.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            rate = copy_rate(model, token_ids, separator, bos, seed=seed + 10_000)
            result.copy_rate.append((step + 1, rate))
            member = ""
            if membership is not None:
                result.membership.append((step + 1, membership_accuracy(model, token_ids, separator, bos, membership,
                                                                         seed=seed + 20_000)))
                member = f"  membership {result.membership[-1][1]:.0%}"
            say(f"  induction warm-up step {step + 1}/{steps}  loss {sum(result.losses[-every:]) / min(every, step + 1):.3f}"
                f"  held-out copy rate {rate:.0%}{member}  {time.perf_counter() - start:.0f}s")
    result.seconds = time.perf_counter() - start
    return result
