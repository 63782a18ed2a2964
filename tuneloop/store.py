"""The SQLite store: the schema, its migrations, and every query tuneloop makes.

One file (``[storage] path``), WAL mode so readers (the dashboard, the CLI,
the trainer) never block the writer. The schema is versioned in
``tuneloop_schema``; migrations run at open, each in its own transaction.
Every write a user's action causes is committed before the call returns, so
"stored" means stored.
"""

from __future__ import annotations

import copy
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from tuneloop.community import LOCAL
from tuneloop.errors import InputError, NotFoundError, StoreError

log = logging.getLogger(__name__)

RATING_VALUES = {"up": 1, "down": -1}

#: corrections.status values: live teaches, pending waits for review, rejected is kept unused.
CORRECTION_STATUSES = ("live", "pending", "rejected")

#: A rater whose agreement weight (``Store.rating_weights``) is below this
#: counts for nothing: (agreements + 1) / (overlaps + 2) < 0.2 takes four
#: disagreements with the others and no agreement, so a new user (0.5) or
#: one who sometimes differs still counts.
MIN_RATING_WEIGHT = 0.2
#: rounds of re-weighting: the others' majority is weighed with the last round's weights
_WEIGHT_ROUNDS = 3


def _not_blocked(user: str, community: str) -> str:
    """SQL: the user is not blocked in the community (or everywhere)."""
    return (f"NOT EXISTS (SELECT 1 FROM blocked_users b WHERE b.user = {user} "
            f"AND b.community IN ({community}, '*'))")

#: The one definition of an answered exchange (alias ``e``). A reply still
#: streaming, or left half-written by a crash, is ``pending``: never context,
#: never counted in figures (only as ``pending``), never trained on.
ANSWERED = "e.finish_reason IS NOT 'pending'"

#: training_runs.status values; the first two are a run still going.
RUN_STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE_RUN = RUN_STATUSES[:2]
_RUN_COLUMNS = frozenset({"reason", "status", "stage", "pid", "started_at", "finished_at", "data_cutoff",
                          "dataset_hash", "version", "promoted", "metrics", "error"})


def _m1_initial(db: sqlite_utils.Database) -> None:
    db.execute("""
        CREATE TABLE exchanges (
            id INTEGER PRIMARY KEY,
            created_at REAL NOT NULL,
            platform TEXT NOT NULL,
            channel TEXT NOT NULL DEFAULT '',
            thread TEXT NOT NULL DEFAULT '',
            user TEXT NOT NULL,
            conversation_id TEXT NOT NULL,
            messages TEXT NOT NULL,          -- JSON: the whole context sent to the model
            prompt TEXT NOT NULL,            -- the user's message this exchange answers
            reply TEXT NOT NULL,
            model_version TEXT NOT NULL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            ttft_ms REAL,
            total_ms REAL,
            finish_reason TEXT
        )""")
    db.execute("CREATE INDEX exchanges_conversation ON exchanges(conversation_id, id)")
    db.execute("CREATE INDEX exchanges_user ON exchanges(user)")
    db.execute("CREATE INDEX exchanges_version ON exchanges(model_version)")
    db.execute("""
        CREATE TABLE ratings (
            exchange_id INTEGER NOT NULL REFERENCES exchanges(id) ON DELETE CASCADE,
            user TEXT NOT NULL,
            rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
            created_at REAL NOT NULL,
            PRIMARY KEY (exchange_id, user)
        )""")
    db.execute("""
        CREATE TABLE corrections (
            id INTEGER PRIMARY KEY,
            exchange_id INTEGER NOT NULL REFERENCES exchanges(id) ON DELETE CASCADE,
            user TEXT NOT NULL,
            text TEXT NOT NULL,
            created_at REAL NOT NULL
        )""")
    db.execute("CREATE INDEX corrections_exchange ON corrections(exchange_id)")


def _m2_platform_refs(db: sqlite_utils.Database) -> None:
    # Platforms rate and correct a reply by *their* message id (a Slack ts,
    # a Discord snowflake); opted-out users and already-handled event ids
    # must survive a restart.
    db.execute("ALTER TABLE exchanges ADD COLUMN reply_ref TEXT")
    db.execute("CREATE INDEX exchanges_reply_ref ON exchanges(platform, reply_ref)")
    db.execute("CREATE TABLE opt_outs (user TEXT PRIMARY KEY, created_at REAL NOT NULL)")
    db.execute("CREATE TABLE seen_events (event_id TEXT PRIMARY KEY, created_at REAL NOT NULL)")


def _m3_training_runs(db: sqlite_utils.Database) -> None:
    # One row per training run, written by the launcher (queued) and the run
    # process (stages, outcome). ``data_cutoff`` is the time the run read the
    # store: feedback stored after it is "new" for the next run.
    db.execute("""
        CREATE TABLE training_runs (
            id INTEGER PRIMARY KEY,
            reason TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL,            -- queued, running, done, failed
            stage TEXT NOT NULL DEFAULT '',  -- dataset, train, gate, registry
            pid INTEGER,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            data_cutoff REAL,
            dataset_hash TEXT,
            version TEXT,
            promoted INTEGER,
            metrics TEXT,                    -- JSON
            error TEXT
        )""")


def _m4_reply_parts(db: sqlite_utils.Database) -> None:
    # A reply longer than a platform message is posted as several; people
    # react to whichever part they read. ``exchanges.reply_ref`` keeps naming
    # the part the bot hints its reactions on; every other part is here.
    db.execute("""
        CREATE TABLE reply_parts (
            platform TEXT NOT NULL,
            ref TEXT NOT NULL,
            exchange_id INTEGER NOT NULL REFERENCES exchanges(id) ON DELETE CASCADE,
            PRIMARY KEY (platform, ref)
        )""")
    db.execute("CREATE INDEX reply_parts_exchange ON reply_parts(exchange_id)")


