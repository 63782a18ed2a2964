"""Trust (issue 12): the review queue, quorum, blocking and weighted ratings,
through the real HTTP API (a non-admin key: corrections wait for review), the
CLI on the same database, and the store's training and export rows."""

from __future__ import annotations

import json
import os
import secrets

import aiohttp
import pytest
import pytest_asyncio

from bot import cli
from bot.runtime import services
from tests.serving import serving
from trainer.data import export, feedback_items
from tuneloop.learning.trust import agree_key, normalise
from tuneloop.store import MIGRATIONS, Store

KEY, ADMIN_KEY = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
C = "http:town"
QUESTION = "What is the capital of France?"
in_module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def config_file(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    path = d / "config.toml"
    path.write_text(f"""
[model]
base = "{tiny_model}"
device = "cpu"
max_new_tokens = 3

[storage]
path = "{d / 'tuneloop.db'}"

[server]
[[server.api_keys]]
community = "town"
key_env = "TL_TRUST_KEY"

[[server.api_keys]]
community = "town"
key_env = "TL_TRUST_ADMIN"
admin = true

[trainer]
enabled = false

[trust]
quorum = 3
""")
    return path


@pytest.fixture(scope="module", autouse=True)
def keys_in_env():
    os.environ.update(TL_TRUST_KEY=KEY, TL_TRUST_ADMIN=ADMIN_KEY)
    yield
    for k in ("TL_TRUST_KEY", "TL_TRUST_ADMIN"):
        os.environ.pop(k, None)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(config_file):
    from tuneloop.config import load

    async with services(load(config_file)) as svc, serving(svc) as base, aiohttp.ClientSession() as http:
        yield base, svc, http


async def ask(server, text: str, key: str = KEY) -> int:
    base, _, http = server
    async with http.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "m", "messages": [{"role": "user", "content": text}]}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["exchange_id"]


