"""Ratings and corrections, for every platform alike.

A rating is one per user per exchange: a later rating replaces it, ``none``
removes it. A reaction (👍/👎 on Slack or Discord) is a rating, and removing
it removes the rating only if it still is the current one. A correction is
a better reply written by a user; it becomes the training target for the
corrected exchange's context once it is live: ``tuneloop.learning.trust``
decides whether it is live at once or waits for review. Every one is counted
in the process's metrics under the platform it came from.

An adapter passes the ``community`` it acts in: an exchange of another
community is "not found", exactly as a missing one.
"""

from __future__ import annotations

import logging

from bot.chat import check_text
from bot.metrics import Metrics
from tuneloop.config import TrustConfig
from tuneloop.errors import InputError
from tuneloop.learning.trust import Decision, Trust
from tuneloop.store import Store

log = logging.getLogger(__name__)

RATING_WORDS = {"up": "up", "down": "down", "none": None}


def parse_rating(word: str | None) -> str | None:
    """``up``/``down``/``none`` (or JSON null) to the stored form; anything else is an error."""
    if word is None:
        return None
    if not isinstance(word, str) or word.lower() not in RATING_WORDS:
        raise InputError(f"rating must be up, down or none, got {word!r}")
    return RATING_WORDS[word.lower()]


class Feedback:
    def __init__(self, store: Store, max_chars: int = 4000, metrics: Metrics | None = None,
                 trust: TrustConfig | None = None):
        self.store = store
        self.max_chars = max_chars
        #: None in one-shot commands, which serve no /metrics
        self.metrics = metrics
        self.trust = Trust(trust or TrustConfig(), store)

    def rate(self, exchange_id: int, user: str, rating: str | None, *, platform: str | None = None,
             community: str | None = None) -> None:
        """Store ``user``'s rating; ``platform`` (where it was given) defaults to the exchange's."""
        value = parse_rating(rating)
        ex = self.store.exchange(exchange_id, community)
        platform = platform or ex.platform
        self.store.rate(exchange_id, user, value)
        if self.metrics is not None:
            self.metrics.rating(platform, value)
        log.info("rating stored: exchange=%d community=%s user=%s rating=%s platform=%s", exchange_id,
                 ex.community, user, value or "none", platform)

    def react(self, exchange_id: int, user: str, rating: str, *, added: bool, platform: str,
              community: str | None = None) -> str:
        """A rating reaction added or removed; what came of it: ``rated``, ``unrated`` or ``ignored``.

        Removing a reaction removes the rating only if it is the current one:
        removing 👍 after switching to 👎 keeps the 👎.
        """
        if added:
            self.rate(exchange_id, user, rating, platform=platform, community=community)
            return "rated"
        if self.store.ratings(exchange_id).get(user) != parse_rating(rating):
            return "ignored"
        self.rate(exchange_id, user, None, platform=platform, community=community)
        return "unrated"

    def correct(self, exchange_id: int, user: str, text: str, *, platform: str | None = None,
                community: str | None = None, channel: str | None = None, admin: bool = False) -> Decision:
        """Store a correction: live, pending review or rejected (``Trust.correct``).

        ``channel`` is the ``[trust]`` key it came through (default: the
        platform's, ``api`` and ``web`` being ``web``); ``admin``: its author is one.
        """
        check_text(text, self.max_chars, what="correction")
        ex = self.store.exchange(exchange_id, community)
        platform = platform or ex.platform
        channel = channel or {"api": "web"}.get(platform, platform)
        decision = self.trust.correct(ex, user, text.strip(), channel=channel, admin=admin)
        if self.metrics is not None:
            self.metrics.correction(platform)
        log.info("correction stored: exchange=%d community=%s user=%s correction=%d status=%s platform=%s",
                 exchange_id, ex.community, user, decision.correction_id, decision.status, platform)
        return decision
