"""The learning loop's commands: retrain, models, promote, rollback, forget, status.

They work whether or not ``tuneloop run`` is running: they act on the store
and the registry, and a running server follows the registry's live pointer
within seconds. A run is a separate process (``python -m trainer.run``).

``--community C`` picks the community whose line (versions, live pointer,
runs) a command acts on under ``[trainer] scope = "community"``; without it,
``local``, the CLI's and the loopback web chat's own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from bot.cli import _print_json, command
from tuneloop.config import Config
from tuneloop.errors import InputError

if TYPE_CHECKING:
    from tuneloop.learning.control import Control


@contextmanager
def _control(config: Config) -> Iterator[Control]:
    """The learning control over a store that is closed on exit."""
    from bot.runtime import open_store
    from tuneloop.learning.control import Control

    with open_store(config) as store:
        yield Control(config, store)


def _community_arg(p):
    p.add_argument("--community", help="the community whose versions to act on (default: local; "
                   "`tuneloop stats` lists them)")


def _community(args, control: Control) -> str | None:
    """``--community``, checked: a known community under scope community; one error line otherwise."""
    from bot.cli import community_arg

    if args.community is None:
        return None
    if control.config.trainer.scope == "global":
        raise InputError('--community needs [trainer] scope = "community"; under "global" one line of '
                         "versions serves every community")
    return community_arg(control.store, args.community)


def _retrain_args(p):
    _community_arg(p)
    p.add_argument("--wait", action="store_true", help="return when the run has finished")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after SECONDS")


@command("retrain", "start a training run now (on any feedback not trained on yet)")(_retrain_args)
def cmd_retrain(args, config: Config) -> int:
    with _control(config) as control:
        started = control.start_run("cli", community=_community(args, control))
        if not args.wait:
            if args.json:
                _print_json(started)
            else:
                print(f"{started['run_id']} started (log: {started['log']})")
            return 0
        try:  # from the first word about the run on: a Ctrl-C before the wait is one too
            if not args.json:
                print(f"{started['run_id']} started; waiting (log: {started['log']})", file=sys.stderr)
            control.wait(started["run_id"], timeout=args.timeout)
        except KeyboardInterrupt:
            # The run is its own process in its own session: Ctrl-C stops the waiting only.
            print(f"tuneloop: interrupted; {started['run_id']} goes on in the background (pid "
                  f"{started['pid']}, log {started['log']}); `tuneloop status` follows it", file=sys.stderr)
            return 130
        out = control.outcome(started["run_id"])
    if args.json:
        _print_json(out)
    elif out["status"] in ("failed", "cancelled"):
        print(f"{out['run_id']} {out['status']}: {out['error']}")
    else:
        m = out["metrics"]
        print(f"{out['run_id']}: {out['version']} {'promoted' if out['promoted'] else 'rejected'}; "
              f"live: {out['live']}")
        for c in out["checks"]:
            print(f"  {'ok  ' if c['passed'] else 'FAIL'} {c['name']}: {c['value']} (limit {c['limit']})"
                  + ("" if c.get("gating", True) else " [reported only: too few held-out items]"))
        print(f"  corrected prompts answered with the correction: {m.get('corrected_exact')} "
              f"(live {m.get('corrected_exact_live')}); BLEU {m.get('bleu')}, ROUGE-L {m.get('rougeL')}")
    return 0 if out["status"] == "done" else 1


def _json_args(p):
    p.add_argument("--json", action="store_true", help="print JSON")
    _community_arg(p)


def _show(config: Config, args, read, text) -> int:
    """Print what ``read(control, community)`` returns, as JSON or through ``text``."""
    with _control(config) as control:
        value = read(control, _community(args, control))
    if args.json:
        _print_json(value)
    else:
        print(text(value))
    return 0


@command("models", "every model version with its metrics and verdict; * marks the live one")(_json_args)
def cmd_models(args, config: Config) -> int:
    from bot.admin import format_models

    return _show(config, args, lambda c, community: c.models(community), format_models)


@command("status", "live version, last run, feedback since then, a run going")(_json_args)
def cmd_status(args, config: Config) -> int:
    from bot.admin import format_status

    return _show(config, args, lambda c, community: c.status(community), format_status)


def _promote_args(p):
    p.add_argument("version", help="a version id (v3) or base")
    _community_arg(p)


@command("promote", "make VERSION live (a running server swaps it in within seconds)")(_promote_args)
def cmd_promote(args, config: Config) -> int:
    with _control(config) as control:
        out = control.promote(args.version, by="cli", community=_community(args, control))
    if out.get("warning"):
        print(f"warning: {out['warning']}", file=sys.stderr)
    print(f"{out['version']} is live{_in(out)} (was {out['previous']})")
    return 0


def _in(out) -> str:
    return "" if out.get("community") in (None, "local", "*") else f" in {out['community']}"


def _rollback_args(p):
    p.add_argument("version", nargs="?", help="version to go back to (default: the live one's parent)")
    _community_arg(p)


@command("rollback", "go back to VERSION, by default the live version's parent")(_rollback_args)
def cmd_rollback(args, config: Config) -> int:
    with _control(config) as control:
        out = control.rollback(args.version, by="cli", community=_community(args, control))
    print(f"rolled back: {out['version']} is live{_in(out)} (was {out['previous']})")
    return 0


def _forget_args(p):
    p.add_argument("user", help="the user id, as exchanges record it")
    p.add_argument("--json", action="store_true", help="print JSON")


@command("forget", "delete a user's exchanges, ratings and corrections; never train on them again")(_forget_args)
def cmd_forget(args, config: Config) -> int:
    from bot.runtime import open_store

    if not args.user.strip():
        raise InputError("user is empty")
    with open_store(config) as store:
        counts = store.forget_user(args.user)
    if args.json:
        _print_json({"user": args.user, **counts})
    else:
        print(f"forgot {args.user}: {counts['exchanges']} exchanges, {counts['ratings']} ratings, "
              f"{counts['corrections']} corrections deleted; opted out of training")
    return 0
