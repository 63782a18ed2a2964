"""The Discord adapter: the real discord.py client against a fake Discord on 127.0.0.1.

One fake Discord, one client and one real engine (the tiny model) serve the
whole module, in order: the client's first READY waits ~2 s for guilds, and
the model loads once. Only Discord's network edge is fake.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.adapters.discord import CONTEXT_MENU_NAME, DiscordAdapter, split_text
from bot.admin import Admin
from bot.chat import Chat
from bot.feedback import Feedback
from bot.services import Services
from tests.fake_discord import FakeDiscord, FakeUser, wait_until
from tests.serving import HeldEngine, StepClock
from tuneloop.config import load
from tuneloop.engine.base import SamplingParams
from tuneloop.learning.control import Control
from tuneloop.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALICE = FakeUser("100000000000000001", "alice")
BOB = FakeUser("100000000000000002", "bob")
ADMIN = FakeUser("100000000000000003", "ada")  # admin by user id
OTHER_BOT = FakeUser("100000000000000005", "otherbot", bot=True)


@pytest.fixture(scope="module")
def long_model(tiny_model: Path, tmp_path_factory) -> Path:
    """The tiny model with a 4,096-token window (RoPE): room for a 5,000-character reply."""
    out = tmp_path_factory.mktemp("discord-model") / "model"
    shutil.copytree(tiny_model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = 4096
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(long_model: Path, tiny_model: Path, tmp_path_factory):
    from tuneloop.engine.local import LocalEngine

    fake = FakeDiscord()
    await fake.start()
    tmp = tmp_path_factory.mktemp("discord")
    # A config file, not a dict: a training run is started with `--config <config.source>`.
    q = json.dumps  # a JSON string or list of strings is valid TOML
    (tmp / "config.toml").write_text(
        f"[storage]\npath = {q(str(tmp / 'tuneloop.db'))}\n"
        f"[model]\nbase = {q(str(tiny_model))}\nmax_new_tokens = 16\n"
        f"[discord]\nenabled = true\napi_base_url = {q(fake.api_base_url)}\nchannels = {q([fake.chat])}\n"
        f"guilds = {q([fake.guild_id])}\n"
        f"[admin]\ndiscord_users = {q([ADMIN.id])}\ndiscord_roles = {q([fake.admin_role])}\n"
        f"[trainer]\nenabled = false\nregistry = {q(str(tmp / 'models'))}\nepochs = 1\ncontrol_prompts = 2\n"
        "eval_max_new_tokens = 8\n", encoding="utf-8")
    config = load(tmp / "config.toml")
    store = Store(config.storage.path)
    engine = LocalEngine(str(long_model), version="tiny", device="cpu", dtype="float32", max_batch=4, threads=1)
    await engine.start()
    control = Control(config, store)  # the real learning control: its runs are real processes
    chat = Chat(config, store, engine)
    services = Services(config, store, engine, chat, Feedback(store, config.model.max_input_chars, chat.metrics),
                        Admin(config, store, control))
    mp = pytest.MonkeyPatch()
    mp.setenv(config.discord.token_env, fake.token)
    # The replies stream on a stepped clock: edits every few deltas, and no waiting, whatever the load.
    adapter = DiscordAdapter(services, clock=StepClock(step=0.25))
    await adapter.start()  # returns at once; the client connects in a task
    await adapter.wait_ready()
    w = type("World", (), {})()
    w.fake, w.store, w.adapter, w.control, w.engine = fake, store, adapter, control, engine
    w.spawned = []  # every training process a test started, stopped below at the latest
    try:
        yield w
    finally:
        for proc in [*w.spawned, *control._children.values()]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    await adapter.stop()
    await engine.stop()
    await fake.close()
    store.close()
    mp.undo()
    assert fake.unknown_routes == []


async def handled(w, key: str, count: int = 1, timeout: float = 30.0) -> list[str]:
    """What came of the events with ``key`` once the adapter has finished ``count`` of them."""
    return await w.adapter.handled.wait(key, count, timeout)


async def answer(w, msg: dict[str, Any], timeout: float = 30.0):
    """The exchange answering ``msg`` once the adapter is done with it, with the bot's messages of it."""
    fake = w.fake
    assert await handled(w, f"message:{msg['id']}", timeout=timeout) == ["replied"]
    first = next(m for m in fake.bot_messages()
                 if (m.get("message_reference") or {}).get("message_id") == msg["id"])
    ex = w.store.exchange_by_ref("discord", first["id"])
    ids = sorted(int(m["id"]) for m in fake.bot_messages(first["channel_id"])
                 if int(first["id"]) <= int(m["id"]) <= int(ex.reply_ref))
    return ex, [fake.messages[str(i)] for i in ids]


