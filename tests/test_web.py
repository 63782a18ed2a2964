"""The HTTP adapter, end to end: a real aiohttp server on 127.0.0.1, the real
``openai`` client, the real LocalEngine on the tiny model, a real store."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading

import aiohttp
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bot import cli
from bot.adapters.web import STATIC
from bot.runtime import services
from tests.serving import HeldEngine, serving
from tuneloop.config import load
from tuneloop.engine import SamplingParams

pytestmark = pytest.mark.asyncio(loop_scope="module")

SYSTEM = "You are the test bot."
MAX_INPUT = 300
MAX_BODY = 20_000


@pytest.fixture(scope="module")
def config_file(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("web")
    path = d / "config.toml"
    # max_batch 2 + max_queue 0: two requests at once fill the engine (the busy test).
    path.write_text(f"""
[model]
base = "{tiny_model}"
device = "cpu"
max_new_tokens = 24
system_prompt = "{SYSTEM}"
max_input_chars = {MAX_INPUT}
max_batch = 2
max_queue = 0

[storage]
path = "{d / 'tuneloop.db'}"

[server]
max_body_bytes = {MAX_BODY}

[trainer]
enabled = false
""")
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(config_file):
    config = load(config_file)
    async with services(config) as svc, serving(svc) as base:
        yield base, svc


@pytest_asyncio.fixture(loop_scope="module")
async def client(server):
    base, _ = server
    c = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    await c.close()


@pytest_asyncio.fixture(loop_scope="module")
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


# -- OpenAI API ------------------------------------------------------------------------------


async def test_completion_is_a_logged_exchange(server, client):
    _, svc = server
    history = [{"role": "system", "content": "Answer briefly."},
               {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hello there"},
               {"role": "user", "content": "how are you?"}]
    r = await client.chat.completions.create(model="anything", messages=history, user="alice",
                                             max_tokens=12, temperature=0)
    ex = svc.store.exchange(int(r.id))
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ex.reply
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.model == ex.model_version == svc.engine.model_version
    assert r.usage.prompt_tokens == ex.prompt_tokens > 0
    assert r.usage.completion_tokens == ex.completion_tokens <= 12
    assert r.usage.total_tokens == ex.prompt_tokens + ex.completion_tokens
    # The request's messages are the context: its system message, its history, its last message.
    assert ex.messages == history
    assert (ex.platform, ex.user, ex.prompt) == ("api", "alice", "how are you?")
    # Greedy through HTTP is greedy on the engine itself.
    direct = await svc.engine.complete(history, SamplingParams(max_new_tokens=12))
    assert direct.text == ex.reply


async def test_default_system_prompt_and_conversation_id(server, client):
    _, svc = server
    r = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}],
        extra_headers={"X-Conversation-Id": "conv-header"})
    ex = svc.store.exchange(int(r.id))
    assert ex.messages[0] == {"role": "system", "content": SYSTEM}
    assert ex.conversation_id == "conv-header"
    assert ex.user == "api-anonymous"
    r2 = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "again"}], extra_body={"conversation_id": "conv-field"})
    assert svc.store.exchange(int(r2.id)).conversation_id == "conv-field"
    r3 = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "new"}])
    assert svc.store.exchange(int(r3.id)).conversation_id.startswith("api-")


async def test_streaming(server, client):
    _, svc = server
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "tell me something"}], stream=True,
        stream_options={"include_usage": True}, user="bob", max_completion_tokens=16)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    ex = svc.store.exchange(int(final[0].id))
    assert text == ex.reply and ex.user == "bob" and ex.platform == "api"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # really streamed
    assert {c.id for c in chunks} == {str(ex.id)}  # every chunk carries the exchange id
    usage = chunks[-1]
    assert usage.choices == [] and usage.id == str(ex.id)
    assert usage.usage.completion_tokens == ex.completion_tokens
    assert usage.usage.prompt_tokens == ex.prompt_tokens


async def test_stream_with_stop_and_seed_sampling(server, client):
    _, svc = server
    r = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], temperature=0.9, top_p=0.9, seed=7,
        stop=["\n"], max_tokens=10)
    r2 = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hello"}], temperature=0.9, top_p=0.9, seed=7,
        stop=["\n"], max_tokens=10)
    assert r.choices[0].message.content == r2.choices[0].message.content  # same seed, same reply
    assert "\n" not in r.choices[0].message.content


async def test_models(server, client):
    _, svc = server
    models = await client.models.list()
    assert [m.id for m in models.data] == [svc.engine.model_version]
    one = await client.models.retrieve(svc.engine.model_version)
    assert one.id == svc.engine.model_version


# -- feedback ----------------------------------------------------------------------------------


async def test_feedback_lands_like_the_cli(server, client, http, config_file):
    base, svc = server
    a = int((await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])).id)
    b = int((await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "b"}])).id)

    async def post(exchange_id, body):
        async with http.post(f"{base}/api/exchanges/{exchange_id}/feedback", json=body) as r:
            return r.status, await r.json()

    assert await post(a, {"user": "carol", "rating": "down"}) == (
        200, {"exchange_id": a, "user": "carol", "rating": "down"})
    status, out = await post(a, {"user": "carol", "correction": "  A better reply.  "})
    assert status == 200 and out["correction"]["text"] == "A better reply."
    # The CLI, on the same database, for the other exchange.
    assert cli.main(["--config", str(config_file), "rate", str(b), "down", "--user", "carol"]) == 0
    assert cli.main(["--config", str(config_file), "correct", str(b), "  A better reply.  ",
                     "--user", "carol"]) == 0

    def rows(exchange_id):
        r = svc.store.query("SELECT user, rating FROM ratings WHERE exchange_id = ?", [exchange_id])
        c = svc.store.query("SELECT user, text FROM corrections WHERE exchange_id = ?", [exchange_id])
        return r, c

    assert rows(a) == rows(b) == ([{"user": "carol", "rating": -1}],
                                  [{"user": "carol", "text": "A better reply."}])
    # A later rating replaces it; null removes it; both at once store both.
    assert (await post(a, {"user": "carol", "rating": "up"}))[0] == 200
    assert svc.store.ratings(a) == {"carol": "up"}
    assert (await post(a, {"user": "carol", "rating": None}))[1]["rating"] is None
    assert svc.store.ratings(a) == {}
    status, out = await post(a, {"user": "dave", "rating": "up", "correction": "Yes."})
    assert status == 200 and out["rating"] == "up" and out["correction"]["id"] > 0
    assert svc.store.ratings(a) == {"dave": "up"}


# -- bad input: always a 4xx JSON error that says what is wrong ------------------------------------

GOOD = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETIONS = "/v1/chat/completions"


def _with(**fields):
    return json.dumps({**GOOD, **fields})


BAD = [
    ("POST", COMPLETIONS, b"{not json", 400, "not valid JSON"),
    ("POST", COMPLETIONS, b"", 400, "empty"),
    ("POST", COMPLETIONS, b"[1, 2]", 400, "JSON object"),
    ("POST", COMPLETIONS, b"\xff\xfe", 400, "UTF-8"),
    ("POST", COMPLETIONS, json.dumps({"model": "m"}), 400, "messages is required"),
    ("POST", COMPLETIONS, _with(messages="hi"), 400, "messages must be a list"),
    ("POST", COMPLETIONS, _with(messages=[]), 400, "messages is empty"),
    ("POST", COMPLETIONS, _with(messages=["hi"]), 400, "messages[0] must be an object"),
    ("POST", COMPLETIONS, _with(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role"),
    ("POST", COMPLETIONS, _with(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("POST", COMPLETIONS, _with(messages=[{"role": "user"}]), 400, "messages[0].content is missing"),
    ("POST", COMPLETIONS, _with(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "only text"),
    ("POST", COMPLETIONS, _with(messages=[{"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}]), 400, "last message"),
    ("POST", COMPLETIONS, _with(messages=[{"role": "user", "content": "   "}]), 400, "message is empty"),
    ("POST", COMPLETIONS, _with(messages=[{"role": "user", "content": "x" * (MAX_INPUT + 1)}]), 400,
     "model.max_input_chars"),
    ("POST", COMPLETIONS, _with(temperature="hot"), 400, "temperature must be a number"),
    ("POST", COMPLETIONS, _with(temperature=9), 400, "temperature must be between 0 and 2"),
    ("POST", COMPLETIONS, _with(top_p=1.5), 400, "top_p"),
    ("POST", COMPLETIONS, _with(max_tokens=0), 400, "max_tokens"),
    ("POST", COMPLETIONS, _with(max_tokens=True), 400, "max_tokens must be an integer"),
    ("POST", COMPLETIONS, _with(max_completion_tokens=2.5), 400, "max_completion_tokens"),
    ("POST", COMPLETIONS, _with(seed="x"), 400, "seed"),
    ("POST", COMPLETIONS, _with(stream="yes"), 400, "stream must be true or false"),
    ("POST", COMPLETIONS, _with(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("POST", COMPLETIONS, _with(stop=7), 400, "stop"),
    ("POST", COMPLETIONS, _with(n=2), 400, "n must be 1"),
    ("POST", COMPLETIONS, _with(user=5), 400, "user must be a string"),
    ("POST", COMPLETIONS, _with(model=5), 400, "model must be a string"),
    ("POST", COMPLETIONS, _with(conversation_id=["x"]), 400, "conversation_id"),
    ("POST", COMPLETIONS, _with(stream_options="x"), 400, "stream_options"),
    ("POST", COMPLETIONS, json.dumps({**GOOD, "messages": [{"role": "user", "content": "y" * MAX_BODY}]}),
     413, f"limit of {MAX_BODY} bytes"),
    ("POST", "/api/exchanges/999999/feedback", json.dumps({"user": "u", "rating": "up"}), 404,
     "exchange 999999 not found"),
    ("POST", "/api/exchanges/abc/feedback", json.dumps({"user": "u", "rating": "up"}), 400, "whole number"),
    ("POST", "/api/exchanges/{id}/feedback", json.dumps({"user": "u", "rating": "meh"}), 400,
     "rating must be up, down or none"),
    ("POST", "/api/exchanges/{id}/feedback", json.dumps({"user": "u", "rating": 1}), 400, "rating must be"),
    ("POST", "/api/exchanges/{id}/feedback", json.dumps({"rating": "up"}), 400, "user is required"),
    ("POST", "/api/exchanges/{id}/feedback", json.dumps({"user": "u"}), 400, "send \"rating\""),
    ("POST", "/api/exchanges/{id}/feedback", json.dumps({"user": "u", "correction": 3}), 400,
     "correction must be a string"),
    ("POST", "/api/exchanges/{id}/feedback", json.dumps({"user": "u", "correction": " "}), 400,
     "correction is empty"),
    ("POST", "/api/exchanges/{id}/feedback", json.dumps({"user": "u", "correction": "z" * (MAX_INPUT + 1)}),
     400, "model.max_input_chars"),
    ("POST", "/api/exchanges/{id}/feedback", b"nope", 400, "not valid JSON"),
    ("GET", "/api/dashboard?bucket=soon", None, 400, "bucket"),
    ("GET", "/v1/models/no-such-model", None, 404, "not found"),
    ("GET", COMPLETIONS, None, 405, "not allowed"),
    ("GET", "/no/such/page", None, 404, "no route"),
]


async def test_bad_input_gets_a_4xx_json_error(server, http):
    base, svc = server
    ex = svc.store.add_exchange(platform="api", user="u", conversation_id="c", messages=[], prompt="p",
                                reply="r", model_version="v")
    before = svc.store.query("SELECT (SELECT COUNT(*) FROM exchanges) AS e, (SELECT COUNT(*) FROM ratings) AS r, "
                             "(SELECT COUNT(*) FROM corrections) AS c")
    failures = []
    for method, path, body, status, words in BAD:
        headers = {"Content-Type": "application/json"}
        async with http.request(method, base + path.replace("{id}", str(ex.id)), data=body,
                                headers=headers) as r:
            text = await r.text()
            try:
                err = json.loads(text)["error"]
                ok = r.status == status and words in err["message"] and err["type"]
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                failures.append(f"{method} {path} {str(body)[:60]}: got {r.status} {text[:200]}")
    assert not failures, "\n".join(failures)
    # Nothing was stored by any of them.
    after = svc.store.query("SELECT (SELECT COUNT(*) FROM exchanges) AS e, (SELECT COUNT(*) FROM ratings) AS r, "
                            "(SELECT COUNT(*) FROM corrections) AS c")
    assert before == after


async def test_engine_busy_is_a_503_with_retry_after(server, http, client):
    base, svc = server
    # Hold the engine thread between two steps (on an event, not on timing), so
    # the two fillers keep both batch slots however fast or slow the machine is.
    gate, entered = threading.Event(), threading.Event()

    def hold():
        entered.set()
        gate.wait(60)

    held = asyncio.ensure_future(svc.engine.run_between(hold))
    assert await asyncio.to_thread(entered.wait, 60)
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    fillers = [svc.engine.submit([{"role": "user", "content": "fill"}], long) for _ in range(2)]
    try:
        async with http.post(base + COMPLETIONS, json=GOOD) as r:
            status, body, retry = r.status, await r.json(), r.headers.get("Retry-After")
        with pytest.raises(openai.InternalServerError):  # the official client sees a 503 too
            await client.chat.completions.create(**GOOD)
    finally:
        gate.set()
        await held
        for f in fillers:
            svc.engine.cancel(f.request_id)
            async for _ in f:
                pass
    assert status == 503, body
    assert body["error"]["type"] == "engine_busy" and "busy" in body["error"]["message"]
    assert retry == "1"
    # Once the fillers are gone the same request is served.
    async with http.post(base + COMPLETIONS, json=GOOD) as r:
        assert r.status == 200, await r.text()


# -- metrics, dashboard, pages, health ---------------------------------------------------------------


async def scrape(http, base) -> dict[tuple[str, tuple], float]:
    async with http.get(base + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_requests_tokens_and_ratings(server, client, http):
    base, svc = server
    before = await scrape(http, base)
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "metrics"}])
    ex = svc.store.exchange(int(r.id))
    async with http.post(f"{base}/api/exchanges/{ex.id}/feedback", json={"user": "mia", "rating": "down"},
                         headers={"X-Tuneloop-Client": "web"}) as resp:
        assert resp.status == 200
    after = await scrape(http, base)

    def grew(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert grew("tuneloop_requests_total", platform="api", outcome=ex.finish_reason) == 1
    assert grew("tuneloop_prompt_tokens_total", platform="api") == ex.prompt_tokens
    assert grew("tuneloop_completion_tokens_total", platform="api") == ex.completion_tokens
    assert grew("tuneloop_request_duration_seconds_count", platform="api") == 1
    assert grew("tuneloop_ratings_total", platform="web", rating="down") == 1
    for name in ("tuneloop_engine_queue_depth", "tuneloop_engine_active_sequences",
                 "tuneloop_engine_tokens_per_second"):
        assert (name, ()) in after, name


async def test_cancelled_reply_is_not_reported_as_stop(server, http):
    base, svc = server
    held = HeldEngine(svc.chat.engine)
    svc.chat.engine = held
    try:
        async with http.post(base + COMPLETIONS, json={**GOOD, "stream": True, "max_tokens": 24}) as r:
            assert r.status == 200
            await asyncio.wait_for(held.held.wait(), 30)
            held._engine.cancel(held.request_ids[-1])
            held.release.set()
            events = [line[6:] for line in (await r.text()).splitlines() if line.startswith("data: ")]
    finally:
        held.release.set()
        svc.chat.engine = held._engine
    final = json.loads(events[-2])
    assert events[-1] == "[DONE]" and svc.store.exchange(final["exchange_id"]).finish_reason == "cancelled"
    assert final["choices"][0]["finish_reason"] == "cancelled"


async def test_dashboard_json(server, http):
    base, svc = server
    async with http.get(base + "/api/dashboard") as r:
        assert r.status == 200
        data = await r.json()
    stats = svc.store.stats()
    assert data["totals"]["exchanges"] == stats["exchanges"] > 0
    assert sum(p["exchanges"] for p in data["timeline"]) == stats["exchanges"]
    assert sum(p["down"] for p in data["timeline"]) == stats["ratings"]["down"]
    assert {v["version"]: v["exchanges"] for v in data["versions"]} == {
        k: v["exchanges"] for k, v in stats["by_version"].items()}
    assert data["corrections"] and {"prompt", "reply", "correction", "user"} <= set(data["corrections"][0])
    assert {"queued", "active", "tokens_per_s"} <= set(data["engine"])
    assert data["engine"]["decode_step"] == "fused"  # the tiny model is a Llama
    async with http.get(base + "/api/dashboard?bucket=300") as r:
        assert (await r.json())["bucket_s"] == 300


async def test_pages_are_self_contained(server, http):
    base, _ = server
    for path in ("/", "/dashboard"):
        async with http.get(base + path) as r:
            assert r.status == 200 and r.content_type == "text/html"
            html = await r.text()
        for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert not ref.startswith(("http:", "https:", "//")), ref  # nothing from the internet
            if ref.startswith("/static/"):
                async with http.get(base + ref) as r:
                    assert r.status == 200, ref
    for f in STATIC.iterdir():
        text = f.read_text().replace("http://www.w3.org/2000/svg", "")  # a namespace, not a fetch
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text), f.name


async def test_healthz(server, http):
    base, svc = server
    async with http.get(base + "/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"


async def test_database_is_consistent(config_file):
    db = sqlite3.connect(load(config_file).storage.path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        db.close()


async def test_concurrent_streams(server, client):
    _, svc = server

    async def one(i):
        s = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"hi {i}"}],
                                                 stream=True, max_tokens=8)
        parts, last = [], None
        async for c in s:
            parts.append(c.choices[0].delta.content or "")
            last = c
        return "".join(parts), int(last.id)

    for text, exchange_id in await asyncio.gather(one(1), one(2)):
        assert svc.store.exchange(exchange_id).reply == text


# -- the dashboard's review queue ----------------------------------------------------------------

def pending_correction(svc, community: str, prompt: str, text: str, user: str = "mallory") -> int:
    """A correction through a non-admin HTTP key's channel: it waits for review (``[trust] http``)."""
    ex = svc.store.add_exchange(platform="api", user=user, conversation_id=f"api-{prompt}",
                                messages=[{"role": "user", "content": prompt}], prompt=prompt, reply="no idea",
                                model_version="base", community=community)
    decision = svc.feedback.correct(ex.id, user, text, platform="api", community=community, channel="http")
    assert decision.status == "pending"
    return decision.correction_id


