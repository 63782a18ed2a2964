"""The memory of corrections: real SQLite, the real encoder from its PyPI package, the tiny model.

A correction is used by the very next reply whose message means the same
(English and Chinese), not by a near miss; ratings of that reply rate the
item; ``forget`` deletes it; ``enabled = false`` turns the fast path off;
consolidation takes items off the fast path and puts them back.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from bot.chat import Turn
from bot.cli import main
from bot.runtime import services
from tuneloop.config import load, parse
from tuneloop.errors import ConfigError, InputError, ModelError, NotFoundError
from tuneloop.memory import Memory
from tuneloop.memory.encoder import Encoder, packaged_minilm, verify_minilm
from tuneloop.store import Store

TAUGHT = [
    ("Who owns project Heron?", "Priya Raman owns project Heron."),
    ("谁负责苍鹭项目？", "王芳负责苍鹭项目。"),
]
PARAPHRASES = [("Who is the owner of the Heron project?", 0), ("苍鹭项目的负责人是谁？", 1)]
NEAR_MISSES = ["Who owns project Falcon?", "who owns project falcon", "谁负责猎鹰项目？"]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder()


@pytest.fixture
def cfg(tmp_path, tiny_model) -> Path:
    f = tmp_path / "config.toml"
    f.write_text(f'[model]\nbase = "{tiny_model}"\nmax_new_tokens = 8\nsystem_prompt = "You are tuneloop."\n'
                 f'[storage]\npath = "t.db"\n')
    return f


def note_of(messages) -> str:
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else ""


def test_packaged_encoder_is_verified_minilm(encoder, tmp_path):
    folder = packaged_minilm()
    verify_minilm(folder)  # sha256 of the weights, architecture, mean pooling
    assert encoder.dim == 384
    v = encoder.encode(["What do we call our build server?", "What is the build server called?",
                        "Tell me a joke."])
    assert abs(float((v * v).sum(1)[0]) - 1) < 1e-5  # normalised
    assert v[0] @ v[1] > 0.8 > 0.3 > v[0] @ v[2]
    # A copy whose weights differ is refused before anything loads.
    fake = tmp_path / "fake"
    shutil.copytree(folder, fake, ignore=shutil.ignore_patterns("model.safetensors"))
    (fake / "model.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ModelError, match="sha256"):
        verify_minilm(fake)
    (fake / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(ModelError, match="config.json"):
        verify_minilm(fake)


def test_next_reply_uses_correction_for_paraphrase_not_near_miss(cfg):
    config = load(cfg)

    async def go():
        async with services(config) as svc:
            chat, store = svc.chat, svc.store
            taught = []
            for prompt, fix in TAUGHT:
                ex = await chat.respond(Turn(text=prompt, user="alice", platform="web"))
                assert store.memory_uses(ex.id) == []
                svc.feedback.correct(ex.id, "bob", fix)
                [item] = [i for i in store.memory_items() if i["exchange_id"] == ex.id]
                assert (item["prompt"], item["reply"], item["status"]) == (prompt, fix, "fast")
                taught.append(item["id"])
            # The very next reply, reworded, is the correction; English and Chinese.
            for text, k in PARAPHRASES + [(p, k) for k, (p, _) in enumerate(TAUGHT)]:
                deltas = []
                ex = await chat.respond(Turn(text=text, user="carol", platform="web"), on_delta=deltas.append)
                assert store.memory_uses(ex.id) == [taught[k]], text
                assert (ex.reply, "".join(deltas), ex.finish_reason) == (TAUGHT[k][1], TAUGHT[k][1], "memory")
                assert ex.messages[0] == {"role": "system", "content": "You are tuneloop."}  # no note
            for text in NEAR_MISSES:
                ex = await chat.respond(Turn(text=text, user="carol", platform="web"))
                assert store.memory_uses(ex.id) == [] and ex.finish_reason != "memory", text
                assert ex.messages[0] == {"role": "system", "content": "You are tuneloop."}
            # Ratings of a reply that used an item rate the item; enough 👎 retire it.
            used = [await chat.respond(Turn(text=PARAPHRASES[0][0], user="dan", platform="web")) for _ in range(2)]
            svc.feedback.rate(used[0].id, "erin", "up")
            assert store.memory_item(taught[0])["rated_up"] == 1
            for ex in used:
                for rater in ("fay", "gus"):
                    svc.feedback.rate(ex.id, rater, "down")
            item = store.memory_item(taught[0])
            assert (item["rated_up"], item["rated_down"]) == (1, 4) and item["hits"] >= 4
            ex = await chat.respond(Turn(text=PARAPHRASES[0][0], user="dan", platform="web"))
            assert store.memory_uses(ex.id) == []
            stats = store.memory_stats()
            assert stats["items"] == 2 and stats["hits"] >= 6 and stats["rated_down"] == 4

    asyncio.run(go())


def test_context_mode_puts_the_correction_in_the_system_prompt(cfg):
    cfg.write_text(cfg.read_text() + '[memory]\nreply = "context"\n')
    config = load(cfg)

    async def go():
        async with services(config) as svc:
            for prompt, fix in TAUGHT:
                ex = await svc.chat.respond(Turn(text=prompt, user="alice", platform="web"))
                svc.feedback.correct(ex.id, "bob", fix)
            for text, k in PARAPHRASES:
                ex = await svc.chat.respond(Turn(text=text, user="carol", platform="web"))
                note = note_of(ex.messages)
                assert note.startswith("You are tuneloop.") and TAUGHT[k][0] in note and TAUGHT[k][1] in note
                assert ex.finish_reason != "memory" and len(svc.store.memory_uses(ex.id)) == 1
            ex = await svc.chat.respond(Turn(text=NEAR_MISSES[0], user="carol", platform="web"))
            assert ex.messages[0] == {"role": "system", "content": "You are tuneloop."}

    asyncio.run(go())


def test_forget_deletes_items_and_the_next_reply_stops_using_them(cfg):
    config = load(cfg)

    async def go():
        async with services(config) as svc:
            ex = await svc.chat.respond(Turn(text=TAUGHT[0][0], user="alice", platform="web"))
            svc.feedback.correct(ex.id, "bob", TAUGHT[0][1])
            again = await svc.chat.respond(Turn(text=TAUGHT[0][0], user="carol", platform="web"))
            assert len(svc.store.memory_uses(again.id)) == 1
            assert svc.store.forget_user("bob")["corrections"] == 1
            assert svc.store.memory_items() == []
            assert svc.store.query("SELECT COUNT(*) AS n FROM memory_vectors")[0]["n"] == 0
            after = await svc.chat.respond(Turn(text=TAUGHT[0][0], user="carol", platform="web"))
            assert svc.store.memory_uses(after.id) == [] and after.finish_reason != "memory"

    asyncio.run(go())


def test_enabled_false_turns_the_fast_path_off(cfg, capsys):
    cfg.write_text(cfg.read_text() + "[memory]\nenabled = false\n")
    config = load(cfg)

    async def go():
        async with services(config) as svc:
            ex = await svc.chat.respond(Turn(text=TAUGHT[0][0], user="alice", platform="web"))
            svc.feedback.correct(ex.id, "bob", TAUGHT[0][1])
            again = await svc.chat.respond(Turn(text=TAUGHT[0][0], user="carol", platform="web"))
            assert svc.store.memory_uses(again.id) == []
            assert again.messages == ex.messages
            assert svc.chat.memory._encoder is None  # not even loaded
            return ex.id

    asyncio.run(go())
    # Still stored: turning the fast path back on finds it, and the CLI lists it.
    code = main(["--config", str(cfg), "memory", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["stats"]["enabled"] is False and out["stats"]["items"] == 1
    assert out["items"][0]["reply"] == TAUGHT[0][1] and out["items"][0]["status"] == "fast"
    assert main(["--config", str(cfg), "memory", "--community", "local"]) == 0
    assert "1 items (1 fast, 0 consolidated" in capsys.readouterr().out
    assert main(["--config", str(cfg), "memory", "--community", "elsewhere"]) != 0  # one line, not a list


def test_bad_corrections_store_nothing(cfg):
    config = load(cfg)

    async def go():
        async with services(config) as svc:
            ex = await svc.chat.respond(Turn(text=TAUGHT[0][0], user="alice", platform="web"))
            for text in ("", "   ", "x" * 100_000):
                with pytest.raises(InputError):
                    svc.feedback.correct(ex.id, "bob", text)
            with pytest.raises(NotFoundError):
                svc.feedback.correct(ex.id + 999, "bob", "Priya.")
            assert svc.store.memory_items() == [] and svc.store.corrections() == []

    asyncio.run(go())


def test_consolidation_takes_items_off_the_fast_path_and_back(tmp_path, encoder):
    store = Store(tmp_path / "t.db")
    ids = []
    for prompt, fix in TAUGHT:
        ex = store.add_exchange(platform="slack", user="alice", conversation_id="c", messages=[
            {"role": "user", "content": prompt}], prompt=prompt, reply="no idea", model_version="v1")
        store.add_correction(ex.id, "bob", fix)
        ids.append(store.memory_items(limit=1)[0]["id"])
    memory = Memory(parse({}, tmp_path).memory, store, encoder=encoder)
    assert [h.item_id for h in memory.recall(PARAPHRASES[0][0])] == [ids[0]]

    rows = store.memory_training_rows()
    assert [(r["item_id"], r["prompt"], r["reply"]) for r in rows] == [
        (i, p, f) for i, (p, f) in zip(ids, TAUGHT)]
    assert json.loads(rows[0]["messages"]) == [{"role": "user", "content": TAUGHT[0][0]}]

    assert store.set_memory_status({ids[0]: True, ids[1]: False, 999: True}, "v2") == {
        "consolidated": 1, "fast": 1}
    assert memory.recall(PARAPHRASES[0][0]) == []  # the weights answer it now
    assert [h.item_id for h in memory.recall(PARAPHRASES[1][0])] == [ids[1]]
    assert store.memory_item(ids[0])["status_version"] == "v2"
    assert store.memory_stats()["consolidated_share"] == 0.5
    assert store.scoped("local").memory_stats()["items"] == 2 and store.scoped("other").memory_stats()["items"] == 0
    assert store.scoped("other").memory_items() == []
    store.set_memory_status({ids[0]: False}, "v3")  # a later version forgot it
    assert [h.item_id for h in memory.recall(PARAPHRASES[0][0])] == [ids[0]]
    store.set_memory_status({ids[0]: True, ids[1]: True}, "v4")
    assert memory.recall(PARAPHRASES[1][0]) == []
    assert store.memory_unconsolidate(["v4"]) == 2  # v4 rolled back: both on the fast path again
    assert [h.item_id for h in memory.recall(PARAPHRASES[1][0])] == [ids[1]]
    assert store.memory_unconsolidate([]) == 0
    with pytest.raises(InputError):
        store.memory_items(status="slow")
    store.close()


def test_migration_makes_items_of_existing_corrections(tmp_path):
    from tuneloop.store import MIGRATIONS

    path = tmp_path / "old.db"
    Store(path, migrations=MIGRATIONS[:4]).close()
    with sqlite3.connect(path) as raw:  # rows as a tuneloop of schema 4 wrote them
        raw.execute("INSERT INTO exchanges (id, created_at, platform, user, conversation_id, messages, prompt, "
                    "reply, model_version) VALUES (1, 0, 'web', 'a', 'c', '[]', 'Q?', 'r', 'v0')")
        raw.execute("INSERT INTO corrections (exchange_id, user, text, created_at) VALUES (1, 'b', 'A.', 0)")
    with Store(path) as store:
        [item] = store.memory_items()
        assert (item["prompt"], item["reply"], item["user"]) == ("Q?", "A.", "b")
    with sqlite3.connect(path) as raw:  # a plain DELETE of the correction cascades too
        raw.execute("PRAGMA foreign_keys = ON")
        raw.execute("DELETE FROM corrections")
    with Store(path) as store:
        assert store.memory_items() == []


@pytest.mark.parametrize("raw, key", [
    ({"enabled": "yes"}, "memory.enabled"),
    ({"min_cosine": 1.5}, "memory.min_cosine"),
    ({"min_lexical": -0.1}, "memory.min_lexical"),
    ({"max_bad_ratings": 0}, "memory.max_bad_ratings"),
    ({"threshold": 0.5}, "memory.threshold"),
])
def test_bad_memory_config_is_one_line(tmp_path, raw, key):
    with pytest.raises(ConfigError, match=key) as e:
        parse({"memory": raw}, tmp_path)
    assert "\n" not in str(e.value)


def test_unloadable_encoder_leaves_replies_alone(cfg, tmp_path):
    cfg.write_text(cfg.read_text() + f'[memory]\nencoder = "{tmp_path / "no-such-encoder"}"\n')
    config = load(cfg)

    async def go():
        async with services(config) as svc:
            ex = await svc.chat.respond(Turn(text=TAUGHT[0][0], user="alice", platform="web"))
            svc.feedback.correct(ex.id, "bob", TAUGHT[0][1])
            again = await svc.chat.respond(Turn(text=TAUGHT[0][0], user="carol", platform="web"))
            assert again.reply is not None and svc.store.memory_uses(again.id) == []

    asyncio.run(go())


def test_eval_and_bench_commands_report_the_issue_figures(capsys):
    from tuneloop.memory.__main__ import main as memory_main

    assert memory_main(["--config", str(Path(__file__).parent.parent / "config.toml"), "eval", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    held = figures["heldout"]
    # The issue's targets, on the held-out split with the shipped thresholds.
    assert held["reliability"] >= 0.95 and held["generalization"] >= 0.80
    assert held["near_miss_matched"] <= 0.05 and held["unrelated_matched"] <= 0.05
    assert held["queries"]["near_miss"] >= 40 and held["queries"]["paraphrase"] >= 100

    assert memory_main(["bench", "--items", "300", "--queries", "20", "--encoded", "30", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["items"] == 300 and bench["queries"] == 20
    assert all(bench["ms"][k]["p50"] > 0 for k in ("recall", "encode", "search"))
    assert bench["index_mb"] > 0


def test_memory_eval_command_on_the_lifelong_set(cfg, capsys):
    # Every 23rd item of the held-out split: one per relation and language.
    code = main(["--config", str(cfg), "memory-eval", "--every", "23", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["reply"] == "verbatim" and out["items"] == 4
    on = out["memory_on"]
    assert on["next_reply_uses_correction"] == 1.0 and on["reliability"] == 1.0
    assert on["near_miss_matched_memory"] == 0.0 and on["unrelated_matched_memory"] == 0.0
    assert on["unrelated_unchanged"] == 1.0
    assert out["memory_off"]["reliability"] == 0.0  # the tiny model knows none of the made-up facts
    assert not (Path(cfg).parent / "t.db").exists()  # a scratch store, not the bot's
