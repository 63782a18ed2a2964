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

What a training run reads besides (``trainer.run``): ``split_holdout``
keeps a rotating share of feedback items out of training for the gate; and
``replay_prompts`` gives the replay set against forgetting: earlier prompts
from the store (exchanges without feedback, opted-out users excluded), then
base SFT prompts (chatterbot-corpus, what the starter was fine-tuned on). The
run answers them with the live model and mixes those replies in at
``replay_ratio``: replaying the model's *own* replies keeps what it does now,
where the corpus's reference replies would themselves move it. Every run
records ``dataset_hash`` of the exact rows it trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from typing import Any

from tuneloop.errors import InputError
from tuneloop.store import Store

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


# --- what a training run reads: new feedback, a held-out split, a replay set ----------


def _bucket(key: str) -> float:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_holdout(items: list[dict[str, Any]], fraction: float, salt: str
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, held_out)``: ``floor(fraction * n)`` items, chosen by a salted hash of the exchange id.

    The salt is the run's seed and id, so the held-out share rotates from run to
    run: feedback held out once is trained on by a later run, never lost. A
    floor, not a round, so that a handful of corrections is mostly trained on.
    """
    n_hold = int(fraction * len(items))
    order = sorted(items, key=lambda it: _bucket(f"{salt}\x00{it['exchange_id']}"))
    held_ids = {it["exchange_id"] for it in order[:n_hold]}
    return ([it for it in items if it["exchange_id"] not in held_ids],
            [it for it in items if it["exchange_id"] in held_ids])


def replay_prompts(store: Store, *, exclude: Iterable[int], limit: int, seed: int,
                   system_prompt: str = "", languages: Iterable[str] = ("english",),
                   exclude_prompts: Iterable[str] = ()) -> list[list[dict[str, str]]]:
    """Up to ``limit`` contexts to replay: earlier prompts from the store, then base SFT prompts.

    Earlier prompts are the contexts of exchanges that carry no feedback (their
    authors not opted out), newest first, one per distinct prompt text. The
    base SFT data is ``chatterbot-corpus`` (what the starter was fine-tuned on),
    asked the way the bot asks: with ``system_prompt``. The order is a seeded
    shuffle within each source, store first.
    """
    rng = random.Random(seed)
    excluded = set(exclude)
    opted = store.opted_out()
    # Prompts that have feedback are the feedback's business, not the replay's.
    seen: set[str] = {p.strip().casefold() for p in exclude_prompts}
    from_store: list[list[dict[str, str]]] = []
    rows = store.query(
        "SELECT id, user, prompt, messages FROM exchanges e WHERE NOT EXISTS "
        "(SELECT 1 FROM ratings r WHERE r.exchange_id = e.id) AND NOT EXISTS "
        "(SELECT 1 FROM corrections c WHERE c.exchange_id = e.id) ORDER BY id DESC LIMIT ?",
        [max(limit * 4, 200)])
    for row in rows:
        key = row["prompt"].strip().casefold()
        if row["id"] in excluded or row["user"] in opted or key in seen:
            continue
        seen.add(key)
        from_store.append(json.loads(row["messages"]))
    rng.shuffle(from_store)
    out = from_store[:limit]
    if len(out) < limit:
        from trainer import corpus

        try:
            pairs = corpus.load_pairs(tuple(languages))
        except (FileNotFoundError, ModuleNotFoundError):
            pairs = []
        rng.shuffle(pairs)
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for pair in pairs:
            if len(out) >= limit:
                break
            key = pair.message.strip().casefold()
            if key in seen or pair.context:
                continue
            seen.add(key)
            out.append(system + [{"role": "user", "content": pair.message}])
    return out


def sft_row(prompt: list[dict[str, str]], completion: str) -> dict[str, Any]:
    return {"prompt": prompt, "completion": _assistant(completion)}
