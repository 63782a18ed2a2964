"""Admin commands: one service that the CLI, Slack and Discord all call.

``Admin.run(caller, "rollback v3")`` parses the command, checks that the
caller may run it, does it, and returns the text to show (adapters send it
back ephemerally). Who is an admin comes from ``[admin]``: per platform user
ids, and Discord role ids. A refusal is logged with the caller's id.

The learning actions (retrain, models, promote, rollback, status of runs)
go to a ``LearningControl`` — ``tuneloop.learning.control.Control`` in the serving
process — for the caller's own community (a Slack workspace's admin retrains,
promotes and rolls back that workspace's line only; the CLI's caller, of no
community, acts on ``local``'s). Without one, they answer that training is not
available.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass, field
from typing import Any, Protocol

from tuneloop.config import Config
from tuneloop.errors import InputError, PermissionDenied
from tuneloop.learning import trust
from tuneloop.store import Store

log = logging.getLogger(__name__)


class LearningControl(Protocol):
    """What the learning loop offers admins (``tuneloop.learning.control.Control``)."""

    # Each acts on ``community``'s line of versions (None: local's; under scope global: the one line).
    def start_run(self, reason: str, *, community: str | None = None
                  ) -> dict[str, Any]: ...  # {"run_id": ..., ...}; raises TrainingError
    def status(self, community: str | None = None
               ) -> dict[str, Any]: ...  # live version, last run, feedback since, next run
    def models(self, community: str | None = None
               ) -> list[dict[str, Any]]: ...  # each version, metrics, verdict, "live": bool
    def promote(self, version: str, by: str = "", community: str | None = None) -> dict[str, Any]: ...
    def rollback(self, version: str | None = None, by: str = "",
                 community: str | None = None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Caller:
    platform: str  # "cli", "slack", "discord", "web", "http"
    user: str
    roles: tuple[str, ...] = field(default_factory=tuple)  # Discord role ids
    #: the community the caller acts in; None: every one (the operator's CLI)
    community: str | None = None
    #: an HTTP caller whose API key is an admin key
    admin_key: bool = False


#: command -> (needs admin, usage, help)
COMMANDS: dict[str, tuple[bool, str, str]] = {
    "help": (False, "help", "this list"),
    "status": (False, "status", "live version, last run, feedback since, next scheduled run"),
    "models": (False, "models", "every version with its metrics and verdict"),
    "forget-me": (False, "forget-me", "delete everything you said and rated; never train on you again"),
    "retrain": (True, "retrain", "start a training run now"),
    "promote": (True, "promote VERSION", "make VERSION live"),
    "rollback": (True, "rollback [VERSION]", "go back to VERSION (default: the live one's parent)"),
    "review": (True, "review", "corrections of this community waiting for review"),
    "approve": (True, "approve ID", "make pending correction ID live (memory and training data)"),
    "reject": (True, "reject ID", "reject pending correction ID"),
    "block": (True, "block USER", "drop USER's pending corrections; never train on anything of theirs again"),
}


class Admin:
    def __init__(self, config: Config, store: Store, control: LearningControl | None = None):
        self.config = config
        self.store = store
        self.control = control

    def is_admin(self, caller: Caller) -> bool:
        a = self.config.admin
        if caller.platform == "cli":
            return a.cli_is_admin
        if caller.platform == "slack":
            return caller.user in a.slack_users
        if caller.platform == "discord":
            return caller.user in a.discord_users or any(r in a.discord_roles for r in caller.roles)
        if caller.platform == "http":
            return caller.admin_key
        return False

    def help_text(self) -> str:
        return "\n".join(f"`{usage}` — {text}" + (" (admins)" if admin else "")
                         for admin, usage, text in COMMANDS.values())

    def run(self, caller: Caller, text: str) -> str:
        """Run one admin command line; return the reply text. Errors are ``TuneloopError``s."""
        try:
            words = shlex.split(text or "")
        except ValueError:
            words = (text or "").split()
        if not words:
            return self.help_text()
        name, args = words[0].lower(), words[1:]
        if name not in COMMANDS:
            raise InputError(f"unknown command {name!r}; try: {', '.join(COMMANDS)}")
        needs_admin, usage, _ = COMMANDS[name]
        if needs_admin and not self.is_admin(caller):
            log.warning("admin command refused: command=%s platform=%s user=%s", name, caller.platform,
                        caller.user)
            raise PermissionDenied(f"`{name}` is for admins only; ask one of your admins")
        log.info("admin command: command=%s platform=%s user=%s args=%s", name, caller.platform,
                 caller.user, args)
        if name == "help":
            return self.help_text()
        if name == "forget-me":
            counts = self.store.forget_user(caller.user)
            return (f"Forgotten: {counts['exchanges']} exchanges, {counts['ratings']} ratings and "
                    f"{counts['corrections']} corrections deleted; nothing of yours will be trained on.")
        if name in ("review", "approve", "reject", "block"):
            return self._trust(caller, name, args, usage)
        if self.control is None:
            return "Training is not available in this process (the learning loop is not running)."
        where = caller.community
        by = f"{caller.platform}:{caller.user}"
        if name == "status":
            return format_status(self.control.status(community=where))
        if name == "models":
            return format_models(self.control.models(community=where))
        if name == "retrain":
            run = self.control.start_run(by, community=where)
            return f"Training run {run['run_id']} started."
        if name == "promote":
            if len(args) != 1:
                raise InputError(f"usage: {usage}")
            out = self.control.promote(args[0], by=by, community=where)
            return f"{out['version']} is live."
        if name == "rollback":
            if len(args) > 1:
                raise InputError(f"usage: {usage}")
            out = self.control.rollback(args[0] if args else None, by=by, community=where)
            return f"Rolled back: {out['version']} is live."
        raise AssertionError(name)


    def _trust(self, caller: Caller, name: str, args: list[str], usage: str) -> str:
        by = f"{caller.platform}:{caller.user}"
        if name == "review":
            if args:
                raise InputError(f"usage: {usage}")
            return format_queue(trust.pending(self.store, caller.community))
        if len(args) != 1:
            raise InputError(f"usage: {usage}")
        if name == "block":
            counts = trust.block(self.store, args[0], by=by, community=caller.community)
            return (f"{args[0]} is blocked: {counts['pending_dropped']} pending corrections dropped; "
                    "nothing of theirs will be trained on.")
        row = trust.review(self.store, correction_id(args[0]), name == "approve", by=by,
                           community=caller.community)
        return f"Correction {row['id']} {'is live' if row['status'] == 'live' else 'rejected'}."


def positive_id(text: str, what: str) -> int:
    """``text`` as a row id (a whole number ≥ 1); ``InputError`` naming ``what`` otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise InputError(f"{what} must be a whole number, got {text!r}") from None
    if value < 1:
        raise InputError(f"{what} must be positive, got {value}")
    return value


