"""MMICT's M-Hub connector (tuna/mhub.py): both modes, no answer leak, frozen parts, save / load, BLIP-2 import."""

from __future__ import annotations

import pytest
import torch

from tests.tuna.conftest import random_images
from tuna.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from tuna.mhub import MHub, MHubConfig, guide_spans, load_blip2_qformer
from tuna.modeling_tuna import TunaForCausalLM
from tuna.processing_tuna import TunaProcessor

HUB = {"num_queries": 4, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "cross_attention_frequency": 1,
       "max_text": 16}
QUERIES = HUB["num_queries"]


def kshot(demo_answers=("A red blorp.", "A green zinnet."), answer="A cat."):
    """Two demonstrations and a query, as icl.prompts lays them out (one round each)."""
    turns = []
    for a in demo_answers:
        turns += [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": a}]
    return turns + [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def hub_model(make_model):
    return make_model(connector_type="mhub", ablation="no_tags", mhub=HUB)


def batch(model, tokenizer, conversation, n_images=3, only_last_answer=True):
    out = TunaProcessor.from_model(model, tokenizer)([conversation], images=[random_images(n_images)],
                                                    padding_side="right")
    if only_last_answer:  # as encode_kshot labels a k-shot sample: the demos' answers are input
        from icl.prompts import label_last_answer_only

        out["labels"] = label_last_answer_only(out["labels"][0])[None]
    return out


def image_token_counts(model, b) -> list[int]:
    ids, labels = b["input_ids"][0], b["labels"][0]
    spans = guide_spans(ids == IMAGE_TOKEN_INDEX, labels != IGNORE_INDEX, HUB["max_text"])
    return [end - start if demo and end > start else QUERIES for start, end, demo in spans]


def test_demos_get_text_features_the_query_gets_query_features(hub_model, tiny_tokenizer):
    b = batch(hub_model, tiny_tokenizer, kshot())
    counts = image_token_counts(hub_model, b)
    assert counts[-1] == QUERIES and all(0 < c <= HUB["max_text"] and c != QUERIES for c in counts[:2])
    prepared = hub_model.prepare_inputs(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"])
    n_text = int((b["input_ids"][0] != IMAGE_TOKEN_INDEX).sum())
    assert int(prepared.attention_mask.sum()) == n_text + sum(counts)
    assert int((prepared.labels != IGNORE_INDEX).sum()) == int((b["labels"] != IGNORE_INDEX).sum())


def test_visual_demo_features_give_every_image_the_query_tokens(make_model, tiny_tokenizer):
    model = make_model(connector_type="mhub", ablation="no_tags", mhub={**HUB, "demo_features": "visual"})
    b = batch(model, tiny_tokenizer, kshot())
    prepared = model.prepare_inputs(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"])
    assert int(prepared.attention_mask.sum()) == int((b["input_ids"][0] != IMAGE_TOKEN_INDEX).sum()) + 3 * QUERIES


def test_guide_spans_stop_at_the_next_image_the_answer_or_max_text():
    is_image = torch.tensor([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    labelled = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 0], dtype=torch.bool)
    assert guide_spans(is_image, labelled, 16) == [(1, 4, True), (5, 7, False)]
    assert guide_spans(is_image, torch.zeros_like(labelled), 16)[-1] == (5, 10, False)  # generation: to the end
    assert guide_spans(is_image, labelled, 2) == [(1, 3, True), (5, 7, False)]


def test_the_query_answer_never_reaches_its_image_but_a_demo_answer_does(hub_model, tiny_tokenizer):
    def query_image_embeds(conversation):
        b = batch(hub_model, tiny_tokenizer, conversation)
        with torch.no_grad():
            p = hub_model.prepare_inputs(b["input_ids"], b["attention_mask"], b["labels"], b["pixel_values"])
        first_label = int((p.labels[0] != IGNORE_INDEX).nonzero()[0])
        return p.inputs_embeds[0, :first_label], b

    base, b = query_image_embeds(kshot(answer="A cat."))
    other, b2 = query_image_embeds(kshot(answer="A dog."))
    assert b["input_ids"].shape == b2["input_ids"].shape
    assert torch.equal(base, other)  # everything before the answer, query image tokens included, is unchanged
    demo_changed, b3 = query_image_embeds(kshot(demo_answers=("A red blorp.", "A green table.")))
    # the second demo's image tokens begin where its sentinel was, shifted by the first image's tokens
    start = int((b["input_ids"][0] == IMAGE_TOKEN_INDEX).nonzero()[1]) - 1 + image_token_counts(hub_model, b)[0]
    assert torch.equal(base[:start], demo_changed[:start])
    span = image_token_counts(hub_model, b)[1]
    assert (base[start:start + span] - demo_changed[start:start + span]).abs().max() > 1e-2  # fused with its answer


def test_frozen_clip_and_llm_stay_unchanged_while_the_hub_trains(make_model, tiny_tokenizer):
    model = make_model(connector_type="mhub", ablation="no_tags", mhub=HUB).train()
    model.set_llm_trainable(False)
    llm_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    clip_before = {k: v.clone() for k, v in model.vision.model.state_dict().items()}
    hub_before = {k: v.clone() for k, v in model.connector.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    b = batch(model, tiny_tokenizer, kshot())
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(**b).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.language_model.state_dict()[k]) for k, v in llm_before.items())
    assert all(torch.equal(v, model.vision.model.state_dict()[k]) for k, v in clip_before.items())
    changed = [k for k, v in hub_before.items() if not torch.equal(v, model.connector.state_dict()[k])]
    assert any(k.startswith("qformer.") for k in changed) and "query_tokens" in changed and "proj.weight" in changed


@pytest.mark.parametrize("kind", ["text_only", "one_image"])
def test_every_trainable_module_is_in_the_graph_of_every_batch(make_model, tiny_tokenizer, kind):
    model = make_model(connector_type="mhub", ablation="no_tags", mhub=HUB).train()
    model.set_llm_trainable(False)
    proc = TunaProcessor.from_model(model, tiny_tokenizer)
    qa = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    b = proc([[{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]], padding_side="right") \
        if kind == "text_only" else proc([qa], images=[random_images(1)], padding_side="right")
    model(**b).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert any(p.grad.any() for p in model.connector.parameters()) == (kind == "one_image")


def test_tags_are_refused_and_generation_and_scoring_run(make_model, hub_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="reads no tags"):
        tagged = make_model(connector_type="mhub", mhub=HUB)
        b = TunaProcessor.from_model(tagged, tiny_tokenizer)([kshot()], images=[random_images(3)],
                                                             tags=[[["cat"], ["dog"], ["blorp"]]], padding_side="right")
        tagged(**b)
    b = batch(hub_model, tiny_tokenizer, kshot())
    scored = hub_model.score(b["input_ids"], b["labels"], b["attention_mask"], b["pixel_values"])
    with torch.no_grad():
        loss = hub_model(**b).loss
    assert torch.allclose(-scored.sum / scored.n_tokens, loss, atol=1e-5)
    prompt = TunaProcessor.from_model(hub_model, tiny_tokenizer)([kshot()[:-1]], images=[random_images(3)],
                                                                 padding_side="left")
    out = hub_model.generate(prompt["input_ids"], prompt["attention_mask"], prompt["pixel_values"], max_new_tokens=3,
                             stop_token_ids=[])
    assert out.shape == (1, 3)


def test_save_load_and_stage1_files_round_trip(make_model, hub_model, tiny_tokenizer, tmp_path):
    b = batch(hub_model, tiny_tokenizer, kshot())
    with torch.no_grad():
        before = hub_model(**b).logits
    hub_model.save_pretrained(tmp_path / "m")
    loaded = TunaForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.connector_type == "mhub" and loaded.config.mhub == hub_model.config.mhub
    with torch.no_grad():
        assert torch.equal(loaded(**b).logits, before)
    hub_model.save_trainable(tmp_path / "stage1")
    fresh = make_model(seed=1, connector_type="mhub", ablation="no_tags", mhub=HUB)
    fresh.load_trainable(tmp_path / "stage1")
    assert all(torch.equal(v, fresh.connector.state_dict()[k]) for k, v in hub_model.connector.state_dict().items())
    other = make_model(connector_type="mhub", ablation="no_tags", mhub={**HUB, "num_queries": 6})
    with pytest.raises(ValueError, match="query_tokens"):
        other.load_trainable(tmp_path / "stage1")


def test_blip2_qformer_checkpoint_loads_into_a_hub_of_its_shape(tmp_path):
    from safetensors.torch import save_file
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    config = MHubConfig(**HUB)
    source = Blip2QFormerModel(Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                  intermediate_size=128, encoder_hidden_size=48,
                                                  cross_attention_frequency=1))  # BLIP-2 captioning: no text FFN
    state = {f"qformer.{k}": v.contiguous() for k, v in source.state_dict().items()}
    state["query_tokens"] = torch.randn(1, QUERIES, 32)
    state["language_projection.weight"] = torch.randn(8, 32)  # other parts of the checkpoint are not read
    save_file(state, str(tmp_path / "model.safetensors"))
    hub = MHub(config, vision_dim=48, llm_dim=16)
    text_ffn_before = hub.qformer.encoder.layer[0].intermediate.dense.weight.clone()
    assert load_blip2_qformer(hub, tmp_path) == len(state) - 1
    assert torch.equal(hub.query_tokens, state["query_tokens"])
    assert all(torch.equal(v, hub.qformer.state_dict()[k]) for k, v in source.state_dict().items())
    assert torch.equal(hub.qformer.encoder.layer[0].intermediate.dense.weight, text_ffn_before)
    wide = MHub(MHubConfig(**{**HUB, "hidden_size": 64}), vision_dim=48, llm_dim=16)
    with pytest.raises(ValueError, match="does not fit this M-Hub"):
        load_blip2_qformer(wide, tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        load_blip2_qformer(hub, tmp_path / "nothing")


def test_config_is_checked():
    with pytest.raises(ValueError, match="demo_features"):
        MHubConfig(demo_features="both")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MHubConfig(hidden_size=30, num_heads=4)
