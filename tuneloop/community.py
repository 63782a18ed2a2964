"""Communities: whose data a row is, as one plain string key.

Everything learned belongs to a community, and the data of one is never the
context, memory, training data or figures of another. The key is stored on
every exchange (``exchanges.community``); ratings, corrections and memory
items belong to their exchange's community. The forms:

    slack:T0123          a Slack workspace (team id)
    discord:123456       a Discord server (guild id)
    dm:discord:98765     a Discord user's direct messages with the bot
    http:acme            an HTTP API key's community (``[[server.api_keys]]``)
    local                the CLI, and the web chat when no API keys are set

A key is made of ``:``-separated parts of letters, digits, ``_``, ``.`` and
``-``, so it is safe in a log line, a file name and a model name (the later
per-community adapters are named after it).
"""

from __future__ import annotations

import re

from tuneloop.errors import InputError

LOCAL = "local"
#: the prefixes a key may start with (besides ``local`` alone)
KINDS = ("slack", "discord", "dm", "http")
MAX_CHARS = 100

_PART = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")


def check(key: str) -> str:
    """``key`` itself if it is a well-formed community key, else an ``InputError`` saying why."""
    if not isinstance(key, str) or not key:
        raise InputError("community is empty")
    if len(key) > MAX_CHARS:
        raise InputError(f"community is longer than {MAX_CHARS} characters")
    if key == LOCAL:
        return key
    parts = key.split(":")
    if parts[0] not in KINDS or len(parts) < 2:
        raise InputError(f"community {key!r} must be 'local' or start with one of "
                         f"{', '.join(k + ':' for k in KINDS)}")
    bad = next((p for p in parts[1:] if not _PART.match(p)), None)
    if bad is not None:
        raise InputError(f"community {key!r}: {bad!r} may hold only letters, digits, '_', '.' and '-'")
    return key


def http(name: str) -> str:
    """The community of an API key configured as ``community = NAME``.

    A bare name is an HTTP community (``acme`` -> ``http:acme``); a full key
    (``slack:T0123``, ``local``) lets a key act within that community.
    """
    if name == LOCAL or ":" in name:
        return check(name)
    return check(f"http:{name}")


def slack(team_id: str | None) -> str:
    """A Slack workspace's community; an event without a team id is ``local``."""
    return check(f"slack:{team_id}") if team_id else LOCAL


def discord(guild_id: int | str | None, user_id: int | str, *, dms: str = "") -> str:
    """A Discord server's community; a direct message belongs to the user's own (``dm:discord:USER``),
    or to ``dms`` when that names a community (``[discord] dm_community``)."""
    if guild_id is not None:
        return check(f"discord:{guild_id}")
    if dms:
        return check(dms)
    return check(f"dm:discord:{user_id}")
