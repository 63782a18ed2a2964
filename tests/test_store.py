"""The SQLite store: one rating per user per exchange, corrections, migrations, foreign files."""

from __future__ import annotations

import ast
import json
import sqlite3
from pathlib import Path

import pytest

from tuneloop.errors import InputError, NotFoundError, StoreError
from tuneloop.store import MIGRATIONS, SCHEMA_VERSION, Store


def add(store: Store, user="alice", prompt="hi", reply="hello", conversation="c1", **kw):
    return store.add_exchange(platform=kw.pop("platform", "cli"), user=user, conversation_id=conversation,
                              messages=[{"role": "user", "content": prompt}], prompt=prompt,
                              reply=reply, model_version=kw.pop("model_version", "starter"), **kw)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "t.db")
    yield s
    s.close()


def test_wal_mode_and_schema_version(store):
    assert store.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    assert store.schema_version == SCHEMA_VERSION


def test_exchange_round_trip_keeps_context_and_timings(store):
    ex = add(store, prompt="你好", reply="嗨", prompt_tokens=5, completion_tokens=2, total_ms=12.5,
             channel="C1", thread="T1")
    got = store.exchange(ex.id)
    assert got.messages == [{"role": "user", "content": "你好"}]
    assert (got.prompt, got.reply, got.channel, got.thread) == ("你好", "嗨", "C1", "T1")
    assert (got.prompt_tokens, got.completion_tokens, got.total_ms) == (5, 2, 12.5)


def test_one_rating_per_user_per_exchange(store):
    ex = add(store)
    store.rate(ex.id, "bob", "up")
    store.rate(ex.id, "bob", "down")  # replaces
    store.rate(ex.id, "carol", "up")
    assert store.ratings(ex.id) == {"bob": "down", "carol": "up"}
    assert store.query("SELECT COUNT(*) AS n FROM ratings")[0]["n"] == 2
    store.rate(ex.id, "bob", None)  # removes
    assert store.ratings(ex.id) == {"carol": "up"}
    store.rate(ex.id, "bob", None)  # removing twice is harmless
    assert store.ratings(ex.id) == {"carol": "up"}


def test_bad_rating_and_unknown_exchange_store_nothing(store):
    ex = add(store)
    with pytest.raises(InputError, match="up, down or none"):
        store.rate(ex.id, "bob", "meh")
    with pytest.raises(NotFoundError, match="exchange 999 not found"):
        store.rate(999, "bob", "up")
    with pytest.raises(NotFoundError):
        store.add_correction(999, "bob", "better")
    assert store.query("SELECT COUNT(*) AS n FROM ratings")[0]["n"] == 0
    assert store.query("SELECT COUNT(*) AS n FROM corrections")[0]["n"] == 0


def test_corrections_are_kept_with_who_and_when(store):
    ex = add(store)
    store.add_correction(ex.id, "bob", "Hello there!")
    [c] = store.corrections(ex.id)
    assert (c["user"], c["text"]) == ("bob", "Hello there!")
    assert c["created_at"] > 0


def test_stats_per_platform_and_version(store):
    a = add(store, platform="cli", model_version="starter")
    b = add(store, platform="slack", model_version="v1")
    store.rate(a.id, "u1", "up")
    store.rate(a.id, "u2", "up")
    store.rate(b.id, "u1", "down")
    store.add_correction(b.id, "u1", "x")
    s = store.stats()
    assert s["exchanges"] == 2 and s["ratings"] == {"up": 2, "down": 1} and s["corrections"] == 1
    assert s["approval_rate"] == pytest.approx(2 / 3, abs=1e-3)
    assert s["by_platform"]["slack"]["ratings"] == {"up": 0, "down": 1}
    assert s["by_version"]["starter"]["approval_rate"] == 1.0


def test_forget_user_deletes_everything_of_theirs_and_opts_out(store):
    mine = add(store, user="dave")
    other = add(store, user="erin")
    store.rate(other.id, "dave", "up")
    store.add_correction(other.id, "dave", "x")
    store.rate(mine.id, "erin", "down")
    counts = store.forget_user("dave")
    assert counts == {"ratings": 1, "corrections": 1, "exchanges": 1}
    assert store.query("SELECT COUNT(*) AS n FROM exchanges WHERE user = 'dave'")[0]["n"] == 0
    assert store.ratings(other.id) == {}
    assert "dave" in store.opted_out()
    assert store.exchange(other.id).user == "erin"


