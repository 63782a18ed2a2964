"""The figures behind ``/dashboard``, from the store's read-only queries.

Exchanges and approval over time and per model version, the latest
corrections, and the review queue (the corrections waiting for an admin,
``trust.pending``) that the page's Approve / Reject buttons act on; answered
exchanges only, as ``tuneloop stats`` counts them (replies still streaming are
``pending``). The engine's load is added by the web adapter. ``store`` is
scoped to the viewer's community (``Store.scoped``), or not for the operator.
"""

from __future__ import annotations

import time
from typing import Any

from tuneloop.learning import trust
from tuneloop.store import Store

_MIN, _HOUR, _DAY = 60, 3600, 86400
#: queue rows shown; the page says how many more wait (``totals.review``)
REVIEW_ROWS = 100


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
    first = store.first_exchange_at()
    if bucket is None:
        bucket = pick_bucket(now - first if first else 0)
    timeline = [{"t": r["t"], "exchanges": r["exchanges"], "up": r["up"], "down": r["down"],
                 "approval_rate": _approval(r["up"], r["down"])} for r in store.timeline(bucket)]
    versions = store.version_figures()
    for v in versions:
        v["approval_rate"] = _approval(v["up"], v["down"])
    totals = store.stats()
    memory = store.memory_stats()
    return {
        "now": now,
        "bucket_s": bucket,
        "totals": {k: totals[k] for k in ("exchanges", "pending", "ratings", "corrections", "approval_rate",
                                          "review")},
        # The memory of corrections: size, replies that used it, share the weights now carry.
        "memory": {k: memory[k] for k in ("items", "hits", "consolidated", "consolidated_share")},
        "by_platform": totals["by_platform"],
        "timeline": timeline,
        "versions": versions,
        "corrections": store.latest_corrections(corrections),
        "review_queue": trust.pending(store, store.community)[:REVIEW_ROWS],
    }