def _m5_memory(db: sqlite_utils.Database) -> None:
    # The fast memory of corrections (tuneloop.memory). A trigger makes every
    # correction an item in the same transaction that stores it, whichever
    # code path stores it; cascades delete it with its correction or exchange.
    # ``memory_generation`` counts changes so a serving process knows when its
    # cached matrix is stale with one tiny read per message.
    db.execute("""
        CREATE TABLE memory_items (
            id INTEGER PRIMARY KEY,
            correction_id INTEGER NOT NULL UNIQUE REFERENCES corrections(id) ON DELETE CASCADE,
            exchange_id INTEGER NOT NULL REFERENCES exchanges(id) ON DELETE CASCADE,
            prompt TEXT NOT NULL,            -- the corrected exchange's user message
            reply TEXT NOT NULL,             -- the correction
            user TEXT NOT NULL,              -- who corrected
            platform TEXT NOT NULL,
            community TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            status TEXT NOT NULL DEFAULT 'fast' CHECK (status IN ('fast', 'consolidated')),
            status_version TEXT,             -- the model version whose check set the status
            status_at REAL
        )""")
    db.execute("CREATE INDEX memory_items_exchange ON memory_items(exchange_id)")
    db.execute("""
        CREATE TABLE memory_vectors (
            item_id INTEGER PRIMARY KEY REFERENCES memory_items(id) ON DELETE CASCADE,
            encoder TEXT NOT NULL,
            vector BLOB NOT NULL             -- float32, little-endian
        )""")
    db.execute("""
        CREATE TABLE memory_uses (
            exchange_id INTEGER NOT NULL REFERENCES exchanges(id) ON DELETE CASCADE,
            item_id INTEGER NOT NULL REFERENCES memory_items(id) ON DELETE CASCADE,
            score REAL,
            PRIMARY KEY (exchange_id, item_id)
        )""")
    db.execute("CREATE INDEX memory_uses_item ON memory_uses(item_id)")
    db.execute("CREATE TABLE memory_generation (n INTEGER NOT NULL)")
    db.execute("INSERT INTO memory_generation VALUES (0)")
    item_from_correction = """
        INSERT INTO memory_items (correction_id, exchange_id, prompt, reply, user, platform, created_at)
        SELECT c.id, c.exchange_id, e.prompt, c.text, c.user, e.platform, c.created_at
        FROM corrections c JOIN exchanges e ON e.id = c.exchange_id"""
    db.execute(item_from_correction)
    db.execute(f"""
        CREATE TRIGGER memory_from_correction AFTER INSERT ON corrections BEGIN
            {item_from_correction} WHERE c.id = NEW.id;
        END""")
    for event in ("INSERT", "DELETE", "UPDATE OF status"):
        name = event.split()[0].lower()
        db.execute(f"""
            CREATE TRIGGER memory_generation_{name} AFTER {event} ON memory_items BEGIN
                UPDATE memory_generation SET n = n + 1;
            END""")


def _m6_communities_and_trust(db: sqlite_utils.Database) -> None:
    # Every exchange belongs to a community (tuneloop.community); its ratings,
    # corrections and memory items belong to it through the exchange, which is
    # why only exchanges carry the column. Rows from before communities were
    # one team's: "local".
    db.execute(f"ALTER TABLE exchanges ADD COLUMN community TEXT NOT NULL DEFAULT '{LOCAL}'")
    db.execute("CREATE INDEX exchanges_community ON exchanges(community, id)")
    db.execute(f"UPDATE memory_items SET community = '{LOCAL}' WHERE community = ''")
    # Trust: a correction is live (it teaches: a memory item, training data),
    # pending (it waits for an admin or a quorum) or rejected (kept, never
    # used). ``agree_key`` names the (question, answer) it gives, normalised,
    # so that distinct users giving the same one can be counted.
    db.execute("ALTER TABLE corrections ADD COLUMN status TEXT NOT NULL DEFAULT 'live' "
               "CHECK (status IN ('live', 'pending', 'rejected'))")
    db.execute("ALTER TABLE corrections ADD COLUMN agree_key TEXT")
    db.execute("ALTER TABLE corrections ADD COLUMN reviewed_by TEXT")
    db.execute("ALTER TABLE corrections ADD COLUMN reviewed_at REAL")
    db.execute("CREATE INDEX corrections_review ON corrections(status, agree_key)")
    db.execute("""
        CREATE TABLE blocked_users (
            community TEXT NOT NULL,         -- '*': every community
            user TEXT NOT NULL,
            created_at REAL NOT NULL,
            by TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (community, user)
        )""")
    # Only a live correction is a memory item: made when it is stored live or
    # approved, removed when it stops being live.
    db.execute("DROP TRIGGER memory_from_correction")
    item = """
        INSERT OR IGNORE INTO memory_items (correction_id, exchange_id, prompt, reply, user, platform,
                                            community, created_at)
        SELECT c.id, c.exchange_id, e.prompt, c.text, c.user, e.platform, e.community, c.created_at
        FROM corrections c JOIN exchanges e ON e.id = c.exchange_id WHERE c.id = NEW.id"""
    db.execute(f"CREATE TRIGGER memory_from_correction AFTER INSERT ON corrections "
               f"WHEN NEW.status = 'live' BEGIN {item}; END")
    db.execute(f"CREATE TRIGGER memory_from_approval AFTER UPDATE OF status ON corrections "
               f"WHEN NEW.status = 'live' BEGIN {item}; END")
    db.execute("CREATE TRIGGER memory_off_unapproval AFTER UPDATE OF status ON corrections "
               "WHEN NEW.status != 'live' BEGIN DELETE FROM memory_items WHERE correction_id = NEW.id; END")


def _m7_run_community(db: sqlite_utils.Database) -> None:
    # A training run trains one line of versions: a community's ([trainer]
    # scope = "community") or '*', every community's (scope = "global"). Runs
    # from before lines were per community trained on what migration 6 made
    # 'local''s: they are local's.
    db.execute(f"ALTER TABLE training_runs ADD COLUMN community TEXT NOT NULL DEFAULT '{LOCAL}'")


#: migration N brings the schema from version N-1 to N. Append, never edit.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_m1_initial, _m2_platform_refs,
                                                             _m3_training_runs, _m4_reply_parts,
                                                             _m5_memory, _m6_communities_and_trust,
                                                             _m7_run_community]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class Exchange:
    id: int
    created_at: float
    platform: str
    channel: str
    thread: str
    user: str
    conversation_id: str
    messages: list[dict[str, str]]
    prompt: str
    reply: str
    model_version: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    finish_reason: str | None = None
    reply_ref: str | None = None
    community: str = LOCAL

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Exchange:
        row = dict(row)
        row["messages"] = json.loads(row["messages"])
        return cls(**row)


