"""Slack text in and out, and a reply streamed into Slack messages by edits.

Inbound, Slack's markup (``<@U1>``, ``<#C1|general>``, ``<https://x|label>``,
``&amp;``) becomes plain text for the model. Outbound, the model's text is
escaped so it can never ping ``<!channel>``, and split into several messages
when it outgrows one. ``ReplyStream`` posts the first piece and then edits
it, at most once per ``interval`` seconds, posting further messages as the
text grows past ``max_chars``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from slack_sdk.web.async_client import AsyncWebClient

log = logging.getLogger(__name__)

#: Slack truncates ``text`` past 40,000 characters and advises 4,000 per message.
MAX_MESSAGE_CHARS = 3900
#: Slack refuses an empty message; a reply that is only whitespace shows this.
EMPTY_REPLY = "…"

_LINK = re.compile(r"<([^<>|]*)(?:\|([^<>]*))?>")


def plain_text(text: str, bot_user_id: str | None = None) -> str:
    """Slack's ``mrkdwn`` markup of a user message to the text a model reads."""

    def link(m: re.Match) -> str:
        target, label = m.group(1), m.group(2)
        if target.startswith("@"):
            return "" if target[1:] == bot_user_id else f"@{label or target[1:]}"
        if target.startswith("#"):
            return f"#{label or target[1:]}"
        if target.startswith("!"):  # <!here>, <!channel>, <!subteam^S1|@team>
            return f"@{label.lstrip('@') if label else target[1:].split('^')[0]}"
        return label or target

    out = _LINK.sub(link, text or "")
    out = out.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return re.sub(r"[ \t]{2,}", " ", out).strip()


def escape(text: str) -> str:
    """Model output to Slack text that cannot mention, link or ping anyone."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def split_text(text: str, limit: int = MAX_MESSAGE_CHARS) -> list[str]:
    """Pieces of at most ``limit`` characters, cut at a line break or space when one is near."""
    pieces: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = max(rest.rfind("\n", 0, limit + 1), rest.rfind(" ", 0, limit + 1))
        if cut < limit // 2:
            cut = limit
        amp = rest.rfind("&", max(0, cut - 5), cut)  # never cut an &amp; in two
        if amp > 0 and ";" not in rest[amp:cut]:
            cut = amp
        pieces.append(rest[:cut].rstrip() or rest[:cut])
        rest = rest[cut:].lstrip()
    if rest.strip() or not pieces:
        pieces.append(rest)
    return pieces


class ReplyStream:
    """One reply in one thread: posted once, then edited as the text grows."""

    def __init__(self, client: AsyncWebClient, channel: str, thread_ts: str, *,
                 interval: float = 1.0, max_chars: int = MAX_MESSAGE_CHARS):
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts
        self.interval = interval
        self.max_chars = max_chars
        self.text = ""
        #: (ts, text shown) of every message this reply occupies, in order
        self.posted: list[tuple[str, str]] = []
        self._last: float | None = None

    @property
    def first_ts(self) -> str | None:
        return self.posted[0][0] if self.posted else None

    async def add(self, delta: str) -> None:
        """A new piece of the reply; shows it if the last edit is ``interval`` old."""
        self.text += delta
        if not self.text.strip():
            return
        if self._last is None or time.monotonic() - self._last >= self.interval:
            await self._show(self.text)

    async def finish(self, text: str) -> list[str]:
        """Show the whole reply (waiting out the edit interval); the ts of its messages."""
        if self._last is not None:
            wait = self.interval - (time.monotonic() - self._last)
            if wait > 0 and self._differs(text):
                await asyncio.sleep(wait)
        await self._show(text)
        return [ts for ts, _ in self.posted]

    def _pieces(self, text: str) -> list[str]:
        return split_text(escape(text), self.max_chars) if text.strip() else [EMPTY_REPLY]

    def _differs(self, text: str) -> bool:
        return [shown for _, shown in self.posted] != self._pieces(text)

    async def _show(self, text: str) -> None:
        self.text = text
        pieces = self._pieces(text)
        for i, piece in enumerate(pieces):
            if i < len(self.posted):
                ts, shown = self.posted[i]
                if shown != piece:
                    await self.client.chat_update(channel=self.channel, ts=ts, text=piece)
                    self.posted[i] = (ts, piece)
            else:
                r = await self.client.chat_postMessage(channel=self.channel, thread_ts=self.thread_ts,
                                                       text=piece)
                self.posted.append((r["ts"], piece))
        # A final text shorter than the streamed one (an error replacing a
        # partial reply) leaves surplus messages: they go.
        for ts, _ in self.posted[len(pieces):]:
            await self.client.chat_delete(channel=self.channel, ts=ts)
        del self.posted[len(pieces):]
        self._last = time.monotonic()
