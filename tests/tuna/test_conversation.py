"""Tests for tuna.conversation: templates, exact label masks, image sentinels, generation prompts, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from tuna.conversation import (
    IGNORE_INDEX,
    IMAGE_MARKER,
    IMAGE_TOKEN_INDEX,
    SequenceTooLongError,
    Template,
    TokenizationError,
    build_generation_prompt,
    get_template,
    list_templates,
    render_text,
    tokenize_conversation,
    verify_segments,
)

ANSWER1 = "A red zinnet sits on the table."
ANSWER2 = "It is blue."
MULTI_IMAGE = [  # two images interleaved with text, two rounds
    {"from": "human", "value": "<image>\nWhat is the blorp? Is there a <image> dog?"},
    {"from": "gpt", "value": ANSWER1},
    {"from": "human", "value": "And the dog?"},
    {"from": "gpt", "value": ANSWER2},
]
SINGLE = MULTI_IMAGE[:2]
# Exact target text (answer + end tokens) per template, in sequence order.
TARGETS = {
    "plain": [ANSWER1 + "\n"],
    "vicuna_v1": [f" {ANSWER1}</s>", f" {ANSWER2}</s>"],
    "chat_template": [f"{ANSWER1}<|im_end|>", f"{ANSWER2}<|im_end|>"],
}
CASES = [("plain", SINGLE), ("vicuna_v1", SINGLE), ("vicuna_v1", MULTI_IMAGE),
         ("chat_template", SINGLE), ("chat_template", MULTI_IMAGE)]


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def target_spans(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of non-ignored labels."""
    spans, start = [], None
    for i, label in enumerate(labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


def decode_with_markers(tok, ids: list[int]) -> str:
    """Decode each text run separately and put ``<image>`` back where the sentinels are."""
    runs, cur = [], []
    for i in ids:
        if i == IMAGE_TOKEN_INDEX:
            runs.append(cur)
            cur = []
        else:
            cur.append(i)
    runs.append(cur)
    return IMAGE_MARKER.join(tok.decode(r, skip_special_tokens=False) for r in runs)


def oracle(tok, text: str, targets: list[str], bos: list[int]) -> tuple[list[int], list[int]]:
    """Independent expectation: tokenize each text run whole; a token is a target iff its character
    offsets lie inside one of the target strings (located left to right in ``text``)."""
    spans, pos = [], 0
    for target in targets:
        start = text.index(target, pos)
        spans.append((start, start + len(target)))
        pos = start + len(target)
    ids, labels, offset = list(bos), [IGNORE_INDEX] * len(bos), 0
    for k, run in enumerate(text.split(IMAGE_MARKER)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
        if run:
            out = tok(run, add_special_tokens=False, return_offsets_mapping=True)
            for tid, (a, b) in zip(out["input_ids"], out["offset_mapping"]):
                inside = any(s <= offset + a and offset + b <= e for s, e in spans)
                ids.append(tid)
                labels.append(tid if inside else IGNORE_INDEX)
        offset += len(run) + len(IMAGE_MARKER)
    return ids, labels


def bos_of(tok, name: str) -> list[int]:
    return [] if name == "chat_template" else [tok.bos_token_id]


@pytest.mark.parametrize("name,conv", CASES)
def test_labels_exact_against_offset_oracle(tiny_tokenizer, name, conv):
    out = tokenize_conversation(conv, tiny_tokenizer, name, sample_id="s1")
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    assert out["input_ids"].dtype == torch.long and out["labels"].dtype == torch.long
    text = render_text(conv, name, tiny_tokenizer)
    n_rounds = len(conv) // 2
    assert (ids, labels) == oracle(tiny_tokenizer, text, TARGETS[name][:n_rounds], bos_of(tiny_tokenizer, name))


@pytest.mark.parametrize("name,conv", CASES)
def test_targets_decode_to_answers_and_ids_to_text(tiny_tokenizer, name, conv):
    out = tokenize_conversation(conv, tiny_tokenizer, name, sample_id="s1")
    ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    spans = target_spans(labels)
    n_rounds = len(conv) // 2
    assert [tiny_tokenizer.decode(labels[a:b], skip_special_tokens=False) for a, b in spans] \
        == TARGETS[name][:n_rounds]
    mask = out["labels"] != IGNORE_INDEX
    assert torch.equal(out["labels"][mask], out["input_ids"][mask])
    bos = bos_of(tiny_tokenizer, name)
    assert ids[:len(bos)] == bos
    assert decode_with_markers(tiny_tokenizer, ids[len(bos):]) == render_text(conv, name, tiny_tokenizer)


@pytest.mark.parametrize("name,conv", CASES)
def test_image_sentinels(tiny_tokenizer, name, conv):
    out = tokenize_conversation(conv, tiny_tokenizer, name)
    ids, labels = out["input_ids"], out["labels"]
    n_markers = sum(t["value"].count(IMAGE_MARKER) for t in conv)
    assert n_markers == 2 and out["n_images"] == 2
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 2
    assert torch.all(labels[ids == IMAGE_TOKEN_INDEX] == IGNORE_INDEX)
    assert int((ids < 0).sum()) == 2  # no other negative ids


def test_rendered_texts(tiny_tokenizer):
    system = get_template("vicuna_v1").system
    assert system.startswith("A chat between a curious user")
    assert render_text(MULTI_IMAGE, "vicuna_v1") == (
        f"{system} USER: <image>\nWhat is the blorp? Is there a <image> dog? ASSISTANT: {ANSWER1}</s>"
        f"USER: And the dog? ASSISTANT: {ANSWER2}</s>")
    assert render_text(SINGLE, "plain") == f"<image><image>{ANSWER1}\n"  # human text dropped
    assert render_text(MULTI_IMAGE[:3], "chat_template", tiny_tokenizer) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat is the blorp? Is there a <image> dog?<|im_end|>\n"
        f"<|im_start|>assistant\n{ANSWER1}<|im_end|>\n"
        "<|im_start|>user\nAnd the dog?<|im_end|>\n<|im_start|>assistant\n")


def test_system_turn_and_role_aliases(tiny_tokenizer):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "<image> Name it."},
            {"from": "assistant", "value": "A blorp."}]
    assert render_text(conv, "vicuna_v1") == "Be brief. USER: <image> Name it. ASSISTANT: A blorp.</s>"
    assert render_text(conv, "chat_template", tiny_tokenizer).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image> Name it.")
    llava = [{"from": "human", "value": "<image> Name it."}, {"from": "gpt", "value": "A blorp."}]
    for name in list_templates():
        a = tokenize_conversation(conv[1:], tiny_tokenizer, name)
        b = tokenize_conversation(llava, tiny_tokenizer, get_template(name))
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.parametrize("name,conv", CASES)
def test_generation_prompt_is_training_prefix(tiny_tokenizer, name, conv):
    train = tokenize_conversation(conv, tiny_tokenizer, name)
    spans = target_spans(train["labels"].tolist())
    for r, (start, _) in enumerate(spans):  # every round: prompt == training ids up to that answer
        prompt = build_generation_prompt(conv[:2 * r + 1], tiny_tokenizer, name)
        assert prompt["input_ids"].tolist() == train["input_ids"][:start].tolist()
        assert prompt["n_images"] == 2
    question = build_generation_prompt(conv[0]["value"], tiny_tokenizer, name)
    assert torch.equal(question["input_ids"], build_generation_prompt(conv[:1], tiny_tokenizer, name)["input_ids"])


