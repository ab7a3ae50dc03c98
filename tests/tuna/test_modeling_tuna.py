"""TunaForCausalLM: splicing, weights, gradients, save/load, stage-1 hand-off, generation, scoring, ablations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.tuna.conftest import random_images
from tuna.conversation import IGNORE_INDEX
from tuna.modeling_tuna import TRAINABLE_FILE, TunaForCausalLM, bias_attention_mask
from tuna.processing_tuna import TunaProcessor

QA = [{"from": "human", "value": "What is in the image?"}, {"from": "gpt", "value": "A red blorp."}]
TWO_IMAGES = [{"from": "human", "value": "<image> and <image>: which is the cat?"},
              {"from": "gpt", "value": "The second one."}]
TAGS = ["red blorp", "cat", "dog"]


@pytest.fixture(scope="module")
def model(make_model):
    return make_model()


def processor(model, tokenizer, **kw):
    return TunaProcessor.from_model(model, tokenizer, **kw)


def train_batch(model, tokenizer, tags=TAGS, images=None):
    """One QA sample with one image and its ``tags``, right-padded for training."""
    images = images or random_images(1)
    return processor(model, tokenizer)([QA], images=[images], tags=[[list(tags)]], padding_side="right")


def expected_block_length(model, tokenizer, tags, queries=1):
    proc = processor(model, tokenizer)
    cfg = model.config
    words = sum(len(proc.tag_token_ids(t)) for t in tags)
    return (len(cfg.tag_prefix_ids) + len(cfg.tag_suffix_ids) + (len(tags) - 1) * len(cfg.tag_separator_ids)
            + words + queries * len(tags))


# ------------------------------------------------------------------------------------ splicing
def test_sequence_layout_lengths_labels_and_block_rows(make_model, tiny_tokenizer):
    model = make_model(weight_mode="scale")
    batch = train_batch(model, tiny_tokenizer)
    prepared = model.prepare_inputs(**{k: v for k, v in batch.items()})
    n_text = int(batch["attention_mask"].sum()) - 1  # minus the image sentinel
    patches = model.config.num_image_tokens
    block = expected_block_length(model, tiny_tokenizer, TAGS)
    assert prepared.inputs_embeds.shape == (1, n_text + patches + block, model.config.text_config.hidden_size)
    # labels: the same answer ids as the text labels, never on image or tag positions
    text_labels = batch["labels"][batch["labels"] != IGNORE_INDEX]
    assert torch.equal(prepared.labels[prepared.labels != IGNORE_INDEX], text_labels)
    start = int((batch["input_ids"][0] == -200).nonzero()) + patches  # first tag-block position
    assert (prepared.labels[0, start - patches:start + block] == IGNORE_INDEX).all()
    # the block: prefix embeddings, then tag 0 = [visual token, word tokens * w_0]
    embed = model.get_input_embeddings()
    rows = prepared.inputs_embeds[0, start:start + block]
    prefix = embed(torch.tensor(model.config.tag_prefix_ids))
    assert torch.allclose(rows[:len(prefix)], prefix)
    w0 = prepared.tag_weights[0, 0]
    first_ids = torch.tensor(processor(model, tiny_tokenizer).tag_token_ids(TAGS[0]))
    at = len(prefix) + 1  # after the visual token
    assert torch.allclose(rows[at:at + len(first_ids)], embed(first_ids) * w0, atol=1e-6)
    assert prepared.key_bias is None  # "scale" mode: no attention bias


def test_weights_sum_to_one_and_follow_cosine_order(make_model):
    model = make_model(weight_scaling="raw", tag_temperature=0.05)
    tower = model.vision
    pixels = torch.stack([tower.clip.preprocess(im) for im in random_images(2)])
    image_embeds = tower(pixels).image_embeds
    tags = [["red blorp", "cat", "dog"], ["house", "tree", "pad"]]
    text = torch.stack([tower.embed_tags(t) for t in tags])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    weights = model.tag_weights(image_embeds, text, mask)
    assert torch.allclose(weights.sum(-1), torch.ones(2))
    assert weights[1, 2] == 0
    cos = (text * image_embeds[:, None]).sum(-1)
    for n, k in ((0, 3), (1, 2)):
        assert torch.equal(weights[n, :k].argsort(), cos[n, :k].argsort())
    expected = torch.softmax(cos[0] / 0.05, -1)
    assert torch.allclose(weights[0], expected, atol=1e-5)


def test_weights_change_the_output_materially_in_bias_mode(make_model, tiny_tokenizer):
    # All weight on the first tag vs all on the last: the answer logits move by a sizeable fraction of
    # what removing the whole tag block does (the weighting is not normalised away).
    model = make_model(weight_mode="bias")
    prepared = model.prepare_inputs(**train_batch(model, tiny_tokenizer))
    tag_positions = prepared.tag_index >= 0
    assert tag_positions.sum() == sum(1 + len(processor(model, tiny_tokenizer).tag_token_ids(t)) for t in TAGS)
    logits = {}
    for name, bias in (("first", [0.0, -30.0, -30.0]), ("last", [-30.0, -30.0, 0.0]), ("none", [-30.0] * 3)):
        prepared.key_bias = torch.zeros_like(prepared.key_bias)
        prepared.key_bias[tag_positions] = torch.tensor(bias)[prepared.tag_index[tag_positions]]
        with torch.no_grad():
            logits[name] = model.language_model(inputs_embeds=prepared.inputs_embeds,
                                                attention_mask=model.attention_inputs(prepared),
                                                position_ids=prepared.position_ids).logits[0, -1]
    shift = (logits["first"] - logits["last"]).abs().max()
    removal = (logits["first"] - logits["none"]).abs().max()
    assert shift > 0.3 * removal > 0


def test_near_zero_weight_equals_removing_the_tag(make_model, tiny_tokenizer):
    # weight -> 0 with the bias formulation == the tag's tokens masked out of attention
    model = make_model(weight_mode="bias")
    prepared = model.prepare_inputs(**train_batch(model, tiny_tokenizer))
    tag_cols = prepared.tag_index >= 0
    prepared.key_bias = prepared.key_bias.masked_fill(tag_cols, -30.0)
    biased = model.attention_inputs(prepared)
    masked = biased.masked_fill(tag_cols[:, None, None, :], torch.finfo(biased.dtype).min)
    run = lambda m: model.language_model(inputs_embeds=prepared.inputs_embeds, attention_mask=m,  # noqa: E731
                                         position_ids=prepared.position_ids).logits[0, -1]
    assert torch.allclose(run(biased), run(masked), atol=1e-5)


def test_bias_attention_mask_values():
    mask = bias_attention_mask(torch.tensor([[0, 1, 1]]), torch.tensor([[0.0, -2.0, 0.5]]), torch.float32)
    low = torch.finfo(torch.float32).min
    assert mask.shape == (1, 1, 3, 3)
    assert mask[0, 0, 2].tolist() == [low, -2.0, 0.5]  # padding key masked, bias on real keys
    assert mask[0, 0, 1].tolist() == [low, -2.0, low]  # causal
    step = bias_attention_mask(torch.tensor([[0, 1, 1]]), torch.tensor([[0.0, -2.0, 0.5]]), torch.float32, 2)
    assert torch.equal(step, mask[:, :, 2:])


def test_marker_image_count_mismatch_and_zero_label_batch_raise(model, tiny_tokenizer):
    proc = processor(model, tiny_tokenizer)
    with pytest.raises(ValueError, match="sample '0': 2 <image> markers but 1 images"):
        proc([TWO_IMAGES], images=[random_images(1)], tags=[[TAGS]])
    batch = train_batch(model, tiny_tokenizer)
    batch["labels"][:] = IGNORE_INDEX
    with pytest.raises(ValueError, match="every label in this batch is IGNORE_INDEX"):
        model(**batch)
    batch = train_batch(model, tiny_tokenizer)
    with pytest.raises(ValueError, match="1 image markers but 0 images"):
        model(**{**batch, "pixel_values": None})


# ------------------------------------------------------------------------------------ gradients
def test_gradients_reach_only_trainable_parts(make_model, tiny_tokenizer):
    model = make_model().train()
    model.set_llm_trainable(False)  # stage 1
    model(**train_batch(model, tiny_tokenizer)).loss.backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == {"connector", "tag_encoder"}
    assert all(p.grad is None for p in model.language_model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.vision.model.parameters())
    model.set_llm_trainable(True)  # stage 2
    model.zero_grad()
    model(**train_batch(model, tiny_tokenizer)).loss.backward()
    assert model.language_model.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in model.vision.model.parameters())


def test_gradient_checkpointing_gives_the_same_loss_and_grads(make_model, tiny_tokenizer):
    model = make_model().train()
    batch = train_batch(model, tiny_tokenizer)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable({"use_reentrant": False})
    assert model.language_model.is_activation_checkpointing
    loss2 = model(**batch).loss
    loss2.backward()
    assert torch.allclose(loss, loss2)
    assert all(torch.allclose(grads[n], p.grad, atol=1e-6) for n, p in model.named_parameters() if n in grads)


def test_loss_only_forward_gives_the_full_forwards_loss_and_grads(make_model, tiny_tokenizer):
    model = make_model().train()
    batch = train_batch(model, tiny_tokenizer)
    losses, grads = [], []
    for kwargs in ({}, {"loss_only": True}, {"num_items_in_batch": 3}, {"loss_only": True, "num_items_in_batch": 3}):
        model.zero_grad()
        out = model(**batch, **kwargs)
        assert (out.logits is None) == bool(kwargs.get("loss_only"))
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    n_answer = int((batch["labels"][:, 1:] != -100).sum())
    assert n_answer != 3  # else the mean and the sum / 3 could not be told apart
    assert torch.allclose(losses[0], losses[1]) and torch.allclose(losses[2], losses[3])
    assert torch.allclose(losses[2], losses[0] * n_answer / 3)
    for full, only in ((grads[0], grads[1]), (grads[2], grads[3])):
        assert full.keys() == only.keys() and len(full) > 0
        assert all(torch.allclose(full[n], only[n], atol=1e-6) for n in full)


# ------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip_is_exact(model, tiny_tokenizer, tmp_path):
    batch = train_batch(model, tiny_tokenizer)
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    loaded = TunaForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.config.to_dict()["tag_prefix_ids"] == model.config.tag_prefix_ids
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert not any(k.startswith("vision") or "visual" in k for k in loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, before)


def test_local_clip_checkpoint_is_copied_and_identity_checked(tiny_llm_dir, tiny_tokenizer, tmp_path):
    from datastore.clip import ClipSpec, load_clip, save_checkpoint

    clip = load_clip(ClipSpec(model="tuna-tiny-clip"))
    with torch.no_grad():
        next(clip.model.parameters()).add_(0.5)  # a "trained" CLIP, different from the random init
    clip = load_clip(ClipSpec(model="tuna-tiny-clip", pretrained=save_checkpoint(clip, str(tmp_path / "c.safetensors"))))
    model = TunaForCausalLM.from_components(str(tiny_llm_dir), clip, tiny_tokenizer, tag_hidden_dim=32, tag_num_heads=2)
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "c.safetensors").unlink()  # the model directory must be self-contained
    assert model.config.clip["pretrained"] == "clip/c.safetensors"
    loaded = TunaForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.vision.clip.identity["weights_sha256"] == clip.identity["weights_sha256"]
    with pytest.raises(ValueError, match="CLIP tower does not match this model"):
        loaded.attach_vision(load_clip(ClipSpec(model="tuna-tiny-clip")))


def test_stage1_partial_save_then_full_load(make_model, tiny_tokenizer, tmp_path):
    stage1 = make_model(seed=1)
    path = stage1.save_trainable(tmp_path / "stage1")
    assert path.name == TRAINABLE_FILE
    from safetensors.torch import load_file
    assert {k.split(".")[0] for k in load_file(str(path))} == {"connector", "tag_encoder"}
    stage2 = make_model(seed=2)
    assert not torch.equal(stage2.connector[0].weight, stage1.connector[0].weight)
    stage2.load_trainable(tmp_path / "stage1")
    for name, value in stage1.trainable_state_dict().items():
        assert torch.equal(stage2.trainable_state_dict()[name], value)
    batch = train_batch(stage1, tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(stage1(**batch).logits, stage2(**batch).logits)
    other = make_model(tag_queries=2)
    with pytest.raises(ValueError, match="does not fit this model: .*tag_encoder.text_proj.weight: shape"):
        other.load_trainable(path)
    with pytest.raises(FileNotFoundError, match="no stage-1 checkpoint"):
        other.load_trainable(tmp_path / "nowhere")


def test_lora_trains_adapters_only_and_merges_exactly(make_model, tiny_tokenizer):
    model = make_model()
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("connector.", "tag_encoder.")) for n in trainable)
    assert any("lora_" in n for n in trainable)
    for name, p in model.named_parameters():  # make the adapters non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = train_batch(model, tiny_tokenizer)
    with torch.no_grad():
        before = model(**batch).logits
        model.merge_lora()
        after = model(**batch).logits
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert torch.allclose(before, after, atol=1e-5)


# ------------------------------------------------------------------------------------ generation / scoring
GEN_QUESTIONS = ["What is in the image?", "<image> and <image>: which is the cat?", "Describe the photo."]


def gen_inputs(model, tokenizer, idx):
    images = random_images(4, seed=3)
    per_sample = [[images[0]], [images[1], images[2]], [images[3]]]
    tags = [[TAGS], [["cat"], ["dog", "tree"]], [[]]]
    proc = processor(model, tokenizer)
    return proc([GEN_QUESTIONS[i] for i in idx], images=[per_sample[i] for i in idx], tags=[tags[i] for i in idx])


@pytest.mark.parametrize("weight_mode", ["scale_and_bias", "scale"])
def test_greedy_generation_is_batch_invariant(make_model, tiny_tokenizer, weight_mode):
    model = make_model(weight_mode=weight_mode)
    together = model.generate(**gen_inputs(model, tiny_tokenizer, [0, 1, 2]), max_new_tokens=8, stop_token_ids=[])
    for i in range(3):
        alone = model.generate(**gen_inputs(model, tiny_tokenizer, [i]), max_new_tokens=8, stop_token_ids=[])
        assert torch.equal(alone[0], together[i]), f"sample {i}"


def test_cached_decoding_equals_full_recompute(make_model, tiny_tokenizer):
    model = make_model(weight_mode="scale_and_bias")
    inputs = gen_inputs(model, tiny_tokenizer, [0, 1])
    tokens = model.generate(**inputs, max_new_tokens=4, stop_token_ids=[])
    prepared = model.prepare_inputs(**inputs, padding_side="left")
    with torch.no_grad():  # greedy without cache: append each token's embedding and recompute everything
        embeds, mask, bias = prepared.inputs_embeds, prepared.attention_mask, prepared.key_bias
        for step in range(4):
            mask4 = bias_attention_mask(mask, bias, embeds.dtype)
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = model.language_model(inputs_embeds=embeds, attention_mask=mask4, position_ids=positions).logits
            token = logits[:, -1].argmax(-1)
            assert torch.equal(token, tokens[:, step])
            embeds = torch.cat([embeds, model.get_input_embeddings()(token)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            bias = torch.cat([bias, torch.zeros_like(bias[:, :1])], 1)


def test_generation_stops_and_pads_after_stop_token(model, tiny_tokenizer):
    inputs = gen_inputs(model, tiny_tokenizer, [0, 1])
    free = model.generate(**inputs, max_new_tokens=6, stop_token_ids=[])
    stop = int(free[0, 1])  # force a stop at step 2 of row 0
    out = model.generate(**inputs, max_new_tokens=6, stop_token_ids=[stop], pad_token_id=-1)
    assert out[0, 1] == stop and (out[0, 2:] == -1).all()
    assert model.config.stop_token_ids == [tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_score_matches_forward_log_softmax_and_is_batch_invariant(model, tiny_tokenizer):
    proc = processor(model, tiny_tokenizer)
    images = random_images(2, seed=5)
    convs = [QA, [{"from": "human", "value": "Which?"}, {"from": "gpt", "value": "The dog, clearly."}]]
    batch = proc(convs, images=[[images[0]], [images[1]]], tags=[[TAGS], [["dog"]]], padding_side="right")
    scores = model.score(**batch)
    with torch.no_grad():
        prepared = model.prepare_inputs(**batch)
        logits = model(**batch).logits
    target = prepared.labels[:, 1:]
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    for b in range(2):
        valid = target[b] != IGNORE_INDEX
        expected = logp[b][valid].gather(-1, target[b][valid][:, None]).squeeze(-1)
        assert torch.allclose(scores.per_token[b], expected, atol=1e-5)
        assert torch.allclose(scores.sum[b], expected.sum(), atol=1e-4)
        assert scores.n_tokens[b] == valid.sum()
        alone = model.score(**proc([convs[b]], images=[[images[b]]], tags=[[[TAGS, ["dog"]][b]]],
                                   padding_side="left"))
        assert torch.allclose(alone.sum[0], scores.sum[b], atol=1e-4)


# ------------------------------------------------------------------------------------ ablations / multi-image
def _prepared(model, tokenizer, tags=TAGS, images=None):
    return model.prepare_inputs(**train_batch(model, tokenizer, tags=tags, images=images))


def test_no_tags_ablation_equals_a_sample_without_tags(make_model, tiny_tokenizer):
    model = make_model()
    images = random_images(1)
    plain = _prepared(model, tiny_tokenizer, tags=[], images=images)
    model.config.ablation = "no_tags"
    ablated = _prepared(model, tiny_tokenizer, images=images)
    assert torch.equal(plain.inputs_embeds, ablated.inputs_embeds)
    assert ablated.tag_weights is None and ablated.key_bias is None


def test_uniform_weights_ablation(make_model, tiny_tokenizer):
    model = make_model(ablation="uniform_weights")
    prepared = _prepared(model, tiny_tokenizer)
    assert torch.equal(prepared.tag_weights, torch.ones(1, 3))  # "count" scaling: uniform -> 1
    assert (prepared.key_bias == 0).all()  # log(1) = 0: the bias changes nothing
    model.config.ablation = "none"
    assert not torch.equal(_prepared(model, tiny_tokenizer).tag_weights, torch.ones(1, 3))


def test_no_image_aware_and_text_tags_ablations(make_model, tiny_tokenizer):
    model = make_model(weight_mode="scale")
    full = _prepared(model, tiny_tokenizer)
    model.config.ablation = "no_image_aware"
    words_only = _prepared(model, tiny_tokenizer)
    assert full.inputs_embeds.shape[1] - words_only.inputs_embeds.shape[1] == len(TAGS)  # one visual token per tag
    assert torch.equal(words_only.tag_weights, full.tag_weights)
    model.config.ablation = "text_tags"
    text = _prepared(model, tiny_tokenizer)
    assert text.tag_weights is None and text.key_bias is None
    assert text.inputs_embeds.shape == words_only.inputs_embeds.shape
    # text tags = unweighted word embeddings: equal to the weighted ones divided by the weights
    assert not torch.allclose(text.inputs_embeds, words_only.inputs_embeds)
    model.train()
    model(**train_batch(model, tiny_tokenizer)).loss.backward()
    # the encoder is off the path: it runs on a zero probe only, so its gradients are exactly zero
    assert all(p.grad is not None and not p.grad.any() for p in model.tag_encoder.parameters())


def test_random_tags_ablation_keeps_the_model_path(make_model, tiny_tokenizer):
    model = make_model()
    base = _prepared(model, tiny_tokenizer)
    model.config.ablation = "random_tags"  # tags are randomised by TagSource; the model reads them as usual
    assert torch.equal(_prepared(model, tiny_tokenizer).inputs_embeds, base.inputs_embeds)


def test_multi_image_sample_puts_each_tag_block_after_its_image(make_model, tiny_tokenizer):
    model = make_model(weight_mode="scale")
    proc = processor(model, tiny_tokenizer)
    images = random_images(2, seed=7)
    batch = proc([TWO_IMAGES], images=[images], tags=[[["cat"], ["dog", "tree"]]], padding_side="right")
    prepared = model.prepare_inputs(**batch)
    patches = model.config.num_image_tokens
    blocks = [expected_block_length(model, tiny_tokenizer, t) for t in (["cat"], ["dog", "tree"])]
    n_text = int(batch["attention_mask"].sum()) - 2
    assert prepared.inputs_embeds.shape[1] == n_text + 2 * patches + sum(blocks)
    ids = batch["input_ids"][0]
    first, second = (ids == -200).nonzero().flatten().tolist()
    # image 1's patch tokens sit right after image 0's tag block and the text between the markers
    with torch.no_grad():
        out = model.vision(torch.stack([model.vision.clip.preprocess(im) for im in images]))
        patch_tokens = model.connector(out.patches)
    start_1 = first + patches + blocks[0] + (second - first - 1)
    assert torch.allclose(prepared.inputs_embeds[0, first:first + patches], patch_tokens[0])
    assert torch.allclose(prepared.inputs_embeds[0, start_1:start_1 + patches], patch_tokens[1])
    cat_ids = torch.tensor(proc.tag_token_ids("cat"))
    cat_at = first + patches + len(model.config.tag_prefix_ids) + 1
    weight = prepared.tag_weights[0, 0]
    assert torch.allclose(prepared.inputs_embeds[0, cat_at:cat_at + len(cat_ids)],
                          model.get_input_embeddings()(cat_ids) * weight, atol=1e-6)


def test_llama_with_sentencepiece_tokenizer_vicuna_template_bf16(tiny_sp_tokenizer, tmp_path):
    from datastore.clip import ClipSpec
    from pipeline.tiny import save_tiny_llm

    llm = save_tiny_llm(tmp_path / "llama", vocab_size=len(tiny_sp_tokenizer), model_type="llama")
    model = TunaForCausalLM.from_components(str(llm), ClipSpec(model="tuna-tiny-clip"), tiny_sp_tokenizer,
                                            dtype=torch.bfloat16, template="vicuna_v1", tag_hidden_dim=32,
                                            tag_num_heads=2)
    assert model.config.stop_token_ids == [tiny_sp_tokenizer.eos_token_id]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    proc = processor(model, tiny_sp_tokenizer)
    images = random_images(2)
    batch = proc([QA, TWO_IMAGES], images=[images[:1], images], tags=[[TAGS], [["cat"], []]], padding_side="right")
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    scores = model.score(**batch)
    assert torch.isfinite(scores.sum).all() and (scores.n_tokens > 0).all()
    prompts = proc(["What is in the image?", "Which?"], images=[images[:1], images[1:]], tags=[[TAGS], [[]]])
    assert model.generate(**prompts, max_new_tokens=3, stop_token_ids=[]).shape == (2, 3)
    model.save_pretrained(tmp_path / "m")
    loaded = TunaForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_text_only_samples_mix_with_image_samples(model, tiny_tokenizer):
    proc = processor(model, tiny_tokenizer)
    text_only = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]
    mixed = proc([text_only, QA], images=[[], random_images(1)], tags=[[], [TAGS]], padding_side="right")
    alone = proc([text_only], padding_side="right")
    assert alone["pixel_values"] is None
    with torch.no_grad():
        assert torch.isfinite(model(**alone).loss)
        mixed_loss = model(**mixed).loss
    assert torch.isfinite(mixed_loss)


def test_flash_attention_with_attention_bias_is_refused(make_model, tiny_tokenizer):
    model = make_model(weight_mode="bias")
    model.language_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="needs an attention bias"):
        model(**train_batch(model, tiny_tokenizer))


@pytest.mark.parametrize("kind", ["text_only", "no_tags", "tags"])
def test_every_trainable_module_is_in_the_graph_of_every_batch(make_model, tiny_tokenizer, kind):
    # DDP (find_unused_parameters=False) and ZeRO-3 need the same parameters used on every rank and step;
    # stage 1 (LLM frozen) on a text-only batch must still give a loss with a graph.
    model = make_model().train()
    model.set_llm_trainable(False)
    proc = processor(model, tiny_tokenizer)
    text_only = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]
    if kind == "text_only":
        batch = proc([text_only], padding_side="right")
    else:
        batch = proc([QA], images=[random_images(1)], tags=[[[] if kind == "no_tags" else TAGS]],
                     padding_side="right")
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if kind == "tags":
        assert all(p.grad.any() for p in model.tag_encoder.parameters())
    else:
        assert not any(p.grad.any() for p in model.tag_encoder.parameters())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied_embeddings"])
def test_checkpoint_with_active_lora_reloads_with_its_adapters(make_model, tiny_tokenizer, tiny_tied_llm_dir,
                                                               tmp_path, tied):
    model = make_model(llm_dir=tiny_tied_llm_dir if tied else None)
    lm_head = model.get_output_embeddings().weight
    assert (lm_head is model.get_input_embeddings().weight) == tied
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = train_batch(model, tiny_tokenizer)
    model.save_pretrained(tmp_path / "mid")  # e.g. a mid-training checkpoint
    loaded = TunaForCausalLM.from_pretrained(tmp_path / "mid")
    assert loaded.config.lora == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
        assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) == tied
        loaded.merge_lora()
        loaded.save_pretrained(tmp_path / "final")
        final = TunaForCausalLM.from_pretrained(tmp_path / "final")
        assert final.config.lora is None and not any("lora_" in k for k in final.state_dict())
        assert torch.allclose(final(**batch).logits, model(**batch).logits, atol=1e-5)


def test_tags_without_token_ids_and_mixed_batches_raise(model, tiny_tokenizer):
    batch = train_batch(model, tiny_tokenizer)
    with pytest.raises(ValueError, match="tags were given without tag_input_ids"):
        model(**{k: v for k, v in batch.items() if not k.startswith("tag_")})
    proc = processor(model, tiny_tokenizer)
    prompt = proc.encode("What?", sample_id="p1")
    answered = proc.encode(QA, sample_id="a1")
    with pytest.raises(ValueError, match=r"with answers\) together with generation prompts \(without\): \['p1'\]"):
        proc.collate([answered, prompt])
    with pytest.raises(ValueError, match="sample 'img-7': 1 <image> markers but 0 images"):
        proc(["<image> What?"], sample_ids=["img-7"])
    out = model(**batch, use_cache=True, return_dict=False, output_hidden_states=True)
    assert out.loss is not None and len(out.hidden_states) == model.config.text_config.num_hidden_layers + 1


def test_generate_returns_the_tag_weights_it_used(model, tiny_tokenizer):
    inputs = gen_inputs(model, tiny_tokenizer, [0, 1])
    tokens, weights = model.generate(**inputs, max_new_tokens=2, stop_token_ids=[], return_tag_weights=True)
    assert torch.equal(tokens, model.generate(**inputs, max_new_tokens=2, stop_token_ids=[]))
    expected = model.weights_for(inputs["pixel_values"], inputs["tags"])
    for n, tags in enumerate(inputs["tags"]):
        assert torch.allclose(weights[n, :len(tags)], torch.tensor(expected[n]), atol=1e-6)


class ScoredTags:
    """A tag source: the same retrieved tags and scores for every image (enough for the processor)."""

    def __init__(self, tags, scores):
        from datastore.store import RetrievedTags

        self.found = RetrievedTags(tags=list(tags), scores=list(scores), neighbours=[], neighbour_scores=[])

    def __call__(self, image_id, image=None):
        return self.found


def test_retrieval_scores_reach_the_weights_as_a_log_prior(make_model, tiny_tokenizer):
    tags, scores = ["red blorp", "cat", "dog", "tree"], [1.0, 6.0, 0.5, 2.0]
    images = random_images(2, seed=5)
    model = make_model(tag_score_prior=1.5, max_tags=3)
    proc = processor(model, tiny_tokenizer, tag_source=ScoredTags(tags, scores))
    batch = proc(["What is it?", "What is it?"], images=[[images[0]], [images[1]]], tags=[None, [["cat", "dog"]]])
    # the source's scores (cut to max_tags like the tags); caller-given tags get an equal prior of 1.0
    assert batch["tags"] == [tags[:3], ["cat", "dog"]]
    torch.testing.assert_close(batch["tag_scores"], torch.tensor([scores[:3], [1.0, 1.0, 0.0]]))
    _, weights = model.generate(**batch, max_new_tokens=1, stop_token_ids=[], return_tag_weights=True)
    image_embeds = model.vision(batch["pixel_values"]).image_embeds
    text = torch.stack([model.vision.embed_tags(t + ["pad"] * (3 - len(t))) for t in batch["tags"]])
    cos = F.cosine_similarity(text, image_embeds[:, None], dim=-1)
    expected0 = torch.softmax(cos[0] / model.config.tag_temperature + 1.5 * torch.tensor(scores[:3]).log(), -1) * 3
    torch.testing.assert_close(weights[0], expected0, atol=1e-5, rtol=1e-4)
    expected1 = torch.softmax(cos[1, :2] / model.config.tag_temperature, -1) * 2  # equal prior: the cosine alone
    torch.testing.assert_close(weights[1, :2], expected1, atol=1e-5, rtol=1e-4)
    assert model.weights_for(batch["pixel_values"], batch["tags"], batch["tag_scores"])[0] == pytest.approx(
        expected0.tolist(), abs=1e-5)
    # λ = 0 (the default, the paper's rule): the scores change nothing
    plain = make_model(max_tags=3)
    _, unweighted = plain.generate(**batch, max_new_tokens=1, stop_token_ids=[], return_tag_weights=True)
    torch.testing.assert_close(unweighted[0], torch.softmax(cos[0] / plain.config.tag_temperature, -1) * 3,
                               atol=1e-5, rtol=1e-4)
    # training batches carry them too, and the loss sees the prior
    train = processor(model, tiny_tokenizer, tag_source=ScoredTags(tags, scores))([QA], images=[[images[0]]],
                                                                                  padding_side="right")
    loss = model(**train).loss
    flat = dict(train, tag_scores=torch.ones_like(train["tag_scores"]))
    assert not torch.isclose(loss, model(**flat).loss)
    assert proc(["What?"], images=[[images[0]]], tags=[[["cat"]]])["tag_scores"] is None


def test_image_patch_positions_say_where_a_patch_is_train_and_hand_over(make_model, tiny_tokenizer, tmp_path):
    plain = make_model()
    assert plain.image_patch_pos is None
    model = make_model(seed=1, image_patch_positions=True).train()
    cfg = model.config
    assert model.image_patch_pos.shape == (cfg.num_image_tokens, cfg.vision_hidden_size)
    assert model.image_patch_pos.std() > 0.01  # initialised, not left at zero
    patches = torch.randn(1, cfg.num_image_tokens, cfg.vision_hidden_size)
    swapped = patches[:, [1, 0, *range(2, cfg.num_image_tokens)]]
    with torch.no_grad():
        tokens = {name: [m._visual_tokens(x, None, torch.float32)[0] for x in (patches, swapped)]
                  for name, m in (("plain", plain), ("positions", model))}
    # without positions the connector is per patch: swapping two patches swaps their tokens exactly
    assert torch.equal(tokens["plain"][0][:, [1, 0]], tokens["plain"][1][:, :2])
    assert not torch.allclose(tokens["positions"][0][:, [1, 0]], tokens["positions"][1][:, :2], atol=1e-4)
    model.set_llm_trainable(False)
    model(**train_batch(model, tiny_tokenizer)).loss.backward()
    assert model.image_patch_pos.grad.abs().sum() > 0
    model.save_trainable(tmp_path / "stage1")
    other = make_model(seed=2, image_patch_positions=True)
    other.load_trainable(tmp_path / "stage1")
    assert torch.equal(other.image_patch_pos, model.image_patch_pos)
    with pytest.raises(ValueError, match="unexpected image_patch_pos"):
        plain.load_trainable(tmp_path / "stage1")


def test_word_map_renames_the_llm_side_only(make_model, tiny_tokenizer):
    model = make_model()
    proc = processor(model, tiny_tokenizer)
    image = random_images(1, seed=7)
    conv = [{"from": "human", "value": "<image>\nHow many blorps? Is the blorp red?"},
            {"from": "gpt", "value": "Two blorps, a red blorp."}]
    renamed = proc.collate([proc.encode(conv, image, tags=[TAGS], word_map={"blorp": "cat"})], "right")
    # the conversation and the tag words read "cat(s)", plural kept; the CLIP side keeps "red blorp"
    by_hand = [{"from": t["from"], "value": t["value"].replace("blorp", "cat")} for t in conv]
    expected = proc.collate([proc.encode(by_hand, image, tags=[["red cat", "cat", "dog"]])], "right")
    assert renamed["tags"] == [TAGS]
    for key in ("input_ids", "labels", "tag_input_ids", "tag_attention_mask"):
        assert torch.equal(renamed[key], expected[key]), key
    assert not torch.equal(renamed["input_ids"], proc.collate([proc.encode(conv, image, tags=[TAGS])])["input_ids"])
    with torch.no_grad():
        assert torch.isclose(model(**renamed).loss, model(**dict(expected, tags=[TAGS])).loss)
        assert not torch.isclose(model(**renamed).loss, model(**expected).loss)  # CLIP reads another text there
    # whole words only: "blorpy" is left alone
    assert proc.encode("a blorpy blorp", word_map={"blorp": "cat"})["input_ids"].tolist() == proc.encode(
        "a blorpy cat")["input_ids"].tolist()