async def give(server, exchange_id: int, body: dict, key: str = KEY) -> dict:
    base, _, http = server
    async with http.post(f"{base}/api/exchanges/{exchange_id}/feedback", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def run_cli(config_file, capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["--config", str(config_file), *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- the troll ----------------------------------------------------------------------------------------


@in_module_loop
async def test_a_trolls_corrections_and_downvotes_teach_nothing(server, config_file, capsys):
    """10 wrong corrections and 50 👎 on good answers from one user of a community under review:
    not served, not trained on, not exported; after `tuneloop block`, gone from the queue."""
    _, svc, _ = server
    store = svc.store
    good = [await ask(server, f"good question {i}") for i in range(50)]
    for eid in good[:10]:  # three regulars like ten of the answers
        for fan in ("ann", "ben", "cat"):
            await give(server, eid, {"user": fan, "rating": "up"})
    for eid in good:
        await give(server, eid, {"user": "troll", "rating": "down"})
    wrong = [await ask(server, f"troll bait {i}") for i in range(10)]
    for i, eid in enumerate(wrong):
        out = await give(server, eid, {"user": "troll", "correction": f"The moon is cheese, {i}."})
        assert out["correction"]["status"] == "pending"

    queue = store.scoped(C).review_queue()
    assert [r["user"] for r in queue] == ["troll"] * 10
    # Not served: a pending correction is no memory item, and the same question gets none.
    assert all(m["user"] != "troll" for m in store.memory_items())
    again = await ask(server, "troll bait 3")
    assert store.memory_uses(again) == []
    # Not trained on: the troll weighs ~0, so their 👎 leave no exchange rated down, and
    # their corrections are in no training row.
    weights = {w["user"]: w for w in store.scoped(C).rating_weights()}
    assert weights["troll"]["weight"] < 0.1 and weights["troll"]["overlaps"] == 10
    assert min(weights[u]["weight"] for u in ("ann", "ben", "cat")) > 0.8
    items = feedback_items(store.scoped(C))
    assert [it["exchange_id"] for it in items] == good[:10]
    assert {it["verdict"] for it in items} == {"up"} and not any(it["corrections"] for it in items)
    for fmt in ("sft", "kto", "dpo"):
        rows = export(store.scoped(C), fmt)
        assert "cheese" not in json.dumps(rows)
        assert not [r for r in rows if r.get("label") is False]
    rc, out, _ = run_cli(config_file, capsys, "export", "--format", "kto", "--community", C)
    assert rc == 0 and "cheese" not in out and out.count("\n") == 10

    rc, out, _ = run_cli(config_file, capsys, "block", "troll", "--community", C)
    assert rc == 0 and "10 pending corrections dropped" in out
    assert store.scoped(C).review_queue() == []
    rc, out, _ = run_cli(config_file, capsys, "review", "--community", C)
    assert rc == 0 and out.strip() == "Nothing waits for review."
    # Kept, not lost; and from now on nothing of theirs counts, new corrections included.
    assert {c["status"] for c in store.corrections(in_effect=False) if c["user"] == "troll"} == {"rejected"}
    assert "troll" not in {w["user"] for w in store.scoped(C).rating_weights()}
    out = await give(server, good[0], {"user": "troll", "correction": "Cheese again."})
    assert out["correction"]["status"] == "rejected" and store.scoped(C).review_queue() == []
    print(f"\ntroll: queue after block {len(store.scoped(C).review_queue())}, "
          f"export rows with its text {sum('cheese' in json.dumps(r) for r in export(store, 'sft'))}, "
          f"training items rated down {sum(it['verdict'] == 'down' for it in feedback_items(store))}")


# -- review, quorum, admins ---------------------------------------------------------------------------


@in_module_loop
async def test_quorum_of_agreeing_users_makes_a_correction_live(server):
    _, svc, _ = server
    store = svc.store
    first = await ask(server, QUESTION)
    second = await ask(server, "what is the capital of france")
    a = await give(server, first, {"user": "u1", "correction": "Paris."})
    b = await give(server, second, {"user": "u2", "correction": "  paris "})  # the same answer, normalised
    again = await give(server, first, {"user": "u1", "correction": "PARIS"})  # one user twice is one vote
    assert {a["correction"]["status"], b["correction"]["status"], again["correction"]["status"]} == {"pending"}
    assert store.corrections(first) == [] and store.corrections(second) == []
    other = await give(server, second, {"user": "u3", "correction": "Lyon."})  # disagrees: no vote
    assert other["correction"]["status"] == "pending"
    third = await give(server, first, {"user": "u3", "correction": "Paris!"})
    assert third["correction"]["status"] == "live"
    live = {c["id"] for c in store.corrections(in_effect=True)}
    assert {a["correction"]["id"], b["correction"]["id"], again["correction"]["id"],
            third["correction"]["id"]} <= live
    assert other["correction"]["id"] not in live
    assert [r["id"] for r in store.scoped(C).review_queue()] == [other["correction"]["id"]]
    # Live means a memory item now, each in its community.
    assert {m["community"] for m in store.memory_items() if m["correction_id"] in live} == {C}


@in_module_loop
async def test_admin_key_corrections_are_live_and_the_cli_reviews(server, config_file, capsys):
    _, svc, _ = server
    store = svc.store
    eid = await ask(server, "who keeps the keys")
    assert (await give(server, eid, {"user": "boss", "correction": "Mo does."}, ADMIN_KEY))[
        "correction"]["status"] == "live"
    pending = (await give(server, eid, {"user": "newbie", "correction": "Jo does."}))["correction"]["id"]
    rejected = (await give(server, eid, {"user": "newbie", "correction": "Nobody."}))["correction"]["id"]
    rc, out, _ = run_cli(config_file, capsys, "review", "--json", "--community", C)
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and {pending, rejected} <= {r["id"] for r in rows}
    assert {"id", "exchange_id", "user", "correction", "community", "prompt", "reply", "agreeing"} <= set(rows[0])
    assert run_cli(config_file, capsys, "approve", str(pending))[1].strip() == f"correction {pending} ({C}): live"
    assert run_cli(config_file, capsys, "reject", str(rejected))[1].strip() == f"correction {rejected} ({C}): rejected"
    assert [c["text"] for c in store.corrections(eid)] == ["Mo does.", "Jo does."]
    # Bad input: one line each, nothing changed.
    for args, message in ((("approve", "99999"), "correction 99999 not found"),
                          (("reject", "abc"), "correction id must be a whole number, got 'abc'"),
                          (("approve", "0"), "correction id must be positive"),
                          (("approve", str(pending)), f"correction {pending} is live, not pending review"),
                          (("review", "--community", "http:nowhere"), "community 'http:nowhere' not found"),
                          (("block", "x", "--community", "http:b a d"), "may hold only letters")):
        rc, out, err = run_cli(config_file, capsys, *args)
        assert rc == 1 and out == "" and err.startswith("tuneloop: error: ") and message in err, err
        assert err.count("\n") == 1
    assert [c["text"] for c in store.corrections(eid)] == ["Mo does.", "Jo does."]


# -- weighted ratings, normalisation, migration --------------------------------------------------------


def _exchange(store: Store, community: str = "local", user: str = "asker"):
    return store.add_exchange(platform="api", user=user, conversation_id="c", messages=[{"role": "user",
                              "content": "q"}], prompt="q", reply="a", model_version="v", community=community)


def test_one_users_stream_of_downvotes_moves_nothing(tmp_path):
    with Store(tmp_path / "w.db") as store:
        shared = [_exchange(store) for _ in range(8)]
        only_troll = [_exchange(store) for _ in range(30)]
        for ex in shared:
            store.rate(ex.id, "ann", "up")
            store.rate(ex.id, "ben", "up")
            store.rate(ex.id, "troll", "down")
        for ex in only_troll:
            store.rate(ex.id, "troll", "down")
        newcomer = _exchange(store)
        store.rate(newcomer.id, "new", "down")  # no overlap: a neutral 0.5, still counted
        weights = {w["user"]: w["weight"] for w in store.rating_weights()}
        assert weights["troll"] < 0.2 < 0.5 == weights["new"] < weights["ann"] == weights["ben"]
        scores = {r["id"]: r["score"] for r in store.feedback_exchanges()}
        assert all(scores[ex.id] > 0 for ex in shared)
        assert all(scores[ex.id] == 0 for ex in only_troll)  # the troll counts for nothing
        assert scores[newcomer.id] == -0.5
        rows = store.weighted_ratings()
        assert {r["weight"] for r in rows if r["user"] == "troll"} == {0.0}
        # Communities weigh apart: the same user id elsewhere starts fresh.
        elsewhere = _exchange(store, "http:b")
        store.rate(elsewhere.id, "troll", "down")
        assert store.scoped("http:b").rating_weights()[0]["weight"] == 0.5


def test_normalised_agreement():
    assert normalise("  Paris.\n") == normalise("PARIS") == normalise("“paris”") == "paris"
    assert normalise("New   York!") == "new york"
    assert agree_key(QUESTION, "Paris.") == agree_key("what is the capital of france", "paris")
    assert agree_key(QUESTION, "Paris") != agree_key(QUESTION, "Lyon")
    assert agree_key("capital of France?", "Paris") != agree_key("capital of Spain?", "Paris")


def test_migration_keeps_old_corrections_live_in_the_local_community(tmp_path):
    path = tmp_path / "old.db"
    old = Store(path, migrations=MIGRATIONS[:5])
    ex = old.add_exchange(platform="slack", user="u", conversation_id="c", messages=[], prompt="p", reply="r",
                          model_version="v")
    old.rate(ex.id, "b", "up")
    with old.transaction():
        old.db.execute("INSERT INTO corrections (exchange_id, user, text, created_at) VALUES (?, 'b', 'R', 0)",
                       [ex.id])
    old.close()
    with Store(path) as new:
        assert new.exchange(ex.id).community == "local"
        (c,) = new.corrections(ex.id)
        assert c["status"] == "live"
        assert [m["community"] for m in new.memory_items()] == ["local"]
        assert new.communities() == ["local"]


@pytest.mark.parametrize("raw, message", [
    ({"trust": {"discord": "maybe"}}, 'trust.discord: must be one of "", live, review, got \'maybe\''),
    ({"trust": {"corrections": ""}}, "trust.corrections: must be one of live, review, got ''"),
    ({"trust": {"quorum": 1}}, "trust.quorum: must be >= 2, got 1"),
    ({"server": {"api_keys": [{"community": "acme"}]}}, "server.api_keys: key_env is required"),
    ({"discord": {"dm_community": "dm:discord:a b"}}, "discord.dm_community: community"),
])
def test_bad_trust_and_key_config_is_one_line(tmp_path, raw, message):
    from tuneloop.config import parse
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        parse(raw, tmp_path)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
