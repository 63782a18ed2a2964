"""Slack text in and out, and the Slack side of a streamed reply.

Inbound, Slack's markup (``<@U1>``, ``<#C1|general>``, ``<https://x|label>``,
``&amp;``) becomes plain text for the model. Outbound, the model's text is
escaped so it can never ping ``<!channel>``, and split into several messages
when it outgrows one (never inside an ``&amp;``). ``SlackPoster`` posts,
edits and deletes one reply's messages in a thread for ``bot.replies``'
``ReplyStream``, which decides when.
"""

from __future__ import annotations

import logging
import re

from slack_sdk.web.async_client import AsyncWebClient

from bot import replies

log = logging.getLogger(__name__)

#: Slack truncates ``text`` past 40,000 characters and advises 4,000 per message.
MAX_MESSAGE_CHARS = 3900
#: what ``escape`` writes; a message is never cut inside one
ENTITY = re.compile(r"&(?:amp|lt|gt);")

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
    """Escaped text in pieces of at most ``limit`` characters, no ``&amp;`` cut in two."""
    return replies.split_text(text, limit, keep_whole=ENTITY)


class SlackPoster:
    """One reply's messages in one Slack thread."""

    def __init__(self, client: AsyncWebClient, channel: str, thread_ts: str):
        self.client = client
        self.channel = channel
        self.thread_ts = thread_ts

    async def post(self, text: str) -> str:
        r = await self.client.chat_postMessage(channel=self.channel, thread_ts=self.thread_ts, text=text)
        return r["ts"]

    async def edit(self, ref: str, text: str) -> None:
        await self.client.chat_update(channel=self.channel, ts=ref, text=text)

    async def delete(self, ref: str) -> None:
        await self.client.chat_delete(channel=self.channel, ts=ref)