async def no_answer(w, msg: dict[str, Any]) -> None:
    """``msg`` was handled, and not answered."""
    assert await handled(w, f"message:{msg['id']}") != ["replied"]
    assert not [m for m in w.fake.bot_messages()
                if (m.get("message_reference") or {}).get("message_id") == msg["id"]]


async def test_commands_synced_to_the_guild(world):
    names = {(c["name"], c["type"]) for c in world.fake.commands[world.fake.guild_id]}
    assert names == {("tuneloop", 1), (CONTEXT_MENU_NAME, 3)}
    group = next(c for c in world.fake.commands[world.fake.guild_id] if c["name"] == "tuneloop")
    assert {o["name"] for o in group["options"]} == {"retrain", "status", "models", "rollback", "promote",
                                                      "forget-me", "review", "approve", "reject", "block"}
    assert ("GET", "/gateway/bot") in world.fake.requests


async def test_mention_gets_a_streamed_reply_logged_as_an_exchange(world, caplog):
    caplog.set_level(logging.INFO, logger="bot.adapters.discord")
    msg = await world.fake.say(ALICE, "hello there", mention_bot=True)
    ex, parts = await answer(world, msg)
    assert len(parts) == 1
    reply = parts[0]
    assert reply["type"] == 19 and reply["message_reference"]["message_id"] == msg["id"]
    assert ex.platform == "discord" and ex.user == ALICE.id and ex.channel == world.fake.general
    assert ex.prompt == "hello there" and ex.reply_ref == reply["id"]
    assert reply["content"] == (ex.reply.strip() and ex.reply or "…")
    await wait_until(lambda: {(e, u) for (m, e, u) in world.fake.reactions if m == reply["id"]}
                     == {("👍", world.fake.bot.id), ("👎", world.fake.bot.id)})
    assert world.store.ratings(ex.id) == {}  # the bot's own reactions are not ratings
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("discord reply:"))
    assert f"message={msg['id']}" in line and f"exchange={ex.id}" in line and world.fake.guild_id in line


async def test_reply_chain_is_the_context(world):
    first = await world.fake.say(ALICE, "what is your name", mention_bot=True)
    ex1, (r1,) = await answer(world, first)
    # A reply to the bot needs no mention.
    second = await world.fake.say(ALICE, "and how old are you", reply_to=r1["id"])
    ex2, (r2,) = await answer(world, second)
    assert ex2.conversation_id == ex1.conversation_id
    assert ex2.messages[-3:] == [{"role": "user", "content": "what is your name"},
                                 {"role": "assistant", "content": ex1.reply},
                                 {"role": "user", "content": "and how old are you"}]
    third = await world.fake.say(BOB, "tell me more", reply_to=r2["id"])
    ex3, _ = await answer(world, third)
    assert [m["content"] for m in ex3.messages if m["role"] == "user"] == [
        "what is your name", "and how old are you", "tell me more"]


