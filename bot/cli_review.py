"""``tuneloop review | approve | reject | block``: the review queue of corrections, from the terminal.

The operator of the machine acts in every community (``--community`` narrows
``review`` and ``block`` to one). What each does: ``tuneloop.learning.trust``.
"""

from __future__ import annotations

import getpass

from bot.admin import correction_id, format_queue
from bot.cli import _print_json, command, community_arg
from tuneloop.config import Config
from tuneloop.errors import PermissionDenied
from tuneloop.learning import trust


def _reviewer(config: Config) -> str:
    if not config.admin.cli_is_admin:
        raise PermissionDenied("reviewing is for admins; admin.cli_is_admin is false in this config")
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _review_args(p):
    p.add_argument("--community", help="one community's queue only (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")


@command("review", "corrections waiting for review (not served, trained on or exported until approved)"
         )(_review_args)
def cmd_review(args, config: Config) -> int:
    from bot.runtime import open_store

    _reviewer(config)
    with open_store(config) as store:
        rows = trust.pending(store, community_arg(store, args.community))
    if args.json:
        for r in rows:
            _print_json(r)
    else:
        print(format_queue(rows))
    return 0


def _id_args(p):
    p.add_argument("correction_id", help="the id `tuneloop review` shows")


def _decide(args, config: Config, approve: bool) -> int:
    from bot.runtime import open_store

    by = _reviewer(config)
    cid = correction_id(args.correction_id)
    with open_store(config) as store:
        row = trust.review(store, cid, approve, by=by, community=None)
    print(f"correction {row['id']} ({row['community']}): {row['status']}")
    return 0


@command("approve", "make a pending correction live: memory at once, training data")(_id_args)
def cmd_approve(args, config: Config) -> int:
    return _decide(args, config, True)


@command("reject", "reject a pending correction (kept, never used)")(_id_args)
def cmd_reject(args, config: Config) -> int:
    return _decide(args, config, False)


def _block_args(p):
    p.add_argument("user", help="the user id, as `tuneloop review` shows it")
    p.add_argument("--community", help="block in this community only (default: everywhere)")


@command("block", "drop a user's pending corrections; never serve or train on anything of theirs again"
         )(_block_args)
def cmd_block(args, config: Config) -> int:
    from bot.runtime import open_store

    by = _reviewer(config)
    with open_store(config) as store:
        scope = community_arg(store, args.community)
        counts = trust.block(store, args.user, by=by, community=scope)
    print(f"{args.user} blocked in {scope or 'every community'}: "
          f"{counts['pending_dropped']} pending corrections dropped")
    return 0