def test_every_part_of_a_split_reply_finds_its_exchange(store):
    ex = add(store, user="dave", platform="slack")
    store.set_reply_ref(ex.id, "1.0001", parts=["1.0002", "1.0003"])
    assert [store.exchange_by_ref("slack", ref).id for ref in ("1.0001", "1.0002", "1.0003")] == [ex.id] * 3
    assert store.exchange(ex.id).reply_ref == "1.0001"
    assert store.exchange_by_ref("discord", "1.0002") is None  # refs are per platform
    assert store.exchange_by_ref("slack", "9.9999") is None
    with pytest.raises(NotFoundError):
        store.set_reply_ref(ex.id + 100, "2.0001", parts=["2.0002"])
    assert store.query("SELECT COUNT(*) AS n FROM reply_parts")[0]["n"] == 2
    store.forget_user("dave")  # nothing of theirs stays, part ids included
    assert store.exchange_by_ref("slack", "1.0002") is None
    assert store.query("SELECT COUNT(*) AS n FROM reply_parts")[0]["n"] == 0


def test_first_sight_survives_reopening(tmp_path):
    s = Store(tmp_path / "t.db")
    assert s.first_sight("Ev1") is True
    assert s.first_sight("Ev1") is False
    s.close()
    s = Store(tmp_path / "t.db")
    assert s.first_sight("Ev1") is False
    s.close()


def test_migrates_an_older_schema_without_losing_rows(tmp_path):
    path = tmp_path / "old.db"
    old = Store(path, migrations=MIGRATIONS[:1])  # a database made by schema version 1
    assert old.schema_version == 1
    ex = add(old, prompt="old prompt")
    old.rate(ex.id, "bob", "up")
    old.close()
    new = Store(path)
    assert new.schema_version == SCHEMA_VERSION
    assert new.exchange(ex.id).prompt == "old prompt"
    assert new.exchange(ex.id).reply_ref is None
    assert new.ratings(ex.id) == {"bob": "up"}
    new.set_reply_ref(ex.id, "1700000000.000100")
    assert new.exchange_by_ref("cli", "1700000000.000100").id == ex.id
    new.close()


def test_a_failed_migration_leaves_the_database_as_it_was(tmp_path):
    path = tmp_path / "t.db"
    Store(path, migrations=MIGRATIONS[:1]).close()

    def broken(db):
        db.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Store(path, migrations=[MIGRATIONS[0], broken])
    s = Store(path, migrations=MIGRATIONS[:1], migrate=False)
    assert s.schema_version == 1
    assert "half_done" not in s.db.table_names()
    s.close()


def test_refuses_a_database_that_is_not_tuneloops(tmp_path):
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.execute("INSERT INTO invoices VALUES (1)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a tuneloop database"):
        Store(other)
    conn = sqlite3.connect(other)  # and it is untouched
    assert conn.execute("SELECT COUNT(*) FROM invoices").fetchone()[0] == 1
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["invoices"]
    conn.close()


def test_refuses_a_file_that_is_not_sqlite(tmp_path):
    junk = tmp_path / "notes.db"
    junk.write_text("just some notes, not a database\n" * 100)
    with pytest.raises(StoreError, match="not a tuneloop database"):
        Store(junk)
    assert junk.read_text().startswith("just some notes")


def test_refuses_a_newer_schema(tmp_path):
    path = tmp_path / "t.db"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE tuneloop_schema SET version = 999")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this tuneloop"):
        Store(path)


def test_pending_exchange_is_invisible_until_finished(store):
    eid = store.begin_exchange(platform="api", user="u", conversation_id="c9",
                               messages=[{"role": "user", "content": "q"}], prompt="q", model_version="m")
    assert store.conversation("c9") == [] and store.stats()["exchanges"] == 0
    ex = store.finish_exchange(eid, reply="a", finish_reason="stop", model_version="m", prompt_tokens=3,
                               completion_tokens=1, ttft_ms=1.0, total_ms=2.0)
    assert ex.reply == "a" and [e.id for e in store.conversation("c9")] == [eid]
    assert store.stats()["exchanges"] == 1
    other = store.begin_exchange(platform="api", user="u", conversation_id="c9",
                                 messages=[], prompt="q2", model_version="m")
    store.discard_exchange(other)
    with pytest.raises(NotFoundError):
        store.exchange(other)
    store.discard_exchange(eid)  # a finished exchange is never discarded
    assert store.exchange(eid).reply == "a"


# -- one definition of pending ------------------------------------------------------------------------