async def test_reply_chain_unknown_to_the_store_is_fetched_from_discord(world):
    fake = world.fake
    # Said before the bot was around: in no cache of the client, so it must be fetched.
    plain = fake._message(fake.general, BOB, "the sky is green today")
    doubt = await fake.say(BOB, "really green", reply_to=plain["id"])
    asking = await fake.say(ALICE, "is that true", reply_to=doubt["id"], mention_bot=True)
    ex, _ = await answer(world, asking)
    assert ex.messages[-3:] == [{"role": "user", "content": "the sky is green today"},
                                {"role": "user", "content": "really green"},
                                {"role": "user", "content": "is that true"}]
    # Discord nests referenced_message one level deep: the first link was fetched over REST.
    assert ("GET", f"/channels/{fake.general}/messages/{plain['id']}") in fake.requests
    assert not [m for m in fake.bot_messages()
                if (m.get("message_reference") or {}).get("message_id") in (plain["id"], doubt["id"])]


async def test_thread_keeps_its_own_context(world):
    fake = world.fake
    thread = await fake.create_thread(fake.general, "help", ALICE)
    await fake.say(BOB, "we are talking about tea", channel=thread)  # read back from Discord
    m1 = await fake.say(ALICE, "do you like it", channel=thread, mention_bot=True)
    ex1, (r1,) = await answer(world, m1)
    assert r1["channel_id"] == thread
    assert ex1.thread == thread and ex1.channel == fake.general
    assert ex1.conversation_id == f"discord-thread-{thread}"
    assert ex1.messages[-2:] == [{"role": "user", "content": "we are talking about tea"},
                                 {"role": "user", "content": "do you like it"}]
    m2 = await fake.say(BOB, "why", channel=thread, mention_bot=True)
    ex2, _ = await answer(world, m2)
    assert ex2.conversation_id == ex1.conversation_id
    assert ex2.messages[-3:] == [{"role": "user", "content": "do you like it"},
                                 {"role": "assistant", "content": ex1.reply},
                                 {"role": "user", "content": "why"}]
    other = await fake.create_thread(fake.general, "other", BOB)
    m3 = await fake.say(BOB, "why", channel=other, mention_bot=True)
    ex3, _ = await answer(world, m3)
    assert ex3.conversation_id != ex1.conversation_id
    assert [m["content"] for m in ex3.messages] == ["why"]


async def test_who_gets_an_answer(world):
    fake = world.fake
    in_channel = await fake.say(ALICE, "anyone here", channel=fake.chat)  # a [discord] channels entry
    await answer(world, in_channel)
    dm = fake.open_dm(ALICE)
    in_dm = await fake.say(ALICE, "a private question", channel=dm)
    ex, (r,) = await answer(world, in_dm)
    assert r["channel_id"] == dm and ex.channel == dm
    await no_answer(world, await fake.say(ALICE, "just chatting"))
    await no_answer(world, await fake.say(OTHER_BOT, "bots talk", mention_bot=True))
    # Its own message, echoed back by the gateway as Discord does, is never answered.
    own = fake._message(fake.chat, fake.bot, "my own words")
    await fake.dispatch("MESSAGE_CREATE", {**own, "member": fake.bot.member(with_user=False)})
    await no_answer(world, own)


async def test_reactions_rate_replace_and_remove(world):
    fake = world.fake
    msg = await fake.say(BOB, "rate me", mention_bot=True)
    ex, (reply,) = await answer(world, msg)
    await fake.react(BOB, reply["id"], "👍")
    await wait_until(lambda: world.store.ratings(ex.id) == {BOB.id: "up"})
    await fake.react(BOB, reply["id"], "👎🏽")  # a skin tone is the same emoji
    await wait_until(lambda: world.store.ratings(ex.id) == {BOB.id: "down"})
    await fake.unreact(BOB, reply["id"], "👍")  # the older reaction: the rating stays
    await fake.react(ALICE, reply["id"], "👍")
    await wait_until(lambda: world.store.ratings(ex.id) == {BOB.id: "down", ALICE.id: "up"})
    await fake.unreact(BOB, reply["id"], "👎🏽")
    await wait_until(lambda: world.store.ratings(ex.id) == {ALICE.id: "up"})
    # A reaction on a message that is not the bot's, and an emoji that is not a rating: ignored.
    await fake.react(BOB, msg["id"], "👍")
    await fake.react(BOB, reply["id"], "🎉")
    assert await handled(world, f"reaction:{msg['id']}:{BOB.id}") == ["ignored"]
    assert (await handled(world, f"reaction:{reply['id']}:{BOB.id}", count=5))[-1] == "ignored"
    assert world.store.ratings(ex.id) == {ALICE.id: "up"}
    assert world.store.query("SELECT COUNT(*) AS n FROM ratings WHERE user = ?", [BOB.id])[0]["n"] == 0


