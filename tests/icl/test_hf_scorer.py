"""HFScorer on a tiny random-init Qwen2-VL built offline: saved with save_pretrained, loaded via from_pretrained."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl.formats import Example

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# Qwen2-VL's chat template, reduced to what k-shot prompts use
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["What color is the ball? The ball is red.", "What is on the table? a big blue ball on the table",
          "How many cats are there? two small cats", "user assistant system"]
ANSWER = "a red ball"


def _tokenizer():
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
        vocab_size=340, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Qwen2-VL (2 text layers, hidden 64; 1-layer vision tower) + processor, saved like a real one."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _tokenizer()
    ids = dict(zip(SPECIAL, tokenizer.convert_tokens_to_ids(SPECIAL)))
    # images become 56x56..56x84 pixels: 4x4..4x6 patches of 14, 4..6 tokens after the 2x2 merge
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 84)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=TEMPLATE)
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "bos_token_id": ids["<|im_start|>"],
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 14,
                       "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("qwen2vl-tiny")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer(checkpoint):
    from icl.hf_scorer import HFScorer

    return HFScorer.from_pretrained(str(checkpoint), batch_size=3)


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """A query and four demos; image sizes differ so the prompts differ in length (padding is exercised)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    made = []
    specs = [("q", "What is on the table?", ANSWER), ("d1", "What color is the ball?", "red"),
             ("d2", "How many cats are there?", "two small cats"), ("d3", "What is on the table?", "a blue ball"),
             ("d4", "What color is the ball?", "blue")]
    for i, (eid, question, answer) in enumerate(specs):
        path = root / f"{eid}.png"
        Image.fromarray(rng.integers(0, 255, (56, 56 + 14 * (i % 3), 3), dtype=np.uint8)).save(path)
        made.append(Example(eid, str(path), question, (answer,), "vqa", answer))
    return made


def _sets(demos):
    d1, d2, d3, d4 = demos
    return [[], [d1], [d1, d2], [d2, d3, d4], [d4], [d3, d1]]


def test_from_pretrained_loads_eval_model(scorer):
    assert not scorer.model.training
    assert type(scorer.model).__name__ == "Qwen2VLForConditionalGeneration"


def test_batch_invariance(scorer, examples):
    from icl.hf_scorer import HFScorer

    query, demos = examples[0], examples[1:]
    one = HFScorer(scorer.model, scorer.processor, batch_size=1).loglik(query, _sets(demos))
    three = HFScorer(scorer.model, scorer.processor, batch_size=3).loglik(query, _sets(demos))
    np.testing.assert_allclose(one.sum, three.sum, atol=1e-4)
    np.testing.assert_array_equal(one.n_tokens, three.n_tokens)
    assert np.all(np.isfinite(one.sum)) and np.all(one.sum < 0)
    np.testing.assert_array_equal(three.dropped, 0)


def test_token_count_is_answer_length_for_any_number_of_demos(scorer, examples):
    query, demos = examples[0], examples[1:]
    n_answer = len(scorer.processor.tokenizer(ANSWER, add_special_tokens=False)["input_ids"])
    assert n_answer > 1
    scores = scorer.loglik(query, _sets(demos))
    np.testing.assert_array_equal(scores.n_tokens, n_answer)
    np.testing.assert_allclose(scores.mean, scores.sum / n_answer)
    other = scorer.loglik(query, _sets(demos)[:2], answer="blue")
    n_other = len(scorer.processor.tokenizer("blue", add_special_tokens=False)["input_ids"])
    np.testing.assert_array_equal(other.n_tokens, n_other)


def test_value_matches_manual_forward(scorer, examples):
    """Full forward over the whole rendered conversation (end-of-turn tokens included), summed by hand."""
    from PIL import Image

    query, d1, d2 = examples[0], examples[1], examples[2]
    tokenizer, processor = scorer.processor.tokenizer, scorer.processor
    text = "".join(f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{e.question}<|im_end|>\n"
                   f"<|im_start|>assistant\n{a}<|im_end|>\n"
                   for e, a in [(d1, "red"), (d2, "two small cats"), (query, ANSWER)])
    images = [Image.open(e.image).convert("RGB") for e in (d1, d2, query)]
    batch = processor(text=[text], images=[images], return_tensors="pt")
    ids = batch["input_ids"][0]
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    end = int((ids == tokenizer.convert_tokens_to_ids("<|im_end|>")).nonzero()[-1])  # the query's answer ends there
    start = end - len(answer_ids)
    assert ids[start:end].tolist() == answer_ids
    with torch.no_grad():
        logprobs = scorer.model(**batch).logits[0].float().log_softmax(-1)
    expected = sum(float(logprobs[p - 1, ids[p]]) for p in range(start, end))
    got = scorer.loglik(query, [[d1, d2]])
    assert got.n_tokens[0] == len(answer_ids)
    assert got.sum[0] == pytest.approx(expected, abs=1e-4)


def test_demos_change_the_score(scorer, examples):
    query, d1, d2 = examples[0], examples[1], examples[2]
    scores = scorer.loglik(query, [[], [d1], [d1, d2], [d2, d1]])
    assert len(set(np.round(scores.sum, 5))) == 4


def test_info_score_is_probability_difference(scorer, examples):
    from icl.hf_scorer import HFScorer
    from icl.scoring import info_score

    query, d1, d2, d3 = examples[0], examples[1], examples[2], examples[3]
    hf = HFScorer(scorer.model, scorer.processor, batch_size=2)
    got = info_score(hf, query, [d1], [d2, d3])
    base = np.exp(hf.loglik(query, [[d1]]).mean[0])
    with_c = np.exp(hf.loglik(query, [[d1, d2], [d1, d3]]).mean)
    np.testing.assert_allclose(got, with_c - base, atol=1e-6)
    assert got.shape == (2,)


def test_empty_candidate_list(scorer, examples):
    scores = scorer.loglik(examples[0], [])
    assert scores.sum.shape == (0,) and scores.n_tokens.shape == (0,)


def test_missing_image_names_the_example(scorer, examples, tmp_path):
    query, d1 = examples[0], examples[1]
    ghost = Example("ghost-7", str(tmp_path / "nope.jpg"), "What?", ("x",), "vqa")
    with pytest.raises(ValueError, match="ghost-7"):
        scorer.loglik(query, [[d1, ghost]])
    with pytest.raises(ValueError, match="ghost-7.*not found"):
        scorer.loglik(ghost, [[d1]])


def test_unlocatable_answer_names_the_query(scorer, examples):
    import copy

    from icl.hf_scorer import HFScorer

    processor = copy.copy(scorer.processor)
    processor.chat_template = TEMPLATE.replace("{{ c['text'] }}", "{{ c['text'] | upper }}")  # answer rewritten
    with pytest.raises(ValueError, match="query 'q'.*not found"):
        HFScorer(scorer.model, processor).loglik(examples[0], [[examples[1]]])
