"""k-shot prompts (only the query's answer labelled, farthest demos dropped first) and answer-likelihood scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuna.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@pytest.fixture(scope="module")
def examples(world):
    from icl.formats import Skipped, read_examples

    found = list(read_examples("synth", [str(world["data_root"])], skipped=Skipped()))
    by_image = {}
    for e in found:
        by_image.setdefault(e.image, e)
    return list(by_image.values())  # one question per image: demos and query never share an image


@pytest.fixture(scope="module")
def model_and_processor(world):
    from transformers import AutoTokenizer

    from datastore.clip import ClipSpec
    from datastore.store import Datastore
    from tuna.modeling_tuna import TunaForCausalLM
    from tuna.processing_tuna import TunaProcessor
    from tuna.tag_source import TagSource

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(world["llm"])
    model = TunaForCausalLM.from_components(str(world["llm"]), ClipSpec(model="tuna-tiny-clip"), tokenizer,
                                            tag_hidden_dim=32, tag_num_heads=2, max_tags=3).eval()
    source = TagSource(datastore=Datastore.open(world["datastore"]), k_images=2)
    return model, TunaProcessor.from_model(model, tokenizer, tag_source=source), tokenizer


def test_label_last_answer_only():
    from icl.prompts import label_last_answer_only

    labels = torch.tensor([IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX, 8, 9])
    assert label_last_answer_only(labels).tolist() == [IGNORE_INDEX] * 7 + [8, 9]
    none = torch.full((3,), IGNORE_INDEX)
    assert label_last_answer_only(none).tolist() == none.tolist()


def test_kshot_sample_labels_only_the_query_answer(model_and_processor, examples):
    from icl.prompts import encode_kshot, kshot_conversation

    _, processor, tokenizer = model_and_processor
    demos, query = examples[:2], examples[2]
    sample = encode_kshot(processor, demos, query)
    encoded = sample.encoded
    assert sample.dropped == 0 and sample.demos == demos
    assert (encoded["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 3 and encoded["pixel_values"].shape[0] == 3
    labelled = encoded["labels"][encoded["labels"] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(labelled).strip().startswith(query.answers[0])
    turns = kshot_conversation(demos, query)
    assert [t["from"] for t in turns] == ["human", "gpt"] * 3
    assert turns[1]["value"] == demos[0].answers[0] and turns[-2]["value"] == f"<image>\n{query.question}"


def test_tags_can_be_off_for_the_demos(model_and_processor, examples):
    from icl.prompts import encode_kshot

    _, processor, _ = model_and_processor
    on = encode_kshot(processor, examples[:2], examples[2]).encoded
    off = encode_kshot(processor, examples[:2], examples[2], demo_tags=False).encoded
    assert all(on["tags"]) and off["tags"][:2] == [[], []] and off["tags"][2] == on["tags"][2]
    assert torch.equal(on["input_ids"], off["input_ids"])


def test_too_long_prompts_drop_the_farthest_demos_first(model_and_processor, examples):
    from dataclasses import replace

    from icl.prompts import encode_kshot

    _, processor, _ = model_and_processor
    one_demo = encode_kshot(processor, examples[3:4], examples[4])
    per_image = processor.tokens_per_image
    length = len(one_demo.encoded["input_ids"]) + 2 * (per_image - 1)
    tight = replace(processor, max_length=length)
    sample = encode_kshot(tight, examples[:4], examples[4])
    assert sample.dropped == 3 and sample.demos == examples[3:4]


def test_loglik_is_batch_invariant_and_info_score_is_a_probability_difference(model_and_processor, examples):
    from icl.scoring import TunaScorer, info_score

    model, processor, _ = model_and_processor
    query, pool = examples[0], examples[1:5]
    sets = [[], pool[:1], pool[1:3], [pool[3], pool[0]]]
    batched = TunaScorer(model, processor, batch_size=4).loglik(query, sets)
    scorer = TunaScorer(model, processor, batch_size=1)
    single = scorer.loglik(query, sets)
    np.testing.assert_allclose(batched.sum, single.sum, rtol=1e-4, atol=1e-4)
    assert len(set(batched.n_tokens.tolist())) == 1  # the query's answer only, whatever the demos
    assert len(set(np.round(batched.sum, 4).tolist())) > 1  # the demos change the likelihood
    scores = info_score(scorer, query, pool[:1], pool[1:4])
    base = scorer.loglik(query, [pool[:1]]).probability[0]
    grown = scorer.loglik(query, [pool[:1] + [c] for c in pool[1:4]]).probability
    np.testing.assert_allclose(scores, grown - base, rtol=1e-4, atol=1e-6)
    other = scorer.loglik(query, sets[:1], answer="zzz qqq")
    assert other.sum[0] != pytest.approx(batched.sum[0])
