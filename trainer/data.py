"""Training datasets from the store, in the column layouts TRL's trainers read.

Rows are *conversational*: ``prompt`` is the list of chat messages the model
saw (system prompt and earlier turns included), completions are lists with
one assistant message. TRL applies the model's chat template to them.

- SFT (``prompt``/``completion``): replies rated 👍 and corrections (the
  correction is the target for the corrected exchange's context).
- KTO (``prompt``/``completion``/``label``): 👍 replies and corrections are
  desirable (True); 👎 replies and replies someone corrected are undesirable.
- DPO (``prompt``/``chosen``/``rejected``): a correction is chosen over the
  reply it corrects.

Conflicting ratings of one exchange are resolved by majority: the exchange
counts as 👍 when more users rated it up than down, 👎 when more rated it
down, and is dropped (as rated) on a tie. A reply that has a correction is
never used as desirable unless its majority is 👍. Users who opted out
(``tuneloop forget``) are excluded, as authors of exchanges and as raters.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from bot.errors import InputError
from bot.store import Store

FORMATS = ("sft", "kto", "dpo")


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def feedback_items(store: Store, since_id: int = 0, exclude: Iterable[int] = ()) -> list[dict[str, Any]]:
    """One item per exchange with feedback: context, reply, majority verdict, corrections."""
    opted = store.opted_out()
    excluded = set(exclude)
    rows = store.query(
        "SELECT e.id, e.user, e.messages, e.reply, "
        "  COALESCE((SELECT SUM(CASE WHEN r.user IN (SELECT user FROM opt_outs) THEN 0 ELSE r.rating END)"
        "            FROM ratings r WHERE r.exchange_id = e.id), 0) AS score "
        "FROM exchanges e WHERE e.id > ? AND (EXISTS (SELECT 1 FROM ratings r WHERE r.exchange_id = e.id) "
        "  OR EXISTS (SELECT 1 FROM corrections c WHERE c.exchange_id = e.id)) ORDER BY e.id",
        [since_id])
    items = []
    for row in rows:
        if row["user"] in opted or row["id"] in excluded:
            continue
        corrections = [c["text"] for c in store.corrections(row["id"]) if c["user"] not in opted]
        verdict = "up" if row["score"] > 0 else "down" if row["score"] < 0 else None
        if verdict is None and not corrections:
            continue
        items.append({"exchange_id": row["id"], "prompt": json.loads(row["messages"]),
                      "reply": row["reply"], "verdict": verdict, "corrections": corrections})
    return items


def to_rows(items: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows: list[dict[str, Any]] = []
    for it in items:
        prompt = it["prompt"]
        if fmt == "sft":
            if it["verdict"] == "up":
                rows.append({"prompt": prompt, "completion": _assistant(it["reply"])})
            if it["corrections"]:
                # The latest correction is the target; earlier ones are superseded.
                rows.append({"prompt": prompt, "completion": _assistant(it["corrections"][-1])})
        elif fmt == "kto":
            if it["verdict"] == "up":
                rows.append({"prompt": prompt, "completion": _assistant(it["reply"]), "label": True})
            elif it["verdict"] == "down" or it["corrections"]:
                rows.append({"prompt": prompt, "completion": _assistant(it["reply"]), "label": False})
            for text in it["corrections"]:
                rows.append({"prompt": prompt, "completion": _assistant(text), "label": True})
        else:  # dpo
            for text in it["corrections"]:
                if text.strip() != it["reply"].strip():
                    rows.append({"prompt": prompt, "chosen": _assistant(text),
                                 "rejected": _assistant(it["reply"])})
    return rows


def export(store: Store, fmt: str) -> list[dict[str, Any]]:
    return to_rows(feedback_items(store), fmt)


def dataset_hash(rows: list[dict[str, Any]]) -> str:
    """A stable hash of the exact rows a run trains on."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]