async def review(http, base, correction_id, decision, headers=None, **kwargs):
    async with http.post(f"{base}/api/corrections/{correction_id}/review", headers=headers,
                         **({"json": {"decision": decision}} | kwargs)) as r:
        return r.status, await r.json()


async def test_operator_reviews_every_communitys_queue_from_the_dashboard(server, http):
    base, svc = server
    a = pending_correction(svc, "http:acme", "capital of atlantis", "Poseidonia")
    z = pending_correction(svc, "http:zeta", "best editor", "ed")
    async with http.get(base + "/api/dashboard") as r:
        data = await r.json()
    queue = {c["id"]: c for c in data["review_queue"]}
    assert {a, z} <= set(queue) and data["totals"]["review"] >= 2
    assert (queue[a]["community"], queue[a]["prompt"], queue[a]["correction"]) == (
        "http:acme", "capital of atlantis", "Poseidonia")

    status, out = await review(http, base, a, "approve")
    assert status == 200 and out["correction"]["status"] == "live" and out["correction"]["community"] == "http:acme"
    row = svc.store.correction(a)
    assert (row["status"], row["reviewed_by"]) == ("live", "web:operator")
    status, out = await review(http, base, z, "reject")
    assert status == 200 and svc.store.correction(z)["status"] == "rejected"
    async with http.get(base + "/api/dashboard") as r:
        assert not {a, z} & {c["id"] for c in (await r.json())["review_queue"]}

    # Bad input: one line each, and nothing changes.
    status, out = await review(http, base, z, "approve")
    assert status == 400 and out["error"]["message"] == f"correction {z} is rejected, not pending review"
    status, out = await review(http, base, 10**9, "approve")
    assert status == 404 and out["error"]["message"] == f"correction {10**9} not found"
    status, out = await review(http, base, "abc", "approve")
    assert status == 400 and "whole number" in out["error"]["message"]
    status, out = await review(http, base, a, "maybe")
    assert status == 400 and out["error"]["message"] == 'decision must be "approve" or "reject", got "maybe"'
    # A form post (what a page on another site can send without asking) is refused.
    c = pending_correction(svc, "http:acme", "tallest tree", "Hyperion")
    status, out = await review(http, base, c, None, json=None, data={"decision": "approve"})
    assert status == 400 and "Content-Type: application/json" in out["error"]["message"]
    assert svc.store.correction(c)["status"] == "pending" and "\n" not in out["error"]["message"]


