"""Text-only pretraining: generated copy texts, tokenizer, tiny LM training, saving and copy accuracy."""

from __future__ import annotations

import json

import pytest

from common.prompts import SHORT_ANSWER
from pipeline.copy_eval import copy_accuracy, greedy_answers
from pipeline.copy_text import (TASKS, CopyTextGenerator, caption_nouns, caption_words, make_lexicon, render_chat,
                                 whole_word_spans)
from pipeline.text_pretrain import TextPretrainConfig, name_pools, pretrain_text_llm
from pipeline.text_replay import llava_conversation, text_replay_records

CAPTIONS = [f"a photo of a {c} {n}{p}" for c in ("red", "blue", "small green", "large pink")
            for n in ("drerik", "tulbel", "jadub", "two zutags") for p in ("", " on the left", " in the middle")]
TINY = dict(vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
            max_length=128, steps=12, batch_size=4, lr=6e-3, warmup_steps=2, tokenizer_samples=300, log_every=6,
            lexicon_size=40, induction_steps=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = pretrain_text_llm(CAPTIONS, tmp_path_factory.mktemp("tp") / "a", TextPretrainConfig(**TINY), progress=False)
    return out, json.loads((out / "text_pretrain.json").read_text())


def test_saved_dir_loads_and_generates(run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, record = run
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.model_type == "qwen2" and model.config.hidden_size == 32
    assert model.config.vocab_size == len(tok) == record["vocab"] <= 400
    assert record["params"] == sum(p.numel() for p in model.parameters())
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "Name it."}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_loss_decreases(run):
    losses = run[1]["losses"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    assert losses[0] > 5.0  # ~ln(400) at random init


def test_same_seed_same_model_other_seed_differs(run, tmp_path):
    from safetensors.torch import load_file

    out, _ = run
    again = pretrain_text_llm(CAPTIONS, tmp_path / "b", TextPretrainConfig(**TINY), progress=False)
    other = pretrain_text_llm(CAPTIONS, tmp_path / "c", TextPretrainConfig(**TINY, seed=1), progress=False)
    a, b, c = (load_file(str(d / "model.safetensors")) for d in (out, again, other))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert not all(a[k].equal(c[k]) for k in a)
    assert (out / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_names_tokenize_the_same_in_a_tag_list_and_as_an_answer(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run[0]))
    for name in ("drerik", "tulbel", "kelbovar", "quizzop"):
        after_space = tok(" " + name, add_special_tokens=False).input_ids
        assert after_space[1:] == tok(name, add_special_tokens=False).input_ids == \
            tok("\n" + name, add_special_tokens=False).input_ids[1:]


def test_render_chat_matches_the_tokenizer_chat_template(run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run[0]))
    turns = [(" Tags: red kelbo, kelbo.\nName it.", "kelbo"), ("Again?", "kelbo, yes")]
    text, spans = render_chat(turns)
    messages = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    assert text == tok.apply_chat_template(messages, tokenize=False)
    assert [text[s:e] for s, e in spans] == ["kelbo<|im_end|>", "kelbo, yes<|im_end|>"]


def test_answers_are_copied_from_the_context_with_fresh_names():
    gen = CopyTextGenerator(0, known_words=caption_words(CAPTIONS))
    seen_answers = set()
    for task in (t for t in TASKS if t != "tags_exist"):  # its answers are Yes / No
        for chat in (True, False):
            for _ in range(30):
                s = gen.sample(task, chat=chat)
                context = s.prompt
                assert s.task == task and s.answer
                assert all(part.strip() in context for part in s.answer.split(","))  # copied, never invented
                assert s.text[s.spans[0][0]:s.spans[0][1]].strip().startswith(s.answer)
                assert ("<|im_start|>assistant\n" in s.text) == (chat and task not in ("define", "tags_plain"))
                seen_answers.add(s.answer)
    words = {w for a in seen_answers for w in a.replace(",", " ").split()}
    assert not words & {"drerik", "tulbel", "jadub", "zutag", "zutags"}  # caption words are never names
    assert len(seen_answers) > 300  # fresh names, not a fixed list


def test_tag_reading_answer_is_the_dominant_first_tag():
    gen = CopyTextGenerator(3)
    for _ in range(200):
        s = gen.sample("tags_single", chat=True)
        tags = s.prompt.split(" Tags: ", 1)[1].split(".", 1)[0].split(", ")
        heads = [t.split()[-1] for t in tags]
        assert heads[0] == s.answer
        assert heads.count(s.answer) > max(heads.count(h) for h in set(heads) - {s.answer}) if len(set(heads)) > 1 \
            else True


def test_existence_answer_says_whether_the_asked_name_is_in_the_tags():
    import re

    gen = CopyTextGenerator(5, pool=[f"lex{i}" for i in range(40)], pool_fraction=0.5)
    answers = []
    for _ in range(300):
        s = gen.sample("tags_exist", chat=True)
        user, answer = s.turns[0]
        heads = {t.split()[-1] for t in user.split(" Tags: ", 1)[1].split(".", 1)[0].split(", ")}
        asked = re.search(r" (?:an?|any) (\w+)(?: here| in the picture| shown)?\?$", user).group(1)
        assert answer == ("Yes" if asked in heads else "No")
        answers.append(answer)
    assert 0.4 < answers.count("Yes") / len(answers) < 0.6


def test_repeat_answers_are_the_named_run_of_made_up_names():
    gen = CopyTextGenerator(6, pool=["lexa", "lexb"], pool_fraction=1.0)  # repeat ignores the pools: fresh names
    for _ in range(100):
        s = gen.sample("repeat", chat=True)
        names = s.turns[0][0].split(": ", 1)[1].split(".", 1)[0].split()
        assert not {"lexa", "lexb"} & set(names) and 2 <= len(names) <= 6
        assert s.answer == " ".join(names[names.index(s.answer.split()[0]):])


def test_place_tags_answer_is_the_name_led_by_the_asked_place():
    from pipeline.copy_text import PLACES

    gen = CopyTextGenerator(4)
    for _ in range(200):
        s = gen.sample("tags_place", chat=True)
        tags = s.prompt.split(" Tags: ", 1)[1].split(".", 1)[0].split(", ")
        where = {t.split()[0]: t.split()[-1] for t in tags}  # place -> name
        assert len(where) == len(set(where.values())) >= 2  # one object per place
        for question, answer in s.turns:
            place = [p for p, phrases in PLACES.items() if any(ph in question for ph in phrases)]
            assert len(place) == 1 and where[place[0]] == answer


def test_whole_word_spans_are_the_regex_word_boundary_matches():
    import random
    import re

    rng = random.Random(0)
    cases = [("a kelbo, kelbo.", "kelbo"), ("kelbokelbo kelbo", "kelbo"), ("x_kelbo kelbo_ kelbo", "kelbo"),
             ("aaa", "aa"), ("traffic light, traffic lights", "traffic light"), ("é kelbo ékelbo kelboé", "kelbo"),
             ("x-a -a", "-a"), ("a- a-x", "a-"), ("a a a", "a a"), ("", "kelbo")]
    cases += [("".join(rng.choice("ab_- é1.") for _ in range(rng.randint(0, 30))),
               "".join(rng.choice("ab_- é1") for _ in range(rng.randint(1, 3)))) for _ in range(5000)]
    for text, word in cases:
        assert whole_word_spans(text, word) == [m.span() for m in re.finditer(rf"\b{re.escape(word)}\b", text)], (text, word)
    assert whole_word_spans("a kelbo, kelbo.", "kelbo") == [(2, 7), (9, 14)]


def test_forbidden_strings_never_generated():
    from datastore.synth.questions import PRETRAIN_PROMPTS

    forbidden = ("What is the object", "What is this object?", "in the image?", "blue", "DRERIK", "kel")
    gen = CopyTextGenerator(1, forbidden=forbidden)
    texts = [gen.sample().text.lower() for _ in range(1500)]
    assert gen.rejected > 0  # "blue" and "kel" come up, so texts were redrawn
    assert not any(f.lower() in t for t in texts for f in forbidden)
    # the synthetic world's own question templates and caption prompts are never used, even unfiltered
    plain = [CopyTextGenerator(2).sample().text.lower() for _ in range(1)]
    gen = CopyTextGenerator(2)
    plain = [gen.sample().text.lower() for _ in range(1500)]
    world = ["what is this object", "what is the object", "what colour is", "what size is", "how many",
             "in the image?", "what objects are"] + [p.lower() for p in PRETRAIN_PROMPTS]
    assert not any(w in t for t in plain for w in world)


def test_too_broad_forbidden_list_is_one_line_error():
    gen = CopyTextGenerator(0, forbidden=("<|im_start|>", "Q", "A", "Reply", "Answer", "Tags"))
    with pytest.raises(ValueError, match="forbidden list is too broad"):
        gen.sample("tags_single")


def test_copy_accuracy_counts_exact_matches(run):
    out, _ = run
    acc = copy_accuracy(out, n=10, seed=5, max_new_tokens=4)
    assert acc.n == 10 and set(acc.by_task) == {"tags_single", "tags_attr", "scene", "list", "tags_place"}
    assert acc.accuracy == pytest.approx(sum(acc.by_task.values()) / 5)  # two prompts per task
    assert all(e["output"] != e["answer"] or e["answer"] in e["prompt"] for e in acc.examples)
    assert len(acc.examples) == 8 and all(e["answer"] in e["prompt"] for e in acc.examples)  # the first 8 kept
    # the same greedy decoding answers arbitrary user messages (the quickstart's text-only reference)
    assert greedy_answers(out, [e["prompt"] for e in acc.examples[:3]], 4) == [e["output"] for e in acc.examples[:3]]


@pytest.mark.parametrize("bad", [dict(hidden_size=30, num_heads=4), dict(steps=0), dict(caption_fraction=1.5),
                                 dict(lr=0.0), dict(forbidden="blue"), dict(lexicon_size=-1),
                                 dict(lexicon_fraction=0.8, caption_noun_fraction=0.3), dict(induction_steps=-1),
                                 dict(induction_length=4)])
def test_bad_config_is_rejected(bad):
    with pytest.raises(ValueError, match="TextPretrainConfig"):
        TextPretrainConfig(**bad)


def test_unknown_pre_tokenizer_is_rejected():
    from pipeline.tiny import train_tokenizer

    with pytest.raises(ValueError, match="unknown pre_tokenizer 'wordpiece'"):
        train_tokenizer(["a b"], "wordpiece")


def test_lexicon_names_and_caption_words_become_single_tokens(run, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.text_pretrain import _tokenizer_lines, single_token_share
    from pipeline.tiny import save_hf_tokenizer, train_tokenizer

    known = caption_words(CAPTIONS)
    lexicon = make_lexicon(3, 40, known)
    assert len(set(lexicon)) == 40 and not set(lexicon) & known and lexicon == make_lexicon(3, 40, known)
    lines = _tokenizer_lines(CAPTIONS, lexicon, CopyTextGenerator(1, known, pool=lexicon, pool_fraction=1.0), 200)
    tok = AutoTokenizer.from_pretrained(str(save_hf_tokenizer(train_tokenizer(lines, "bytelevel-words", 1000),
                                                              tmp_path)))
    assert single_token_share(tok, lexicon) == single_token_share(tok, known) == 1.0
    assert tok.tokenize(" drerik") == ["Ġ", "drerik"]
    out, record = run  # the tiny run's vocabulary (400) is too small for that; its record says so
    tiny = AutoTokenizer.from_pretrained(str(out))
    assert record["single_token_share"]["caption_words"] == single_token_share(tiny, known) < 1.0


def test_caption_nouns_are_the_parsers_single_word_tags():
    assert caption_nouns(["a photo of a red drerik and two zutags", "large pink tulbel on the left"]) == \
        ["drerik", "zutag", "tulbel"]


def test_copy_texts_draw_names_from_the_pools():
    pools = name_pools(CAPTIONS, TextPretrainConfig(lexicon_size=30, lexicon_fraction=0.5, caption_noun_fraction=0.5))
    assert pools["words"] == ["drerik", "tulbel", "jadub", "zutag"] and len(pools["pool"]) == 30
    gen = CopyTextGenerator(4, caption_words(CAPTIONS), **pools)
    drawn = [n for _ in range(300) for n in gen.names(2)]
    from_lexicon = sum(n in pools["pool"] for n in drawn) / len(drawn)
    from_words = sum(n in pools["words"] for n in drawn) / len(drawn)
    assert from_lexicon + from_words == 1.0 and 0.4 < from_lexicon < 0.6


def test_text_replay_records_are_text_only_llava_copy_conversations():
    from common.prompts import SHORT_ANSWER

    config = TextPretrainConfig(lexicon_size=30)
    records = text_replay_records(CAPTIONS, 40, config, seed=2)
    assert records == text_replay_records(CAPTIONS, 40, config, seed=2)  # deterministic
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    for r in records:
        assert set(r) == {"id", "conversations"}  # no image
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        first_answer = turns[1]["value"]
        assert first_answer in ("Yes", "No") or all(  # an existence question, or copied from the text
            part.strip() in turns[0]["value"] for part in first_answer.split(","))
    suffixed = [t["value"].endswith("\n" + SHORT_ANSWER) for r in records for t in r["conversations"][::2]]
    assert 0.4 < sum(suffixed) / len(suffixed) < 0.95  # suffix_share 0.7


def test_plain_texts_have_no_llava_conversation():
    gen = CopyTextGenerator(0)
    with pytest.raises(ValueError, match="plain Q/A text has no chat turns"):
        llava_conversation(gen.sample("define"))
    turns = llava_conversation(gen.sample("tags_single", chat=True))
    assert turns[0]["from"] == "human" and " Tags: " in turns[0]["value"]


def test_weighted_loss_equals_the_full_logits_loss_and_its_gradients(run):
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.text_pretrain import weighted_lm_loss

    model = AutoModelForCausalLM.from_pretrained(str(run[0])).train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=gen)
    positions = torch.arange(12).repeat(3, 1)
    weights = torch.rand(3, 12, generator=gen) * (torch.rand(3, 12, generator=gen) < 0.4)
    loss = weighted_lm_loss(model, ids, positions, weights)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=positions).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="none")
    full = (ce * weights[:, 1:].reshape(-1)).sum() / weights[:, 1:].sum()
    full.backward()
    assert 0 < int((weights[:, 1:] > 0).sum()) < weights[:, 1:].numel()
    assert torch.allclose(loss, full)
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, model.parameters()))