def test_dashboard_and_stats_count_the_same_exchanges(store, tmp_path, capsys):
    from bot.cli import main
    from bot.dashboard import dashboard

    a = add(store, platform="cli", model_version="v1")
    b = add(store, platform="slack", model_version="v2")
    store.rate(a.id, "u1", "up")
    store.rate(b.id, "u1", "down")
    # Two replies still streaming, one of them already rated (a reaction can come first).
    streaming = store.begin_exchange(platform="web", user="u2", conversation_id="c2",
                                     messages=[{"role": "user", "content": "q"}], prompt="q",
                                     model_version="v2")
    store.begin_exchange(platform="web", user="u3", conversation_id="c3",
                         messages=[{"role": "user", "content": "q"}], prompt="q", model_version="v3")
    store.rate(streaming, "u1", "up")

    board = dashboard(store)
    config = tmp_path / "config.toml"
    config.write_text(f'[storage]\npath = "{store.path}"\n')
    assert main(["--config", str(config), "stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)

    assert stats["exchanges"] == board["totals"]["exchanges"] == 2
    assert stats["pending"] == board["totals"]["pending"] == store.pending_exchanges() == 2
    assert sum(p["exchanges"] for p in board["timeline"]) == 2
    assert {v["version"]: v["exchanges"] for v in board["versions"]} == {
        k: v["exchanges"] for k, v in stats["by_version"].items()} == {"v1": 1, "v2": 1}
    assert sum(p["up"] for p in board["timeline"]) == stats["ratings"]["up"] == 1
    assert main(["--config", str(config), "stats"]) == 0
    assert "not counted: 2 exchanges pending" in capsys.readouterr().out

    store.finish_exchange(streaming, reply="done", finish_reason="stop", model_version="v2", prompt_tokens=1,
                          completion_tokens=1, ttft_ms=1.0, total_ms=2.0)
    board = dashboard(store)
    assert board["totals"]["exchanges"] == store.stats()["exchanges"] == 3
    assert board["totals"]["pending"] == 1
    assert sum(p["up"] for p in board["timeline"]) == store.stats()["ratings"]["up"] == 2


# -- training runs --------------------------------------------------------------------------------------


def test_training_run_rows(store):
    rid = store.add_training_run("cli", pid=123)
    assert store.training_run(rid)["status"] == "queued"
    store.update_training_run(rid, status="running", stage="train")
    with pytest.raises(InputError, match="no column bogus"):
        store.update_training_run(rid, bogus=1)
    with pytest.raises(InputError, match="status must be one of"):
        store.update_training_run(rid, status="paused")
    with pytest.raises(NotFoundError):
        store.update_training_run(rid + 1, stage="x")
    other = store.add_training_run("schedule")
    assert [r["id"] for r in store.training_runs(("queued", "running"))] == [rid, other]
    assert store.training_runs(("running",), newest_first=True, limit=1)[0]["id"] == rid
    # Ending is conditional: a run that finished on its own keeps its outcome.
    store.update_training_run(other, status="done")
    assert store.end_active_training_run(other, "cancelled", "stopped") is False
    assert store.end_active_training_run(rid, "cancelled", "stopped") is True
    row = store.training_run(rid)
    assert (row["status"], row["error"]) == ("cancelled", "stopped") and row["finished_at"] > 0
    assert store.training_run(other)["status"] == "done"


# -- all SQL in the store -----------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
#: Modules allowed to run their own SQL: none. Add a Store method instead.
SQL_ALLOWED: set[str] = set()
_SQL_CALLS = {"execute", "executemany", "executescript", "query"}


def sql_outside_store(source: str) -> list[str]:
    """Where ``source`` talks to the database itself: SQL calls, ``.db`` (sqlite-utils), sqlite imports."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _SQL_CALLS:
            found.append(f"line {node.lineno}: .{node.func.attr}(...)")
        elif isinstance(node, ast.Attribute) and node.attr == "db":
            found.append(f"line {node.lineno}: .db")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: import {n}" for n in names
                      if n.split(".")[0] in ("sqlite3", "sqlite_utils")]
    return found


def test_the_sql_check_finds_sql():
    assert len(sql_outside_store("import sqlite3\nstore.query('SELECT 1')\nstore.db['t'].insert({})\n"
                                 "store.db.execute('DELETE FROM t')\n")) == 5
    assert sql_outside_store("store.stats()\nrows = store.training_runs(('done',))\n") == []


def test_all_sql_is_in_the_store():
    offenders = {}
    for pkg in ("tuneloop", "bot", "trainer"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "tuneloop/store.py" or rel in SQL_ALLOWED:
                continue
            found = sql_outside_store(path.read_text(encoding="utf-8"))
            if found:
                offenders[rel] = found
    assert offenders == {}, f"SQL outside tuneloop/store.py (add a Store method): {offenders}"
