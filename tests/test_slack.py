"""The Slack adapter end to end: the real slack-bolt app and the real engine on the tiny model,
against a fake Slack (Web API, Socket Mode websocket, response_url) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from bot.adapters.slack import SlackAdapter, conversation_id
from bot.adapters.slack_text import ENTITY, SlackPoster, escape, plain_text, split_text
from bot.adapters.slack_views import SUGGEST_SHORTCUT
from bot.admin import Admin
from bot.chat import Chat
from bot.feedback import Feedback
from bot.replies import ReplyStream
from bot.services import Services
from tests.fake_slack import (
    TEAM,
    FakeSlack,
    block_action_body,
    command_body,
    event_body,
    form,
    reaction_event,
    shortcut_body,
    sign,
    view_submission_body,
)
from tests.serving import HeldEngine, StepClock, serving
from tuneloop.config import load
from tuneloop.engine.local import LocalEngine
from tuneloop.errors import ConfigError
from tuneloop.learning.control import Control
from tuneloop.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
ALLOWED, GENERAL, DM = "C0ALLOW", "C0GENERAL", "D0DIRECT"
ALICE, BOB, ADMIN = "U0ALICE", "U0BOB", "U0ADMIN"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(tiny_model):
    e = LocalEngine(str(tiny_model), version="tiny", device="cpu", max_batch=8)
    await e.start()
    yield e
    await e.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def fake():
    f = await FakeSlack().start()
    yield f
    await f.stop()


class Bot:
    """One running adapter (HTTP or Socket Mode) and ways to talk to it as Slack does."""

    def __init__(self, fake: FakeSlack, svc: Services, adapter: SlackAdapter, url: str | None):
        self.fake, self.svc, self.adapter, self.url = fake, svc, adapter, url
        self.http = aiohttp.ClientSession()
        #: requests sent to the adapter; each ends in one ``handled`` signal
        self.sent = 0

    async def post(self, body: str, content_type: str, *, headers=None, secret=SECRET, timestamp=None):
        h = {"Content-Type": content_type, **sign(secret, body, timestamp), **(headers or {})}
        self.sent += 1
        async with self.http.post(self.url, data=body.encode(), headers=h) as r:
            return r.status, await r.text()

    async def socket_send(self, kind: str, payload: dict, **kwargs) -> dict:
        self.sent += 1
        return await self.fake.socket_send(kind, payload, **kwargs)

    async def event(self, event: dict, *, event_id: str | None = None, retry: int | None = None):
        body = event_body(event, event_id)
        if self.url is None:
            await self.socket_send("events_api", body, retry_attempt=retry or 0)
            return 200, body["event_id"]
        headers = {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"} if retry else None
        status, _ = await self.post(json.dumps(body), "application/json", headers=headers)
        return status, body["event_id"]

    async def command(self, text: str, user: str) -> tuple[int, float]:
        body = command_body(text, user, GENERAL, self.fake.response_url())
        start = time.monotonic()
        if self.url is None:
            await self.socket_send("slash_commands", body)
            return 200, time.monotonic() - start
        status, _ = await self.post(form(body), "application/x-www-form-urlencoded")
        return status, time.monotonic() - start

    async def interactive(self, payload: dict) -> tuple[int, str]:
        if self.url is None:
            ack = await self.socket_send("interactive", payload)
            return 200, json.dumps(ack.get("payload") or {})
        return await self.post(form({"payload": json.dumps(payload)}), "application/x-www-form-urlencoded")

    async def settle(self) -> None:
        """Wait until the adapter has finished with every request sent to it, ignored ones too."""
        await self.adapter.handled.wait(count=self.sent)

    async def mention(self, text: str, user: str = ALICE, channel: str = GENERAL, thread_ts: str | None = None):
        """A message mentioning the bot: Slack sends both events; the answer's exchange."""
        msg = self.fake.user_message(channel, user, f"<@{self.fake.bot_user_id}> {text}", thread_ts=thread_ts)
        await self.event(msg)
        await self.event(self.fake.mention_event(msg))
        await self.settle()
        return msg, self.svc.store.conversation(conversation_id(channel, thread_ts or msg["ts"]))[-1]

    def exchanges(self) -> int:
        return self.svc.store.query("SELECT COUNT(*) AS n FROM exchanges")[0]["n"]


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def write_config(path, sections: dict) -> None:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")