def test_chat_template_adds_no_bos_and_ends_with_turn_newline(tiny_tokenizer):
    ids = tokenize_conversation(SINGLE, tiny_tokenizer, "chat_template")["input_ids"].tolist()
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-2:] == enc(tiny_tokenizer, "<|im_end|>\n")  # trailing newline kept, not a target


@pytest.mark.parametrize("name", ["vicuna_v1", "plain"])
def test_sentencepiece_style_tokenizer(tiny_sp_tokenizer, name):
    """Llama-like ``▁`` tokenizers: segments are tokenized in context, so the sequence equals the
    whole-text tokenization of each text run (the labels come from the offset oracle)."""
    tok = tiny_sp_tokenizer
    conv = SINGLE if name == "plain" else MULTI_IMAGE
    out = tokenize_conversation(conv, tok, name, sample_id="sp")
    expected = oracle(tok, render_text(conv, name), TARGETS[name][:len(conv) // 2], [tok.bos_token_id])
    assert (out["input_ids"].tolist(), out["labels"].tolist()) == expected
    # The trap in-context tokenization avoids: with prepend_scheme "first" the text after "</s>" has no
    # "▁" in the whole text, but would get one if the next round's prompt were tokenized standalone.
    standalone_differs = enc(tok, "USER:") != enc(tok, "</s>USER:")[1:]
    assert standalone_differs == (tok.backend_tokenizer.pre_tokenizer.prepend_scheme == "first")
    start = target_spans(out["labels"].tolist())[0][0]
    prompt = build_generation_prompt(conv[:1], tok, name)["input_ids"].tolist()
    assert prompt == out["input_ids"][:start].tolist()


def test_template_registry_and_validation():
    assert list_templates() == ["chat_template", "plain", "vicuna_v1"]
    t = get_template("vicuna_v1")
    assert (t.roles, t.sep, t.sep2) == (("USER", "ASSISTANT"), " ", "</s>")
    with pytest.raises(ValueError, match=r"unknown conversation template 'llama9'.*'plain'.*'vicuna_v1'"):
        get_template("llama9")
    with pytest.raises(ValueError, match=r"Template.style must be one of .*'fancy'"):
        Template(name="x", style="fancy")
    with pytest.raises(ValueError, match=r"Template.sep2 must not contain '<image>'"):
        Template(name="x", style="separator", sep2="<image>")
    with pytest.raises(ValueError, match=r"Template.end_of_turn"):
        Template(name="x", style="separator", end_of_turn="</s>")


BAD = [
    ([], r"sample 'bad-7': empty conversation"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}],
     r"sample 'bad-7': turn 1 is 'user' but 'assistant' was expected"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}],
     r"sample 'bad-7': turn 0 is 'assistant' but 'user' was expected"),
    ([{"from": "system", "value": "s"}, {"from": "gpt", "value": "a"}],
     r"sample 'bad-7': turn 1 is 'assistant' but 'user' was expected"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
     r"sample 'bad-7': conversation ends with a human turn"),
    ([{"from": "bot", "value": "a"}], r"sample 'bad-7': turn 0 has role 'bot'"),
    ([{"from": "human", "value": 3}], r"sample 'bad-7': turn 0 must be a dict with a string 'value'"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "see <image>"}],
     r"sample 'bad-7': turn 1 \(assistant\) contains '<image>'"),
    ([{"from": "system", "value": "s"}], r"sample 'bad-7': conversation has no human/gpt turns"),
]


