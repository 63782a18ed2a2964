"""Slack installs in many workspaces through bolt's OAuth flow: the real slack-bolt app, slack_sdk's
SQLite installation and state stores in the store's database file, and the real engine on the tiny
model, against the fake Slack on 127.0.0.1 (its ``oauth.v2.access`` hands out one token per team)."""

from __future__ import annotations

import json
import re
import sqlite3

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from bot.adapters.slack import SlackAdapter, conversation_id
from bot.admin import Admin
from bot.chat import Chat
from bot.feedback import Feedback
from bot.services import Services
from tests.fake_slack import CLIENT_ID, CLIENT_SECRET, FakeSlack, event_body, reaction_event, sign
from tests.test_slack import SECRET, write_config
from tuneloop.config import load, parse
from tuneloop.engine.local import LocalEngine
from tuneloop.errors import ConfigError
from tuneloop.learning.control import Control
from tuneloop.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="module")

T1, T2, T3 = "T0ONE", "T0TWO", "T0THREE"
ALICE, BOB = "U0ALICE", "U0BOB"
CHANNEL = "C0GENERAL"
STATE_COOKIE = "slack-app-oauth-state"


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


class Server:
    """``tuneloop run``'s aiohttp app with the Slack adapter in HTTP mode and OAuth installs."""

    def __init__(self, fake: FakeSlack, svc: Services, adapter: SlackAdapter, base: str):
        self.fake, self.svc, self.adapter, self.base = fake, svc, adapter, base
        self.http = aiohttp.ClientSession()
        self.sent = 0

    async def install(self, team: str) -> tuple[int, str]:
        """Someone installs the app in ``team``: the install page, Slack's approval, the redirect back."""
        async with self.http.get(self.base + "/slack/install", allow_redirects=False) as r:
            assert r.status == 200, await r.text()
            page = await r.text()
            state = r.cookies[STATE_COOKIE].value
        link = re.search(r'href="(https://slack.com/oauth/v2/authorize\?[^"]+)"', page)[1].replace("&amp;", "&")
        assert f"state={state}" in link and f"client_id={CLIENT_ID}" in link and "chat:write" in link
        code = f"code-{team}-{state[:8]}"
        self.fake.grant(code, team)
        return await self.redirect(code, state)

    async def redirect(self, code: str, state: str, cookie: str | None = None) -> tuple[int, str]:
        """Slack sends the installer's browser back with ``code`` and ``state`` (and the install's cookie)."""
        headers = {"Cookie": f"{STATE_COOKIE}={state if cookie is None else cookie}"}
        async with self.http.get(self.base + "/slack/oauth_redirect", params={"code": code, "state": state},
                                 headers=headers, allow_redirects=False) as r:
            return r.status, await r.text()

    async def event(self, event: dict, team: str) -> int:
        body = json.dumps(event_body(event, team=team))
        headers = {"Content-Type": "application/json", **sign(SECRET, body)}
        self.sent += 1
        async with self.http.post(self.base + "/slack/events", data=body.encode(), headers=headers) as r:
            return r.status

    async def mention(self, team: str, text: str, user: str = ALICE):
        """A mention in ``team``'s channel; the exchange that answers it (None if none did)."""
        msg = self.fake.user_message(CHANNEL, user, f"<@U0BOT{team}> {text}")
        assert await self.event(self.fake.mention_event(msg), team) == 200
        await self.adapter.handled.wait(count=self.sent)
        found = self.svc.store.conversation(conversation_id(CHANNEL, msg["ts"]), community=f"slack:{team}")
        return msg, (found[-1] if found else None)

    def token_of(self, team: str) -> str:
        (token,) = [t for t, ws in self.fake.workspaces.items() if ws.team_id == team]
        return token