@pytest_asyncio.fixture(loop_scope="module")
async def make_bot(tmp_path, engine, fake, tiny_model, monkeypatch):
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-test-token")
    monkeypatch.setenv("SLACK_APP_TOKEN", "xapp-test-token")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SECRET)
    running: list[tuple[Bot, web.AppRunner | None]] = []

    async def make(mode: str = "http", *, engine=engine, **adapter_kwargs) -> Bot:
        path = tmp_path / f"tuneloop-{mode}.toml"
        write_config(path, {
            "storage": {"path": "db/tuneloop.db"},
            "model": {"base": tiny_model, "device": "cpu", "max_new_tokens": 24},
            "slack": {"enabled": True, "mode": mode, "api_base_url": fake.api_url, "channels": [ALLOWED]},
            "admin": {"slack_users": [ADMIN]},
            "trainer": {"enabled": False, "registry": tmp_path / "models", "epochs": 1, "batch_size": 2,
                        "control_prompts": 2, "eval_max_new_tokens": 8}})
        config = load(path)
        assert config.source == path.resolve()
        store = Store(config.storage.path)
        control = Control(config, store)
        chat = Chat(config, store, engine)
        svc = Services(config, store, engine, chat, Feedback(store, config.model.max_input_chars, chat.metrics),
                       Admin(config, store, control))
        adapter_kwargs.setdefault("edit_interval", 0.0)
        adapter = SlackAdapter(svc, ping_interval=2, **adapter_kwargs)
        runner, url = None, None
        if mode == "http":
            app = web.Application()
            adapter.attach(app)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/slack/events"
        await adapter.start()
        bot = Bot(fake, svc, adapter, url)
        bot.control = control
        running.append((bot, runner))
        return bot

    yield make
    for bot, runner in running:
        await bot.adapter.stop()
        await bot.http.close()
        if runner is not None:
            await runner.cleanup()
        for proc in bot.control._children.values():  # no training process outlives the test
            proc.kill()
            proc.wait()
        bot.svc.store.close()


def add_feedback(bot: Bot) -> None:
    """One rated exchange of the workspace the live version has not trained on: what an admin's
    retrain there needs (retrain trains on the caller's own workspace only)."""
    ex = bot.svc.store.add_exchange(platform="slack", user=ALICE, conversation_id=f"slack:{DM}:1.1",
                                    messages=[{"role": "user", "content": "hello"}], prompt="hello",
                                    reply="hi there", model_version="base", channel=DM, thread="1.1",
                                    community=f"slack:{TEAM}")
    bot.svc.store.rate(ex.id, BOB, "up")


def run_rows(bot: Bot) -> list[dict]:
    return bot.svc.store.query("SELECT * FROM training_runs ORDER BY id")


# ---------------------------------------------------------------------- conversations


async def test_mention_gets_a_threaded_reply_streamed_by_edits(make_bot, fake, caplog):
    caplog.set_level(logging.INFO, logger="bot.adapters.slack")
    bot = await make_bot()
    msg, ex = await bot.mention("hello there")
    assert ex.platform == "slack" and ex.user == ALICE and ex.prompt == "hello there"
    assert ex.conversation_id == f"slack:{GENERAL}:{msg['ts']}" and ex.thread == msg["ts"]
    posts = fake.calls_to("chat.postMessage")
    assert len(posts) == 1 and posts[0].args["thread_ts"] == msg["ts"]
    assert fake.calls_to("chat.update"), "the reply streams by editing the posted message"
    (reply,) = fake.bot_replies(GENERAL, msg["ts"])
    assert reply["text"] == escape(ex.reply) and ex.reply_ref == reply["ts"]
    assert bot.exchanges() == 1, "the message event and the app_mention give one reply"
    assert {n for n, _ in fake.reactions[(GENERAL, reply["ts"])]} == {"+1", "-1"}
    line = next(r.getMessage() for r in caplog.records if "outcome=replied" in r.getMessage())
    assert f"channel={GENERAL}" in line and f"ts={msg['ts']}" in line and f"exchange={ex.id}" in line
    assert "event_id=Ev" in line


