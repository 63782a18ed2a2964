"""The figures behind ``/dashboard``: read-only queries over the store.

Exchanges and approval over time and per model version, and the latest
corrections. The engine's load is added by the web adapter.
"""

from __future__ import annotations

import time
from typing import Any

from tuneloop.store import Store

_MIN, _HOUR, _DAY = 60, 3600, 86400


def pick_bucket(span_s: float) -> int:
    """A bucket width that gives a readable number of points for ``span_s``."""
    for width in (5 * _MIN, 15 * _MIN, _HOUR, 6 * _HOUR, _DAY):
        if span_s / width <= 48:
            return width
    return 7 * _DAY


def _approval(up: int, down: int) -> float | None:
    return round(up / (up + down), 4) if up + down else None


def dashboard(store: Store, bucket: int | None = None, corrections: int = 20) -> dict[str, Any]:
    now = time.time()
    first = store.query("SELECT MIN(created_at) AS t FROM exchanges")[0]["t"]
    if bucket is None:
        bucket = pick_bucket(now - first if first else 0)
    # Ratings count in the bucket of the exchange they rate, so a bucket's
    # approval is that of the replies given then.
    rows = store.query(
        "SELECT CAST(e.created_at / :b AS INTEGER) * :b AS t, COUNT(DISTINCT e.id) AS exchanges, "
        "COALESCE(SUM(r.rating > 0), 0) AS up, COALESCE(SUM(r.rating < 0), 0) AS down "
        "FROM exchanges e LEFT JOIN ratings r ON r.exchange_id = e.id "
        "GROUP BY 1 ORDER BY 1", {"b": bucket})
    timeline = [{"t": r["t"], "exchanges": r["exchanges"], "up": r["up"], "down": r["down"],
                 "approval_rate": _approval(r["up"], r["down"])} for r in rows]
    versions = store.query(
        "SELECT e.model_version AS version, COUNT(DISTINCT e.id) AS exchanges, "
        "MIN(e.created_at) AS first_seen, MAX(e.created_at) AS last_seen, "
        "COALESCE(SUM(r.rating > 0), 0) AS up, COALESCE(SUM(r.rating < 0), 0) AS down "
        "FROM exchanges e LEFT JOIN ratings r ON r.exchange_id = e.id "
        "GROUP BY e.model_version ORDER BY first_seen")
    for v in versions:
        v["approval_rate"] = _approval(v["up"], v["down"])
    latest = store.query(
        "SELECT c.id, c.exchange_id, c.user, c.text AS correction, c.created_at, e.prompt, e.reply, "
        "e.model_version, e.platform FROM corrections c JOIN exchanges e ON e.id = c.exchange_id "
        "ORDER BY c.id DESC LIMIT ?", [corrections])
    totals = store.stats()
    return {
        "now": now,
        "bucket_s": bucket,
        "totals": {k: totals[k] for k in ("exchanges", "ratings", "corrections", "approval_rate")},
        "by_platform": totals["by_platform"],
        "timeline": timeline,
        "versions": versions,
        "corrections": latest,
    }