async def test_reaction_while_the_reply_streams_rates_it(world):
    fake, chat = world.fake, world.adapter.services.chat

    def counted() -> tuple[float, float]:
        sample = chat.metrics.registry.get_sample_value
        requests = sum(sample("tuneloop_requests_total", {"platform": "discord", "outcome": o}) or 0
                       for o in ("stop", "length"))
        return requests, sample("tuneloop_ratings_total", {"platform": "discord", "rating": "up"}) or 0

    before = counted()
    held = HeldEngine(chat.engine)
    chat.engine = held
    try:
        msg = await fake.say(ALICE, "hello, are you there", mention_bot=True)
        await asyncio.wait_for(held.held.wait(), 30)  # the first part is posted; the rest waits
        (part,) = [m for m in fake.bot_messages() if (m.get("message_reference") or {}).get("message_id") == msg["id"]]
        await fake.react(BOB, part["id"], "👍")
        assert await handled(world, f"reaction:{part['id']}:{BOB.id}") == ["rated"]
    finally:
        held.release.set()
        chat.engine = held._engine
    ex, (reply,) = await answer(world, msg)
    assert reply["id"] == part["id"] and world.store.ratings(ex.id) == {BOB.id: "up"}
    # Discord's traffic is counted like every platform's: one reply, one 👍.
    assert counted() == (before[0] + 1, before[1] + 1)


async def test_corrections_by_prefix_and_by_modal(world):
    fake = world.fake
    msg = await fake.say(ALICE, "capital of france", mention_bot=True)
    ex, (reply,) = await answer(world, msg)
    fix = await fake.say(ALICE, "!fix Paris is the capital of France.", reply_to=reply["id"])
    # Stored for review ([trust] discord = "review"): kept, not yet in effect.
    stored = await wait_until(lambda: world.store.corrections(ex.id, in_effect=False))
    assert [(c["user"], c["text"], c["status"]) for c in stored] == [
        (ALICE.id, "Paris is the capital of France.", "pending")]
    assert world.store.corrections(ex.id) == []
    await wait_until(lambda: (fix["id"], "✅", fake.bot.id) in fake.reactions)
    await no_answer(world, fix)  # a correction is not a question

    menu = await fake.context_menu(BOB, CONTEXT_MENU_NAME, reply["id"])
    cb = await wait_until(lambda: fake.callback_for(menu))
    assert cb["type"] == 9  # MODAL
    submit = await fake.submit_modal(BOB, cb["data"], "It is Paris.")
    done = await wait_until(lambda: fake.callback_for(submit))
    assert done["type"] == 4 and done["data"]["flags"] & 64  # ephemeral
    assert "an admin will review it" in done["data"]["content"]
    assert [(c["user"], c["text"]) for c in world.store.corrections(ex.id, in_effect=False)][-1] == (
        BOB.id, "It is Paris.")

    # On a message that is not the bot's reply: a polite ephemeral no.
    not_ours = await fake.context_menu(BOB, CONTEXT_MENU_NAME, msg["id"])
    cb = await wait_until(lambda: fake.callback_for(not_ours))
    assert cb["type"] == 4 and cb["data"]["flags"] & 64 and "not one of my replies" in cb["data"]["content"]


async def command(w, user: FakeUser, sub: str, **options: str) -> str:
    interaction = await w.fake.slash(user, sub, options)
    cb = await wait_until(lambda: w.fake.callback_for(interaction))
    assert cb["type"] == 5 and cb["data"]["flags"] & 64  # deferred, ephemeral
    ups = await wait_until(lambda: w.fake.followups_for(interaction))
    assert all(f["flags"] & 64 for f in ups)
    return "\n".join(f["content"] for f in ups)