KEYS = {"TL_WEB_ACME_ADMIN": "acme-admin-key", "TL_WEB_ACME_USER": "acme-user-key",
        "TL_WEB_ZETA_ADMIN": "zeta-admin-key"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keyed(tiny_model, tmp_path_factory):
    from tuneloop.config import parse

    d = tmp_path_factory.mktemp("web-keys")
    keys = [{"community": "acme", "key_env": "TL_WEB_ACME_ADMIN", "admin": True},
            {"community": "acme", "key_env": "TL_WEB_ACME_USER"},
            {"community": "zeta", "key_env": "TL_WEB_ZETA_ADMIN", "admin": True}]
    config = parse({"model": {"base": str(tiny_model), "device": "cpu", "max_new_tokens": 8},
                    "storage": {"path": str(d / "tuneloop.db")}, "server": {"api_keys": keys},
                    "trainer": {"enabled": False}}, d)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in KEYS.items():
            mp.setenv(name, value)
        async with services(config) as svc, serving(svc) as base:
            yield base, svc


def bearer(env: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[env]}"}


async def test_admin_key_reviews_its_own_community_only(keyed, http):
    base, svc = keyed
    acme = pending_correction(svc, "http:acme", "capital of atlantis", "Poseidonia")
    zeta = pending_correction(svc, "http:zeta", "best editor", "ed")
    async with http.get(base + "/api/dashboard", headers=bearer("TL_WEB_ACME_ADMIN")) as r:
        assert [c["id"] for c in (await r.json())["review_queue"]] == [acme]

    status, out = await review(http, base, zeta, "approve", headers=bearer("TL_WEB_ACME_ADMIN"))
    assert status == 404 and out["error"]["message"] == f"correction {zeta} not found"
    status, _ = await review(http, base, acme, "approve", headers=bearer("TL_WEB_ACME_USER"))
    assert status == 403
    status, _ = await review(http, base, acme, "approve")
    assert status == 401
    assert svc.store.correction(acme)["status"] == svc.store.correction(zeta)["status"] == "pending"

    status, out = await review(http, base, acme, "approve", headers=bearer("TL_WEB_ACME_ADMIN"))
    assert status == 200 and out["correction"]["status"] == "live"
    assert svc.store.correction(acme)["reviewed_by"] == "web:TL_WEB_ACME_ADMIN"
    status, out = await review(http, base, zeta, "reject", headers=bearer("TL_WEB_ZETA_ADMIN"))
    assert status == 200 and svc.store.correction(zeta)["status"] == "rejected"
