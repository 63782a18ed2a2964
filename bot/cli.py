"""The ``tuneloop`` command.

Names, arguments and JSON fields here are a contract with scripts: change
them only by adding. Every failure tuneloop expects prints one line,
``tuneloop: error: ...``, and exits non-zero; nothing stored is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from bot import __version__
from tuneloop.config import Config, load
from tuneloop.errors import InputError, TuneloopError

log = logging.getLogger("tuneloop")

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[..., int], str]] = {}


def command(name: str, help: str):
    """Register ``tuneloop NAME``: the decorated function adds its arguments."""
    def wrap(add_args):
        def register(run):
            COMMANDS[name] = (add_args, run, help)
            return run
        return register
    return wrap


def _exchange_id(text: str) -> int:
    from bot.admin import positive_id  # here: `tuneloop --help` imports no more than it needs

    return positive_id(text, "exchange id")


def community_arg(store, text: str | None) -> str | None:
    """``--community C``: a community that has data (``tuneloop stats`` lists them), else one error line."""
    if text is None:
        return None
    from tuneloop import community

    community.check(text)
    known = store.communities()
    if text not in known:
        raise InputError(f"community {text!r} not found (known: {', '.join(known) or 'none yet'})")
    return text


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=None) + "\n")


def _default_user(args) -> str:
    from bot.adapters.console import default_user

    return args.user or default_user()


# -- chat / ask ----------------------------------------------------------------------

def _check_conversation(config: Config, conversation: str | None) -> None:
    """Fail on an unknown conversation id before the model loads."""
    if conversation:
        from bot.runtime import open_store
        from tuneloop.community import LOCAL

        with open_store(config) as store:
            # The terminal talks in the local community: another's conversation is not there to continue.
            if not store.conversation_exists(conversation, LOCAL):
                raise InputError(f"conversation {conversation} not found")


def _chat_args(p):
    p.add_argument("--user", help="who is talking (default: your login name)")
    p.add_argument("--conversation", help="continue this conversation id")


@command("chat", "talk to the bot in the terminal (/good /bad /fix TEXT /new /quit)")(_chat_args)
def cmd_chat(args, config: Config) -> int:
    from bot.adapters.console import run_console
    from bot.runtime import services

    _check_conversation(config, args.conversation)

    async def go() -> int:
        async with services(config) as svc:
            return await run_console(svc, _default_user(args), args.conversation)

    return asyncio.run(go())


def _ask_args(p):
    p.add_argument("text", help="the message")
    _chat_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("ask", "one exchange: send TEXT, print the reply")(_ask_args)
def cmd_ask(args, config: Config) -> int:
    from bot.chat import Turn, check_text
    from bot.runtime import services

    check_text(args.text, config.model.max_input_chars)  # fail before loading a model
    _check_conversation(config, args.conversation)

    async def go() -> int:
        async with services(config) as svc:
            stream = None if args.json else (lambda d: (sys.stdout.write(d), sys.stdout.flush()))
            ex = await svc.chat.respond(
                Turn(text=args.text, user=_default_user(args), platform="cli",
                     conversation_id=args.conversation), on_delta=stream)
            if args.json:
                _print_json({"exchange_id": ex.id, "conversation_id": ex.conversation_id,
                             "reply": ex.reply, "model_version": ex.model_version,
                             "prompt_tokens": ex.prompt_tokens,
                             "completion_tokens": ex.completion_tokens,
                             "finish_reason": ex.finish_reason, "total_ms": round(ex.total_ms or 0, 1)})
            else:
                sys.stdout.write(f"\n[exchange {ex.id} · conversation {ex.conversation_id} · "
                                 f"{ex.model_version}]\n")
        return 0

    return asyncio.run(go())


# -- feedback ---------------------------------------------------------------------------

def _rate_args(p):
    p.add_argument("exchange_id")
    p.add_argument("rating", help="up, down or none (removes your rating)")
    p.add_argument("--user", help="who rates (default: your login name)")


@command("rate", "rate an exchange up, down or none")(_rate_args)
def cmd_rate(args, config: Config) -> int:
    from bot.feedback import Feedback, parse_rating
    from bot.runtime import open_store

    exchange_id = _exchange_id(args.exchange_id)
    rating = parse_rating(args.rating)
    with open_store(config) as store:
        Feedback(store).rate(exchange_id, _default_user(args), rating)
    print(f"exchange {exchange_id}: rating {rating or 'removed'}")
    return 0


def _correct_args(p):
    p.add_argument("exchange_id")
    p.add_argument("text", help="the better reply")
    p.add_argument("--user", help="who corrects (default: your login name)")


@command("correct", "store a better reply for an exchange")(_correct_args)
def cmd_correct(args, config: Config) -> int:
    from bot.feedback import Feedback
    from bot.runtime import open_store

    exchange_id = _exchange_id(args.exchange_id)
    with open_store(config) as store:
        decision = Feedback(store, config.model.max_input_chars, trust=config.trust).correct(
            exchange_id, _default_user(args), args.text, channel="cli", admin=config.admin.cli_is_admin)
    waits = " (waits for review: tuneloop review)" if decision.status == "pending" else ""
    print(f"exchange {exchange_id}: correction {decision.correction_id} stored, {decision.status}{waits}")
    return 0


# -- figures and data --------------------------------------------------------------------

def _stats_args(p):
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--community", help="one community's figures only (default: all)")


@command("stats", "exchanges, ratings, corrections and approval, per platform, version and community"
         )(_stats_args)
def cmd_stats(args, config: Config) -> int:
    from bot.runtime import open_store

    with open_store(config) as store:
        stats = store.scoped(community_arg(store, args.community)).stats()
    if args.json:
        _print_json(stats)
        return 0

    def pct(v):
        return "-" if v is None else f"{v:.0%}"

    def line(name, s):
        return (f"{name:<28} {s['exchanges']:>9} {s['ratings']['up']:>5} {s['ratings']['down']:>5} "
                f"{s['corrections']:>11} {pct(s['approval_rate']):>9}")

    print(f"{'':<28} {'exchanges':>9} {'up':>5} {'down':>5} {'corrections':>11} {'approval':>9}")
    print(line("all", stats))
    for title, key in (("platform", "by_platform"), ("version", "by_version"), ("community", "by_community")):
        for name, s in stats[key].items():
            print(line(f"{title} {name}", s))
    if stats["pending"]:
        print(f"not counted: {stats['pending']} exchanges pending (a reply still streaming, or cut by a crash)")
    if stats["review"]:
        print(f"waiting for review: {stats['review']} corrections (tuneloop review)")
    return 0


def _export_args(p):
    p.add_argument("--format", required=True, help="sft, kto or dpo")
    p.add_argument("--output", help="write to FILE instead of standard output")
    p.add_argument("--community", help="one community's feedback only (default: all)")


@command("export", "feedback as JSONL for TRL's SFT, KTO or DPO trainers")(_export_args)
def cmd_export(args, config: Config) -> int:
    from bot.runtime import open_store
    from trainer.data import FORMATS, export

    if args.format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {args.format!r}")
    with open_store(config) as store:
        rows = export(store.scoped(community_arg(store, args.community)), args.format)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)  # a reader never sees half a file
        print(f"{len(rows)} {args.format} rows written to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# -- entry point -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # Import the modules that register more commands (run, bench, training).
    for module in ("bot.cli_serve", "bot.cli_train", "bot.cli_memory", "bot.cli_review"):
        try:
            __import__(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    parser = argparse.ArgumentParser(
        prog="tuneloop", description="A chatbot for Slack and Discord that learns from its users.")
    parser.add_argument("--config", help="config file (default: $TUNELOOP_CONFIG or ./config.toml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every event")
    parser.add_argument("--version", action="version", version=f"tuneloop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, _, help_text) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def setup_logging(verbose: bool, default: int = logging.WARNING) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else default, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # The starter build and model downloads report progress at INFO.
    logging.getLogger("trainer").setLevel(logging.INFO)
    logging.getLogger("trainer.models").setLevel(logging.INFO)
    # APScheduler narrates every job it adds; bot.learning logs the schedule once.
    logging.getLogger("apscheduler").setLevel(logging.INFO if verbose else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(args.verbose, logging.INFO if args.command in ("run",) else logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.verbose and args.command in ("ask", "chat"):
        # Weight-loading bars are noise in a one-shot answer; downloads and
        # the starter build keep their own progress.
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        config = load(args.config)
        return COMMANDS[args.command][1](args, config) or 0
    except TuneloopError as e:
        print(f"tuneloop: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tuneloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
