"""A reply streamed into a platform's messages, for every platform alike.

Boundary: this module knows no platform. A ``Poster`` posts, edits and
deletes one platform's messages; ``ReplyStream`` decides what and when:

- the first visible text is posted at once, then the message is edited at
  most once per ``interval`` seconds, and the final text waits out the
  interval too;
- text past the platform's ``max_chars`` continues in a further message;
- every message is registered as part of the exchange's reply the moment it
  exists (the reference is the first or the last message, as the platform
  wants), so a 👍 given while the reply still streams already rates it.

Time comes from a ``Clock`` so that tests can drive it without sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Literal, Protocol

from tuneloop.store import Store

log = logging.getLogger(__name__)

#: Platforms refuse an empty message; a reply that is only whitespace shows this.
EMPTY_REPLY = "…"


class Poster(Protocol):
    """One reply's messages on one platform."""

    async def post(self, text: str) -> str:
        """Post the reply's next message; its platform reference (Slack ts, Discord message id)."""

    async def edit(self, ref: str, text: str) -> None:
        """Replace the text of a message this poster posted."""

    async def delete(self, ref: str) -> None:
        """Remove a message this poster posted."""


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """The real clock."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def split_text(text: str, limit: int, *, keep_whole: re.Pattern[str] | None = None) -> list[str]:
    """Pieces of at most ``limit`` characters, cut at a line break or space when one is near.

    No piece is blank, so a blank text has none. ``keep_whole`` matches what
    must not be cut in two (Slack's ``&amp;``): a cut inside a match moves
    before it.
    """
    pieces: list[str] = []
    rest = text
    while len(rest) > limit:
        cut = max(rest.rfind("\n", 0, limit + 1), rest.rfind(" ", 0, limit + 1))
        if cut < limit // 2:
            cut = limit
        if keep_whole is not None:
            for m in keep_whole.finditer(rest, max(0, cut - limit // 2), min(len(rest), cut + limit)):
                if m.start() < cut < m.end() and m.start() > 0:
                    cut = m.start()
                    break
        pieces.append(rest[:cut].rstrip() or rest[:cut])
        rest = rest[cut:].lstrip()
    if rest.strip():
        pieces.append(rest)
    return pieces


class ReplyStream:
    """One reply: posted, edited at most every ``interval`` s, split at ``max_chars``.

    Give ``start`` to ``Chat.respond`` as ``on_start`` and ``add`` as
    ``on_delta``; then ``finish`` with the whole reply (or, when answering
    failed, with the apology and ``failed=True``: the exchange is gone and the
    messages are no longer its reply).
    """

    def __init__(self, poster: Poster, store: Store, *, max_chars: int, interval: float = 1.0,
                 anchor: Literal["first", "last"] = "first", clock: Clock | None = None,
                 render: Callable[[str], str] = str, keep_whole: re.Pattern[str] | None = None):
        self.poster = poster
        self.store = store
        self.max_chars = max_chars
        self.interval = interval
        #: which message is the exchange's ``reply_ref``; the others are its parts
        self.anchor = anchor
        self.clock = clock or MonotonicClock()
        self.render = render
        self.keep_whole = keep_whole
        self.exchange_id: int | None = None
        self.text = ""
        #: (ref, text shown) of every message this reply occupies, in order
        self.posted: list[tuple[str, str]] = []
        self._last: float | None = None

    @property
    def refs(self) -> list[str]:
        return [ref for ref, _ in self.posted]

    @property
    def reply_ref(self) -> str | None:
        if not self.posted:
            return None
        return self.posted[0][0] if self.anchor == "first" else self.posted[-1][0]

    def start(self, exchange_id: int) -> None:
        """The exchange this reply answers is logged: its messages will be registered with it."""
        self.exchange_id = exchange_id
        if self.posted:
            self._register()

    async def add(self, delta: str) -> None:
        """A new piece of the reply; shown at once if nothing is, else once the last edit is ``interval`` old."""
        self.text += delta
        if not self.text.strip():
            return
        if self._last is None or self.clock.now() - self._last >= self.interval:
            await self._show(self.text)

    async def finish(self, text: str, *, failed: bool = False) -> list[str]:
        """Show ``text`` as the whole reply (waiting out the edit interval); the refs of its messages."""
        if failed:
            self.exchange_id = None
        if self._last is not None and self._pieces(text) != [shown for _, shown in self.posted]:
            wait = self.interval - (self.clock.now() - self._last)
            if wait > 0:
                await self.clock.sleep(wait)
        await self._show(text)
        return self.refs

    def _pieces(self, text: str) -> list[str]:
        return split_text(self.render(text), self.max_chars, keep_whole=self.keep_whole) or [EMPTY_REPLY]

    async def _show(self, text: str) -> None:
        self.text = text
        pieces = self._pieces(text)
        for i, piece in enumerate(pieces):
            if i < len(self.posted):
                ref, shown = self.posted[i]
                if shown != piece:
                    await self.poster.edit(ref, piece)
                    self.posted[i] = (ref, piece)
            else:
                self.posted.append((await self.poster.post(piece), piece))
                self._register()
        # A final text shorter than the streamed one (an apology replacing a
        # partial reply) leaves surplus messages: they go.
        for ref, _ in self.posted[len(pieces):]:
            await self.poster.delete(ref)
        del self.posted[len(pieces):]
        self._last = self.clock.now()

    def _register(self) -> None:
        if self.exchange_id is None:
            return
        main = self.reply_ref
        assert main is not None
        self.store.set_reply_ref(self.exchange_id, main, parts=[r for r in self.refs if r != main])