@pytest.mark.parametrize("name", ["vicuna_v1", "chat_template", "plain"])
@pytest.mark.parametrize("conv,message", BAD)
def test_malformed_conversations(tiny_tokenizer, name, conv, message):
    with pytest.raises(ValueError, match=message):
        tokenize_conversation(conv, tiny_tokenizer, name, sample_id="bad-7")


def test_generation_and_plain_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"sample 'g1': the last turn must be human"):
        build_generation_prompt(SINGLE, tiny_tokenizer, "vicuna_v1", sample_id="g1")
    with pytest.raises(ValueError, match=r"sample 'p1': template 'plain' takes exactly one human/gpt round, got 2"):
        tokenize_conversation(MULTI_IMAGE, tiny_tokenizer, "plain", sample_id="p1")
    with pytest.raises(ValueError, match=r"unknown conversation template 'nope'"):
        tokenize_conversation(SINGLE, tiny_tokenizer, "nope")
    with pytest.raises(ValueError, match=r"needs a tokenizer"):
        render_text(SINGLE, "chat_template")


def test_no_target_tokens(tiny_tokenizer):
    bare = Template(name="bare", style="plain", sep="")
    conv = [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": ""}]
    with pytest.raises(ValueError, match=r"sample 'z0': no target tokens .*zero loss"):
        tokenize_conversation(conv, tiny_tokenizer, bare, sample_id="z0")
    conv[1]["value"] = "ok"  # the same template with a real answer is fine
    assert int((tokenize_conversation(conv, tiny_tokenizer, bare)["labels"] != IGNORE_INDEX).sum()) > 0


def test_max_length(tiny_tokenizer):
    n = len(tokenize_conversation(SINGLE, tiny_tokenizer, "vicuna_v1")["input_ids"])
    assert len(tokenize_conversation(SINGLE, tiny_tokenizer, "vicuna_v1", max_length=n)["input_ids"]) == n
    with pytest.raises(SequenceTooLongError, match=rf"sample 'long-3': sequence length {n} exceeds max_length {n - 1}"):
        tokenize_conversation(SINGLE, tiny_tokenizer, "vicuna_v1", max_length=n - 1, sample_id="long-3")
    # each of the 2 images counted as 10 positions
    with pytest.raises(SequenceTooLongError, match=rf"sequence length {n + 18} exceeds max_length {n}"):
        tokenize_conversation(SINGLE, tiny_tokenizer, "vicuna_v1", max_length=n, tokens_per_image=10)
    with pytest.raises(ValueError, match=r"max_length must be None or >= 1, got 0"):
        tokenize_conversation(SINGLE, tiny_tokenizer, "vicuna_v1", max_length=0)


def test_chat_template_errors(tiny_tokenizer_dir, tiny_tokenizer):
    bare = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    bare.chat_template = None
    with pytest.raises(ValueError, match=r"sample 'c1': template 'chat_template' needs a tokenizer with a chat"):
        tokenize_conversation(SINGLE, bare, "chat_template", sample_id="c1")
    odd = Template(name="odd", style="chat_template", end_of_turn="<|eot|>")
    with pytest.raises(ValueError, match=r"sample 'c2': no end-of-turn token among \['<\|eot\|>'\]"):
        tokenize_conversation(SINGLE, tiny_tokenizer, odd, sample_id="c2")


def test_boundary_merge_raises_tokenization_error(tiny_tokenizer):
    # Qwen2-style pre-tokenization joins newline runs: "assistant\n" + "\nA red" holds the token "\n\n"
    # across the prompt/answer boundary, so no exact label mask exists.
    assert len(enc(tiny_tokenizer, "\n\n")) == 1
    conv = [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "\nA red blorp."}]
    message = r"sample 'm9': segment '\\nA red blorp.*merges.* is \d+ tokens alone.*\(\d+ tokens together\)"
    with pytest.raises(TokenizationError, match=message):
        tokenize_conversation(conv, tiny_tokenizer, "chat_template", sample_id="m9")
    assert issubclass(TokenizationError, ValueError)


def test_verify_segments_detects_inconsistent_pieces(tiny_tokenizer):
    texts = ["assistant\n", "\nA red"]
    good = [(t, ids) for t, ids in zip(texts, [enc(tiny_tokenizer, "assistant\n"), enc(tiny_tokenizer, "\nA red")])]
    n_built = sum(len(ids) for _, ids in good)
    n_whole = len(enc(tiny_tokenizer, "".join(texts)))
    assert n_whole == n_built - 1  # standalone pieces split the "\n\n" token
    with pytest.raises(TokenizationError, match=rf"sample 'v2': .* gives {n_built} tokens .* gives {n_whole} tokens"):
        verify_segments(good, tiny_tokenizer, sample_id="v2")
    a, b = enc(tiny_tokenizer, "A red"), enc(tiny_tokenizer, " blorp")
    assert a + b == enc(tiny_tokenizer, "A red blorp")
    verify_segments([("A red", a), (" blorp", b)], tiny_tokenizer)  # consistent: no error
    with pytest.raises(TokenizationError, match=r"sample 'v3'"):
        verify_segments([("A red", a), (" blorp", b[::-1] + a)], tiny_tokenizer, "v3")
