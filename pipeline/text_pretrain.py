"""Text-only pretraining of a tiny causal LM: the language + copy-from-context prior a real LLM brings.

A tiny LLM trained from scratch only on seen-category instructions memorises the seen names instead of
reading them from the retrieved tags. This stage gives it the missing prior before multimodal training:
the caller's captions (world language; they may name any category, like a real LLM knowing words) and
generated copy texts with made-up names (:mod:`pipeline.copy_text`).

``pretrain_text_llm`` trains a BPE tokenizer on that text, a random-init Qwen2 LM (:mod:`pipeline.tiny`)
with a plain torch loop, and saves both with ``save_pretrained``; :mod:`pipeline.copy_eval` measures it.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from common.cli import HelpFormatter, add_config_flags, config_from_args
from common.log import error_line
from datastore.synth.layout import World
from pipeline.copy_eval import copy_accuracy
from pipeline.copy_text import (END_OF_TURN, TASK_WEIGHTS, TASKS, CopyText, CopyTextGenerator, caption_nouns,
                                caption_words, exists_answer_gaps, make_lexicon)

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.induction import MembershipRows


@dataclass
class TextPretrainConfig:
    """Tokenizer, model, data mix and optimisation of the text-only stage.

    Attributes:
        vocab_size: BPE vocabulary (special and chat tokens included).
        pre_tokenizer: ``tiny.train_tokenizer`` scheme; "bytelevel-words" splits spaces off words, so
            a name has the same tokens in a tag list (" drerik") and as an answer ("drerik").
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the Qwen2 LM.
        tie_word_embeddings: share input and output embeddings (fewer parameters, faster).
        max_length: packed row length in tokens (samples are never split across rows).
        steps, batch_size, lr, warmup_steps, min_lr_ratio, weight_decay: AdamW, linear warmup then
            cosine decay to ``lr * min_lr_ratio``.
        caption_fraction: share of samples drawn from the captions (the rest is generated copy text).
        chat_fraction: share of generated samples rendered as ChatML conversations.
        task_weights: relative frequency of each generated task, in the order of ``TASKS``.
        answer_weight, context_weight: loss weights of a generated text's answer tokens (copied names,
            end of turn; repeated mentions of a name count as answers) and of its other tokens
            (captions always weigh 1). First mentions of random names weigh 0: they cannot be
            predicted. Template text drowns the copy signal in a short run, hence context_weight 0.
        short_fraction, short_length: curriculum -- this share of the steps trains only on generated
            samples of at most ``short_length`` tokens (attention learns to find the name to copy much
            sooner in short contexts); captions join afterwards.
        tokenizer_samples: generated texts added to the captions for training the tokenizer.
        lexicon_size, lexicon_fraction: a fixed lexicon of made-up names (never a caption word) from
            which this share of the copy texts' names is drawn (the rest is fresh). The tokenizer is
            trained on the captions and on texts with these names, so world names and lexicon names
            are mostly single tokens, like the words of a real LLM's vocabulary: copying a name is
            then one attention lookup, which a tiny model learns in a CPU-minute budget (copying
            3-4 subword pieces needs induction heads that take far longer to form).
        caption_noun_fraction: share of names drawn from the captions' nouns (the single-word tags
            of the ``rule`` tag parser): copying is then trained on the LLM's own vocabulary too.
            These are words of the text corpus only; no eval image or question is used.
        forbidden: strings no generated text may contain (case-insensitive), e.g. eval questions.
        induction_steps, induction_length: steps (0 = none) of the induction warm-up before everything
            else: rows of ``induction_length`` tokens holding random token runs said twice
            (pipeline/induction.py), so that multi-token names can be copied.
        induction_rows: induction rows added to every step of the main phase (0 = none), their loss added
            to the text loss, so that the copying head formed in the warm-up is kept.
        membership_steps: steps (0 = none) of a membership warm-up after the induction warm-up, the first
            half with the answer right after the asked token, the second with the ``tags_exist`` gaps
            (``batch_size`` membership rows added to each step's repeat rows). A 3-layer model learns
            the first half there; the gaps come later, with ``membership_rows`` (docs/experiments.md,
            section 22).
        membership_rows: membership rows added to every step of the main phase (0 = none): a list of random
            tokens, " a", a token listed half of the time, the rest of a ``tags_exist`` question, then "Yes" or
            "No" (pipeline/induction.py). Random tokens leave nothing but the list to read; the
            ``tags_exist`` texts alone never taught it. With 3 layers, 600 warm-up steps and 8 rows the
            text LLM answers ``tags_exist`` 80 % right, and copies less well (section 22); a 2-layer model
            cannot carry the finding to an answer this far on (section 20).
        membership_short_answer: the membership rows' gaps include the instruction data's existence question
            (" in the image?" and LLaVA's short-answer line: 38 tokens here), the form POPE asks. With 3
            layers the text LLM then answers random-list rows 88 % right, but real tag lists at chance, and
            TUNA's POPE stays at chance (docs/experiments.md, section 23).
        seed: everything (data, init, order) is a function of it and ``threads``.
        threads: torch intra-op threads while training.
        log_every: progress line every this many steps.
    """

    vocab_size: int = 3072
    pre_tokenizer: str = "bytelevel-words"
    hidden_size: int = 128
    num_layers: int = 2
    # 8 heads of 16, not 4 of 32: the induction head then forms in the warm-up at every seed tried
    # (docs/experiments.md, section 19)
    num_heads: int = 8
    num_kv_heads: int = 8
    intermediate_size: int = 384
    tie_word_embeddings: bool = True
    max_length: int = 160
    steps: int = 1500  # 600-700 steps leave the copy skill to the seed (docs/experiments.md, section 9)
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    caption_fraction: float = 0.2
    chat_fraction: float = 0.75
    task_weights: tuple[float, ...] = TASK_WEIGHTS
    answer_weight: float = 1.0
    context_weight: float = 0.0
    short_fraction: float = 0.4
    short_length: int = 48
    tokenizer_samples: int = 6000
    lexicon_size: int = 600
    lexicon_fraction: float = 0.6
    caption_noun_fraction: float = 0.3
    forbidden: tuple[str, ...] = ()
    induction_steps: int = 800
    induction_length: int = 64
    induction_rows: int = 0
    membership_steps: int = 0
    membership_rows: int = 0
    membership_short_answer: bool = False
    seed: int = 0
    threads: int = 2
    log_every: int = 100

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "max_length", "short_length", "steps", "batch_size", "threads", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TextPretrainConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"TextPretrainConfig: hidden_size {self.hidden_size} must divide by num_heads "
                             f"{self.num_heads}, which must divide by num_kv_heads {self.num_kv_heads}")
        counts = (self.induction_steps, self.induction_rows, self.membership_steps, self.membership_rows)
        if min(counts) < 0 or self.induction_length < 8:
            raise ValueError(f"TextPretrainConfig: induction_steps, induction_rows, membership_steps and membership_rows "
                             f"must be >= 0 and induction_length >= 8 (got {counts}, {self.induction_length})")
        for name in ("caption_fraction", "chat_fraction", "min_lr_ratio", "short_fraction", "lexicon_fraction",
                     "caption_noun_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TextPretrainConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.lr <= 0 or self.answer_weight <= 0 or min(self.context_weight, self.weight_decay,
                                                         self.warmup_steps) < 0:
            raise ValueError("TextPretrainConfig: lr and answer_weight must be > 0, context_weight, weight_decay "
                             f"and warmup_steps >= 0 (got {self.lr}, {self.answer_weight}, {self.context_weight}, "
                             f"{self.weight_decay}, {self.warmup_steps})")
        if self.lexicon_size < 0 or self.lexicon_fraction + self.caption_noun_fraction > 1:
            raise ValueError(f"TextPretrainConfig: lexicon_size must be >= 0 and lexicon_fraction + "
                             f"caption_noun_fraction <= 1 (got {self.lexicon_size}, {self.lexicon_fraction}, "
                             f"{self.caption_noun_fraction})")
        self.task_weights = tuple(float(w) for w in self.task_weights)
        if len(self.task_weights) != len(TASKS) or min(self.task_weights) < 0 or not sum(self.task_weights):
            raise ValueError(f"TextPretrainConfig.task_weights must be {len(TASKS)} weights >= 0 (one per task "
                             f"{TASKS}), not all 0; got {self.task_weights!r}")
        if isinstance(self.forbidden, str):
            raise ValueError("TextPretrainConfig.forbidden must be a sequence of strings, not one string")
        self.forbidden = tuple(str(s) for s in self.forbidden if str(s))


def _tokenizer_lines(captions: list[str], lexicon: list[str], gen: CopyTextGenerator, n: int,
                     repeats: int = 8) -> list[str]:
    """The tokenizer's training text: the captions, ``n`` generated texts and each lexicon name
    ``repeats`` times, so caption words and lexicon names become whole tokens."""
    lines = list(captions) + [" ".join(lexicon)] * repeats
    for _ in range(n):
        text = gen.sample().text
        lines.append(text.replace("<|im_start|>", "\n").replace(END_OF_TURN, "\n"))
    return lines


def single_token_share(tokenizer: Any, words: Iterable[str]) -> float:
    """Share of ``words`` that the tokenizer keeps whole after a space (as in " Tags: kelbo")."""
    words = list(words)
    return sum(len(tokenizer.tokenize(" " + w)) <= 2 for w in words) / max(1, len(words))  # " " + word


def _encode(tok: Any, texts: list[str], samples: list[CopyText | None], answer_weight: float,
            context_weight: float, eos: int) -> list[tuple[list[int], list[float]]]:
    """Token ids (+ EOS) and per-token loss weights: answers and repeated name mentions ``answer_weight``,
    first mentions 0, the rest ``context_weight``; a None sample (a caption) weighs 1 throughout."""
    import numpy as np

    out = []
    for enc, text, sample in zip(tok.encode_batch(texts, add_special_tokens=False), texts, samples):
        if sample is None:
            out.append((enc.ids + [eos], [1.0] * (len(enc.ids) + 1)))
            continue
        char_w = np.full(len(text) + 1, context_weight)
        for spans, weight in ((sample.fresh, 0.0), (sample.copies, answer_weight), (sample.spans, answer_weight)):
            for start, end in spans:
                char_w[start:end] = weight
        starts = np.fromiter((start for start, _ in enc.offsets), dtype=np.int64, count=len(enc.ids))
        out.append((enc.ids + [eos], char_w[starts].tolist() + [context_weight]))
    return out


def _pack(samples: Iterator[tuple[list[int], list[float]]], n_rows: int, length: int, pad: int,
          buffer: int = 64):
    """Pack whole samples into ``n_rows`` rows of ``length`` tokens: ids, weights, position ids, dropped.

    Best fit from a buffer of pending samples (bucketed by length): each row takes the longest pending
    sample that still fits until none does -- far fuller rows than first-come packing. Position ids
    restart at every sample (and at the padding), which makes HF models attend within samples only.
    """
    import torch

    ids, weights, positions = [], [], []
    buckets: dict[int, list[tuple[list[int], list[float]]]] = {}
    n_pending, dropped = 0, 0
    for _ in range(n_rows):
        row_ids, row_w, row_pos = [], [], []
        while True:
            while n_pending < buffer:
                sample = next(samples)
                if len(sample[0]) > length:
                    dropped += 1
                    continue
                buckets.setdefault(len(sample[0]), []).append(sample)
                n_pending += 1
            fit = next((n for n in range(length - len(row_ids), 0, -1) if buckets.get(n)), None)
            if fit is None:
                break
            sample_ids, sample_w = buckets[fit].pop(0)
            n_pending -= 1
            row_ids += sample_ids
            row_w += sample_w
            row_pos += range(len(sample_ids))
        ids.append(row_ids + [pad] * (length - len(row_ids)))
        weights.append(row_w + [0.0] * (length - len(row_w)))
        positions.append(row_pos + list(range(length - len(row_pos))))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights), torch.tensor(positions), dropped


def known_words(captions: list[str], names: Iterable[str] | None = None) -> set[str]:
    """Words no made-up name may equal: those of the captions and of the given names."""
    return caption_words([*captions, *(names or ())])


def name_pools(captions: list[str], config: TextPretrainConfig, known: set[str] | None = None,
               names: list[str] | None = None) -> dict[str, Any]:
    """The :class:`CopyTextGenerator` name arguments of ``config``: its lexicon and the "known words" --
    ``names`` when given (e.g. a names file), else the caption nouns."""
    known = known_words(captions, names) if known is None else known
    return {"pool": make_lexicon(config.seed * 2 + 3, config.lexicon_size, known),
            "pool_fraction": config.lexicon_fraction, "words": list(names) if names else caption_nouns(captions),
            "words_fraction": config.caption_noun_fraction}


def membership_spec(tok: Any, short_answer: bool = False) -> MembershipRows:
    """The membership rows for ``tok``'s LLM: " a" before the asked token, "Yes"/"No" after one of the
    ``tags_exist`` questions' gaps (pipeline.copy_text.exists_answer_gaps; ``short_answer``: and the
    instruction data's existence question's). Where the tokenizer makes a
    space a token of its own (the quickstart's ``bytelevel-words``), it comes before every listed and
    asked token, as in the texts: a head that learned "the token right after 'a'" would otherwise read
    the space in every real question."""
    from pipeline.induction import MembershipRows

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    space = ids(" ")
    own_token = len(space) == 1 and ids(" a") == space + ids("a")
    prefix = tuple(space) if own_token else ()
    return MembershipRows(mark=tuple(ids(" a")) + prefix, yes=ids("Yes")[0], no=ids("No")[0],
                          fillers=tuple(tuple(ids(gap)) for gap in exists_answer_gaps(short_answer)),
                          item_prefix=prefix)


def weighted_lm_loss(model: Any, ids: Tensor, positions: Tensor, weights: Tensor) -> Tensor:
    """Next-token cross-entropy of packed rows ``ids`` (B, L), weighted per target token by ``weights``
    (B, L; position t weighs the prediction of token t) and divided by the weights' sum. The LM head runs
    only where a weight is non-zero (with ``context_weight`` 0, the answers): the same loss as over the full
    (B, L, V) logits, at a fraction of the LM head's cost."""
    import torch.nn.functional as F

    hidden = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[:, :-1]
    w = weights[:, 1:].reshape(-1)
    kept = w > 0
    logits = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[kept]).float()
    ce = F.cross_entropy(logits, ids[:, 1:].reshape(-1)[kept], reduction="none")
    return (ce * w[kept]).sum() / w.sum()


def pretrain_text_llm(captions: list[str], out_dir: str | Path, config: TextPretrainConfig | None = None,
                      progress: bool = True, names: list[str] | None = None,
                      record: dict[str, Any] | None = None) -> Path:
    """Train tokenizer + tiny Qwen2 LM on captions and generated copy texts; save both to ``out_dir``.

    Args:
        captions: world text (any category names allowed); may be empty.
        out_dir: written with ``save_pretrained`` (tokenizer with the ChatML chat template, model,
            ``text_pretrain.json`` with the config, losses and timings).
        config: sizes and schedule (default :class:`TextPretrainConfig`).
        progress: print a line every ``config.log_every`` steps and the timings at the end.
        names: names the copy texts draw instead of the caption nouns (:func:`name_pools`).
        record: extra entries for ``text_pretrain.json`` (e.g. the corpus's read and skip counts).

    Returns:
        ``out_dir`` as a Path; ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.schedule import warmup_cosine_lr
    from pipeline.tiny import save_hf_tokenizer, tiny_llm_config, train_tokenizer

    config = config or TextPretrainConfig()
    captions = [c.strip() for c in captions if c and c.strip()]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    # Tokenizer: captions + generated texts (own seed stream, not the training stream).
    known = known_words(captions, names)
    pools = name_pools(captions, config, known, names)
    lexicon = pools["pool"]
    gen = CopyTextGenerator(config.seed * 2 + 1, known, config.forbidden, config.chat_fraction,
                            task_weights=config.task_weights, **pools)
    tok = train_tokenizer(_tokenizer_lines(captions, lexicon, gen, config.tokenizer_samples),
                          config.pre_tokenizer, config.vocab_size)
    save_hf_tokenizer(tok, out)
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    vocab = len(hf_tok)
    whole = {"caption_words": single_token_share(hf_tok, known), "lexicon": single_token_share(hf_tok, lexicon)}
    timings["tokenizer_s"] = time.perf_counter() - t0

    # Data: a stream of caption / generated samples packed into steps * batch rows.
    t1 = time.perf_counter()
    rng = random.Random(config.seed)
    gen = CopyTextGenerator(config.seed * 2 + 2, known, config.forbidden, config.chat_fraction,
                            task_weights=config.task_weights, **pools)
    eos, pad = hf_tok.eos_token_id, hf_tok.pad_token_id
    counts = {"captions": 0, **{t: 0 for t in TASKS}}

    cap_order: list[str] = []

    def stream(caption_fraction: float, max_chars: int | None = None) -> Iterator[tuple[list[int], list[float]]]:
        nonlocal cap_order
        while True:
            texts, spans = [], []
            for _ in range(512):
                if captions and rng.random() < caption_fraction:
                    if not cap_order:
                        cap_order = rng.sample(captions, len(captions))
                    texts.append(cap_order.pop())
                    spans.append(None)
                    counts["captions"] += 1
                else:
                    s = gen.sample()
                    if max_chars is not None and len(s.text) > max_chars:
                        continue  # surely too long for the short phase (~3 characters per token)
                    texts.append(s.text)
                    spans.append(s)
                    counts[s.task] += 1
            yield from _encode(tok, texts, spans, config.answer_weight, config.context_weight, eos)

    # Curriculum: the first steps see only short samples (copy heads form far faster in short contexts).
    n_rows = config.steps * config.batch_size
    n_short = int(config.short_fraction * config.steps) * config.batch_size
    short = _pack((x for x in stream(0.0, 4 * config.short_length) if len(x[0]) <= config.short_length), n_short,
                  config.max_length, pad)
    rest = _pack(stream(config.caption_fraction), n_rows - n_short, config.max_length, pad)
    data, weights, positions = (torch.cat([a, b]) for a, b in zip(short[:3], rest[:3]))
    dropped = rest[3]
    fill = float((data != pad).float().mean())
    timings["data_s"] = time.perf_counter() - t1
    say(f"text pretrain: vocab {vocab} (single tokens: {whole['caption_words']:.0%} of caption words, "
        f"{whole['lexicon']:.0%} of the {len(lexicon)} lexicon names), {n_rows} rows x {config.max_length} tokens ({fill:.0%} filled, "
        f"{dropped} too long), samples {counts}, {gen.rejected} forbidden texts redrawn, "
        f"tokenizer {timings['tokenizer_s']:.1f}s, data {timings['data_s']:.1f}s")

    # Model: tiny random-init Qwen2 (pipeline.tiny), trained in a plain loop.
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        cfg = tiny_llm_config(vocab, "qwen2", config.hidden_size, config.num_layers, config.num_heads,
                              config.num_kv_heads, config.intermediate_size,
                              tie_word_embeddings=config.tie_word_embeddings, bos_token_id=hf_tok.bos_token_id,
                              eos_token_id=eos, pad_token_id=pad)
        model = AutoModelForCausalLM.from_config(cfg)
        n_params = sum(p.numel() for p in model.parameters())
        induction = None
        from pipeline.induction import induction_warmup, membership_accuracy, membership_batch, repeat_batch

        special = set(hf_tok.all_special_ids)
        token_ids = torch.tensor([i for i in range(vocab) if i not in special])  # the induction rows' tokens
        if config.induction_steps:
            induction = induction_warmup(model, token_ids, eos, hf_tok.bos_token_id, config.induction_steps,
                                         weighted_lm_loss,
                                         batch_size=config.batch_size, length=config.induction_length, lr=config.lr,
                                         warmup_steps=config.warmup_steps, seed=config.seed,
                                         every=config.log_every, say=say)
            timings["induction_s"] = induction.seconds
        member = (membership_spec(hf_tok, config.membership_short_answer)
                  if config.membership_steps or config.membership_rows else None)
        membership: list[dict[str, Any]] = []
        phases = [("none", replace(member, fillers=(), max_gap=0)), ("tags_exist", member)] if config.membership_steps else []
        for n, (gap, spec) in enumerate(phases):
            done = induction_warmup(model, token_ids, eos, hf_tok.bos_token_id, config.membership_steps // 2 or 1,
                                    weighted_lm_loss, batch_size=config.batch_size, length=config.induction_length,
                                    lr=config.lr, warmup_steps=config.warmup_steps, seed=config.seed + 1 + n,
                                    every=config.log_every, say=say, membership=spec, membership_rows=config.batch_size)
            membership.append({"gap": gap, "accuracy": done.membership, "seconds": done.seconds})
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                weight_decay=config.weight_decay)
        mix_generator = torch.Generator().manual_seed(config.seed + 1)
        row_positions = torch.arange(config.induction_length)

        def induction_rows() -> tuple[Tensor, Tensor, Tensor]:
            ids, w = repeat_batch(token_ids, config.induction_rows, config.induction_length, eos,
                                  hf_tok.bos_token_id, mix_generator)
            return ids, row_positions.expand(len(ids), -1), w

        def membership_rows() -> tuple[Tensor, Tensor, Tensor]:
            ids, w, _ = membership_batch(token_ids, config.membership_rows, config.induction_length, eos,
                                         hf_tok.bos_token_id, member, mix_generator)
            return ids, row_positions.expand(len(ids), -1), w

        model.train()
        losses, t2, window = [], time.perf_counter(), time.perf_counter()
        for step in range(config.steps):
            for group in opt.param_groups:
                group["lr"] = warmup_cosine_lr(step, config.steps, config.warmup_steps, config.lr,
                                               config.min_lr_ratio)
            rows = slice(step * config.batch_size, (step + 1) * config.batch_size)
            ids, w = data[rows], weights[rows]
            loss = weighted_lm_loss(model, ids, positions[rows], w)
            if config.induction_rows:
                loss = loss + weighted_lm_loss(model, *induction_rows())
            if config.membership_rows:
                loss = loss + weighted_lm_loss(model, *membership_rows())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                k = (step % config.log_every) + 1
                per_step = (time.perf_counter() - window) / k
                elapsed = time.perf_counter() - t2
                say(f"  step {step + 1}/{config.steps}  loss {sum(losses[-k:]) / k:.3f}  "
                    f"{per_step * 1000:.0f} ms/step  {elapsed:.0f}s elapsed, "
                    f"~{per_step * (config.steps - step - 1):.0f}s left")
                window = time.perf_counter()
        timings["train_s"] = time.perf_counter() - t2
        if member is not None:  # what the main phase kept of it
            membership.append({"gap": "tags_exist", "after": "main", "accuracy": [[config.steps, membership_accuracy(
                model, token_ids, eos, hf_tok.bos_token_id, member, seed=config.seed + 20_000, rows=64)]]})
            say(f"  membership (held-out yes/no on random lists) after the text steps: "
                f"{membership[-1]['accuracy'][0][1]:.0%}")
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.generation_config.eos_token_id = [eos, hf_tok.convert_tokens_to_ids(END_OF_TURN)]
    model.generation_config.pad_token_id = pad
    model.save_pretrained(str(out))
    timings["total_s"] = time.perf_counter() - t0
    record = {**(record or {}), "config": asdict(config), "vocab": vocab, "single_token_share": whole,
              "params": n_params, "samples": counts,
              "induction": None if induction is None else {"steps": induction.steps, "copy_rate": induction.copy_rate,
                                                            "seconds": induction.seconds},
              "membership": membership,
              "rows": n_rows, "fill": fill, "dropped": dropped, "losses": losses, "timings": timings}
    (out / "text_pretrain.json").write_text(json.dumps(record, indent=1))
    say(f"text pretrain: {n_params / 1e6:.2f}M params, train {timings['train_s']:.1f}s "
        f"({timings['train_s'] / config.steps * 1000:.0f} ms/step), total {timings['total_s']:.1f}s -> {out}")
    return out


# ------------------------------------------------------------------------------------------ corpus
TEXT_SUFFIXES = (".txt", ".jsonl")  # any other input is read as a webdataset shard
NAMED_SKIPS = 5  # skipped samples named per reason
NAME_RE = re.compile(r"\w+(?:[ '-]\w+)*")  # copy texts find names with \b...\b regexes: no other symbols


@dataclass
class CaptionCorpus:
    """Captions read from shards and text files, and the samples skipped (counted by reason, the first
    :data:`NAMED_SKIPS` of each reason named "shard key" or "file:line")."""

    inputs: list[str]
    files: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples.setdefault(reason, [])) < NAMED_SKIPS:
            self.examples[reason].append(where)

    def summary(self) -> str:
        """One line: files, samples read, captions kept, skips by reason with their first names."""
        skips = "; ".join(f"{r} {n} (first: {', '.join(self.examples[r])})" for r, n in self.skipped.items())
        return (f"{len(self.files)} file(s), {self.read} samples read, {len(self.captions)} captions kept, "
                f"{sum(self.skipped.values())} skipped{': ' + skips if skips else ''}")

    def record(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "files": len(self.files), "read": self.read, "captions": len(self.captions),
                "skipped": self.skipped, "skipped_examples": self.examples}


def _jsonl_caption(line: bytes, key: str) -> tuple[str | None, str | None]:
    """(caption, None) or (None, skip reason) of one JSONL line whose caption is field ``key``."""
    from datastore.reader import decode_caption

    if not line.strip():
        return None, "empty_caption"
    try:
        row = json.loads(line)
    except ValueError:  # bad UTF-8 or bad JSON
        return None, "undecodable_text"
    if not isinstance(row, dict) or key not in row:
        return None, "missing_caption"
    if not isinstance(row[key], str):
        return None, "undecodable_text"
    # the datastore's decoding (whitespace, empty, lone surrogates) for the field's text too
    return decode_caption({"txt": row[key].encode("utf-8", "surrogatepass")}, "txt")


def _text_file_samples(url: str, jsonl_field: str) -> Iterator[tuple[str, tuple[str | None, str | None]]]:
    import fsspec

    from datastore.reader import ShardError, decode_caption

    try:
        with fsspec.open(url, "rb") as lines:
            for i, line in enumerate(lines, 1):
                yield f"{url}:{i}", (_jsonl_caption(line, jsonl_field) if url.endswith(".jsonl")
                                     else decode_caption({"txt": line}, "txt"))
    except OSError as exc:
        raise ShardError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc


def read_captions(inputs: list[str], caption_key: str = "txt", jsonl_field: str = "caption",
                  limit: int | None = None, progress: bool = True) -> CaptionCorpus:
    """Captions of webdataset shards (image + caption, as ``tuna-datastore build`` reads them: the same
    patterns and ``caption_key``; images are not decoded) and text files (``*.txt``: a caption a line;
    ``*.jsonl``: a JSON object a line, caption in ``jsonl_field``), in input order, at most ``limit``.

    Bad samples (undecodable bytes or JSON, empty caption, no caption member or field) are skipped and
    counted by reason, as the datastore build does.

    Raises:
        ShardError: an input that does not exist or cannot be read.
    """
    from tqdm import tqdm

    from datastore.reader import decode_caption, expand_shards, iter_raw_samples

    corpus = CaptionCorpus(list(inputs), expand_shards(inputs))
    bar = tqdm(corpus.files, desc="read captions", unit="file", disable=not progress)
    for url in bar:
        samples = (_text_file_samples(url, jsonl_field) if url.endswith(TEXT_SUFFIXES) else
                   ((f"{url} {s.get('__key__')}", decode_caption(s, caption_key)) for s in iter_raw_samples(url)))
        for where, (caption, reason) in samples:
            corpus.read += 1
            if reason:
                corpus.skip(reason, where)
                continue
            corpus.captions.append(caption)
            if limit is not None and len(corpus.captions) >= limit:
                bar.close()
                return corpus
        bar.set_postfix(captions=len(corpus.captions), skipped=sum(corpus.skipped.values()))
    return corpus


def read_names(path: str | Path) -> tuple[list[str], list[str]]:
    """(names, rejected lines) of a names file: one name a line, blank lines ignored, duplicates dropped.

    Raises:
        ValueError: no usable name in the file.
    """
    names, rejected = [], []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        name = " ".join(line.split())
        if name:
            (names if NAME_RE.fullmatch(name) else rejected).append(name)
    if not names:
        raise ValueError(f"names file {path}: no usable name (one a line; letters, digits, spaces, - and ' only)"
                         + (f"; rejected {rejected[:3]}" if rejected else ""))
    return list(dict.fromkeys(names)), rejected


# ------------------------------------------------------------------------------------------ CLI
LLAVA_TEXT_REPLAY = 40_000  # LLaVA-1.5's text-only (ShareGPT) conversations in its 665K mix
MIN_EVAL_NAMES = 4  # a copy prompt names up to 4 objects; fewer names would never fill one

EPILOG = """\
inputs (one of --input / --world; neither: generated copy texts only):
  --input 'shards/{00000..00099}.tar'   webdataset shards of image + caption, read like
                                        tuna-datastore build (--caption-key txt or json:FIELD)
  --input captions.txt                  one caption a line
  --input captions.jsonl                one JSON object a line, caption in --jsonl-field
  --names names.txt                     optional, one object/category name a line: the names the
                                        generated copy texts use (default: the captions' nouns)
  Bad samples (undecodable bytes, empty caption, no caption member or field) are skipped and
  counted by reason; when none is usable the run stops before training (exit 1).

outputs (OUT):
  config.json, model.safetensors, tokenizer.json, ...  the LM and its tokenizer (from_pretrained)
  text_replay.json    text-only copy conversations, LLaVA format ({id, conversations: human/gpt
                      turns}, no image): add it to stage 2's --data_path next to the instruction JSON
  text_pretrain.json  config, corpus counts (skipped samples by reason, the first few named),
                      names, losses, copy accuracy, per-stage timings

example:
  python -m pipeline.text_pretrain --input 'cc3m/{00000..00331}.tar' --names names.txt \\
      --max-captions 200000 --out llm
"""


def _world_inputs(path: str) -> tuple[list[str], list[str], int | None]:
    """A tuna-synth world's corpus shards, novel category names (for the copy eval; none when its
    world.json does not label them) and instruction count -- read before training, tolerantly."""
    world = World.open(path)
    categories = world.info.get("categories") or []
    novel = [c["name"] for c in categories if isinstance(c, dict) and c.get("novelty") == "novel" and c.get("name")]
    instruct = (world.info.get("counts") or {}).get("instruct")
    return world.corpus_shards(), novel, instruct if isinstance(instruct, int) else None


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.text_pretrain (--input PATTERN ... | --world W) [--names FILE] --out DIR``:
    pretrain a tiny LLM's tokenizer and weights on a caption corpus and generated copy texts, write the
    text-only conversations stage 2 mixes in, then measure the copy accuracy."""
    from pipeline.quickstart import QuickstartConfig

    parser = argparse.ArgumentParser(prog="python -m pipeline.text_pretrain", description=main.__doc__,
                                     formatter_class=HelpFormatter, epilog=EPILOG)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", nargs="+", metavar="PATTERN",
                        help="webdataset shards (brace patterns, globs, fsspec URLs) and/or *.txt / *.jsonl "
                        "caption files")
    source.add_argument("--world", help="tuna-synth output folder: its corpus shards' captions")
    parser.add_argument("--caption-key", default="txt", help="shards' caption member: extension(s) ';'-separated, "
                        "or json:FIELD (as tuna-datastore build)")
    parser.add_argument("--jsonl-field", default="caption", help="*.jsonl inputs: the caption's field")
    parser.add_argument("--max-captions", type=int, help="stop reading after this many captions (the training "
                        "samples about steps x batch_size x caption_fraction of them; the tokenizer reads all)")
    parser.add_argument("--names", help="names file, one object/category name a line: the generated copy texts' "
                        "known names (default: the captions' nouns) and a second copy-accuracy measure")
    parser.add_argument("--out", required=True, help="output folder (see outputs below)")
    parser.add_argument("--text-replay", type=int, metavar="N",
                        help=f"text-only conversations written to OUT/text_replay.json (default: with --world, "
                        f"{QuickstartConfig.text_replay} per instruction record, the quickstart's ratio; else "
                        f"{LLAVA_TEXT_REPLAY}, LLaVA-1.5's; for a tiny LLM use about half your instruction records)")
    parser.add_argument("--n-eval", type=int, default=200, help="held-out copy prompts measured after training")
    add_config_flags(parser.add_argument_group("text pretraining (TextPretrainConfig)"), TextPretrainConfig)
    args = parser.parse_args(argv)
    from datastore.reader import ShardError
    from pipeline.text_replay import text_replay_records

    out = Path(args.out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Everything the end of the run needs is read and checked here, before training starts.
    try:
        config = config_from_args(TextPretrainConfig, args)
        for flag, least in (("max_captions", 1), ("text_replay", 0), ("n_eval", 0)):
            if getattr(args, flag) is not None and getattr(args, flag) < least:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be >= {least}")
        names, rejected = read_names(args.names) if args.names else (None, [])
        eval_names, n_instruct, inputs, caption_key = names or [], None, args.input, args.caption_key
        if args.world:
            inputs, world_novel, n_instruct = _world_inputs(args.world)
            caption_key, eval_names = "txt", eval_names or world_novel
        n_replay = args.text_replay if args.text_replay is not None else (
            round(QuickstartConfig.text_replay * n_instruct) if n_instruct else LLAVA_TEXT_REPLAY)

        t = time.perf_counter()
        corpus = read_captions(inputs, caption_key, args.jsonl_field, args.max_captions) if inputs else None
        timings["read_s"] = time.perf_counter() - t
        if corpus is not None:
            print(f"corpus: {corpus.summary()}", flush=True)
            if not corpus.captions:
                raise ValueError(f"no usable caption in {' '.join(args.input or [args.world])}: {corpus.summary()} "
                                 f"(caption key {caption_key!r}, JSONL field {args.jsonl_field!r})")
        captions = corpus.captions if corpus else []

        # The replay file does not depend on the model: written first, so nothing can fail after training.
        t = time.perf_counter()
        # the caption nouns (name_pools' default) parsed once here, not once per use: slow on a big corpus
        pool_names = names or caption_nouns(captions)
        records = text_replay_records(captions, n_replay, config, seed=config.seed + 1, names=pool_names)
        out.mkdir(parents=True, exist_ok=True)
        (out / "text_replay.json").write_text(json.dumps(records, indent=1))
        timings["replay_s"] = time.perf_counter() - t

        record = {"corpus": corpus.record() if corpus else None,
                  "names": {"file": args.names, "n": len(pool_names), "rejected": rejected},
                  "text_replay": {"path": "text_replay.json", "n": len(records)}}
        pretrain_text_llm(captions, out, config, names=pool_names, record=record)
        t = time.perf_counter()
        known = known_words(captions, pool_names)
        accuracy = {"fresh": copy_accuracy(out, n=args.n_eval, known_words=known)} if args.n_eval else {}
        if args.n_eval and len(eval_names) >= MIN_EVAL_NAMES:
            accuracy["names"] = copy_accuracy(out, n=args.n_eval, known_words=known, names=eval_names)
        timings["eval_s"] = time.perf_counter() - t
    except (ValueError, ShardError, OSError) as exc:
        print(f"text_pretrain: error: {error_line(exc)}", file=sys.stderr)
        return 1

    which = {"fresh": "fresh-name prompts",
             "names": "prompts with the " + ("names file's names" if names else "world's novel names")}
    for kind, acc in accuracy.items():
        by_task = ", ".join(f"{k} {v:.0%}" for k, v in acc.by_task.items())
        print(f"copy accuracy {acc.accuracy:.1%} on {acc.n} {which[kind]} ({by_task})")
        if kind == "fresh":
            for e in acc.examples[:4]:
                print(f"  {e['task']}: {e['prompt']!r} -> {e['output']!r} (want {e['answer']!r})")
    if args.n_eval and eval_names and "names" not in accuracy:
        print(f"(no copy accuracy with named prompts: {len(eval_names)} names, {MIN_EVAL_NAMES} needed)")
    saved = json.loads((out / "text_pretrain.json").read_text())
    saved["copy_accuracy"] = {k: asdict(v) for k, v in accuracy.items()}
    trained = {k: v for k, v in saved["timings"].items() if k != "total_s"}
    saved["timings"] = {"read_s": timings["read_s"], "replay_s": timings["replay_s"], **trained,
                        "eval_s": timings["eval_s"], "total_s": time.perf_counter() - start}
    (out / "text_pretrain.json").write_text(json.dumps(saved, indent=1))
    if corpus is not None:
        print(f"corpus: {corpus.summary()}")
    print("timings: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in saved["timings"].items()))
    print(f"model + tokenizer -> {out}\n{len(records)} text-only conversations for stage 2 -> "
          f"{out / 'text_replay.json'}\nrecord -> {out / 'text_pretrain.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
