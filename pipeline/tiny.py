"""Tiny models built locally (no hub): BPE tokenizers trained in-process and small random-init LLMs.

Used by tests, benchmarks and the quickstart; everything is saved with ``save_pretrained`` and loaded
back through the same ``from_pretrained`` code as real checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split pattern (newline runs form their own pre-tokens, e.g. "\n\n").
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# "bytelevel-words": spaces are tokens of their own, so a word has the same tokens after a space, a
# newline or at the start of a turn (a copied name reads the same in a tag list and in an answer).
WORD_SPLIT = r"""\p{L}+|\p{N}|[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+"""
# ChatML as Qwen2 uses it, including the default system prompt when none is given.
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(lines: list[str], pre_tokenizer: str = "bytelevel", vocab_size: int = 1000):
    """Train a BPE tokenizer in-process.

    ``"bytelevel"`` mimics Qwen2 (byte-level BPE, no prefix space); ``"bytelevel-words"`` is the same
    with spaces split off words (``WORD_SPLIT``: " drerik" = " " + "drerik"); ``"metaspace-first"`` /
    ``"metaspace-always"`` mimic SentencePiece-converted Llama tokenizers (``▁`` word prefix, dummy
    prefix at the start of the text / of every split between special tokens).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = SPECIAL_TOKENS + CHAT_TOKENS
    if pre_tokenizer in ("bytelevel", "bytelevel-words"):
        tok = Tokenizer(models.BPE())
        split = QWEN2_SPLIT if pre_tokenizer == "bytelevel" else WORD_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif pre_tokenizer in ("metaspace-first", "metaspace-always"):
        scheme = pre_tokenizer.split("-", 1)[1]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        alphabet = sorted(set("".join(lines)) | {"▁"})
    else:
        raise ValueError(f"unknown pre_tokenizer {pre_tokenizer!r}; valid: bytelevel, bytelevel-words, "
                         "metaspace-first, metaspace-always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def save_hf_tokenizer(tok, out_dir: Path) -> Path:
    """Wrap a ``tokenizers.Tokenizer`` as an HF fast tokenizer with a ChatML chat template and save it."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens=CHAT_TOKENS, clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(str(out_dir))
    return out_dir


def tiny_llm_config(vocab_size: int, model_type: str = "qwen2", hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                    **config: Any):
    """HF config of a small causal LM (``intermediate_size`` defaults to twice the hidden size)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=vocab_size, hidden_size=hidden_size,
                                intermediate_size=intermediate_size or hidden_size * 2,
                                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                                num_key_value_heads=num_kv_heads, max_position_embeddings=4096, **config)


def save_tiny_llm(out_dir: Path, vocab_size: int, model_type: str = "qwen2", hidden_size: int = 64,
                  num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, seed: int = 0,
                  intermediate_size: int | None = None, **config: Any) -> Path:
    """Save a random-init causal LM (``model_type`` "qwen2", "llama", "mistral", ...) to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_llm_config(vocab_size, model_type, hidden_size, num_layers, num_heads, num_kv_heads,
                          intermediate_size, **config)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out_dir))
    return out_dir
