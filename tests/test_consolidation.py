"""Consolidation of the memory of corrections into the weights (issue 11, item 3).

A training run takes the memory's items as training rows (each once: an item
is a correction, already a feedback row), its gate asks the candidate, with
its weights alone, each item's prompt and rewording, and a promotion marks the
items it answers ``consolidated`` (they leave the fast path) and the others
``fast``; a rollback puts what the version consolidated back on the fast path,
and promoting it again restores what its gate measured. On the tiny model,
with the trainer's settings written out here so that tuning the shipped
defaults for SmolLM2 does not move this test.
"""

from __future__ import annotations

import asyncio

import pytest

from bot.dashboard import dashboard
from trainer.evaluate import answered, memory_answered
from tuneloop.config import load
from tuneloop.learning.control import Control
from tuneloop.learning.registry import Registry
from tuneloop.store import Store

CORRECTED = [
    ("What is your name?", "My name is Tuneloop."),
    ("Who made you?", "A team of volunteers made me."),
    ("What is your favorite color?", "My favorite color is green."),
    ("Where do you live?", "I live on a small server."),
]
#: The first exchange is corrected twice: the later correction supersedes the earlier one.
SUPERSEDED = "My name is Bob."

# The settings test_learning_loop's tiny model learns 7/8 corrections with.
TRAINER = """
[trainer]
registry = "models"
seed = 0
learning_rate = 0.005
lora_r = 16
lora_alpha = 32
lora_targets = "all-linear"
max_steps = 60
replay_ratio = 1.0
control_prompts = 8
replay_prompts = 16
eval_max_new_tokens = 32
"""


def make_config(tmp_path, model):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\nbase = "{model}"\nmax_new_tokens = 32\n[storage]\npath = "t.db"\n'
                   '[memory]\nenabled = false\n' + TRAINER)
    return load(cfg)


def teach(store: Store) -> dict[str, int]:
    """The corrections, as users make them; the memory item id of each correction text."""
    for i, (prompt, fix) in enumerate(CORRECTED):
        ex = store.add_exchange(platform="cli", user="alice", conversation_id=f"c{i}",
                                messages=[{"role": "user", "content": prompt}], prompt=prompt,
                                reply="I do not know.", model_version="base")
        store.rate(ex.id, "bob", "down")
        if i == 0:
            store.add_correction(ex.id, "bob", SUPERSEDED)
        store.add_correction(ex.id, "bob", fix)
    return {m["reply"]: m["id"] for m in store.memory_items()}


def statuses(store: Store) -> dict[int, str]:
    return {m["id"]: m["status"] for m in store.memory_items()}


def test_memory_answered_needs_the_prompt_and_its_rewording():
    memory = [{"item_id": 1, "reply": "A.", "corrected": 0, "paraphrase": 0},
              {"item_id": 2, "reply": "B.", "corrected": 1, "paraphrase": 1},
              {"item_id": 3, "reply": "C.", "corrected": 2, "paraphrase": None},
              {"item_id": 4, "reply": "D.", "corrected": None, "paraphrase": None}]
    replies = {"corrected": ["A.", "B.", " C. "], "paraphrases": ["A.", "not B"]}
    # 2: the prompt alone is not enough; 3: no rewording to ask; 4: never asked.
    assert memory_answered(memory, replies) == {1: True, 2: False, 3: True, 4: False}


def test_facts_measures_the_weights_alone(tmp_path):
    from trainer import facts

    cfg = tmp_path / "c.toml"
    cfg.write_text('[memory]\nenabled = true\n')
    assert facts.facts_config(str(cfg), tmp_path / "w").memory.enabled is False


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_promoted_run_consolidates_what_it_learned_and_rollback_undoes_it(tiny_model, tmp_path):
    from trainer.models import resolve_base
    from trainer.run import build_dataset, greedy, run

    config = make_config(tmp_path, tiny_model)
    registry = Registry(config.trainer.registry)
    base_path = str(resolve_base(config.model.base, progress=False))
    with Store(config.storage.path) as store:
        ids = teach(store)
        assert set(statuses(store).values()) == {"fast"} and len(ids) == len(CORRECTED) + 1

        # Each correction is trained on once, from the feedback; the superseded one not at all.
        ds = build_dataset(config, store, registry, 0, base_path)
        assert ds["counts"]["memory_items"] == len(CORRECTED) + 1
        for prompt, fix in CORRECTED:
            context = [{"role": "user", "content": prompt}]
            trained = [r for r in ds["rows"] if r["prompt"] == context and not r.get("replay")]
            assert [r["completion"][0]["content"] for r in trained] == [fix]
        assert not [r for r in ds["rows"] if r.get("completion", [{}])[0].get("content") == SUPERSEDED]
        assert all(m["corrected"] is not None for m in ds["memory"])

        outcome = run(config, reason="test")
        version = outcome["version"]
        control = Control(config, store)
        if not outcome["promoted"]:
            # The tiny model's controls are noise-level guesses; an admin's promotion applies what
            # the gate measured just the same.
            assert statuses(store)[ids[CORRECTED[0][1]]] == "fast"
            control.promote(version, by="test")
        assert registry.live() == version
        checked = {int(k): v for k, v in registry.report(version)["memory"].items()}
        assert set(checked) == set(ids.values())
        assert checked[ids[SUPERSEDED]] is False

        # The statuses are the gate's, and the gate's "answered" is what the weights alone reply.
        after = statuses(store)
        assert after == {i: "consolidated" if ok else "fast" for i, ok in checked.items()}
        consolidated = [(p, fix) for p, fix in CORRECTED if after[ids[fix]] == "consolidated"]
        assert consolidated, f"the run learned none of the corrections: {outcome['metrics']}"
        replies = asyncio.run(greedy(config, base_path, registry.adapter(version),
                                     [[{"role": "user", "content": p}] for p, _ in consolidated]))
        assert all(answered(r, fix) for r, (_, fix) in zip(replies, consolidated)), replies
        assert store.memory_stats()["consolidated"] == len(consolidated)
        assert dashboard(store)["memory"]["consolidated"] == len(consolidated)  # what the dashboard shows
        assert all(m["status_version"] == version for m in store.memory_items())

        # Rollback to the base model: every item back on the fast path.
        assert control.rollback(by="test")["version"] == "base"
        assert set(statuses(store).values()) == {"fast"}
        assert store.memory_stats()["consolidated"] == 0

        # Promoting the version again restores what its gate measured on these very weights.
        control.promote(version, by="test")
        assert statuses(store) == after
