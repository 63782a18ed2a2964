"""Block Kit views of the Slack adapter: the App Home tab and the "suggest a better reply" modal."""

from __future__ import annotations

import json
from typing import Any

from tuneloop.store import Exchange

#: callback id of the message shortcut (slack-manifest.yml names it too)
SUGGEST_SHORTCUT = "tuneloop_suggest_reply"
SUGGEST_VIEW = "tuneloop_suggest_reply_view"
SUGGEST_BLOCK = "correction"
SUGGEST_INPUT = "text"
#: App Home button action ids -> the admin command each one runs
HOME_ACTIONS = {
    "tuneloop_home_retrain": "retrain",
    "tuneloop_home_rollback": "rollback",
    "tuneloop_home_refresh": "status",
}
#: App Home review button action ids -> the admin command each runs on the correction id in its value
REVIEW_ACTIONS = {
    "tuneloop_review_approve": "approve",
    "tuneloop_review_reject": "reject",
}
#: pending corrections shown on the App Home (Block Kit allows 100 blocks a view)
MAX_REVIEW_ITEMS = 10
_MAX_SECTION = 2900  # Block Kit caps a section's text at 3,000 characters


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text[:_MAX_SECTION] or " "}}


def _review_blocks(queue: list[dict[str, Any]]) -> list[dict[str, Any]]:
    blocks = [_section(f"*Waiting for review* ({len(queue)})" if queue else "*Waiting for review*: nothing")]
    for row in queue[:MAX_REVIEW_ITEMS]:
        agree = f" · {row['agreeing']} agree" if row.get("agreeing", 0) > 1 else ""
        blocks.append(_section(f"#{row['id']} by <@{row['user']}>{agree}\n*Asked:* {row['prompt'][:800]}\n"
                               f"*Bot:* {row['reply'][:800]}\n*Correction:* {row['correction'][:800]}"))
        blocks.append({"type": "actions", "block_id": f"tuneloop_review_{row['id']}", "elements": [
            {"type": "button", "action_id": "tuneloop_review_approve", "style": "primary", "value": str(row["id"]),
             "text": {"type": "plain_text", "text": "Approve"}},
            {"type": "button", "action_id": "tuneloop_review_reject", "style": "danger", "value": str(row["id"]),
             "text": {"type": "plain_text", "text": "Reject"}}]})
    return blocks


def home_view(status: str, *, is_admin: bool, note: str | None = None,
              queue: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The App Home tab: the learning loop's status, and for admins buttons and the review queue."""
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": "tuneloop"}}]
    if note:
        blocks.append(_section(f"> {note}"))
    blocks += [_section("*Status*\n```" + status + "```")]
    buttons: list[dict[str, Any]] = [
        {"type": "button", "action_id": "tuneloop_home_refresh", "text": {"type": "plain_text", "text": "Refresh"}}]
    if is_admin:
        buttons = [
            {"type": "button", "action_id": "tuneloop_home_retrain", "style": "primary",
             "text": {"type": "plain_text", "text": "Retrain now"}},
            {"type": "button", "action_id": "tuneloop_home_rollback", "style": "danger",
             "text": {"type": "plain_text", "text": "Roll back"},
             "confirm": {"title": {"type": "plain_text", "text": "Roll back?"},
                         "text": {"type": "plain_text", "text": "Make the live version's parent live again."},
                         "confirm": {"type": "plain_text", "text": "Roll back"},
                         "deny": {"type": "plain_text", "text": "Cancel"}}},
        ] + buttons
    blocks.append({"type": "actions", "block_id": "tuneloop_home", "elements": buttons})
    if is_admin and queue is not None:
        blocks += _review_blocks(queue)
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text":
                   "Rate my replies with :+1: / :-1:, or reply `!fix` with a better answer. "
                   "`/tuneloop help` lists the commands."}]})
    return {"type": "home", "blocks": blocks}


def suggest_view(exchange: Exchange, channel: str) -> dict[str, Any]:
    """The modal that takes a better reply to ``exchange``."""
    return {
        "type": "modal",
        "callback_id": SUGGEST_VIEW,
        "private_metadata": json.dumps({"exchange": exchange.id, "channel": channel}),
        "title": {"type": "plain_text", "text": "Suggest a better reply"},
        "submit": {"type": "plain_text", "text": "Save"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            _section("*They asked*\n" + exchange.prompt[:1000]),
            {"type": "input", "block_id": SUGGEST_BLOCK,
             "label": {"type": "plain_text", "text": "A better reply"},
             "element": {"type": "plain_text_input", "action_id": SUGGEST_INPUT, "multiline": True,
                         "initial_value": exchange.reply[:2900], "max_length": 3000}},
        ],
    }


def submitted_text(view: dict[str, Any]) -> str:
    values = (view.get("state") or {}).get("values") or {}
    return ((values.get(SUGGEST_BLOCK) or {}).get(SUGGEST_INPUT) or {}).get("value") or ""


def submitted_exchange(view: dict[str, Any]) -> int | None:
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
        return int(meta["exchange"])
    except (ValueError, KeyError, TypeError):
        return None
