"""Fixtures for tuna tests: tiny tokenizers trained in-process and loaded through AutoTokenizer."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.tiny import save_hf_tokenizer, train_tokenizer

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


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """Directory of a tiny Qwen2-like byte-level BPE tokenizer (vocab 1000, ChatML chat template)."""
    return save_hf_tokenizer(train_tokenizer(corpus(), "bytelevel"), tmp_path_factory.mktemp("tiny_tokenizer"))


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
    return AutoTokenizer.from_pretrained(str(save_hf_tokenizer(train_tokenizer(corpus(), request.param), out)))


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random-init 2-layer Qwen2 saved with save_pretrained (vocab of the tiny tokenizer)."""
    from pipeline.tiny import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), vocab_size=len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_tied_llm_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """The tiny Qwen2 with tied input/output embeddings (as Qwen2-0.5B/1.5B ship)."""
    from pipeline.tiny import save_tiny_llm

    return save_tiny_llm(tmp_path_factory.mktemp("tiny_tied_llm"), vocab_size=len(tiny_tokenizer),
                         tie_word_embeddings=True)


@pytest.fixture(scope="session")
def make_model(tiny_llm_dir, tiny_tokenizer):
    """Factory: a TunaForCausalLM around the tiny LLM (from disk, or ``llm_dir``) and the tiny CLIP;
    other kwargs -> TunaConfig."""
    import torch

    from datastore.clip import ClipSpec
    from tuna.modeling_tuna import TunaForCausalLM

    def make(seed: int = 0, llm_dir: Path | None = None, **config):
        torch.manual_seed(seed)
        config = {"template": "chat_template", "tag_hidden_dim": 32, "tag_num_heads": 2, **config}
        return TunaForCausalLM.from_components(str(llm_dir or tiny_llm_dir), ClipSpec(model="tuna-tiny-clip"),
                                               tiny_tokenizer, **config)

    return make


def random_images(n: int, seed: int = 0, size: int = 64) -> list:
    """``n`` distinct random RGB images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