@pytest_asyncio.fixture(loop_scope="module")
async def make_server(tmp_path, engine, fake, tiny_model, monkeypatch):
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("SLACK_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("SLACK_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.delenv("SLACK_BOT_TOKEN", raising=False)  # OAuth installs need no token of their own
    running: list[tuple[Server, web.AppRunner]] = []

    async def make() -> Server:
        path = tmp_path / "tuneloop.toml"
        write_config(path, {
            "storage": {"path": "db/tuneloop.db"},
            "model": {"base": tiny_model, "device": "cpu", "max_new_tokens": 12},
            "slack": {"enabled": True, "mode": "http", "oauth": True, "api_base_url": fake.api_url,
                      "add_reactions": False},
            "trainer": {"enabled": False, "registry": tmp_path / "models"}})
        config = load(path)
        store = Store(config.storage.path)
        chat = Chat(config, store, engine)
        svc = Services(config, store, engine, chat, Feedback(store, config.model.max_input_chars, chat.metrics),
                       Admin(config, store, Control(config, store)))
        adapter = SlackAdapter(svc, edit_interval=0.0)
        app = web.Application()
        adapter.attach(app)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        await adapter.start()
        server = Server(fake, svc, adapter, f"http://127.0.0.1:{runner.addresses[0][1]}")
        running.append((server, runner))
        return server

    yield make
    for server, runner in running:
        await server.adapter.stop()
        await server.http.close()
        await runner.cleanup()
        server.svc.store.close()


def installed_teams(server: Server) -> set[str]:
    """The workspaces slack_sdk's installation store holds, read from the store's own database file."""
    with sqlite3.connect(server.svc.store.path) as conn:
        return {row[0] for row in conn.execute("SELECT team_id FROM slack_bots")}


async def test_two_workspaces_install_and_each_is_answered_with_its_own_token(make_server, fake):
    server = await make_server()
    assert not fake.calls_to("auth.test"), "an OAuth app has no token of its own to check at start"
    for team in (T1, T2):
        status, page = await server.install(team)
        assert status == 200, page
    assert installed_teams(server) == {T1, T2}
    assert [c.args.get("code", "")[:len("code-T0ONE")] for c in fake.calls_to("oauth.v2.access")] == [
        f"code-{T1}", f"code-{T2}"]

    _, ex2 = await server.mention(T2, "hello from two")
    _, ex1 = await server.mention(T1, "hello from one")
    assert ex2 is not None and ex2.community == f"slack:{T2}" and ex2.prompt == "hello from two"
    assert ex1 is not None and ex1.community == f"slack:{T1}" and ex1.prompt == "hello from one"
    # Every Web API call made for a workspace's event came with that workspace's own token.
    by_thread = {ex.thread: ex for ex in (ex1, ex2)}
    posts = fake.calls_to("chat.postMessage") + fake.calls_to("chat.update")
    assert posts and {(by_thread[c.args["thread_ts"]].community if "thread_ts" in c.args
                       else None) for c in fake.calls_to("chat.postMessage")} == {f"slack:{T1}", f"slack:{T2}"}
    for c in fake.calls_to("chat.postMessage"):
        team = by_thread[c.args["thread_ts"]].community.removeprefix("slack:")
        assert c.token == server.token_of(team)
    assert server.token_of(T1) != server.token_of(T2)
    # The reply was posted by T2's own bot user, and is rated there (not in T1) by a reaction.
    reply_ts = ex2.reply_ref
    assert fake.messages[CHANNEL][reply_ts]["user"] == f"U0BOT{T2}"
    assert await server.event(reaction_event("reaction_added", BOB, "+1", CHANNEL, reply_ts), T1) == 200
    await server.adapter.handled.wait(count=server.sent)
    assert server.svc.store.ratings(ex2.id) == {}, "T1 cannot rate T2's reply"
    assert await server.event(reaction_event("reaction_added", BOB, "+1", CHANNEL, reply_ts), T2) == 200
    await server.adapter.handled.wait(count=server.sent)
    assert server.svc.store.ratings(ex2.id) == {BOB: "up"}


async def test_installs_survive_a_restart_and_uninstall_removes_them(make_server, fake):
    first = await make_server()
    await first.install(T2)
    await first.adapter.stop()
    again = await make_server()  # same database file: the install is still there
    _, ex = await again.mention(T2, "still there?")
    assert ex is not None and ex.community == f"slack:{T2}"

    assert await again.event({"type": "app_uninstalled", "event_ts": "1.1"}, T2) == 200
    await again.adapter.handled.wait(count=again.sent)
    assert installed_teams(again) == set()
    posted = len(fake.calls_to("chat.postMessage"))
    _, gone = await again.mention(T2, "anyone?")
    assert gone is None and len(fake.calls_to("chat.postMessage")) == posted


async def test_refused_installs_and_unknown_workspaces_store_nothing(make_server, fake, caplog):
    server = await make_server()
    # A state that was never issued, or a cookie that does not match it (another browser): refused.
    fake.grant("code-forged", T3)
    status, _ = await server.redirect("code-forged", "00000000-0000-0000-0000-000000000000")
    assert status >= 400
    async with server.http.get(server.base + "/slack/install") as r:
        state = r.cookies[STATE_COOKIE].value
    status, _ = await server.redirect("code-forged", state, cookie="someone-else")
    assert status >= 400
    # A code Slack does not know: oauth.v2.access refuses it; a used state cannot be replayed.
    async with server.http.get(server.base + "/slack/install") as r:
        state = r.cookies[STATE_COOKIE].value
    status, _ = await server.redirect("code-unknown", state)
    assert status >= 400 and fake.calls_to("oauth.v2.access")
    status, _ = await server.redirect("code-forged", state)
    assert status >= 400
    assert installed_teams(server) == set()

    # An event from a workspace that never installed the app: nothing runs, nothing is posted.
    _, ex = await server.mention(T3, "hello?")
    assert ex is None and not fake.calls_to("chat.postMessage")
    assert server.adapter.handled.events[-1].outcome == "refused"


@pytest.mark.parametrize("slack, message", [
    ({"oauth": True}, 'slack.oauth: needs mode = "http"'),
    ({"oauth": True, "mode": "http", "install_path": "install"}, "slack.install_path: must be a path"),
    ({"oauth": True, "mode": "http", "redirect_uri_path": "/slack/install"},
     "slack.redirect_uri_path: must differ from install_path"),
    ({"oauth": True, "mode": "http", "scopes": []}, "slack.scopes: must be Slack scope names"),
    ({"oauth": True, "mode": "http", "scopes": ["chat write"]}, "slack.scopes: must be Slack scope names"),
    ({"oauth": True, "mode": "http", "redirect_uri": "https://x.io/elsewhere"}, "slack.redirect_uri: must be a URL"),
    ({"client_id_env": "NOT AN ENV"}, "slack.client_id_env: must name an environment variable"),
])
async def test_bad_oauth_config_is_one_line(tmp_path, slack, message):
    with pytest.raises(ConfigError) as e:
        parse({"slack": slack}, tmp_path)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


async def test_missing_client_secret_fails_the_start_with_its_key(make_server, monkeypatch):
    monkeypatch.delenv("SLACK_CLIENT_SECRET")
    with pytest.raises(ConfigError, match="slack.client_secret_env: environment variable SLACK_CLIENT_SECRET"):
        await make_server()


async def test_default_scopes_are_the_manifests():
    from pathlib import Path

    import yaml

    from tuneloop.config import SLACK_BOT_SCOPES

    m = yaml.safe_load((Path(__file__).parent.parent / "slack-manifest.yml").read_text(encoding="utf-8"))
    assert list(SLACK_BOT_SCOPES) == m["oauth_config"]["scopes"]["bot"]