def stop_runs(w) -> None:
    """Kill the training processes started so far and let the reaper mark their runs failed."""
    procs = list(w.control._children.values())
    w.spawned.extend(procs)
    for proc in procs:
        proc.kill()
        proc.wait()
    w.control.reap()


async def test_slash_commands_and_admin_checks(world):
    control, store = world.control, world.store
    # Something the live (base) version has not trained on: an admin's retrain needs it.
    ex = store.add_exchange(platform="discord", user="100000000000000009", conversation_id="seed",
                            messages=[{"role": "user", "content": "hi"}], prompt="hi", reply="hello",
                            model_version="tiny")
    store.rate(ex.id, "100000000000000009", "up")
    assert control.untrained_feedback() >= 1

    text = await command(world, BOB, "retrain")
    assert "admins only" in text
    assert store.query("SELECT * FROM training_runs") == [] and control._children == {}

    text = await command(world, ADMIN, "retrain")  # admin by user id
    assert "Training run run-1 started." in text
    (run1,) = store.query("SELECT * FROM training_runs")
    assert run1["id"] == 1 and run1["reason"] == f"discord:{ADMIN.id}"
    assert run1["status"] in ("queued", "running") and run1["pid"] in control._children
    assert control._children[run1["pid"]].poll() is None  # a real training process, running

    role_admin = FakeUser("100000000000000004", "rita", roles=[world.fake.admin_role])
    text = await command(world, role_admin, "retrain")  # one run at a time: a polite no
    assert "run-1 is going" in text and len(store.query("SELECT * FROM training_runs")) == 1
    stop_runs(world)
    assert store.query("SELECT status FROM training_runs WHERE id = 1")[0]["status"] == "failed"

    text = await command(world, role_admin, "retrain")  # admin by role
    assert "Training run run-2 started." in text
    rows = store.query("SELECT * FROM training_runs ORDER BY id")
    assert [(r["id"], r["reason"]) for r in rows] == [(1, f"discord:{ADMIN.id}"), (2, f"discord:{role_admin.id}")]
    assert rows[1]["pid"] in control._children and control._children[rows[1]["pid"]].poll() is None
    stop_runs(world)  # no training in the background of the tests that follow

    status = await command(world, BOB, "status")
    assert "live version: base" in status and "last run: run-2 failed" in status
    assert "* base [base]" in await command(world, BOB, "models")
    assert "admins only" in await command(world, BOB, "promote", version="v1")
    assert "v1 not found" in await command(world, role_admin, "promote", version="v1")
    assert "base is live" in await command(world, role_admin, "promote", version="base")
    assert "Rolled back: base is live" in await command(world, ADMIN, "rollback", version="base")
    assert "nothing to roll back" in await command(world, ADMIN, "rollback")


async def test_forget_me(world):
    fake = world.fake
    carol = FakeUser("100000000000000006", "carol")
    msg = await fake.say(carol, "remember this", mention_bot=True)
    _, (reply,) = await answer(world, msg)
    assert "Forgotten: 1 exchanges" in await command(world, carol, "forget-me")
    assert not world.store.query("SELECT id FROM exchanges WHERE user = ?", [carol.id])
    # A reply to the forgotten exchange's message still works: the chain is read back from Discord.
    again = await fake.say(BOB, "what did she say", reply_to=reply["id"])
    ex, _ = await answer(world, again)
    assert [m["content"] for m in ex.messages if m["role"] == "user"] == ["remember this", "what did she say"]


async def test_unknown_command_is_answered_politely(world):
    interaction = await world.fake.slash(BOB, "launch-rockets", group="nonsense")
    cb = await wait_until(lambda: world.fake.callback_for(interaction))
    assert cb["type"] == 4 and cb["data"]["flags"] & 64 and "don't know that command" in cb["data"]["content"]


