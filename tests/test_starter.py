"""The offline starter: corpus split, tokenizer + chat template, loss mask, builds and cache."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer import corpus, pretrain, starter, starter_eval
from trainer.starter import STARTER, TINY, Recipe, build_model, ensure_starter

SYSTEM = "You are tuneloop, a friendly assistant that learns from feedback."


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def test_corpus_pairs_carry_context_and_split_by_prompt():
    pairs = corpus.load_pairs(("english",))
    assert {"english"} == {p.language for p in pairs}
    multi = next(p for p in pairs if len(p.context) >= 2)
    roles = [m["role"] for m in multi.messages(system=SYSTEM)]
    assert roles[0] == "system" and roles[-1] == "user"
    assert all(a != b for a, b in zip(roles[1:], roles[2:], strict=False))  # user/assistant alternate

    train, held = corpus.split_pairs(pairs, 0.2, seed=3)
    assert (train, held) == corpus.split_pairs(pairs, 0.2, seed=3)
    assert 0.1 < len(held) / len(pairs) < 0.3
    held_prompts = {corpus.normalize(p.message) for p in held}
    assert not held_prompts & {corpus.normalize(p.message) for p in train}


def test_tiny_model_loads_and_chats(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    meta = json.loads((tiny_model / "tuneloop.json").read_text())
    assert meta["key"] == TINY.key() and meta["parameters"] == sum(p.numel() for p in model.parameters())

    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert text == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == im_end
    assert tok.pad_token_id is not None and tok.pad_token_id != im_end
    assert tok.decode(tok("你好, world")["input_ids"]) == "你好, world"  # byte-level: no unknowns

    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=40, do_sample=False)
    reply = out[0, ids["input_ids"].shape[1] :].tolist()
    assert im_end in reply, "greedy decoding should end its turn"
    assert reply.index(im_end) == len(reply) - 1  # generation stopped at <|im_end|>


def test_prompt_tokens_are_masked(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "How are you?"}]
    ids, labels = pretrain.sft_example(tok, messages, "Fine, thanks.", max_len=128)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [pretrain.IGNORE] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :]
    assert tok.decode(labels[len(prompt) :]) == "Fine, thanks.<|im_end|>"
    # the template's generation markers agree with the mask
    full = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": "Fine, thanks."}],
        return_assistant_tokens_mask=True,
        return_dict=True,
    )
    learned = [i for i, m in zip(full["input_ids"], full["assistant_masks"], strict=True) if m]
    assert learned == ids[len(prompt) :]

    batch = pretrain.collate([(ids, labels), (ids[:5], labels[:5])], tok.pad_token_id)
    assert batch["labels"][1, 5:].eq(pretrain.IGNORE).all() and batch["attention_mask"][1, 5:].eq(0).all()

    # a prompt too long for the window loses its oldest turns, never the last user turn
    long = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}, *messages[1:]]
    ids, labels = pretrain.sft_example(tok, long, "Fine.", max_len=48)
    assert len(ids) <= 48 and "word" not in tok.decode(ids)


def test_recipe_key_and_cache_reuse(tmp_path, monkeypatch, tiny_model):
    assert TINY.key() == Recipe(**dataclasses.asdict(TINY)).key()
    assert TINY.key() != dataclasses.replace(TINY, sft_steps=TINY.sft_steps + 1).key()
    assert TINY.key() != STARTER.key()
    assert TINY.key() == dataclasses.replace(TINY, expected_minutes=9).key()  # display-only field

    # A finished build in the cache is reused, not rebuilt.
    calls = []
    monkeypatch.setattr(starter, "build_model", lambda out, recipe, progress=True: calls.append(out))
    folder = tmp_path / f"starter-{TINY.key()}"
    import shutil

    shutil.copytree(tiny_model, folder)
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path))
    assert ensure_starter(recipe=TINY, progress=False) == folder
    assert calls == []
    # ...but a changed recipe has a new folder and is built.
    other = dataclasses.replace(TINY, seed=1)
    assert ensure_starter(recipe=other, progress=False) == tmp_path / f"starter-{other.key()}"
    assert len(calls) == 1


def test_ensure_starter_builds_once(tmp_path):
    recipe = dataclasses.replace(TINY, pretrain_steps=5, sft_steps=5)
    first = ensure_starter(tmp_path, recipe, progress=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert starter.is_complete(first, recipe)
    assert ensure_starter(tmp_path, recipe, progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


@pytest.mark.slow
def test_starter_recipe_learns(tmp_path):
    """The STARTER code path, shortened, beats the same model untrained."""
    recipe = dataclasses.replace(STARTER, pretrain_steps=25, sft_steps=90, threads=1)
    path = build_model(tmp_path / "model", recipe, progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    trained = AutoModelForCausalLM.from_pretrained(path)
    torch.manual_seed(0)
    untrained = pretrain.new_model(recipe.shape, tok)
    untrained.generation_config = trained.generation_config

    items = starter_eval.eval_items(recipe.languages, recipe.holdout_fraction, recipe.split_seed, limit=12)
    items = {"train_sample": items["train_sample"]}
    before = starter_eval.evaluate(untrained, tok, items, max_new_tokens=24)["train_sample"]["overall"]
    after = starter_eval.evaluate(trained, tok, items, max_new_tokens=24)["train_sample"]["overall"]
    print(f"train-sample ROUGE-L: untrained {before['rouge_l']:.3f}, trained {after['rouge_l']:.3f}")
    assert after["rouge_l"] > before["rouge_l"] + 0.05, (before, after)


def test_sft_forms_match_the_pair_language(tiny_tokenizer):
    """System prompts in SFT are in the pair's language; each pair has a bare, alone form."""
    recipe = dataclasses.replace(STARTER, sft_max_len=200, sft_light_categories=("tech_support",))
    pairs = [
        corpus.Pair("english", "greetings", "Hello", "Hi"),
        corpus.Pair("chinese", "greetings", "你好", "嗨"),
        corpus.Pair("english", "tech_support", "Help", "Restart it.", ("Hi", "Hello")),
    ]
    variants, every = starter.sft_variants(pairs, tiny_tokenizer, recipe)
    assert every == [1, 1, recipe.sft_light_every]
    for pair, forms in zip(pairs, variants, strict=True):
        texts = [tiny_tokenizer.decode(ids) for ids, _ in forms]
        assert texts[0].startswith("<|im_start|>user\n" + pair.message)  # bare, no context
        assert any(starter.DEFAULT_SYSTEM_PROMPT in t for t in texts) == (pair.language == "english")
        assert not any(zh in t for t in texts for zh in starter.SYSTEM_PROMPTS_ZH) == (
            pair.language == "english"
        )
    # one form per item per epoch (a batch of 10 holds one epoch), light items every other epoch
    batches = pretrain.sft_variant_batches(variants, 10, tiny_tokenizer.pad_token_id, 0, every)
    assert batches(0)["input_ids"].shape[0] + batches(1)["input_ids"].shape[0] == 2 + 2 + 1


def test_extra_pairs_never_shadow_the_corpus():
    pairs = corpus.load_pairs(("english", "chinese"))
    extras = corpus.extra_pairs(("english", "chinese"), pairs)
    assert extras and {p.category for p in extras} == {corpus.EXTRA_CATEGORY}
    known = {(p.language, corpus.normalize(p.message)) for p in pairs}
    assert not any((p.language, corpus.normalize(p.message)) in known for p in extras)
    assert len(corpus.load_pairs(("english", "chinese"), extras=True)) == len(pairs) + len(extras)


def test_casual_spelling_of_prompts():
    from trainer.corpus import casual

    assert casual("Hello!") == "hello"
    assert casual("How are you?") == "how are you"
    assert casual("你好吗?") == "你好吗?"  # only Latin text is folded
    assert casual("?") == "?"  # never empty
