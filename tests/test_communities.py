"""Communities kept apart (issue 12), through the real HTTP API with API keys, the
CLI on the same database, and the store's per-community views.

Two API keys name two communities (``http:acme``, ``http:beta``); a third is
acme's admin key. Nothing of one community is context, memory, a training or
export row, a figure or a feedback target of the other.
"""

from __future__ import annotations

import json
import os
import secrets

import aiohttp
import pytest
import pytest_asyncio

from bot import cli
from bot.chat import Turn
from bot.runtime import services
from tests.fake_discord import wait_until
from tests.fake_slack import TEAM, block_action_body, command_body, event_body, form, reaction_event
from tests.serving import serving
from tests.test_discord import ADMIN as DISCORD_ADMIN
from tests.test_discord import ALICE as D_ALICE
from tests.test_discord import BOB as D_BOB
from tests.test_discord import answer, long_model, world  # noqa: F401 — fixtures
from tests.test_slack import ADMIN as SLACK_ADMIN
from tests.test_slack import ALICE, BOB, GENERAL, engine, fake, make_bot  # noqa: F401 — fixtures
from trainer.data import export
from tuneloop.config import TrustConfig, load
from tuneloop.errors import ConfigError, NotFoundError
from tuneloop.store import Store

in_module_loop = pytest.mark.asyncio(loop_scope="module")

ENV = {"TL_TEST_ACME": secrets.token_urlsafe(16), "TL_TEST_BETA": secrets.token_urlsafe(16),
       "TL_TEST_ACME_ADMIN": secrets.token_urlsafe(16)}
ACME, BETA, ADMIN = (ENV[k] for k in ENV)
COMPLETIONS = "/v1/chat/completions"


def _config_text(tiny_model, d, *, server: str) -> str:
    return f"""
[model]
base = "{tiny_model}"
device = "cpu"
max_new_tokens = 3

[storage]
path = "{d / 'tuneloop.db'}"

{server}

[trainer]
enabled = false

[memory]
enabled = false
"""


KEYS = """
[[server.api_keys]]
community = "acme"
key_env = "TL_TEST_ACME"

[[server.api_keys]]
community = "beta"
key_env = "TL_TEST_BETA"

[[server.api_keys]]
community = "acme"
key_env = "TL_TEST_ACME_ADMIN"
admin = true
"""


