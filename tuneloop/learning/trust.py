"""Trust: what stands between a correction and what the bot learns.

A correction is stored ``live`` (it teaches at once: a memory item the next
reply uses, and training data), ``pending`` (it waits in the review queue:
not served, not trained on, not exported) or ``rejected`` (kept, never used).
Which one:

- its author is blocked in the exchange's community -> rejected;
- its author is an admin (the ``[admin]`` lists, an admin API key, the CLI)
  -> live;
- else the policy of the channel it came through (``[trust]``: ``cli``,
  ``web``, ``http``, ``slack``, ``discord``, or ``corrections`` for those left
  empty) -> live or pending;
- a pending one goes live, with every pending one that agrees with it, once
  ``quorum`` distinct users of the community gave the same answer to the
  same question (both normalised: case, spacing, surrounding punctuation).

Ratings need no queue: ``Store.rating_weights`` weighs each rater by their
agreement with the others, so a stream of 👎 from one user moves nothing.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from dataclasses import dataclass, field

from tuneloop.config import TrustConfig
from tuneloop.errors import InputError, NotFoundError
from tuneloop.store import Exchange, Store

log = logging.getLogger(__name__)

#: ``[trust]`` keys naming the channels a correction comes through
CHANNELS = ("cli", "web", "http", "slack", "discord")

_SPACE = re.compile(r"\s+")
_EDGE = " \t\n\"'`“”‘’.,;:!?¡¿。，！？"


def normalise(text: str) -> str:
    """Text as compared for agreement: NFKC, case-folded, one space, no surrounding punctuation."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip(_EDGE)


def agree_key(prompt: str, correction: str) -> str:
    """Names a (question, answer) pair: two corrections agree when their keys are equal."""
    joined = f"{normalise(prompt)}\x00{normalise(correction)}"
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class Decision:
    correction_id: int
    #: live, pending or rejected: where this correction stands now
    status: str
    #: corrections (this one included) that a reached quorum just made live
    approved_by_quorum: list[int] = field(default_factory=list)


class Trust:
    def __init__(self, config: TrustConfig, store: Store):
        self.config = config
        self.store = store

    def policy(self, channel: str) -> str:
        """``live`` or ``review`` for corrections that come through ``channel`` from a non-admin
        (a channel with no key of its own, such as a script's platform name, follows ``corrections``)."""
        own = getattr(self.config, channel) if channel in CHANNELS else ""
        return own or self.config.corrections

    def correct(self, exchange: Exchange, user: str, text: str, *, channel: str, admin: bool) -> Decision:
        """Store ``user``'s correction of ``exchange`` as live, pending or rejected (see the module)."""
        if self.store.is_blocked(user, exchange.community):
            status = "rejected"
        elif admin or self.policy(channel) == "live":
            status = "live"
        else:
            status = "pending"
        key = agree_key(exchange.prompt, text)
        cid = self.store.add_correction(exchange.id, user, text, status=status, agree_key=key)
        if status != "pending":
            return Decision(cid, status)
        agreeing = self.store.agreeing_users(exchange.community, key)
        if agreeing < self.config.quorum:
            return Decision(cid, status)
        approved = self.store.approve_agreed(exchange.community, key, by="quorum")
        log.info("quorum reached: community=%s users=%d corrections=%s", exchange.community, agreeing,
                 ",".join(map(str, approved)))
        return Decision(cid, "live", approved)


# -- what admins do: the CLI, Slack and Discord alike -------------------------------------
# ``community`` is the admin's own (None: the operator's CLI, every community);
# a correction of another community is "not found", as a missing one.


def pending(store: Store, community: str | None) -> list[dict]:
    """The review queue, oldest first (``Store.review_queue``)."""
    return store.scoped(community).review_queue()


def review(store: Store, correction_id: int, approve: bool, *, by: str, community: str | None) -> dict:
    """Approve (live: memory and training data at once) or reject a pending correction."""
    row = store.correction(correction_id)
    if community is not None and row["community"] != community:
        raise NotFoundError(f"correction {correction_id} not found")
    out = store.review_correction(correction_id, "live" if approve else "rejected", by)
    log.info("correction reviewed: correction=%d community=%s status=%s by=%s", correction_id,
             out["community"], out["status"], by)
    return out


def block(store: Store, user: str, *, by: str, community: str | None) -> dict:
    """Block ``user`` in ``community`` (None: everywhere); see ``Store.block_user``."""
    if not user or not user.strip():
        raise InputError("block needs the user id to block")
    counts = store.block_user(user.strip(), community, by)
    log.info("user blocked: user=%s community=%s by=%s pending_dropped=%d", user, community or "*", by,
             counts["pending_dropped"])
    return counts
