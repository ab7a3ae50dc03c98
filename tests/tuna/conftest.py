"""Fixtures for tuna tests: tiny tokenizers trained in-process and loaded through AutoTokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# Qwen2's pre-tokenizer split pattern (newline runs form their own pre-tokens, e.g. "\n\n").
QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
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

_COLOURS = ["red", "blue", "green", "yellow", "purple", "small", "large", "old", "shiny"]
_NOUNS = ["blorp", "zinnet", "cat", "dog", "table", "car", "tree", "house", "person", "image", "photo"]
_VERBS = ["sits on", "stands near", "looks at", "is next to", "is under", "holds"]
_QUESTIONS = ["What is in the image?", "Describe the photo.", "Which one is the {n}?",
              "Is there a {c} {n}?", "How many {n}s are there?", "What colour is the {n}?"]


def corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """English-like training lines with made-up nouns, chat-style prefixes and blank lines."""
    rng = random.Random(seed)
    lines = [
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions.",
        "You are a helpful assistant.",
    ]
    for i in range(n_lines):
        c, n, c2, n2 = rng.choice(_COLOURS), rng.choice(_NOUNS), rng.choice(_COLOURS), rng.choice(_NOUNS)
        question = rng.choice(_QUESTIONS).format(c=c, n=n)
        answer = f"A {c} {n} {rng.choice(_VERBS)} the {c2} {n2}. There are {i % 7} of them!"
        style = i % 3
        if style == 0:
            lines.append(f"USER: {question} ASSISTANT: {answer}")
        elif style == 1:
            lines.append(f"user\n{question}\n\nassistant\n{answer}\n\n")
        else:
            lines.append(f"{answer} {question}: yes, no; (maybe) \"quoted\" 'it's' {i * 37}.")
    return lines


def train_tokenizer(pre_tokenizer: str = "bytelevel", vocab_size: int = 1000):
    """Train a BPE tokenizer in-process.

    ``"bytelevel"`` mimics Qwen2 (byte-level BPE, no prefix space); ``"metaspace-first"`` /
    ``"metaspace-always"`` mimic SentencePiece-converted Llama tokenizers (``▁`` word prefix, dummy
    prefix at the start of the text / of every split between special tokens).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    special = SPECIAL_TOKENS + CHAT_TOKENS
    if pre_tokenizer == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        scheme = pre_tokenizer.split("-", 1)[1]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
        alphabet = sorted(set("".join(corpus())) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
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


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """Directory of a tiny Qwen2-like byte-level BPE tokenizer (vocab 1000, ChatML chat template)."""
    return save_hf_tokenizer(train_tokenizer("bytelevel"), tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer loaded back through ``AutoTokenizer.from_pretrained`` (the real-checkpoint path)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture(scope="session", params=["metaspace-first", "metaspace-always"])
def tiny_sp_tokenizer(request, tmp_path_factory):
    """A tiny SentencePiece/Llama-like tokenizer (``▁`` prefixes), in both dummy-prefix flavours."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp(f"tiny_{request.param}")
    return AutoTokenizer.from_pretrained(str(save_hf_tokenizer(train_tokenizer(request.param), out)))
