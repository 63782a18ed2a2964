"""Ratings and corrections, for every platform alike.

A rating is one per user per exchange: a later rating replaces it, ``none``
removes it. A correction is a better reply written by a user; it becomes the
training target for the corrected exchange's context.
"""

from __future__ import annotations

import logging

from bot.chat import check_text
from tuneloop.errors import InputError
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
    def __init__(self, store: Store, max_chars: int = 4000):
        self.store = store
        self.max_chars = max_chars

    def rate(self, exchange_id: int, user: str, rating: str | None) -> None:
        value = parse_rating(rating)
        self.store.rate(exchange_id, user, value)
        log.info("rating stored: exchange=%d user=%s rating=%s", exchange_id, user, value or "none")

    def correct(self, exchange_id: int, user: str, text: str) -> int:
        check_text(text, self.max_chars, what="correction")
        cid = self.store.add_correction(exchange_id, user, text.strip())
        log.info("correction stored: exchange=%d user=%s correction=%d", exchange_id, user, cid)
        return cid