@pytest.fixture(scope="module")
def config_file(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("communities")
    path = d / "config.toml"
    path.write_text(_config_text(tiny_model, d, server=f"[server]\n{KEYS}"))
    return path


@pytest.fixture(scope="module", autouse=True)
def keys_in_env():
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(config_file):
    config = load(config_file)
    async with services(config) as svc, serving(svc) as base:
        yield base, svc


@pytest_asyncio.fixture(loop_scope="module")
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def complete(http, base, key, text, *, conversation=None, user=None):
    body = {"model": "m", "messages": [{"role": "user", "content": text}]}
    if user:
        body["user"] = user
    headers = {**auth(key), **({"X-Conversation-Id": conversation} if conversation else {})}
    async with http.post(base + COMPLETIONS, json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["exchange_id"]


async def feedback(http, base, key, exchange_id, body):
    async with http.post(f"{base}/api/exchanges/{exchange_id}/feedback", json=body, headers=auth(key)) as r:
        return r.status, await r.json()


# -- authentication ---------------------------------------------------------------------------------


@in_module_loop
async def test_without_a_valid_key_every_api_path_is_401(server, http):
    base, svc = server
    before = svc.store.stats()["exchanges"]
    for method, path in (("POST", COMPLETIONS), ("GET", "/v1/models"), ("POST", "/api/exchanges/1/feedback"),
                         ("GET", "/api/dashboard"), ("GET", "/metrics")):
        for headers in ({}, auth("not-a-key"), {"Authorization": "Basic abc"}, auth("")):
            async with http.request(method, base + path, json={"user": "x", "rating": "up"},
                                    headers=headers) as r:
                assert r.status == 401, (path, headers)
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await r.json())["error"]["type"] == "authentication_error"
    assert svc.store.stats()["exchanges"] == before
    async with http.get(base + "/healthz") as r:  # liveness stays open for probes
        assert r.status == 200


@in_module_loop
async def test_a_revoked_key_is_refused_at_once(server, http):
    base, _ = server
    async with http.get(base + "/v1/models", headers=auth(BETA)) as r:
        assert r.status == 200
    os.environ["TL_TEST_BETA"] = "changed-" + BETA  # the operator rotated it
    try:
        async with http.get(base + "/v1/models", headers=auth(BETA)) as r:
            assert r.status == 401
        del os.environ["TL_TEST_BETA"]  # and then removed it
        async with http.get(base + "/v1/models", headers=auth(BETA)) as r:
            assert r.status == 401
    finally:
        os.environ["TL_TEST_BETA"] = BETA
    async with http.get(base + "/v1/models", headers=auth(BETA)) as r:
        assert r.status == 200


@in_module_loop
async def test_dashboard_needs_an_admin_key_and_shows_its_community_only(server, http):
    base, svc = server
    await complete(http, base, ACME, "dashboard acme")
    await complete(http, base, BETA, "dashboard beta")
    async with http.get(base + "/api/dashboard", headers=auth(ACME)) as r:
        assert r.status == 403 and "admin" in (await r.json())["error"]["message"]
    async with http.get(base + "/metrics", headers=auth(BETA)) as r:
        assert r.status == 403
    async with http.get(base + "/api/dashboard", headers=auth(ADMIN)) as r:
        assert r.status == 200
        data = await r.json()
    acme = svc.store.scoped("http:acme").stats()
    assert data["totals"]["exchanges"] == acme["exchanges"] < svc.store.stats()["exchanges"]
    assert data["totals"]["review"] == acme["review"]
    assert sum(p["exchanges"] for p in data["timeline"]) == acme["exchanges"]


@in_module_loop
async def test_login_form_sets_a_cookie_only_for_a_valid_key(server, http):
    base, _ = server
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:  # IPs allowed
        async with browser.get(base + "/dashboard", allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/login?next=/dashboard"
        async with browser.get(base + "/login?next=/dashboard") as r:
            assert r.status == 200 and 'name="key"' in await r.text()
        async with browser.post(base + "/login", data={"key": ACME, "next": "/dashboard"}) as r:
            assert "needs an admin key" in await r.text()
        async with browser.post(base + "/login", data={"key": "wrong", "next": "/dashboard"}) as r:
            assert "not valid" in await r.text()
        assert not browser.cookie_jar.filter_cookies(base)
        async with browser.post(base + "/login", data={"key": ADMIN, "next": "https://evil.example/"},
                                allow_redirects=False) as r:
            assert r.status == 302 and r.headers["Location"] == "/"  # never off-site
        async with browser.get(base + "/api/dashboard") as r:  # the cookie, no header
            assert r.status == 200
        async with browser.get(base + "/dashboard") as r:
            assert r.status == 200 and "tuneloop dashboard" in await r.text()


# -- data kept apart -----------------------------------------------------------------------------------


@in_module_loop
async def test_feedback_cannot_reach_another_communitys_exchange(server, http):
    base, svc = server
    a = await complete(http, base, ACME, "acme asks")
    missing = a + 10_000
    status, gone = await feedback(http, base, BETA, missing, {"user": "eve", "rating": "down"})
    for body in ({"user": "eve", "rating": "down"}, {"user": "eve", "correction": "Wrong."}):
        status, out = await feedback(http, base, BETA, a, body)
        # Exactly what a missing id answers, so an id reveals nothing.
        assert status == 404 and out["error"]["message"] == f"exchange {a} not found"
    assert gone["error"]["message"] == f"exchange {missing} not found"
    assert svc.store.ratings(a) == {} and svc.store.corrections(a, in_effect=False) == []
    status, out = await feedback(http, base, ACME, a, {"user": "ann", "rating": "up"})
    assert status == 200 and svc.store.ratings(a) == {"ann": "up"}
    assert svc.store.exchange(a).community == "http:acme"


@in_module_loop
async def test_a_non_admin_keys_correction_waits_and_an_admin_keys_is_live(server, http):
    base, svc = server
    a = await complete(http, base, ACME, "who runs acme?")
    status, out = await feedback(http, base, ACME, a, {"user": "ann", "correction": "Ann does."})
    assert status == 200 and out["correction"]["status"] == "pending"
    assert svc.store.corrections(a) == []  # not in effect: nothing trains on it
    status, out = await feedback(http, base, ADMIN, a, {"user": "boss", "correction": "Ann does."})
    assert out["correction"]["status"] == "live"
    assert [c["text"] for c in svc.store.corrections(a)] == ["Ann does."]


@in_module_loop
async def test_200_scripted_requests_leak_nothing_across_communities(server, http, config_file, tmp_path):
    """Both communities talk in the *same* conversation ids, rate and correct each other's
    exchange ids, and read their stats, exports and dashboards: leaks counted, must be 0."""
    base, svc = server
    own: dict[str, list[int]] = {"http:acme": [], "http:beta": []}
    key = {"http:acme": ACME, "http:beta": BETA}
    for i in range(100):
        for name in own:
            token = f"{name.split(':')[1]}-secret-{i}"
            conversation = f"shared-{i % 10}"  # the same ids in both communities
            own[name].append(await complete(http, base, key[name], token, conversation=conversation,
                                            user=f"u{i % 7}"))
    leaks = 0
    for name, ids in own.items():
        other = "beta" if name == "http:acme" else "acme"
        for eid in ids:
            ex = svc.store.exchange(eid)
            leaks += ex.community != name
            leaks += any(f"{other}-secret" in m["content"] for m in ex.messages)
    # A later turn of each shared conversation, from the store (as Slack, Discord and the CLI continue one).
    for name in own:
        other = "beta" if name == "http:acme" else "acme"
        for i in range(10):
            context = svc.chat.context(Turn(text="and then?", user="u0", platform="api", community=name,
                                            conversation_id=f"shared-{i}"))
            leaks += any(f"{other}-secret" in m["content"] for m in context)
            assert any(f"{name.split(':')[1]}-secret" in m["content"] for m in context)
    # Feedback through the other community's key: every one a 404.
    cross = 0
    for eid in own["http:acme"][:20]:
        status, _ = await feedback(http, base, BETA, eid, {"user": "eve", "rating": "down"})
        cross += status != 404
    for eid in own["http:beta"][:20]:
        status, _ = await feedback(http, base, ACME, eid, {"user": "eve", "correction": "No."})
        cross += status != 404
    leaks += cross
    # Each community rates its own: stats and exports per community hold nothing of the other.
    for name, ids in own.items():
        for eid in ids[:5]:
            assert (await feedback(http, base, key[name], eid, {"user": "fan", "rating": "up"}))[0] == 200
    for name in own:
        other = "beta" if name == "http:acme" else "acme"
        rows = export(svc.store.scoped(name), "sft")
        leaks += sum(f"{other}-secret" in json.dumps(r) for r in rows)
        assert len(rows) >= 5
        stats = svc.store.scoped(name).stats()
        leaks += set(stats["by_community"]) != {name}
    print(f"\ncross-community leaks in {sum(map(len, own.values()))} requests: {leaks}")
    assert leaks == 0


# -- the CLI: --community, and bad names ----------------------------------------------------------------


@in_module_loop
async def test_stats_and_export_take_a_community(server, config_file, capsys, tmp_path):
    _, svc = server
    assert cli.main(["--config", str(config_file), "stats", "--json", "--community", "http:beta"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert list(stats["by_community"]) == ["http:beta"]
    assert stats["exchanges"] == svc.store.scoped("http:beta").stats()["exchanges"]
    assert cli.main(["--config", str(config_file), "stats", "--json"]) == 0
    assert {"http:acme", "http:beta"} <= set(json.loads(capsys.readouterr().out)["by_community"])
    out = tmp_path / "beta.jsonl"
    assert cli.main(["--config", str(config_file), "export", "--format", "sft", "--community", "http:beta",
                     "--output", str(out)]) == 0
    assert "acme" not in out.read_text()
    for bad, message in (("nowhere:1", "must be 'local' or start with"),
                         ("http:a b", "may hold only letters"),
                         ("http:nobody", "community 'http:nobody' not found (known: ")):
        capsys.readouterr()
        assert cli.main(["--config", str(config_file), "stats", "--community", bad]) == 1
        err = capsys.readouterr().err
        assert err.startswith("tuneloop: error: ") and message in err and err.count("\n") == 1


def test_a_community_name_with_odd_characters_stops_start_up(tiny_model, tmp_path):
    for name in ("a b", "ac/me", "x" * 101, "", "beta:é"):
        path = tmp_path / "bad.toml"
        server = f'[server]\n[[server.api_keys]]\ncommunity = "{name}"\nkey_env = "K"\n'
        path.write_text(_config_text(tiny_model, tmp_path, server=server))
        with pytest.raises(ConfigError, match=r"server.api_keys \(K\): community"):
            load(path)


def test_without_keys_the_server_binds_only_loopback(tiny_model, tmp_path, capsys):
    path = tmp_path / "open.toml"
    for host, ok in (("0.0.0.0", False), ("192.168.1.5", False), ("::", False), ("example.org", False),
                     ("127.0.0.1", True), ("::1", True), ("localhost", True)):
        path.write_text(_config_text(tiny_model, tmp_path, server=f'[server]\nhost = "{host}"\nport = 0'))
        from bot.adapters.web import check_exposure

        if ok:
            check_exposure(load(path))
        else:
            with pytest.raises(ConfigError, match="without \\[\\[server.api_keys\\]\\]"):
                check_exposure(load(path))
    # `tuneloop run` says so in one line, before loading anything.
    path.write_text(_config_text(tiny_model, tmp_path, server='[server]\nhost = "0.0.0.0"\nport = 0'))
    assert cli.main(["--config", str(path), "run"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tuneloop: error: server.host: '0.0.0.0' is reachable from other machines")


def test_an_exchange_of_another_community_is_not_found_in_the_store(tmp_path):
    with Store(tmp_path / "t.db") as store:
        ex = store.add_exchange(platform="api", user="u", conversation_id="c", messages=[], prompt="p",
                                reply="r", model_version="v", community="http:acme")
        assert store.exchange(ex.id, "http:acme").id == ex.id
        with pytest.raises(NotFoundError, match=f"exchange {ex.id} not found"):
            store.exchange(ex.id, "http:beta")
        assert store.conversation("c", community="http:beta") == []
        assert not store.conversation_exists("c", community="http:beta")


# -- Slack: two workspaces on one install --------------------------------------------------------------


OTHER_TEAM = "T0OTHER"


async def slack_event(bot, event: dict, team: str) -> None:
    body = event_body(event)
    body["team_id"] = body["authorizations"][0]["team_id"] = team
    status, _ = await bot.post(json.dumps(body), "application/json")
    assert status == 200


async def slack_command(bot, text: str, user: str, team: str) -> str:
    body = {**command_body(text, user, GENERAL, bot.fake.response_url()), "team_id": team}
    answered = len(bot.fake.responses)
    status, _ = await bot.post(form(body), "application/x-www-form-urlencoded")
    assert status == 200
    await bot.fake.wait_for(lambda: len(bot.fake.responses) > answered, what="the answer")
    return bot.fake.responses[-1]["text"]


@in_module_loop
async def test_slack_workspaces_are_communities(make_bot, fake):  # noqa: F811
    bot = await make_bot()
    # Slack corrections under review here, so that the queue has something to keep apart.
    bot.svc.feedback.trust.config = TrustConfig(slack="review")
    msg, ex = await bot.mention("what is our wifi password")
    assert ex.community == f"slack:{TEAM}"
    reply = fake.bot_replies(GENERAL, msg["ts"])[0]
    # The same channel and message seen from another workspace: neither a rating nor a correction lands.
    await slack_event(bot, reaction_event("reaction_added", BOB, "-1", GENERAL, reply["ts"]), OTHER_TEAM)
    await slack_event(bot, fake.user_message(GENERAL, BOB, "!fix It is hunter2.", thread_ts=msg["ts"]), OTHER_TEAM)
    await bot.settle()
    assert bot.svc.store.ratings(ex.id) == {} and bot.svc.store.corrections(ex.id, in_effect=False) == []
    # In its own workspace, a non-admin's correction waits for review.
    await slack_event(bot, fake.user_message(GENERAL, BOB, "!fix It is on the fridge.", thread_ts=msg["ts"]), TEAM)
    await bot.settle()
    (pending,) = bot.svc.store.corrections(ex.id, in_effect=False)
    assert pending["status"] == "pending"
    # The other workspace's admin neither sees nor approves it.
    assert await slack_command(bot, "review", SLACK_ADMIN, OTHER_TEAM) == "Nothing waits for review."
    answer = await slack_command(bot, f"approve {pending['id']}", SLACK_ADMIN, OTHER_TEAM)
    assert answer == f"Sorry: correction {pending['id']} not found"
    # Its own workspace's admin does.
    assert f"#{pending['id']} by {BOB}" in await slack_command(bot, "review", SLACK_ADMIN, TEAM)
    assert await slack_command(bot, f"approve {pending['id']}", SLACK_ADMIN, TEAM) == (
        f"Correction {pending['id']} is live.")
    assert [c["text"] for c in bot.svc.store.corrections(ex.id)] == ["It is on the fridge."]
    # A mention from the other workspace is that workspace's exchange.
    other = fake.user_message(GENERAL, ALICE, f"<@{fake.bot_user_id}> hello from elsewhere")
    await slack_event(bot, other, OTHER_TEAM)
    await slack_event(bot, fake.mention_event(other), OTHER_TEAM)
    await bot.settle()
    (theirs,) = bot.svc.store.conversation(f"slack:{GENERAL}:{other['ts']}")
    assert theirs.community == f"slack:{OTHER_TEAM}" and len(theirs.messages) == 1 + bool(
        bot.svc.config.model.system_prompt)
    assert bot.svc.store.communities() == sorted([f"slack:{TEAM}", f"slack:{OTHER_TEAM}"])


def review_click(user: str, verb: str, correction_id: int, team: str) -> dict:
    body = block_action_body(user, f"tuneloop_review_{verb}")
    body["team"]["id"] = body["user"]["team_id"] = team
    body["actions"][0].update(value=str(correction_id), block_id=f"tuneloop_review_{correction_id}")
    return body


@in_module_loop
async def test_slack_app_home_reviews_its_own_workspaces_queue(make_bot, fake):  # noqa: F811
    bot = await make_bot()
    bot.svc.feedback.trust.config = TrustConfig(slack="review")
    msg, ex = await bot.mention("when is the standup")
    for user, text in ((BOB, "!fix At 9:30."), (ALICE, "!fix Never.")):
        await slack_event(bot, fake.user_message(GENERAL, user, text, thread_ts=msg["ts"]), TEAM)
    await bot.settle()
    keep, drop = (c["id"] for c in bot.svc.store.corrections(ex.id, in_effect=False))

    async def home(user: str, team: str) -> str:
        await slack_event(bot, {"type": "app_home_opened", "user": user, "channel": "D0HOME", "tab": "home",
                                "event_ts": "1700000000.1"}, team)
        await bot.settle()
        return json.dumps(fake.calls_to("views.publish")[-1].args["view"])

    mine = await home(SLACK_ADMIN, TEAM)
    assert "Waiting for review* (2)" in mine and f'"value": "{keep}"' in mine and "At 9:30." in mine
    theirs = await home(SLACK_ADMIN, OTHER_TEAM)
    assert "Waiting for review*: nothing" in theirs and "At 9:30." not in theirs
    assert "tuneloop_review" not in await home(BOB, TEAM)  # not an admin: no queue, no buttons
    # A click from another workspace (a forged or stale id) changes nothing.
    await bot.interactive(review_click(SLACK_ADMIN, "approve", keep, OTHER_TEAM))
    await bot.settle()
    assert bot.svc.store.corrections(ex.id) == []
    assert f"correction {keep} not found" in json.dumps(fake.calls_to("views.publish")[-1].args["view"])
    await bot.interactive(review_click(BOB, "approve", keep, TEAM))
    await bot.settle()
    assert bot.svc.store.corrections(ex.id) == []
    await bot.interactive(review_click(SLACK_ADMIN, "approve", keep, TEAM))
    await bot.interactive(review_click(SLACK_ADMIN, "reject", drop, TEAM))
    await bot.settle()
    assert [c["text"] for c in bot.svc.store.corrections(ex.id)] == ["At 9:30."]
    assert "Waiting for review*: nothing" in await home(SLACK_ADMIN, TEAM)


# -- Discord: two servers, and direct messages ---------------------------------------------------------


async def discord_command(w, caller, sub: str, channel: str, **options: str) -> str:
    interaction = await w.fake.slash(caller, sub, options, channel=channel)
    ups = await wait_until(lambda: w.fake.followups_for(interaction))
    assert all(f["flags"] & 64 for f in ups)  # ephemeral: only the admin sees the queue
    return "\n".join(f["content"] for f in ups)


@in_module_loop
async def test_discord_servers_and_dms_are_communities(world):  # noqa: F811 — the fixture
    dfake = world.fake
    other_guild, other_channel = await dfake.add_guild()
    await wait_until(lambda: world.adapter.client.get_guild(int(other_guild)))
    here = f"discord:{dfake.guild_id}"

    msg = await dfake.say(D_ALICE, "who won the office quiz", mention_bot=True)
    ex, (reply,) = await answer(world, msg)
    assert ex.community == here
    theirs = await dfake.say(D_BOB, "who won the office quiz", mention_bot=True, channel=other_channel)
    ex2, _ = await answer(world, theirs)
    assert ex2.community == f"discord:{other_guild}"
    dm = dfake.open_dm(D_ALICE)
    private = await dfake.say(D_ALICE, "just between us", channel=dm)
    ex3, _ = await answer(world, private)
    assert ex3.community == f"dm:discord:{D_ALICE.id}"

    await dfake.say(D_BOB, "!fix Team Heron won.", reply_to=reply["id"])
    (pending,) = await wait_until(lambda: world.store.corrections(ex.id, in_effect=False))
    assert pending["status"] == "pending"  # [trust] discord = "review"
    # The other server's admin neither sees it nor approves it; this server's admin does.
    assert await discord_command(world, DISCORD_ADMIN, "review", other_channel) == "Nothing waits for review."
    out = await discord_command(world, DISCORD_ADMIN, "approve", other_channel, correction=str(pending["id"]))
    assert out == f"⚠️ correction {pending['id']} not found"
    assert f"#{pending['id']} by {D_BOB.id}" in await discord_command(world, DISCORD_ADMIN, "review", dfake.general)
    out = await discord_command(world, D_BOB, "approve", dfake.general, correction=str(pending["id"]))
    assert out.startswith("🚫") and world.store.corrections(ex.id) == []
    out = await discord_command(world, DISCORD_ADMIN, "approve", dfake.general, correction=str(pending["id"]))
    assert out == f"Correction {pending['id']} is live."
    assert [c["text"] for c in world.store.corrections(ex.id)] == ["Team Heron won."]
    # The other server's question is unaffected: nothing of here in its figures or training rows.
    assert world.store.scoped(f"discord:{other_guild}").feedback_exchanges() == []
    assert [r["id"] for r in world.store.scoped(here).feedback_exchanges()] == [ex.id]
    # Memory: the next same question is answered with the correction here, and never there.
    again_here = await dfake.say(D_ALICE, "who won the office quiz?", mention_bot=True)
    again_there = await dfake.say(D_BOB, "who won the office quiz?", mention_bot=True, channel=other_channel)
    (mine, _), (other, _) = await answer(world, again_here), await answer(world, again_there)
    (item,) = [m["id"] for m in world.store.memory_items() if m["correction_id"] == pending["id"]]
    assert world.store.memory_uses(mine.id) == [item]
    assert world.store.memory_uses(other.id) == []
    assert "Team Heron" not in json.dumps(other.messages)
    # Blocking on Discord: the user's pending corrections here leave the queue, and nothing of theirs counts.
    await dfake.say(D_BOB, "!fix Team Falcon won.", reply_to=reply["id"])
    await wait_until(lambda: len(world.store.scoped(here).review_queue()) == 1)
    out = await discord_command(world, DISCORD_ADMIN, "block", dfake.general, user=f"<@{D_BOB.id}>")
    assert out == f"{D_BOB.id} is blocked: 1 pending corrections dropped; nothing of theirs will be trained on."
    assert world.store.scoped(here).review_queue() == [] and world.store.is_blocked(D_BOB.id, here)
    assert not world.store.is_blocked(D_BOB.id, f"discord:{other_guild}")  # this server only