def correction_id(text: str) -> int:
    return positive_id(text, "correction id")


def format_queue(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "Nothing waits for review."
    out = []
    for r in rows:
        agree = f" · {r['agreeing']} agree" if r["agreeing"] > 1 else ""
        out.append(f"#{r['id']} by {r['user']} ({r['community']}{agree})\n"
                   f"  asked: {_short(r['prompt'])}\n  bot: {_short(r['reply'])}\n"
                   f"  correction: {_short(r['correction'])}")
    return "\n".join(out)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def format_status(s: dict[str, Any]) -> str:
    lines = [f"live version: {s.get('live_version')}"]
    last = s.get("last_run")
    if last:
        lines.append(f"last run: {last.get('run_id')} {last.get('status')}"
                     + (f" → {last.get('version')} ({'promoted' if last.get('promoted') else 'rejected'})"
                        if last.get("version") else ""))
    else:
        lines.append("last run: none yet")
    lines.append(f"feedback since then: {s.get('new_feedback', 0)}")
    if s.get("running"):
        lines.append(f"running now: {s['running']}")
    lines.append(f"next scheduled run: {s.get('next_run') or 'not scheduled'}")
    if s.get("communities"):
        lines.append("other communities' live versions: "
                     + ", ".join(f"{k} {v}" for k, v in s["communities"].items()))
    return "\n".join(lines)


def format_models(models: list[dict[str, Any]]) -> str:
    if not models:
        return "no versions yet"
    out = []
    for m in models:
        metrics = m.get("metrics") or {}
        figs = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in list(metrics.items())[:4])
        out.append(f"{'* ' if m.get('live') else '  '}{m['version']} [{m.get('verdict', '')}] {figs}")
    return "\n".join(out)