async def test_second_message_in_thread_sees_the_first(make_bot):
    bot = await make_bot()
    first, ex1 = await bot.mention("what is a cat")
    _, ex2 = await bot.mention("and a dog", thread_ts=first["ts"])
    assert ex2.conversation_id == ex1.conversation_id
    contents = [m["content"] for m in ex2.messages]
    assert contents[:2] == ["what is a cat", ex1.reply] and contents[-1] == "and a dog"


async def test_thread_unknown_to_the_store_is_read_from_slack(make_bot, fake):
    bot = await make_bot()
    root = fake.user_message(ALLOWED, BOB, "we need a name for the &lt;new&gt; project")
    fake.user_message(ALLOWED, ALICE, "how about <@U0BOB> picks", thread_ts=root["ts"])
    ask = fake.user_message(ALLOWED, ALICE, "any ideas?", thread_ts=root["ts"])
    await bot.event(ask)  # an allowed channel: no mention needed
    await bot.settle()
    assert fake.calls_to("conversations.replies")
    (ex,) = bot.svc.store.conversation(conversation_id(ALLOWED, root["ts"]))
    assert [m["content"] for m in ex.messages] == [
        "we need a name for the <new> project", "how about @U0BOB picks", "any ideas?"]


async def test_dm_answered_and_other_messages_ignored(make_bot, fake):
    bot = await make_bot()
    await bot.event(fake.user_message(GENERAL, ALICE, "chatting, not to the bot"))
    await bot.event({**fake.user_message(ALLOWED, ALICE, "x"), "subtype": "message_changed"})
    await bot.event({**fake.user_message(ALLOWED, "U0OTHERBOT", "beep"), "bot_id": "B0OTHER"})
    await bot.event({**fake.user_message(ALLOWED, fake.bot_user_id, "my own words")})
    await bot.event({k: v for k, v in fake.user_message(ALLOWED, ALICE, "").items() if k != "text"})
    await bot.event({"type": "pin_added", "user": ALICE, "channel_id": GENERAL, "event_ts": "1.2"})
    await bot.event({"type": "message", "channel": ALLOWED})  # no user, no ts
    await bot.settle()
    assert bot.exchanges() == 0 and not fake.calls_to("chat.postMessage")
    dm = fake.user_message(DM, ALICE, "hi bot", channel_type="im")
    await bot.event(dm)
    await bot.settle()
    assert bot.exchanges() == 1 and fake.bot_replies(DM, dm["ts"])


async def test_long_reply_is_split_and_huge_message_refused_politely(make_bot, fake):
    bot = await make_bot(max_message_chars=6)
    msg, ex = await bot.mention("tell me a long story")
    replies = fake.bot_replies(GENERAL, msg["ts"])
    assert len(ex.reply) > 6 and len(replies) >= 2
    assert all(len(r["text"]) <= 6 for r in replies)
    assert "".join("".join(r["text"] for r in replies).split()) == "".join(escape(ex.reply).split())
    assert ex.reply_ref == replies[0]["ts"]
    # People react to whichever part they read: a later part rates the same exchange.
    await bot.event(reaction_event("reaction_added", BOB, "-1", GENERAL, replies[-1]["ts"]))
    await bot.settle()
    assert bot.svc.store.ratings(ex.id) == {BOB: "down"}

    huge = fake.user_message(DM, ALICE, "word " * 2000, channel_type="im")
    status, _ = await bot.event(huge)
    await bot.settle()
    assert status == 200 and bot.exchanges() == 1
    text = " ".join(r["text"] for r in fake.bot_replies(DM, huge["ts"]))
    assert "Sorry" in text and "limit" in text