async def test_bad_input_is_ignored_or_answered_politely(world):
    fake = world.fake
    await no_answer(world, await fake.say(ALICE, "", mention_bot=True))
    await no_answer(world, await fake.say(ALICE, "   ", channel=fake.chat))
    photo = {"id": fake.snowflake(), "filename": "cat.png", "size": 1234, "url": "https://cdn.invalid/cat.png",
             "proxy_url": "https://cdn.invalid/cat.png", "content_type": "image/png", "width": 10, "height": 10}
    only_attachment = await fake.say(ALICE, "", mention_bot=True, attachments=[photo])
    polite = await wait_until(lambda: [m for m in fake.bot_messages()
                                       if (m.get("message_reference") or {}).get("message_id")
                                       == only_attachment["id"]])
    assert "only read text" in polite[0]["content"]
    too_long = await fake.say(ALICE, "x" * 4500, channel=fake.chat)
    refusal = await wait_until(lambda: [m for m in fake.bot_messages()
                                        if (m.get("message_reference") or {}).get("message_id") == too_long["id"]])
    assert "limit" in refusal[0]["content"]
    # A reply to a message that no longer exists, and a correction of a non-bot message: no crash.
    gone = await fake.say(BOB, "soon deleted")
    orphan = await fake.say(ALICE, "about that", reply_to=gone["id"], mention_bot=True)
    del fake.messages[gone["id"]]
    await answer(world, orphan)


async def test_a_5000_character_reply_arrives_as_three_messages(world):
    fake, adapter, engine = world.fake, world.adapter, world.engine
    prompt = "write a long story"
    # The tiny model ends its turns early; sampled past its end-of-turn token it writes on.
    # Measure its characters per token on this very prompt, then ask for ~5,000 characters.
    sampling = {"ignore_eos": True, "temperature": 1.0, "seed": 1}
    probe = await engine.complete([{"role": "user", "content": prompt}],
                                  SamplingParams(max_new_tokens=400, **sampling))
    tokens = min(4000, int(5000 * probe.completion_tokens / max(1, len(probe.text))) + 1)
    adapter.sampling = {"max_new_tokens": tokens, **sampling}
    try:
        msg = await fake.say(ALICE, prompt, channel=fake.chat)
        ex, parts = await answer(world, msg, timeout=120)
    finally:
        adapter.sampling = {}
    assert 4000 < len(ex.reply) <= 6000, len(ex.reply)
    assert len(parts) == 3
    assert [p["content"] for p in parts] == split_text(ex.reply)
    assert all(len(p["content"]) <= 2000 for p in parts)
    assert ex.reply_ref == parts[-1]["id"]
    # Streamed: the messages were edited as the text grew (how often is bot.replies' rule, tested there).
    assert sum(len(fake.edits.get(p["id"], [])) for p in parts) >= 1
    # A rating on an earlier part rates the same exchange; the store knows every
    # part, so this holds after a restart too.
    assert all(world.store.exchange_by_ref("discord", str(p["id"])).id == ex.id for p in parts)
    await fake.react(BOB, parts[0]["id"], "👍")
    await wait_until(lambda: world.store.ratings(ex.id) == {BOB.id: "up"})


async def test_keeps_answering_through_gateway_reconnects(world):
    fake = world.fake
    identifies = fake.identifies
    await fake.drop()
    # Said while the bot is away: replayed on RESUME.
    missed = await fake.say(ALICE, "are you back", mention_bot=True)
    await fake.wait_connected(timeout=30)
    await answer(world, missed)
    assert fake.resumes >= 1 and fake.identifies == identifies
    after = await fake.say(BOB, "welcome back", mention_bot=True)
    await answer(world, after)
    assert fake.heartbeats >= 1


async def test_split_text_keeps_pieces_stable():
    text = ("word " * 1000).strip()
    parts = split_text(text)
    assert all(len(p) <= 2000 for p in parts) and " ".join(parts) == text
    assert split_text(text[:4500])[:2] == parts[:2]
    assert split_text("x" * 4001) == ["x" * 2000, "x" * 2000, "x"]
    assert split_text("") == []