class Store:
    """The tuneloop database. Thread-safe: one connection, one lock."""

    def __init__(self, path: str | Path, *, migrate: bool = True,
                 migrations: list[Callable[[sqlite_utils.Database], None]] | None = None):
        self.path = Path(path)
        self._migrations = MIGRATIONS if migrations is None else migrations
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        #: the community this view reads figures and training rows of; None: all (see ``scoped``)
        self.community: str | None = None
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30,
                                   isolation_level=None)  # we open transactions ourselves
            conn.execute("PRAGMA foreign_keys = ON")
            self.db = sqlite_utils.Database(conn)
            self._check_is_ours()
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a tuneloop database ({e})") from None
        if migrate:
            self.migrate()
            self.prune_seen_events()

    # -- schema -------------------------------------------------------------

    def _check_is_ours(self) -> None:
        tables = set(self.db.table_names())
        if tables and "tuneloop_schema" not in tables:
            raise StoreError(f"{self.path}: not a tuneloop database (it has tables "
                             f"{', '.join(sorted(tables)[:5])} but no tuneloop_schema)")

    @property
    def schema_version(self) -> int:
        if "tuneloop_schema" not in self.db.table_names():
            return 0
        row = self.db.execute("SELECT version FROM tuneloop_schema").fetchone()
        return row[0] if row else 0

    def migrate(self) -> None:
        with self._lock:
            if "tuneloop_schema" not in self.db.table_names():
                self.db.execute("CREATE TABLE tuneloop_schema (version INTEGER NOT NULL)")
                self.db.execute("INSERT INTO tuneloop_schema VALUES (0)")
            current = self.schema_version
            if current > len(self._migrations):
                raise StoreError(f"{self.path}: schema version {current} is newer than this "
                                 f"tuneloop knows ({len(self._migrations)}); upgrade tuneloop")
            for n in range(current, len(self._migrations)):
                with self.transaction():
                    self._migrations[n](self.db)
                    self.db.execute("UPDATE tuneloop_schema SET version = ?", [n + 1])
                log.info("store migrated: path=%s schema=%d", self.path, n + 1)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic, committed write. Nested use joins the outer transaction."""
        with self._lock:
            conn = self.db.conn
            if conn.in_transaction:
                yield
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        with self._lock:
            cur = self.db.execute(sql, params)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, row)) for row in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self.db.conn.close()

    def scoped(self, community: str | None) -> Store:
        """A view of this store whose figures and training rows are ``community``'s only.

        The methods a dashboard, ``stats``, ``export`` or a training run read
        (``stats``, ``timeline``, ``version_figures``, ``latest_corrections``,
        ``feedback_exchanges``, ``exchanges_without_feedback``,
        ``count_feedback_since``, ``memory_training_rows``, ``review_queue``,
        ``rating_weights``) honour it; it shares this store's connection and lock.
        """
        view = copy.copy(self)
        view.community = community
        return view

    def _scope(self, alias: str = "e") -> tuple[str, list[Any]]:
        """`` AND alias.community = ?`` and its parameter when scoped, else nothing."""
        if self.community is None:
            return "", []
        return f" AND {alias}.community = ?", [self.community]

    def communities(self) -> list[str]:
        """Every community that has an exchange, in order."""
        return [r["community"] for r in self.query("SELECT DISTINCT community FROM exchanges ORDER BY 1")]

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- exchanges ------------------------------------------------------------

    def add_exchange(self, *, platform: str, user: str, conversation_id: str,
                     messages: list[dict[str, str]], prompt: str, reply: str, model_version: str,
                     channel: str = "", thread: str = "", prompt_tokens: int | None = None,
                     completion_tokens: int | None = None, ttft_ms: float | None = None,
                     total_ms: float | None = None, finish_reason: str | None = None,
                     reply_ref: str | None = None, community: str = LOCAL) -> Exchange:
        row = dict(created_at=time.time(), platform=platform, channel=channel, thread=thread,
                   user=user, conversation_id=conversation_id,
                   messages=json.dumps(messages, ensure_ascii=False), prompt=prompt, reply=reply,
                   model_version=model_version, prompt_tokens=prompt_tokens,
                   completion_tokens=completion_tokens, ttft_ms=ttft_ms, total_ms=total_ms,
                   finish_reason=finish_reason)
        if reply_ref is not None:
            row["reply_ref"] = reply_ref
        if community != LOCAL:  # the column's default; a store on an older schema has no column
            row["community"] = community
        with self.transaction():
            cur = self.db.execute(
                f"INSERT INTO exchanges ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()))
            exchange_id = cur.lastrowid
        return self.exchange(exchange_id)

    def begin_exchange(self, **fields: Any) -> int:
        """Log an exchange whose reply is still streaming; ``finish_exchange`` completes it.

        Streaming clients get the exchange id with the first token. A row left
        ``pending`` by a crash is never used as context or counted in stats.
        """
        fields = {**fields, "reply": "", "finish_reason": "pending"}
        return self.add_exchange(**fields).id

    def finish_exchange(self, exchange_id: int, *, reply: str, finish_reason: str, model_version: str,
                        prompt_tokens: int | None, completion_tokens: int | None,
                        ttft_ms: float | None, total_ms: float | None) -> Exchange:
        with self.transaction():
            self.db.execute(
                "UPDATE exchanges SET reply = ?, finish_reason = ?, model_version = ?, prompt_tokens = ?, "
                "completion_tokens = ?, ttft_ms = ?, total_ms = ? WHERE id = ?",
                [reply, finish_reason, model_version, prompt_tokens, completion_tokens, ttft_ms, total_ms,
                 exchange_id])
        return self.exchange(exchange_id)

    def discard_exchange(self, exchange_id: int) -> None:
        """Remove a pending exchange whose reply never came (the request failed)."""
        with self.transaction():
            self.db.execute("DELETE FROM exchanges WHERE id = ? AND finish_reason = 'pending'", [exchange_id])

    def exchange(self, exchange_id: int, community: str | None = None) -> Exchange:
        """The exchange; with ``community``, one of that community's only: another's is
        "not found" just like a missing one, so an id reveals nothing across communities."""
        rows = self.query("SELECT * FROM exchanges WHERE id = ?", [exchange_id])
        if not rows or (community is not None and rows[0]["community"] != community):
            raise NotFoundError(f"exchange {exchange_id} not found")
        return Exchange.from_row(rows[0])

    def exchange_by_ref(self, platform: str, reply_ref: str, community: str | None = None) -> Exchange | None:
        """The exchange whose reply is (or includes) the platform message ``reply_ref``
        (in ``community``, when given)."""
        where, params = ("", []) if community is None else (" AND e.community = ?", [community])
        rows = self.query(f"SELECT * FROM exchanges e WHERE platform = ? AND reply_ref = ?{where} "
                          "ORDER BY id DESC LIMIT 1", [platform, reply_ref, *params])
        if not rows:
            rows = self.query("SELECT e.* FROM reply_parts p JOIN exchanges e ON e.id = p.exchange_id "
                              f"WHERE p.platform = ? AND p.ref = ?{where}", [platform, reply_ref, *params])
        return Exchange.from_row(rows[0]) if rows else None

    def set_reply_ref(self, exchange_id: int, reply_ref: str, parts: Sequence[str] = ()) -> None:
        """Name the platform message of a reply, and ``parts``: the others it was split into."""
        with self.transaction():
            cur = self.db.execute("UPDATE exchanges SET reply_ref = ? WHERE id = ?",
                                  [reply_ref, exchange_id])
            if cur.rowcount == 0:
                raise NotFoundError(f"exchange {exchange_id} not found")
            for ref in parts:
                self.db.execute("INSERT OR REPLACE INTO reply_parts (platform, ref, exchange_id) "
                                "SELECT platform, ?, id FROM exchanges WHERE id = ?", [ref, exchange_id])

    def conversation(self, conversation_id: str, limit: int = 50, community: str | None = None) -> list[Exchange]:
        """The latest ``limit`` exchanges of a conversation (in ``community``, when given), oldest first."""
        where, params = ("", []) if community is None else (" AND community = ?", [community])
        rows = self.query(f"SELECT * FROM exchanges e WHERE conversation_id = ?{where} "
                          f"AND {ANSWERED} ORDER BY id DESC LIMIT ?",
                          [conversation_id, *params, limit])
        return [Exchange.from_row(r) for r in reversed(rows)]

    def conversation_exists(self, conversation_id: str, community: str | None = None) -> bool:
        where, params = ("", []) if community is None else (" AND community = ?", [community])
        return bool(self.query(f"SELECT 1 FROM exchanges WHERE conversation_id = ?{where} LIMIT 1",
                               [conversation_id, *params]))

    # -- ratings and corrections ------------------------------------------------

    def rate(self, exchange_id: int, user: str, rating: str | None) -> None:
        """One rating per user per exchange: up/down replace, None removes."""
        if rating is not None and rating not in RATING_VALUES:
            raise InputError(f"rating must be up, down or none, got {rating!r}")
        with self.transaction():
            self.exchange(exchange_id)
            if rating is None:
                self.db.execute("DELETE FROM ratings WHERE exchange_id = ? AND user = ?",
                                [exchange_id, user])
            else:
                self.db.execute(
                    "INSERT INTO ratings (exchange_id, user, rating, created_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (exchange_id, user) DO UPDATE SET rating = excluded.rating, "
                    "created_at = excluded.created_at",
                    [exchange_id, user, RATING_VALUES[rating], time.time()])

    def ratings(self, exchange_id: int) -> dict[str, str]:
        rows = self.query("SELECT user, rating FROM ratings WHERE exchange_id = ?", [exchange_id])
        return {r["user"]: "up" if r["rating"] > 0 else "down" for r in rows}

    def add_correction(self, exchange_id: int, user: str, text: str, *, status: str = "live",
                       agree_key: str | None = None) -> int:
        """Store a correction; ``status`` live (it teaches at once), pending (it waits for review)
        or rejected (kept, never used: its author is blocked)."""
        if status not in CORRECTION_STATUSES:
            raise InputError(f"correction status must be one of {', '.join(CORRECTION_STATUSES)}, got {status!r}")
        with self.transaction():
            self.exchange(exchange_id)
            cur = self.db.execute(
                "INSERT INTO corrections (exchange_id, user, text, created_at, status, agree_key) "
                "VALUES (?, ?, ?, ?, ?, ?)", [exchange_id, user, text, time.time(), status, agree_key])
            return cur.lastrowid

    def corrections(self, exchange_id: int | None = None, limit: int = 1000, *,
                    in_effect: bool = True) -> list[dict[str, Any]]:
        """Corrections, of one exchange (oldest first) or all (newest first).

        ``in_effect``: only those that teach (live, their author not blocked) —
        what training and export read; False: every one as stored, with its ``status``.
        """
        where = (f" AND c.status = 'live' AND {_not_blocked('c.user', 'e.community')}" if in_effect else "")
        base = f"SELECT c.* FROM corrections c JOIN exchanges e ON e.id = c.exchange_id WHERE 1{where}"
        if exchange_id is None:
            return self.query(f"{base} ORDER BY c.id DESC LIMIT ?", [limit])
        return self.query(f"{base} AND c.exchange_id = ? ORDER BY c.id", [exchange_id])

    # -- users --------------------------------------------------------------------

    def count_feedback_since(self, since: float | None) -> int:
        """Ratings and corrections stored after ``since`` (a run's data cutoff), opt-outs excluded.

        ``since=None`` counts everything: no run has read the store yet.
        """
        cutoff = -1.0 if since is None else since
        opted = "(SELECT user FROM opt_outs)"
        scope, params = self._scope()
        trusted = f"{_not_blocked('e.user', 'e.community')}{scope}"
        rated = self.query(
            f"SELECT COUNT(*) AS n FROM ratings r JOIN exchanges e ON e.id = r.exchange_id "
            f"WHERE r.created_at > ? AND r.user NOT IN {opted} AND e.user NOT IN {opted} "
            f"AND {_not_blocked('r.user', 'e.community')} AND {trusted}", [cutoff, *params])[0]["n"]
        corrected = self.query(
            f"SELECT COUNT(*) AS n FROM corrections c JOIN exchanges e ON e.id = c.exchange_id "
            f"WHERE c.created_at > ? AND c.user NOT IN {opted} AND e.user NOT IN {opted} "
            f"AND c.status = 'live' AND {_not_blocked('c.user', 'e.community')} AND {trusted}",
            [cutoff, *params])[0]["n"]
        return rated + corrected

    def forget_user(self, user: str) -> dict[str, int]:
        """Delete a user's exchanges, ratings and corrections; opt them out of training."""
        with self.transaction():
            counts = {
                "ratings": self.db.execute("DELETE FROM ratings WHERE user = ?", [user]).rowcount,
                "corrections": self.db.execute("DELETE FROM corrections WHERE user = ?", [user]).rowcount,
            }
            # Cascades remove other people's ratings of this user's exchanges too:
            # the exchange text is this user's, so nothing of it may stay.
            counts["exchanges"] = self.db.execute("DELETE FROM exchanges WHERE user = ?", [user]).rowcount
            self.db.execute("INSERT OR REPLACE INTO opt_outs (user, created_at) VALUES (?, ?)",
                            [user, time.time()])
        return counts

    def opted_out(self) -> set[str]:
        return {r["user"] for r in self.query("SELECT user FROM opt_outs")}

    # -- what a training run reads (trainer.data) -----------------------------------

    def feedback_exchanges(self, since_id: int = 0) -> list[dict[str, Any]]:
        """Exchanges after ``since_id`` that carry a rating or a live correction, oldest first
        (of the scoped community only, when scoped; never of a blocked author).

        ``score`` is the sum of their ratings (+1/-1) each times its rater's
        agreement weight (``rating_weights``; below ``MIN_RATING_WEIGHT``: 0),
        opted-out and blocked raters left out: its sign is the verdict, its
        size the confidence. ``votes`` is the plain sum.
        """
        scope, params = self._scope()
        rows = self.query(
            "SELECT e.id, e.user, e.community, e.messages, e.reply "
            f"FROM exchanges e WHERE e.id > ? AND {ANSWERED} AND {_not_blocked('e.user', 'e.community')}{scope} "
            "AND (EXISTS (SELECT 1 FROM ratings r WHERE r.exchange_id = e.id) "
            "  OR EXISTS (SELECT 1 FROM corrections c WHERE c.exchange_id = e.id AND c.status = 'live')) "
            "ORDER BY e.id", [since_id, *params])
        by_exchange: dict[int, list[dict[str, Any]]] = {}
        for r in self.weighted_ratings():
            by_exchange.setdefault(r["exchange_id"], []).append(r)
        for row in rows:
            rated = by_exchange.get(row["id"], [])
            row["score"] = round(sum(r["rating"] * r["weight"] for r in rated), 4)
            row["votes"] = sum(r["rating"] for r in rated)
        return rows

    def exchanges_without_feedback(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` exchanges nobody rated or corrected (``id, user, prompt, messages``)."""
        scope, params = self._scope()
        return self.query(
            "SELECT id, user, prompt, messages FROM exchanges e WHERE NOT EXISTS "
            "(SELECT 1 FROM ratings r WHERE r.exchange_id = e.id) AND NOT EXISTS "
            "(SELECT 1 FROM corrections c WHERE c.exchange_id = e.id) "
            f"AND {ANSWERED} AND {_not_blocked('e.user', 'e.community')}{scope} ORDER BY id DESC LIMIT ?",
            [*params, limit])

    # -- trust: agreement weights, the review queue, blocked users ------------------------

    def _ratings_for_weights(self) -> list[dict[str, Any]]:
        scope, params = self._scope()
        return self.query(
            "SELECT r.exchange_id, r.user, r.rating, e.community FROM ratings r "
            f"JOIN exchanges e ON e.id = r.exchange_id WHERE {ANSWERED}{scope} "
            "AND r.user NOT IN (SELECT user FROM opt_outs) AND e.user NOT IN (SELECT user FROM opt_outs) "
            f"AND {_not_blocked('r.user', 'e.community')} AND {_not_blocked('e.user', 'e.community')}", params)

    def rating_weights(self) -> list[dict[str, Any]]:
        """Each rater's agreement with the others, per community: ``community, user, ratings,
        overlaps`` (their ratings of exchanges others rated too, with a majority), ``agreements``
        and ``weight`` = (agreements + 1) / (overlaps + 2).

        The others' majority on an exchange is the sign of their ratings weighed by
        the previous round's weights (first round: 1 each), so a user who only ever
        disagrees sinks towards 0 and cannot tip the majority their ratings are judged by.
        """
        ratings = self._ratings_for_weights()
        by_exchange: dict[int, list[dict[str, Any]]] = {}
        for r in ratings:
            by_exchange.setdefault(r["exchange_id"], []).append(r)
        weight: dict[tuple[str, str], float] = {}
        figures: dict[tuple[str, str], dict[str, Any]] = {}
        for _ in range(_WEIGHT_ROUNDS):
            figures = {}
            for rated in by_exchange.values():
                total = sum(weight.get((r["community"], r["user"]), 1.0) * r["rating"] for r in rated)
                for r in rated:
                    key = (r["community"], r["user"])
                    f = figures.setdefault(key, {"community": key[0], "user": key[1], "ratings": 0,
                                                 "overlaps": 0, "agreements": 0})
                    f["ratings"] += 1
                    others = total - weight.get(key, 1.0) * r["rating"]
                    if abs(others) > 1e-9:
                        f["overlaps"] += 1
                        f["agreements"] += (others > 0) == (r["rating"] > 0)
            weight = {k: (f["agreements"] + 1) / (f["overlaps"] + 2) for k, f in figures.items()}
        for k, f in figures.items():
            f["weight"] = round(weight[k], 4)
        return sorted(figures.values(), key=lambda f: (f["community"], f["user"]))

    def weighted_ratings(self) -> list[dict[str, Any]]:
        """Every rating training may read: ``exchange_id, community, user, rating`` (+1/-1) and
        ``weight``, the rater's agreement weight, 0 below ``MIN_RATING_WEIGHT``."""
        weights = {(w["community"], w["user"]): w["weight"] for w in self.rating_weights()}
        out = []
        for r in self._ratings_for_weights():
            w = weights.get((r["community"], r["user"]), 0.5)
            out.append({**r, "weight": w if w >= MIN_RATING_WEIGHT else 0.0})
        return out

    def correction(self, correction_id: int) -> dict[str, Any]:
        """One correction as stored, with its exchange's ``community``, ``prompt`` and ``reply``."""
        rows = self.query("SELECT c.*, e.community, e.prompt, e.reply, e.platform FROM corrections c "
                          "JOIN exchanges e ON e.id = c.exchange_id WHERE c.id = ?", [correction_id])
        if not rows:
            raise NotFoundError(f"correction {correction_id} not found")
        return rows[0]

    def review_queue(self, limit: int = 1000) -> list[dict[str, Any]]:
        """Pending corrections, oldest first, each with its exchange (``community, prompt, reply``)
        and ``agreeing``: the distinct users who gave the same answer to the same question."""
        scope, params = self._scope()
        return self.query(
            "SELECT c.id, c.exchange_id, c.user, c.text AS correction, c.created_at, e.community, "
            "e.platform, e.prompt, e.reply, "
            "(SELECT COUNT(DISTINCT c2.user) FROM corrections c2 JOIN exchanges e2 ON e2.id = c2.exchange_id "
            " WHERE c2.agree_key = c.agree_key AND e2.community = e.community "
            " AND c2.status IN ('pending', 'live')) AS agreeing "
            f"FROM corrections c JOIN exchanges e ON e.id = c.exchange_id WHERE c.status = 'pending'{scope} "
            "ORDER BY c.id LIMIT ?", [*params, limit])

    def review_correction(self, correction_id: int, status: str, by: str) -> dict[str, Any]:
        """Approve (``live``) or reject a pending correction; the row as it now is."""
        if status not in ("live", "rejected"):
            raise InputError(f"a review makes a correction live or rejected, not {status!r}")
        with self.transaction():
            row = self.correction(correction_id)
            if row["status"] != "pending":
                raise InputError(f"correction {correction_id} is {row['status']}, not pending review")
            self.db.execute("UPDATE corrections SET status = ?, reviewed_by = ?, reviewed_at = ? WHERE id = ?",
                            [status, by, time.time(), correction_id])
            return self.correction(correction_id)

    def agreeing_users(self, community: str, agree_key: str) -> int:
        """Distinct users, not blocked, whose pending or live correction in ``community`` has ``agree_key``."""
        return self.query(
            "SELECT COUNT(DISTINCT c.user) AS n FROM corrections c JOIN exchanges e ON e.id = c.exchange_id "
            "WHERE c.agree_key = ? AND e.community = ? AND c.status IN ('pending', 'live') "
            f"AND {_not_blocked('c.user', 'e.community')}", [agree_key, community])[0]["n"]

    def approve_agreed(self, community: str, agree_key: str, by: str) -> list[int]:
        """Make every pending correction in ``community`` with ``agree_key`` live; their ids."""
        with self.transaction():
            ids = [r["id"] for r in self.query(
                "SELECT c.id FROM corrections c JOIN exchanges e ON e.id = c.exchange_id "
                "WHERE c.agree_key = ? AND e.community = ? AND c.status = 'pending' "
                f"AND {_not_blocked('c.user', 'e.community')} ORDER BY c.id", [agree_key, community])]
            for cid in ids:
                self.db.execute("UPDATE corrections SET status = 'live', reviewed_by = ?, reviewed_at = ? "
                                "WHERE id = ?", [by, time.time(), cid])
        return ids

    def block_user(self, user: str, community: str | None, by: str) -> dict[str, int]:
        """Block ``user`` in ``community`` (None: everywhere): their pending corrections are
        rejected, and nothing of theirs (exchanges, ratings, corrections, memory items) is
        served from memory, trained on or exported again. Nothing is deleted."""
        where = "" if community is None else " AND e.community = ?"
        params = [] if community is None else [community]
        with self.transaction():
            self.db.execute("INSERT OR REPLACE INTO blocked_users (community, user, created_at, by) "
                            "VALUES (?, ?, ?, ?)", [community or "*", user, time.time(), by])
            dropped = self.db.execute(
                "UPDATE corrections SET status = 'rejected', reviewed_by = ?, reviewed_at = ? "
                "WHERE status = 'pending' AND user = ? AND exchange_id IN "
                f"(SELECT e.id FROM exchanges e WHERE 1{where})", [by, time.time(), user, *params]).rowcount
            # The serving process's memory index must drop the user's live items.
            self.db.execute("UPDATE memory_generation SET n = n + 1")
        return {"pending_dropped": dropped}

    def blocked_users(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM blocked_users ORDER BY created_at")

    def is_blocked(self, user: str, community: str) -> bool:
        return bool(self.query("SELECT 1 FROM blocked_users WHERE user = ? AND community IN (?, '*')",
                               [user, community]))

    # -- platform events ------------------------------------------------------------

    def prune_seen_events(self, older_than_s: float = 7 * 86400) -> None:
        """Forget handled event ids once no platform would retry them (Slack: minutes)."""
        if "seen_events" not in self.db.table_names():
            return
        with self.transaction():
            self.db.execute("DELETE FROM seen_events WHERE created_at < ?", [time.time() - older_than_s])

    def first_sight(self, event_id: str) -> bool:
        """True the first time an event id is seen, False on every retry after."""
        with self.transaction():
            cur = self.db.execute("INSERT OR IGNORE INTO seen_events (event_id, created_at) VALUES (?, ?)",
                                  [event_id, time.time()])
            return cur.rowcount == 1

    # -- figures ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        def block(where: str = "", params: tuple = ()) -> dict[str, Any]:
            ex = self.query(f"SELECT COUNT(*) AS n FROM exchanges e {where}", params)[0]["n"]
            r = self.query("SELECT SUM(r.rating > 0) AS up, SUM(r.rating < 0) AS down "
                           f"FROM ratings r JOIN exchanges e ON e.id = r.exchange_id {where}", params)[0]
            c = self.query("SELECT COUNT(*) AS n FROM corrections c "
                           f"JOIN exchanges e ON e.id = c.exchange_id {where}", params)[0]["n"]
            up, down = r["up"] or 0, r["down"] or 0
            return {"exchanges": ex, "ratings": {"up": up, "down": down}, "corrections": c,
                    "approval_rate": round(up / (up + down), 4) if up + down else None}

        scope, sp = self._scope()
        done = ANSWERED + scope
        out = block(f"WHERE {done}", tuple(sp))
        out["pending"] = self.pending_exchanges()
        out["by_platform"] = {
            p["platform"]: block(f"WHERE {done} AND e.platform = ?", (*sp, p["platform"]))
            for p in self.query(f"SELECT DISTINCT platform FROM exchanges e WHERE {done} ORDER BY 1", sp)}
        out["by_version"] = {
            v["model_version"]: block(f"WHERE {done} AND e.model_version = ?", (*sp, v["model_version"]))
            for v in self.query(f"SELECT DISTINCT model_version FROM exchanges e WHERE {done} ORDER BY 1", sp)}
        out["by_community"] = {
            c["community"]: block(f"WHERE {done} AND e.community = ?", (*sp, c["community"]))
            for c in self.query(f"SELECT DISTINCT community FROM exchanges e WHERE {done} ORDER BY 1", sp)}
        out["review"] = self.query(
            "SELECT COUNT(*) AS n FROM corrections c JOIN exchanges e ON e.id = c.exchange_id "
            f"WHERE c.status = 'pending'{scope}", sp)[0]["n"]
        return out

    def pending_exchanges(self) -> int:
        """Exchanges whose reply is still streaming or was cut by a crash (not ``ANSWERED``)."""
        scope, sp = self._scope()
        return self.query(f"SELECT COUNT(*) AS n FROM exchanges e WHERE NOT ({ANSWERED}){scope}", sp)[0]["n"]

    def first_exchange_at(self) -> float | None:
        """When the first answered exchange was stored; ``None`` before any."""
        scope, sp = self._scope()
        return self.query(f"SELECT MIN(created_at) AS t FROM exchanges e WHERE {ANSWERED}{scope}", sp)[0]["t"]

    def timeline(self, bucket_s: int) -> list[dict[str, Any]]:
        """Answered exchanges and their ratings per ``bucket_s``-wide time bucket, oldest first.

        Ratings count in the bucket of the exchange they rate, so a bucket's
        approval is that of the replies given then.
        """
        scope = "" if self.community is None else " AND e.community = :c"
        return self.query(
            "SELECT CAST(e.created_at / :b AS INTEGER) * :b AS t, COUNT(DISTINCT e.id) AS exchanges, "
            "COALESCE(SUM(r.rating > 0), 0) AS up, COALESCE(SUM(r.rating < 0), 0) AS down "
            f"FROM exchanges e LEFT JOIN ratings r ON r.exchange_id = e.id WHERE {ANSWERED}{scope} "
            "GROUP BY 1 ORDER BY 1", {"b": bucket_s, "c": self.community})

    def version_figures(self) -> list[dict[str, Any]]:
        """Per model version: answered exchanges, first and last seen, ratings; oldest version first."""
        return self.query(
            "SELECT e.model_version AS version, COUNT(DISTINCT e.id) AS exchanges, "
            "MIN(e.created_at) AS first_seen, MAX(e.created_at) AS last_seen, "
            "COALESCE(SUM(r.rating > 0), 0) AS up, COALESCE(SUM(r.rating < 0), 0) AS down "
            f"FROM exchanges e LEFT JOIN ratings r ON r.exchange_id = e.id WHERE {ANSWERED}{self._scope()[0]} "
            "GROUP BY e.model_version ORDER BY first_seen", self._scope()[1])

    def latest_corrections(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest corrections with the exchange they correct, newest first."""
        scope, sp = self._scope()
        return self.query(
            "SELECT c.id, c.exchange_id, c.user, c.text AS correction, c.created_at, c.status, e.prompt, "
            "e.reply, e.model_version, e.platform, e.community FROM corrections c "
            f"JOIN exchanges e ON e.id = c.exchange_id WHERE 1{scope} ORDER BY c.id DESC LIMIT ?", [*sp, limit])

    # -- training runs ------------------------------------------------------------------
    # Rows as stored; ``tuneloop.learning.runs`` gives them their meaning.

    def add_training_run(self, reason: str, pid: int | None = None, community: str = LOCAL) -> int:
        """A queued run of ``community``'s line ('*': the global line)."""
        with self.transaction():
            return self.db.execute(
                "INSERT INTO training_runs (reason, status, pid, created_at, community) "
                "VALUES (?, 'queued', ?, ?, ?)", [reason, pid, time.time(), community]).lastrowid

    def update_training_run(self, run_id: int, **fields: Any) -> None:
        unknown = set(fields) - _RUN_COLUMNS
        if unknown:
            raise InputError(f"training_runs has no column {', '.join(sorted(unknown))}")
        if fields.get("status", "queued") not in RUN_STATUSES:
            raise InputError(f"training run status must be one of {', '.join(RUN_STATUSES)}, "
                             f"got {fields['status']!r}")
        if not fields:
            return
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction():
            cur = self.db.execute(f"UPDATE training_runs SET {cols} WHERE id = ?", [*fields.values(), run_id])
            if cur.rowcount == 0:
                raise NotFoundError(f"training run {run_id} not found")

    def end_active_training_run(self, run_id: int, status: str, error: str) -> bool:
        """Mark a run that is still queued or running ``status`` (failed, cancelled); False if it had ended.

        Conditional, so a run that finished on its own a moment before keeps its outcome.
        """
        if status not in RUN_STATUSES[2:]:
            raise InputError(f"a run ends done, failed or cancelled, not {status!r}")
        with self.transaction():
            cur = self.db.execute(
                "UPDATE training_runs SET status = ?, finished_at = ?, error = ? "
                f"WHERE id = ? AND status IN ({', '.join('?' * len(ACTIVE_RUN))})",
                [status, time.time(), error, run_id, *ACTIVE_RUN])
            return cur.rowcount == 1

    def training_run(self, run_id: int) -> dict[str, Any]:
        rows = self.query("SELECT * FROM training_runs WHERE id = ?", [run_id])
        if not rows:
            raise NotFoundError(f"training run {run_id} not found")
        return rows[0]

    def training_runs(self, statuses: Sequence[str] = RUN_STATUSES, *, newest_first: bool = False,
                      limit: int = -1, community: str | None = None) -> list[dict[str, Any]]:
        """Runs whose status is one of ``statuses`` (of one line's ``community`` when given), in order
        of creation."""
        where, params = (" AND community = ?", [community]) if community is not None else ("", [])
        order = "DESC" if newest_first else "ASC"
        return self.query(f"SELECT * FROM training_runs WHERE status IN ({', '.join('?' * len(statuses))})"
                          f"{where} ORDER BY id {order} LIMIT ?", [*statuses, *params, limit])

    # -- memory of corrections (tuneloop.memory) ------------------------------------

    def memory_generation(self) -> int:
        """A counter that changes whenever a memory item is added, deleted or changes status."""
        return self.query("SELECT n FROM memory_generation")[0]["n"]

    def memory_index_rows(self, encoder: str, status: str = "fast") -> list[dict[str, Any]]:
        """Items of ``status`` with their vector under ``encoder`` (None where not encoded yet)."""
        return self.query(
            "SELECT m.id, m.prompt, m.community, v.vector FROM memory_items m "
            "LEFT JOIN memory_vectors v ON v.item_id = m.id AND v.encoder = ? "
            f"WHERE m.status = ? AND {_not_blocked('m.user', 'm.community')} ORDER BY m.id", [encoder, status])

    def set_memory_vectors(self, encoder: str, vectors: Sequence[tuple[int, bytes]]) -> None:
        with self.transaction():
            for item_id, blob in vectors:
                # An item deleted since it was read has nothing to attach to.
                self.db.execute("INSERT OR REPLACE INTO memory_vectors (item_id, encoder, vector) "
                                "SELECT id, ?, ? FROM memory_items WHERE id = ?", [encoder, blob, item_id])

    _MEMORY_FIGURES = (
        "(SELECT COUNT(*) FROM memory_uses u WHERE u.item_id = m.id) AS hits, "
        "(SELECT COUNT(*) FROM memory_uses u JOIN ratings r ON r.exchange_id = u.exchange_id "
        " WHERE u.item_id = m.id AND r.rating > 0) AS rated_up, "
        "(SELECT COUNT(*) FROM memory_uses u JOIN ratings r ON r.exchange_id = u.exchange_id "
        " WHERE u.item_id = m.id AND r.rating < 0) AS rated_down")

    def memory_items(self, status: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Items (of the scoped community, when scoped), newest first, with ``hits`` (replies that
        used them) and the ratings of those replies."""
        if status is not None and status not in ("fast", "consolidated"):
            raise InputError(f"memory status must be fast or consolidated, got {status!r}")
        where, params = ("AND m.status = ?", [status]) if status else ("", [])
        scope, sp = self._scope("m")
        return self.query(f"SELECT m.*, {self._MEMORY_FIGURES} FROM memory_items m WHERE 1 = 1{scope} {where} "
                          f"ORDER BY m.id DESC LIMIT ?", [*sp, *params, limit])

    def memory_item(self, item_id: int) -> dict[str, Any]:
        rows = self.query(f"SELECT m.*, {self._MEMORY_FIGURES} FROM memory_items m WHERE m.id = ?", [item_id])
        if not rows:
            raise NotFoundError(f"memory item {item_id} not found")
        return rows[0]

    def record_memory_use(self, exchange_id: int, uses: Sequence[tuple[int, float]]) -> None:
        """Which memory items (and at what match score) the reply of ``exchange_id`` used."""
        with self.transaction():
            for item_id, score in uses:
                self.db.execute("INSERT OR REPLACE INTO memory_uses (exchange_id, item_id, score) "
                                "SELECT ?, id, ? FROM memory_items WHERE id = ?", [exchange_id, score, item_id])

    def memory_uses(self, exchange_id: int) -> list[int]:
        return [r["item_id"] for r in self.query(
            "SELECT item_id FROM memory_uses WHERE exchange_id = ? ORDER BY item_id", [exchange_id])]

    def memory_training_rows(self, status: str | None = None) -> list[dict[str, Any]]:
        """Items as training rows, oldest first: ``item_id, exchange_id, messages`` (the corrected
        exchange's context, JSON), ``prompt``, ``reply`` (the correction), ``status``; opt-outs left out."""
        where, params = ("AND m.status = ?", [status]) if status else ("", [])
        scope, sp = self._scope()
        return self.query(
            "SELECT m.id AS item_id, m.exchange_id, e.messages, m.prompt, m.reply, m.status "
            "FROM memory_items m JOIN exchanges e ON e.id = m.exchange_id "
            "WHERE m.user NOT IN (SELECT user FROM opt_outs) AND e.user NOT IN (SELECT user FROM opt_outs) "
            f"AND {_not_blocked('m.user', 'e.community')} AND {_not_blocked('e.user', 'e.community')}{scope} "
            f"{where} ORDER BY m.id", [*sp, *params])

    def set_memory_status(self, answered: dict[int, bool], version: str) -> dict[str, int]:
        """After ``version`` was checked item by item: answered items become ``consolidated`` (the
        weights alone answer them), the others go back to ``fast``. Unknown ids are skipped."""
        counts = {"consolidated": 0, "fast": 0}
        now = time.time()
        with self.transaction():
            for item_id, ok in answered.items():
                status = "consolidated" if ok else "fast"
                cur = self.db.execute("UPDATE memory_items SET status = ?, status_version = ?, status_at = ? "
                                      "WHERE id = ?", [status, version, now, item_id])
                counts[status] += cur.rowcount
        return counts

    def memory_unconsolidate(self, versions: Sequence[str]) -> int:
        """Items consolidated by any of ``versions`` (no longer live: rolled back, replaced by a
        version not yet checked) go back to the fast path; how many did."""
        if not versions:
            return 0
        with self.transaction():
            return self.db.execute(
                f"UPDATE memory_items SET status = 'fast', status_at = ? WHERE status = 'consolidated' "
                f"AND status_version IN ({', '.join('?' * len(versions))})", [time.time(), *versions]).rowcount

    def memory_stats(self) -> dict[str, Any]:
        """Memory size, hits and consolidated share (the dashboard's figures; the scoped community's
        when scoped)."""
        scope, sp = self._scope("m")
        uses = f"(SELECT u.* FROM memory_uses u JOIN memory_items m ON m.id = u.item_id WHERE 1 = 1{scope})"
        row = self.query(
            "SELECT COUNT(*) AS items, COALESCE(SUM(status = 'consolidated'), 0) AS consolidated, "
            f"(SELECT COUNT(*) FROM {uses}) AS hits, "
            f"(SELECT COUNT(DISTINCT exchange_id) FROM {uses}) AS replies FROM memory_items m WHERE 1 = 1{scope}",
            [*sp, *sp, *sp])[0]
        rated = self.query("SELECT SUM(r.rating > 0) AS up, SUM(r.rating < 0) AS down FROM ratings r "
                           f"WHERE r.exchange_id IN (SELECT exchange_id FROM {uses})", sp)[0]
        n = row["items"]
        return {"items": n, "fast": n - row["consolidated"], "consolidated": row["consolidated"],
                "consolidated_share": round(row["consolidated"] / n, 4) if n else None,
                "hits": row["hits"], "replies_using_memory": row["replies"],
                "rated_up": rated["up"] or 0, "rated_down": rated["down"] or 0}