async def test_rate_limited_reply_is_waited_out(make_bot, fake):
    bot = await make_bot()
    fake.rate_limit("chat.postMessage", times=1, retry_after=1)
    msg, ex = await bot.mention("are you there")
    assert [c.status for c in fake.calls if c.method == "chat.postMessage"] == [429, 200]
    (reply,) = fake.bot_replies(GENERAL, msg["ts"])
    assert reply["text"] == escape(ex.reply)


async def test_edits_at_most_once_per_interval(fake, tmp_path):
    clock = StepClock(step=0.25)
    store = Store(tmp_path / "t.db")
    stream = ReplyStream(SlackPoster(_client(fake), GENERAL, fake.new_ts()), store, max_chars=3900,
                         interval=1.0, clock=clock, render=escape, keep_whole=ENTITY)
    for _ in range(40):
        await stream.add("word ")
    await stream.finish(stream.text + "end & co")
    store.close()
    shown = fake.calls_to("chat.postMessage") + fake.calls_to("chat.update")
    # Once at once, then once per interval of the stream's clock at most, the final text included.
    assert 3 <= len(shown) <= clock.t / 1.0 + 1
    assert all(0 < s <= 1.0 for s in clock.sleeps)
    assert fake.messages[GENERAL][stream.refs[0]]["text"].endswith("end &amp; co")


def _client(fake):
    from slack_sdk.web.async_client import AsyncWebClient

    return AsyncWebClient(token="xoxb-t", base_url=fake.api_url)


async def test_text_translation():
    assert plain_text("<@U0BOT> hi <@U1|ann> in <#C1|general> see <https://x.io|docs> &amp; <!here>",
                      "U0BOT") == "hi @ann in #general see docs & @here"
    assert escape("<!channel> & co") == "&lt;!channel&gt; &amp; co"
    assert split_text("a" * 10, 4) == ["aaaa", "aaaa", "aa"]
    assert split_text("one two three", 8) == ["one two", "three"]
    pieces = split_text("a&amp;b&amp;c&amp;d&amp;e", 6)
    assert "".join(pieces) == "a&amp;b&amp;c&amp;d&amp;e" and all(p.count("&") == p.count("&amp;") for p in pieces)


# ---------------------------------------------------------------------- ratings and corrections


async def test_reactions_add_replace_and_remove_ratings(make_bot, fake):
    bot = await make_bot()
    msg, ex = await bot.mention("rate me")
    ref, ratings = ex.reply_ref, lambda: bot.svc.store.ratings(ex.id)

    async def react(kind, user, name, ts=ref):
        await bot.event(reaction_event(kind, user, name, GENERAL, ts))
        await bot.settle()

    await react("reaction_added", BOB, "+1")
    assert ratings() == {BOB: "up"}
    await react("reaction_added", BOB, "-1")
    assert ratings() == {BOB: "down"}
    await react("reaction_removed", BOB, "+1")  # no longer the rating: nothing changes
    assert ratings() == {BOB: "down"}
    await react("reaction_removed", BOB, "-1")
    assert ratings() == {}
    await react("reaction_added", ALICE, "thumbsup::skin-tone-3")
    await react("reaction_added", fake.bot_user_id, "-1")  # the bot's own hint
    await react("reaction_added", BOB, "tada")
    await react("reaction_added", BOB, "+1", ts=msg["ts"])  # the user's message, not a bot reply
    assert ratings() == {ALICE: "up"}
    assert bot.svc.store.query("SELECT COUNT(*) AS n FROM ratings")[0]["n"] == 1


async def test_reaction_while_the_reply_streams_rates_it(make_bot, fake, engine):
    held = HeldEngine(engine)
    bot = await make_bot(engine=held)
    msg = fake.user_message(DM, ALICE, "hello, are you there", channel_type="im")
    await bot.event(msg)
    await asyncio.wait_for(held.held.wait(), 30)  # the first part is posted; the rest waits
    (part,) = fake.bot_replies(DM, msg["ts"])
    _, rid = await bot.event(reaction_event("reaction_added", BOB, "+1", DM, part["ts"]))
    assert await bot.adapter.handled.wait(f"event:{rid}") == ["rated"]
    held.release.set()
    await bot.settle()
    (ex,) = bot.svc.store.conversation(conversation_id(DM, msg["ts"]))
    assert ex.reply_ref == part["ts"] and bot.svc.store.ratings(ex.id) == {BOB: "up"}


