"""The terminal adapter: ``tuneloop chat``. Translates lines to turns, nothing more."""

from __future__ import annotations

import asyncio
import getpass
import sys

from bot.chat import Turn, new_conversation_id
from bot.services import Services
from tuneloop.errors import TuneloopError

HELP = "commands: /good  /bad  /fix TEXT  /new  /quit"


def default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 — no login name in some containers
        return "cli"


async def run_console(svc: Services, user: str, conversation_id: str | None = None,
                      stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    loop = asyncio.get_running_loop()
    conversation = conversation_id or new_conversation_id("cli")
    last: int | None = None
    out.write(f"tuneloop chat — model {svc.engine.model_version}. {HELP}\n")
    out.flush()
    while True:
        out.write("you> ")
        out.flush()
        line = await loop.run_in_executor(None, stdin.readline)
        if not line:  # end of input
            out.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                return 0
            if line == "/new":
                conversation, last = new_conversation_id("cli"), None
                out.write("(new conversation)\n")
            elif line in ("/good", "/bad"):
                if last is None:
                    out.write("nothing to rate yet\n")
                    continue
                svc.feedback.rate(last, user, "up" if line == "/good" else "down")
                out.write(f"(rated exchange {last} {'up' if line == '/good' else 'down'})\n")
            elif line.startswith("/fix"):
                if last is None:
                    out.write("nothing to correct yet\n")
                    continue
                svc.feedback.correct(last, user, line[4:].strip())
                out.write(f"(correction stored for exchange {last})\n")
            elif line.startswith("/"):
                out.write(f"unknown command {line.split()[0]}; {HELP}\n")
            else:
                out.write("bot> ")
                out.flush()

                def show(delta: str) -> None:
                    out.write(delta)
                    out.flush()

                ex = await svc.chat.respond(Turn(text=line, user=user, platform="cli",
                                                 conversation_id=conversation), on_delta=show)
                last = ex.id
                out.write(f"\n  [exchange {ex.id}]\n")
        except TuneloopError as e:
            out.write(f"error: {e}\n")
        out.flush()