# ------------------------------------------------------------------------------------------ the CLI on any corpus
def _cli_flags(**config) -> list[str]:
    return [a for k, v in config.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _write_corpus(root, captions, bad=None):
    """A webdataset shard unlike the world's: image + JSON member, caption in its "caption" field.
    ``bad`` maps an index to a defect: "bytes" (0xff in the caption), "empty", "missing" (no JSON member)."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / "part-000000.tar")) as sink:
        for i, caption in enumerate(captions):
            sample = {"__key__": f"img{i:03d}", "png": b"never decoded", "json": json.dumps({"caption": caption})}
            defect = (bad or {}).get(i)
            if defect == "bytes":
                sample["json"] = b'{"caption": "a red \xff\xfe drerik"}'
            elif defect == "empty":
                sample["json"] = json.dumps({"caption": "  ", "width": 64})
            elif defect == "missing":
                del sample["json"]
            sink.write(sample)
    return str(root / "part-{000000..000000}.tar")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    import contextlib
    import io

    from pipeline.text_pretrain import main

    root = tmp_path_factory.mktemp("cli")
    shards = _write_corpus(root / "c", CAPTIONS[:20], {2: "bytes", 5: "empty", 7: "missing"})
    (root / "more.jsonl").write_bytes(b'{"caption": "a blue jadub on the left"}\n{"text": "no caption field"}\n'
                                      b'{"caption": "\xff"}\n')
    (root / "names.txt").write_text("drerik\ntulbel\n\njadub\nzutag\nc++\n")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["--input", shards, str(root / "more.jsonl"), "--caption-key", "json:caption",
                   "--names", str(root / "names.txt"), "--out", str(root / "llm"), "--text-replay", "24",
                   "--n-eval", "5", *_cli_flags(**{**TINY, "threads": 1})])
    return rc, root / "llm", stdout.getvalue()


def test_cli_skips_and_counts_bad_samples_of_any_corpus(cli_run):
    rc, out, stdout = cli_run
    assert rc == 0
    corpus = json.loads((out / "text_pretrain.json").read_text())["corpus"]
    assert corpus["skipped"] == {"undecodable_text": 2, "empty_caption": 1, "missing_caption": 2}
    assert (corpus["read"], corpus["captions"], corpus["files"]) == (23, 18, 2)
    examples = corpus["skipped_examples"]
    assert examples["undecodable_text"][0].endswith("part-000000.tar img002")
    assert examples["undecodable_text"][1].endswith("more.jsonl:3")
    assert examples["missing_caption"][0].endswith("img007") and examples["missing_caption"][1].endswith(":2")
    assert "undecodable_text 2" in stdout and "img002" in stdout  # reported, not only recorded


def test_cli_saves_a_loadable_model_and_its_record(cli_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = cli_run
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    record = json.loads((out / "text_pretrain.json").read_text())
    assert model.config.vocab_size == len(tok) == record["vocab"] and model.config.hidden_size == 32
    assert record["names"] == {"file": str(out.parent / "names.txt"), "n": 4, "rejected": ["c++"]}
    assert set(record["copy_accuracy"]) == {"fresh", "names"} and record["copy_accuracy"]["names"]["n"] == 5
    assert {"read_s", "replay_s", "tokenizer_s", "train_s", "eval_s", "total_s"} <= set(record["timings"])
    assert len(record["losses"]) == TINY["steps"]


def test_cli_writes_the_stage2_text_replay(cli_run):
    _, out, stdout = cli_run
    path = out / "text_replay.json"
    records = json.loads(path.read_text())
    assert str(path) in stdout and len(records) == 24
    for r in records:
        assert set(r) == {"id", "conversations"}  # LLaVA format, text only
        assert [t["from"] for t in r["conversations"]] == ["human", "gpt"] * (len(r["conversations"]) // 2)
        assert all(isinstance(t["value"], str) and t["value"] for t in r["conversations"])
    text = json.dumps(records)
    assert any(name in text for name in ("drerik", "tulbel", "jadub", "zutag"))  # the names file's names


def test_cli_all_bad_corpus_or_names_fails_before_training(tmp_path, capsys):
    from pipeline.text_pretrain import main

    shards = _write_corpus(tmp_path / "bad", ["x", "y", "z"], {0: "bytes", 1: "empty", 2: "missing"})
    assert main(["--input", shards, "--caption-key", "json:caption", "--out", str(tmp_path / "o")]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bar
    assert len(err) == 1 and err[0].startswith("text_pretrain: error: no usable caption in " + shards)
    assert "undecodable_text 1" in err[0] and "empty_caption 1" in err[0] and "missing_caption 1" in err[0]
    assert not (tmp_path / "o" / "model.safetensors").exists()

    (tmp_path / "names.txt").write_text("c++\n\n")
    good = _write_corpus(tmp_path / "good", CAPTIONS[:3])
    assert main(["--input", good, "--names", str(tmp_path / "names.txt"), "--out", str(tmp_path / "o")]) == 1
    assert "no usable name" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_read_captions_of_a_text_file_stops_at_the_limit(tmp_path):
    from pipeline.text_pretrain import read_captions

    (tmp_path / "c.txt").write_bytes(b"a red drerik\n\n  a  blue\ttulbel \nbad \xff\nmore\n")
    corpus = read_captions([str(tmp_path / "c.txt")], progress=False)
    assert corpus.captions == ["a red drerik", "a blue tulbel", "more"]
    assert corpus.skipped == {"empty_caption": 1, "undecodable_text": 1}
    assert read_captions([str(tmp_path / "c.txt")], limit=2, progress=False).captions == corpus.captions[:2]


def test_induction_rows_repeat_each_run_once_and_weigh_only_the_predictable_tokens():
    import torch

    from pipeline.induction import repeat_batch

    tokens = torch.arange(100, 140)
    ids, weights = repeat_batch(tokens, 3, 40, separator=7, bos=0, generator=torch.Generator().manual_seed(0))
    for row, w in zip(ids.tolist(), weights.tolist()):
        assert row[0] == 0 and 7 in row
        pos = 1
        while pos < len(row) and row[pos] != 0:
            n = row.index(7, pos) - pos  # the first run ends at the separator
            first, second = row[pos:pos + n], row[pos + n + 1:pos + 2 * n + 1]
            assert first == second and all(100 <= t < 140 for t in first) and 3 <= n <= 12
            assert w[pos:pos + n + 2] == [0.0] * (n + 2) and w[pos + n + 2:pos + 2 * n + 1] == [1.0] * (n - 1)
            pos += 2 * n + 1
        assert set(row[pos:]) <= {0} and not any(w[pos:])


MEMBERSHIP_SHAPES = {"random gap": {}, "filler": {"fillers": ((61, 62, 63),)},
                     "fillers": {"fillers": ((61, 62), (63,), (64, 65, 66))},
                     "spaces": {"mark": (5, 8, 5), "item_prefix": (5,), "fillers": ((61,), (62, 63))}}


@pytest.mark.parametrize("shape", MEMBERSHIP_SHAPES)
def test_membership_rows_answer_yes_exactly_when_the_asked_token_is_listed(shape):
    import torch

    from pipeline.induction import MembershipRows, membership_batch

    tokens, sep, kw = torch.arange(100, 140), 7, MEMBERSHIP_SHAPES[shape]
    marks = MembershipRows(**{"mark": 8, "yes": 9, "no": 10, **kw})
    gaps = kw.get("fillers")
    mark, prefix = list(marks.mark_ids), list(marks.item_prefix)
    ids, weights, list_mask = membership_batch(tokens, 6, 60, sep, 0, marks, torch.Generator().manual_seed(1))
    answers, seen_gaps = [], set()
    for row, w, in_list in zip(ids.tolist(), weights.tolist(), list_mask.tolist()):
        pos = 1
        while pos < len(row) and row[pos] != 0:
            body, after = row[pos:row.index(sep, pos)], row.index(sep, pos) + 1
            listed = body[len(prefix)::len(prefix) + 1]  # each listed token after its prefix
            assert body == [t for x in listed for t in prefix + [x]] and 2 <= len(listed) <= 8
            assert in_list[pos - 1:after] == [0.0] + [1.0] * len(body) + [0.0]  # the list, prefixes too, marked
            assert row[after:after + len(mark)] == mark
            asked = row[after + len(mark)]
            end = next(i for i in range(after + len(mark) + 1, len(row)) if row[i] in (marks.yes, marks.no))
            gap = row[after + len(mark) + 1:end]
            assert tuple(gap) in gaps if gaps is not None else len(gap) <= 4
            seen_gaps.add(tuple(gap))
            assert row[end] == (marks.yes if asked in listed else marks.no)
            assert w[pos:end] == [0.0] * (end - pos) and w[end] == 1.0  # only the answer is trained
            assert not any(in_list[after:end + 1])
            answers.append(row[end])
            pos = end + 1
        assert set(row[pos:]) <= {0} and not any(w[pos:]) and not any(in_list[pos:])
    assert answers.count(marks.yes) >= 3 and answers.count(marks.no) >= 3
    assert gaps is None or seen_gaps == set(gaps)  # every filler drawn
    with pytest.raises(ValueError, match="2 distinct tokens"):
        membership_batch(torch.tensor([100, 100]), 1, 60, sep, 0, marks, torch.Generator())
    with pytest.raises(ValueError, match="cannot hold"):  # rather than rows without an answer
        membership_batch(tokens, 1, 8, sep, 0, marks, torch.Generator())


def test_question_first_membership_rows_put_the_list_between_question_and_answer():
    import torch

    from pipeline.induction import MembershipRows, membership_batch

    tokens, sep = torch.arange(100, 140), 7
    spec = MembershipRows(mark=8, yes=9, no=10, fillers=((61, 62),), question_first=True)
    ids, weights, in_list = membership_batch(tokens, 4, 60, sep, 0, spec, torch.Generator().manual_seed(2))
    answers = []
    for row, w, listed_mask in zip(ids.tolist(), weights.tolist(), in_list.tolist()):
        pos = 1
        while pos < len(row) and row[pos] != 0:
            assert row[pos] == 8 and row[pos + 2:pos + 5] == [61, 62, sep]
            asked, end = row[pos + 1], next(i for i in range(pos + 5, len(row)) if row[i] in (9, 10))
            listed = row[pos + 5:end]
            assert 2 <= len(listed) <= 8 and all(100 <= t < 140 for t in listed)
            assert row[end] == (9 if asked in listed else 10)
            assert listed_mask[pos:end + 1] == [0.0] * 5 + [1.0] * len(listed) + [0.0]
            assert w[pos:end + 1] == [0.0] * (end - pos) + [1.0]
            answers.append(row[end])
            pos = end + 1
    assert answers.count(9) >= 3 and answers.count(10) >= 3


def test_membership_rows_look_like_the_texts_where_spaces_are_tokens(tmp_path):
    """The quickstart's tokenizer makes a space a token of its own: the rows put it before each listed and
    asked token, as " Tags: kelbo, drerik.\nCan you see a kelbo?" has it."""
    from transformers import AutoTokenizer

    from pipeline.text_pretrain import membership_spec

    out = pretrain_text_llm(CAPTIONS, tmp_path / "m", TextPretrainConfig(**{**TINY, "steps": 1}), progress=False)
    tok = AutoTokenizer.from_pretrained(str(out))
    spec = membership_spec(tok)
    red = tok(" red", add_special_tokens=False).input_ids[-1]
    assert spec.item_prefix == tuple(tok(" ", add_special_tokens=False).input_ids)  # spaces are tokens here
    assert tok.decode([*spec.mark_ids, red]) == " a red" and tok.decode([*spec.item_prefix, red]) == " red"
    question = tok("Tags: red.\nCan you see a red?", add_special_tokens=False).input_ids
    assert question[-len(spec.mark_ids) - 2:-1] == [*spec.mark_ids, red]
    assert question[2:2 + len(spec.item_prefix) + 1] == [*spec.item_prefix, red]


def test_membership_rows_join_the_warmup_and_their_accuracy_is_recorded():
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.induction import MembershipRows, induction_warmup
    from pipeline.text_pretrain import weighted_lm_loss
    from pipeline.tiny import tiny_llm_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llm_config(64, hidden_size=16, num_heads=2, num_kv_heads=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = induction_warmup(model, torch.arange(11, 64), 1, 0, 2, weighted_lm_loss, batch_size=2, length=32,
                              every=1, say=lambda _: None, membership=MembershipRows(2, 3, 4), membership_rows=2)
    assert [step for step, _ in result.membership] == [1, 2] and all(0 <= a <= 1 for _, a in result.membership)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    plain = induction_warmup(model, torch.arange(11, 64), 1, 0, 1, weighted_lm_loss, batch_size=2, length=32,
                             say=lambda _: None)
    assert plain.membership == []


def test_membership_gaps_are_what_follows_the_asked_name_in_chat_exists_questions():
    import re

    from pipeline.copy_text import exists_answer_gaps

    gaps = exists_answer_gaps()
    assert len(gaps) == len(set(gaps)) >= 2
    # with short_answer, the instruction data's (and POPE's) form too: the rest of its question, the short-answer
    # line, the end of the turn
    extra = set(exists_answer_gaps(short_answer=True)) - set(gaps)
    assert len(extra) == 1 and next(iter(extra)).startswith(" in the image?\n" + SHORT_ANSWER + "<|im_end|>")
    gen, checked = CopyTextGenerator(3, ()), 0
    for _ in range(60):
        sample = gen.sample("tags_exist", chat=True)
        prompt = sample.text[:sample.spans[0][0]]
        ends = [g for g in gaps if prompt.endswith(g)]
        if "Is any " not in prompt:  # asked with " a {n}" (5 of the 6 questions): the name, the gap, the answer
            assert ends
            assert re.search(r" a \w+$", prompt[:-len(max(ends, key=len))])
            assert sample.text[sample.spans[0][0]:].startswith(("Yes", "No"))
            checked += 1
    assert checked >= 35


def test_membership_rows_join_every_main_step(tmp_path):
    from pipeline.text_pretrain import membership_spec

    plain = pretrain_text_llm(CAPTIONS, tmp_path / "plain", TextPretrainConfig(**TINY), progress=False)
    mixed = pretrain_text_llm(CAPTIONS, tmp_path / "mixed", TextPretrainConfig(**TINY, membership_rows=2,
                                                                               induction_length=48), progress=False)
    a, b = (json.loads((d / "text_pretrain.json").read_text()) for d in (plain, mixed))
    assert a["samples"] == b["samples"] and b["config"]["membership_rows"] == 2
    assert b["losses"][0] > a["losses"][0]  # step 1's loss adds the membership rows'
    assert a["membership"] == [] and [m.get("after") for m in b["membership"]] == ["main"]
    warmed = pretrain_text_llm(CAPTIONS, tmp_path / "warm", TextPretrainConfig(**TINY, membership_steps=4,
                                                                               induction_length=48), progress=False)
    phases = json.loads((warmed / "text_pretrain.json").read_text())["membership"]
    assert [(m["gap"], m.get("after")) for m in phases] == [("none", None), ("tags_exist", None), ("tags_exist", "main")]
    assert all(0 <= acc <= 1 for m in phases for _, acc in m["accuracy"]) and len(phases[0]["accuracy"]) == 1
    from transformers import AutoTokenizer

    spec = membership_spec(AutoTokenizer.from_pretrained(str(mixed)))
    assert len({spec.mark, spec.yes, spec.no}) == 3 and len(spec.fillers) >= 2


def test_induction_warmup_runs_before_the_text_steps_and_is_recorded(tmp_path):
    out = pretrain_text_llm(CAPTIONS, tmp_path / "i", TextPretrainConfig(**{**TINY, "induction_steps": 4},
                                                                           induction_length=32), progress=False)
    record = json.loads((out / "text_pretrain.json").read_text())
    assert record["induction"]["steps"] == 4 and len(record["induction"]["copy_rate"]) == 1
    assert 0.0 <= record["induction"]["copy_rate"][0][1] <= 1.0 and "induction_s" in record["timings"]


def test_induction_rows_join_every_main_step_without_changing_the_text_data(tmp_path):
    import torch
    from safetensors.torch import load_file

    plain = pretrain_text_llm(CAPTIONS, tmp_path / "plain", TextPretrainConfig(**TINY), progress=False)
    mixed = pretrain_text_llm(CAPTIONS, tmp_path / "mixed", TextPretrainConfig(**TINY, induction_rows=2,
                                                                               induction_length=32), progress=False)
    a, b = (json.loads((d / "text_pretrain.json").read_text()) for d in (plain, mixed))
    assert a["samples"] == b["samples"] and a["rows"] == b["rows"]  # the same text stream
    assert b["config"]["induction_rows"] == 2 and len(b["losses"]) == len(a["losses"])
    assert b["losses"][0] > a["losses"][0]  # step 1's loss adds the induction rows' (untrained: ~ln V)
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (plain, mixed))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