async def test_every_platform_reaches_metrics(make_bot, fake):
    bot = await make_bot()
    msg = fake.user_message(DM, ALICE, "count me", channel_type="im")
    await bot.event(msg)
    await bot.settle()
    (ex,) = bot.svc.store.conversation(conversation_id(DM, msg["ts"]))
    await bot.event(reaction_event("reaction_added", BOB, "+1", DM, ex.reply_ref))
    await bot.event(reaction_event("reaction_removed", BOB, "+1", DM, ex.reply_ref))
    await bot.settle()
    async with serving(bot.svc) as base:
        async with bot.http.post(base + "/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "and me"}]}) as r:
            assert r.status == 200
            api = await r.json()
        async with bot.http.get(base + "/metrics") as r:
            text = await r.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("tuneloop_requests_total", platform="slack", outcome=ex.finish_reason) == 1
    assert value("tuneloop_requests_total", platform="api", outcome=api["choices"][0]["finish_reason"]) == 1
    assert value("tuneloop_completion_tokens_total", platform="slack") == ex.completion_tokens
    assert value("tuneloop_ratings_total", platform="slack", rating="up") == 1
    assert value("tuneloop_ratings_total", platform="slack", rating="none") == 1
    assert value("tuneloop_request_duration_seconds_count", platform="slack") == 1


async def test_correction_by_prefix_in_the_thread(make_bot, fake):
    bot = await make_bot()
    msg, ex = await bot.mention("capital of france")
    fix = fake.user_message(GENERAL, BOB, "!fix Paris is the capital of France.", thread_ts=msg["ts"])
    await bot.event(fix)
    await bot.settle()
    (c,) = bot.svc.store.corrections(ex.id)
    assert c["user"] == BOB and c["text"] == "Paris is the capital of France."
    assert bot.exchanges() == 1, "a correction is not answered"
    assert ("white_check_mark", fake.bot_user_id) in fake.reactions[(GENERAL, fix["ts"])]

    lonely = fake.user_message(GENERAL, BOB, "!fix nothing to fix here")
    await bot.event(lonely)
    await bot.settle()
    assert len(bot.svc.store.corrections()) == 1
    assert fake.calls_to("chat.postEphemeral")[-1].args["user"] == BOB


async def test_correction_by_shortcut_modal(make_bot, fake):
    bot = await make_bot()
    msg, ex = await bot.mention("say something nice")
    reply = fake.bot_replies(GENERAL, msg["ts"])[0]
    status, _ = await bot.interactive(shortcut_body(SUGGEST_SHORTCUT, BOB, GENERAL, reply, fake.response_url()))
    await bot.settle()
    assert status == 200
    view = fake.calls_to("views.open")[-1].args["view"]
    assert view["type"] == "modal" and json.loads(view["private_metadata"])["exchange"] == ex.id

    status, text = await bot.interactive(view_submission_body(BOB, view, "  "))
    assert status == 200 and "errors" in text and not bot.svc.store.corrections(ex.id)
    status, _ = await bot.interactive(view_submission_body(BOB, view, "You are doing great."))
    await bot.settle()
    assert status == 200
    assert [(c["user"], c["text"]) for c in bot.svc.store.corrections(ex.id)] == [(BOB, "You are doing great.")]

    # On someone else's message: a polite ephemeral answer, no modal.
    opened = len(fake.calls_to("views.open"))
    await bot.interactive(shortcut_body(SUGGEST_SHORTCUT, BOB, GENERAL, msg, fake.response_url()))
    await bot.settle()
    assert len(fake.calls_to("views.open")) == opened
    assert "not one of my replies" in fake.responses[-1]["text"]


# ---------------------------------------------------------------------- delivery


async def test_retried_event_is_ignored_also_after_a_restart(make_bot, fake):
    bot = await make_bot()
    msg = fake.user_message(DM, ALICE, "only once please", channel_type="im")
    _, event_id = await bot.event(msg)
    await bot.settle()
    await bot.event(msg, event_id=event_id, retry=1)
    await bot.settle()
    assert bot.exchanges() == 1 and len(fake.bot_replies(DM, msg["ts"])) == 1

    await bot.adapter.stop()
    again = await make_bot()  # a new process on the same database
    status, _ = await again.event(msg, event_id=event_id, retry=2)
    await again.settle()
    assert status == 200 and again.exchanges() == 1 and len(fake.bot_replies(DM, msg["ts"])) == 1

    (ex,) = again.svc.store.conversation(conversation_id(DM, msg["ts"]))
    reaction = reaction_event("reaction_added", BOB, "+1", DM, ex.reply_ref)
    _, rid = await again.event(reaction)
    await again.settle()
    again.svc.feedback.rate(ex.id, BOB, None)  # had the retry run, it would rate again
    await again.event(reaction, event_id=rid, retry=1)
    await again.settle()
    assert again.svc.store.ratings(ex.id) == {}


async def test_bad_or_stale_signature_gets_401_and_does_nothing(make_bot, fake):
    bot = await make_bot()
    body = json.dumps(event_body(fake.user_message(DM, ALICE, "sneaky", channel_type="im")))
    status, _ = await bot.post(body, "application/json", secret="not-the-secret")
    assert status == 401
    status, _ = await bot.post(body, "application/json", timestamp=int(time.time()) - 3600)
    assert status == 401
    await bot.settle()
    assert bot.exchanges() == 0 and not fake.calls_to("chat.postMessage")


async def test_garbage_from_slack_never_500(make_bot):
    bot = await make_bot()
    for body, ctype in [("{}", "application/json"), ("not json", "application/json"),
                        (form({"payload": json.dumps({"type": "block_actions", "actions": [{"action_id": "zzz"}],
                                                      "user": {"id": ALICE}})}),
                         "application/x-www-form-urlencoded"),
                        (form({"payload": "{broken"}), "application/x-www-form-urlencoded"),
                        (form({**command_body("", ALICE, GENERAL, "x"), "command": "/other"}),
                         "application/x-www-form-urlencoded")]:
        status, _ = await bot.post(body, ctype)
        assert status < 500, body
    await bot.settle()


# ---------------------------------------------------------------------- admin


async def test_slash_command_refuses_non_admins_and_starts_a_run_for_admins(make_bot, fake):
    bot = await make_bot()
    add_feedback(bot)  # so that only the permission check can refuse
    status, took = await bot.command("retrain", BOB)
    assert status == 200 and took < 3
    await fake.wait_for(lambda: fake.responses, what="the answer")
    assert "admins only" in fake.responses[-1]["text"] and fake.responses[-1]["response_type"] == "ephemeral"
    assert run_rows(bot) == [] and not bot.control._children

    await bot.command("retrain", ADMIN)
    await fake.wait_for(lambda: len(fake.responses) == 2, what="the answer")
    assert fake.responses[-1]["text"] == "Training run run-1 started."
    (row,) = run_rows(bot)
    assert row["id"] == 1 and row["reason"] == "slack:U0ADMIN" and row["pid"] in bot.control._children
    assert bot.control.running()["run_id"] == "run-1", "the training process is going"

    await bot.command("retrain", ADMIN)  # one run at a time
    await fake.wait_for(lambda: len(fake.responses) == 3, what="the answer")
    assert "is going" in fake.responses[-1]["text"] and len(run_rows(bot)) == 1

    await bot.command("status", BOB)
    await bot.command("models", BOB)
    await bot.command("rollback", BOB)
    await bot.command("frobnicate", BOB)
    await fake.wait_for(lambda: len(fake.responses) == 7, what="the answers")
    texts = [r["text"] for r in fake.responses[3:]]
    assert "live version: base" in texts[0] and "running now: run-1" in texts[0]
    assert "* base [base]" in texts[1]
    assert "admins only" in texts[2] and bot.control.registry.live() is None
    assert "unknown command" in texts[3]


async def test_app_home_shows_status_and_its_buttons_run_admin_actions(make_bot, fake):
    bot = await make_bot()
    add_feedback(bot)
    await bot.event({"type": "app_home_opened", "user": ADMIN, "channel": "D0HOME", "tab": "home",
                     "event_ts": "1700000000.1"})
    await bot.settle()
    view = fake.calls_to("views.publish")[-1].args["view"]
    assert view["type"] == "home" and "live version: base" in json.dumps(view)
    assert "feedback since then: 1" in json.dumps(view)
    assert "tuneloop_home_retrain" in json.dumps(view)

    status, _ = await bot.interactive(block_action_body(ADMIN, "tuneloop_home_retrain"))
    await bot.settle()
    assert status == 200
    assert [(r["id"], r["reason"]) for r in run_rows(bot)] == [(1, "slack:U0ADMIN")]
    assert bot.control.running()["run_id"] == "run-1" and len(bot.control._children) == 1
    assert "run-1 started" in json.dumps(fake.calls_to("views.publish")[-1].args["view"])

    await bot.interactive(block_action_body(BOB, "tuneloop_home_retrain"))
    await bot.settle()
    assert len(run_rows(bot)) == 1 and len(bot.control._children) == 1
    published = json.dumps(fake.calls_to("views.publish")[-1].args["view"])
    assert "admins only" in published and "tuneloop_home_retrain" not in published


# ---------------------------------------------------------------------- socket mode


async def test_socket_mode_answers_mentions_and_commands(make_bot, fake):
    bot = await make_bot("socket")
    msg = fake.user_message(GENERAL, ALICE, f"<@{fake.bot_user_id}> hello over the socket")
    mention = fake.mention_event(msg)
    await bot.event(msg)
    _, event_id = await bot.event(mention)
    await bot.settle()
    (ex,) = bot.svc.store.conversation(conversation_id(GENERAL, msg["ts"]))
    (reply,) = fake.bot_replies(GENERAL, msg["ts"])
    assert reply["text"] == escape(ex.reply) and ex.reply_ref == reply["ts"]
    await bot.event(mention, event_id=event_id, retry=1)  # Slack redelivers: acked, not answered
    await bot.settle()
    assert bot.exchanges() == 1 and len(fake.bot_replies(GENERAL, msg["ts"])) == 1

    add_feedback(bot)
    status, took = await bot.command("retrain", ADMIN)
    assert took < 3
    await fake.wait_for(lambda: fake.responses, what="the answer")
    assert fake.responses[-1]["text"] == "Training run run-1 started."
    assert [r["reason"] for r in run_rows(bot)] == ["slack:U0ADMIN"] and bot.control.running()


async def test_manifest_matches_the_adapter():
    from pathlib import Path

    import yaml

    from bot.adapters.slack import COMMAND

    m = yaml.safe_load((Path(__file__).parent.parent / "slack-manifest.yml").read_text(encoding="utf-8"))
    assert [c["command"] for c in m["features"]["slash_commands"]] == [COMMAND]
    assert [s["callback_id"] for s in m["features"]["shortcuts"]] == [SUGGEST_SHORTCUT]
    events = set(m["settings"]["event_subscriptions"]["bot_events"])
    assert {"app_mention", "message.im", "message.channels", "reaction_added", "reaction_removed",
            "app_home_opened", "app_uninstalled", "tokens_revoked"} <= events
    assert m["features"]["app_home"]["home_tab_enabled"] and m["settings"]["interactivity"]["is_enabled"]


async def test_missing_or_refused_tokens_fail_the_start_with_the_key(make_bot, monkeypatch):
    monkeypatch.setenv("SLACK_APP_TOKEN", "not-an-app-token")
    with pytest.raises(ConfigError, match="slack.app_token_env"):
        await make_bot("socket")
    monkeypatch.delenv("SLACK_SIGNING_SECRET")
    with pytest.raises(ConfigError, match="slack.signing_secret_env: environment variable SLACK_SIGNING_SECRET"):
        await make_bot("http")
