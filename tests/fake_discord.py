"""A fake Discord on 127.0.0.1: the REST routes the adapter uses and a gateway websocket.

The gateway speaks the documented sequence: HELLO (op 10) on connect,
IDENTIFY (op 2) answered by READY and GUILD_CREATE dispatches (op 0, with
sequence numbers), HEARTBEAT (op 1) answered by HEARTBEAT_ACK (op 11), and
RESUME (op 6) answered by replaying the dispatches missed since the given
sequence, then RESUMED. ``drop()`` cuts the connection as Discord's edge does.

Payloads have the shapes of Discord's documentation (API v10), with the fields
discord.py 2.7.1's parsers require. Tests act as users through ``say``,
``react``, ``unreact``, ``slash``, ``context_menu`` and ``submit_modal``, and
read what the bot did from ``messages``, ``callbacks``, ``followups`` and
``requests``.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

DISCORD_EPOCH_MS = 1420070400000
# A generous permission set, as a string like Discord sends it.
ALL_PERMISSIONS = str((1 << 50) - 1)


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


@dataclass
class FakeUser:
    id: str
    name: str
    bot: bool = False
    roles: list[str] = field(default_factory=list)

    def payload(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.name, "discriminator": "0", "global_name": self.name,
                "avatar": None, "bot": self.bot, "public_flags": 0, "flags": 0}

    def member(self, with_user: bool = True) -> dict[str, Any]:
        m = {"roles": list(self.roles), "joined_at": "2024-01-01T00:00:00+00:00", "deaf": False,
             "mute": False, "flags": 0, "nick": None, "avatar": None, "pending": False}
        if with_user:
            m["user"] = self.payload()
        return m


class FakeDiscord:
    """One guild with two text channels, a bot user, and whatever the tests add."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.bot = FakeUser(self.snowflake(), "tuneloop", bot=True)
        self.application_id = self.snowflake()
        self.guild_id = self.snowflake()
        self.admin_role = self.snowflake()
        self.general = self.snowflake()  # answered on mention only
        self.chat = self.snowflake()  # meant to be in [discord] channels
        self.token = "fake-bot-token"
        self.channels: dict[str, dict[str, Any]] = {}
        for cid, name in ((self.general, "general"), (self.chat, "chat")):
            self.channels[cid] = {"id": cid, "type": 0, "guild_id": self.guild_id, "name": name,
                                  "position": len(self.channels), "permission_overwrites": [], "nsfw": False,
                                  "parent_id": None, "topic": None, "last_message_id": None,
                                  "rate_limit_per_user": 0, "flags": 0}
        self.more_guilds: list[str] = []  # add_guild's
        self.messages: dict[str, dict[str, Any]] = {}
        self.edits: dict[str, list[float]] = {}  # message id -> monotonic times of PATCHes
        self.reactions: list[tuple[str, str, str]] = []  # (message id, emoji, user id) added over REST
        self.commands: dict[str, list[dict[str, Any]]] = {}  # "global" or guild id -> synced commands
        self.callbacks: list[dict[str, Any]] = []  # interaction responses
        self.followups: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.unknown_routes: list[tuple[str, str]] = []
        self.identifies = 0
        self.resumes = 0
        self.heartbeats = 0
        self._ws: web.WebSocketResponse | None = None
        self._seq = 0
        self._session = "fake-session-1"
        self._sent: list[dict[str, Any]] = []  # every dispatch of the session, for RESUME
        self._connected = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ server

    def snowflake(self) -> str:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) | (next(self._ids) & 0x3FFFFF))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base_url(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.url.rsplit(':', 1)[1]}/gateway"

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 41250}, "s": None, "t": None})
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            op = data.get("op")
            if op == 1:
                self.heartbeats += 1
                await ws.send_json({"op": 11, "d": None, "s": None, "t": None})
            elif op == 2:
                self.identifies += 1
                self._ws = ws
                self._seq = 0
                self._sent = []
                await self.dispatch("READY", self._ready())
                await self.dispatch("GUILD_CREATE", self._guild())
                for gid in self.more_guilds:
                    await self.dispatch("GUILD_CREATE", self._guild(gid))
                self._connected.set()
            elif op == 6:
                self.resumes += 1
                d = data["d"]
                if d.get("session_id") != self._session or d.get("token") != self.token:
                    await ws.send_json({"op": 9, "d": False, "s": None, "t": None})
                    continue
                self._ws = ws
                for event in self._sent:
                    if event["s"] > (d.get("seq") or 0):
                        await ws.send_json(event)
                self._seq += 1
                await ws.send_json({"op": 0, "t": "RESUMED", "s": self._seq, "d": {}})
                self._connected.set()
        if self._ws is ws:
            self._ws = None
            self._connected.clear()
        return ws

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a dispatch now, or keep it for the RESUME of a dropped session."""
        self._seq += 1
        payload = {"op": 0, "t": event, "s": self._seq, "d": data}
        self._sent.append(payload)
        if self._ws is not None and not self._ws.closed:
            try:
                await self._ws.send_json(payload)
            except ConnectionResetError:
                pass

    async def drop(self) -> None:
        """Close the gateway connection the way an edge restart does (close code 4000)."""
        ws, self._ws = self._ws, None
        self._connected.clear()
        if ws is not None:
            await ws.close(code=4000, message=b"dropped by the test")

    async def wait_connected(self, timeout: float = 20) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    def _ready(self) -> dict[str, Any]:
        return {"v": 10, "user": {**self.bot.payload(), "verified": True, "mfa_enabled": False},
                "guilds": [{"id": self.guild_id, "unavailable": True}], "session_id": self._session,
                "resume_gateway_url": self.gateway_url, "shard": [0, 1],
                "application": {"id": self.application_id, "flags": 0},
                "private_channels": [], "relationships": [], "user_settings": {}, "session_type": "normal"}

    async def add_guild(self) -> tuple[str, str]:
        """Another server, with one text channel, that the bot joins now: ``(guild id, channel id)``."""
        gid, cid = self.snowflake(), self.snowflake()
        self.channels[cid] = {"id": cid, "type": 0, "guild_id": gid, "name": "general", "position": 0,
                              "permission_overwrites": [], "nsfw": False, "parent_id": None, "topic": None,
                              "last_message_id": None, "rate_limit_per_user": 0, "flags": 0}
        self.more_guilds.append(gid)
        await self.dispatch("GUILD_CREATE", self._guild(gid))
        return gid, cid

    def _guild(self, guild_id: str | None = None) -> dict[str, Any]:
        guild_id = guild_id or self.guild_id
        role = {"color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0,
                "icon": None, "unicode_emoji": None, "permissions": "0"}
        return {
            "id": guild_id, "name": "Fake Guild", "icon": None, "splash": None, "discovery_splash": None,
            "owner_id": self.snowflake(), "afk_channel_id": None, "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "mfa_level": 0, "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
            "vanity_url_code": None, "description": None, "banner": None, "premium_tier": 0,
            "preferred_locale": "en-US", "public_updates_channel_id": None, "nsfw_level": 0,
            "premium_progress_bar_enabled": False, "features": [], "emojis": [], "stickers": [],
            "roles": [{**role, "id": guild_id, "name": "@everyone", "position": 0,
                       "permissions": "1115136"},
                      {**role, "id": self.admin_role, "name": "bot-admins", "position": 1}],
            "joined_at": _now_iso(), "large": False, "unavailable": False, "member_count": 2,
            "voice_states": [], "members": [self.bot.member()],
            "channels": [c for c in self.channels.values() if c.get("guild_id") == guild_id],
            "threads": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    # ------------------------------------------------------------------ what users do

    def _message(self, channel_id: str, author: FakeUser, content: str, *, reply_to: str | None = None,
                 mentions: list[FakeUser] | None = None, attachments: list[dict] | None = None,
                 store: bool = True) -> dict:
        channel = self.channels[channel_id]
        guild_id = channel.get("guild_id")
        msg: dict[str, Any] = {
            "id": self.snowflake(), "channel_id": channel_id, "author": author.payload(),
            "content": content, "timestamp": _now_iso(), "edited_timestamp": None, "tts": False,
            "mention_everyone": False, "mentions": [u.payload() for u in (mentions or [])],
            "mention_roles": [], "attachments": attachments or [], "embeds": [], "pinned": False,
            "type": 0, "flags": 0, "components": [],
        }
        if guild_id:
            msg["guild_id"] = guild_id
        if reply_to is not None:
            parent = self.messages[reply_to]
            msg["type"] = 19
            msg["message_reference"] = {"type": 0, "message_id": reply_to, "channel_id": parent["channel_id"],
                                        **({"guild_id": guild_id} if guild_id else {})}
            msg["referenced_message"] = {k: v for k, v in parent.items() if k != "referenced_message"}
        if store:
            self.messages[msg["id"]] = msg
            channel["last_message_id"] = msg["id"]
        return msg

    async def say(self, author: FakeUser, content: str, *, channel: str | None = None,
                  reply_to: str | None = None, mention_bot: bool = False,
                  attachments: list[dict] | None = None) -> dict[str, Any]:
        """A user posts a message; the bot gets MESSAGE_CREATE."""
        channel = channel or self.general
        if mention_bot:
            content = f"<@{self.bot.id}> {content}"
        msg = self._message(channel, author, content, reply_to=reply_to,
                            mentions=[self.bot] if mention_bot else None, attachments=attachments)
        event = dict(msg)
        if msg.get("guild_id"):
            event["member"] = author.member(with_user=False)
        await self.dispatch("MESSAGE_CREATE", event)
        return msg

    def open_dm(self, user: FakeUser) -> str:
        cid = self.snowflake()
        self.channels[cid] = {"id": cid, "type": 1, "recipients": [user.payload()], "last_message_id": None,
                              "flags": 0}
        return cid

    async def create_thread(self, parent: str, name: str, owner: FakeUser) -> str:
        tid = self.snowflake()
        thread = {"id": tid, "guild_id": self.guild_id, "parent_id": parent, "owner_id": owner.id,
                  "name": name, "type": 11, "last_message_id": None, "rate_limit_per_user": 0,
                  "message_count": 0, "member_count": 1, "total_message_sent": 0, "flags": 0,
                  "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                      "archive_timestamp": _now_iso(), "locked": False,
                                      "create_timestamp": _now_iso()}}
        self.channels[tid] = thread
        await self.dispatch("THREAD_CREATE", {**thread, "newly_created": True})
        return tid

    async def react(self, user: FakeUser, message_id: str, emoji: str) -> None:
        msg = self.messages[message_id]
        await self.dispatch("MESSAGE_REACTION_ADD", {
            "user_id": user.id, "channel_id": msg["channel_id"], "message_id": message_id,
            **({"guild_id": msg["guild_id"], "member": user.member()} if msg.get("guild_id") else {}),
            "emoji": {"id": None, "name": emoji},
            "message_author_id": msg["author"]["id"], "burst": False, "burst_colors": [], "type": 0})

    async def unreact(self, user: FakeUser, message_id: str, emoji: str) -> None:
        msg = self.messages[message_id]
        await self.dispatch("MESSAGE_REACTION_REMOVE", {
            "user_id": user.id, "channel_id": msg["channel_id"], "message_id": message_id,
            **({"guild_id": msg["guild_id"]} if msg.get("guild_id") else {}),
            "emoji": {"id": None, "name": emoji}, "burst": False, "type": 0})

    def _interaction(self, user: FakeUser, kind: int, data: dict[str, Any], channel: str | None = None) -> dict:
        channel = channel or self.general
        guild_id = self.channels[channel].get("guild_id", self.guild_id)
        return {
            "id": self.snowflake(), "application_id": self.application_id, "type": kind, "data": data,
            "guild_id": guild_id, "guild": {"id": guild_id, "locale": "en-US", "features": []},
            "channel_id": channel, "channel": {**self.channels[channel], "permissions": ALL_PERMISSIONS},
            "member": {**user.member(), "permissions": ALL_PERMISSIONS},
            "token": f"itoken-{self.snowflake()}", "version": 1, "app_permissions": ALL_PERMISSIONS,
            "locale": "en-US", "guild_locale": "en-US", "entitlements": [], "entitlement_sku_ids": [],
            "authorizing_integration_owners": {"0": guild_id}, "context": 0,
            "attachment_size_limit": 10485760,
        }

    def _command(self, name: str, kind: int = 1) -> dict[str, Any]:
        for cmds in self.commands.values():
            for c in cmds:
                if c["name"] == name and c.get("type", 1) == kind:
                    return c
        return {"id": self.snowflake(), "name": name, "type": kind}

    async def slash(self, user: FakeUser, sub: str, options: dict[str, str] | None = None,
                    group: str = "tuneloop", channel: str | None = None) -> dict[str, Any]:
        """A user runs ``/group sub option:value``; returns the interaction sent."""
        cmd = self._command(group)
        data: dict[str, Any] = {"id": cmd["id"], "name": group, "type": 1, "options": [
            {"name": sub, "type": 1, "options": [{"name": k, "type": 3, "value": v}
                                                 for k, v in (options or {}).items()]}]}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        interaction = self._interaction(user, 2, data, channel)
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    async def context_menu(self, user: FakeUser, name: str, message_id: str) -> dict[str, Any]:
        cmd = self._command(name, 3)
        msg = self.messages[message_id]
        data = {"id": cmd["id"], "name": name, "type": 3, "target_id": message_id,
                "resolved": {"messages": {message_id: msg}}}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        interaction = self._interaction(user, 2, data, channel=msg["channel_id"])
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    async def submit_modal(self, user: FakeUser, modal: dict[str, Any], value: str,
                           channel: str | None = None) -> dict[str, Any]:
        """A user fills every text input of ``modal`` (a type-9 callback's data) with ``value``."""
        rows = []
        for row in modal["components"]:
            inner = row["components"] if row["type"] == 1 else [row["component"]]
            rows.append({"type": 1, "components": [{"type": 4, "custom_id": c["custom_id"], "value": value}
                                                   for c in inner]})
        interaction = self._interaction(user, 5, {"custom_id": modal["custom_id"], "components": rows}, channel)
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    def callback_for(self, interaction: dict[str, Any]) -> dict[str, Any] | None:
        return next((c for c in self.callbacks if c["interaction_id"] == interaction["id"]), None)

    def followups_for(self, interaction: dict[str, Any]) -> list[dict[str, Any]]:
        return [f for f in self.followups if f["token"] == interaction["token"]]

    def bot_messages(self, channel: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.messages.values()
                if m["author"]["id"] == self.bot.id and (channel is None or m["channel_id"] == channel)]

    # ------------------------------------------------------------------ REST

    @staticmethod
    def _error(status: int, code: int, message: str) -> web.Response:
        return _json({"code": code, "message": message}, status=status)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        method = request.method
        self.requests.append((method, path))
        # Interaction responses and followups authenticate by the token in their path.
        by_path = path.startswith(("/interactions/", "/webhooks/"))
        if not by_path and request.headers.get("Authorization") != f"Bot {self.token}":
            return self._error(401, 0, "401: Unauthorized")
        body: Any = None
        if request.can_read_body:
            body = await request.json()
        parts = path.strip("/").split("/")
        handler = self._route(method, parts)
        if handler is None:
            self.unknown_routes.append((method, path))
            log.warning("fake discord: no route for %s %s", method, path)
            return self._error(404, 0, "404: Not Found")
        return await handler(request, parts, body)

    def _route(self, method: str, p: list[str]):
        n = len(p)
        table = [
            ("GET", ["users", "@me"], self._me),
            ("GET", ["oauth2", "applications", "@me"], self._app),
            ("GET", ["gateway", "bot"], self._gateway_bot),
            ("PUT", ["applications", "*", "commands"], self._sync),
            ("PUT", ["applications", "*", "guilds", "*", "commands"], self._sync),
            ("POST", ["channels", "*", "messages"], self._create_message),
            ("GET", ["channels", "*", "messages"], self._history),
            ("GET", ["channels", "*", "messages", "*"], self._get_message),
            ("PATCH", ["channels", "*", "messages", "*"], self._edit_message),
            ("DELETE", ["channels", "*", "messages", "*"], self._delete_message),
            ("PUT", ["channels", "*", "messages", "*", "reactions", "*", "@me"], self._add_reaction),
            ("GET", ["channels", "*"], self._get_channel),
            ("POST", ["interactions", "*", "*", "callback"], self._callback),
            ("POST", ["webhooks", "*", "*"], self._followup),
            ("PATCH", ["webhooks", "*", "*", "messages", "*"], self._edit_followup),
        ]
        for m, pattern, handler in table:
            if m == method and len(pattern) == n and all(a == "*" or a == b for a, b in zip(pattern, p, strict=True)):
                return handler
        return None

    async def _me(self, request, p, body):
        return _json({**self.bot.payload(), "verified": True, "mfa_enabled": False})

    async def _app(self, request, p, body):
        owner = FakeUser(self.snowflake(), "owner")
        return _json({
            "id": self.application_id, "name": "tuneloop", "description": "", "icon": None,
            "bot_public": True, "bot_require_code_grant": False, "owner": owner.payload(),
            "verify_key": "00" * 32, "flags": 0, "team": None, "summary": "", "rpc_origins": [],
            "bot": self.bot.payload(), "interactions_endpoint_url": None, "tags": []})

    async def _gateway_bot(self, request, p, body):
        return _json({"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}})

    async def _sync(self, request, p, body):
        scope = p[3] if len(p) == 5 else "global"
        out = []
        for cmd in body:
            c = {**cmd, "id": self.snowflake(), "application_id": self.application_id, "version": self.snowflake(),
                 "default_member_permissions": cmd.get("default_member_permissions"), "type": cmd.get("type", 1),
                 "description": cmd.get("description", ""), "dm_permission": True, "nsfw": False}
            if scope != "global":
                c["guild_id"] = scope
            out.append(c)
        self.commands[scope] = out
        return _json(out)

    def _check_content(self, content: Any) -> web.Response | None:
        if not isinstance(content, str) or not content.strip():
            return self._error(400, 50006, "Cannot send an empty message")
        if len(content) > 2000:
            return self._error(400, 50035, "Invalid Form Body (content: Must be 2000 or fewer in length.)")
        return None

    async def _create_message(self, request, p, body):
        cid = p[1]
        if cid not in self.channels:
            return self._error(404, 10003, "Unknown Channel")
        err = self._check_content(body.get("content"))
        if err is not None:
            return err
        ref = (body.get("message_reference") or {}).get("message_id")
        msg = self._message(cid, self.bot, body["content"], reply_to=str(ref) if ref else None)
        return _json(msg)

    async def _get_message(self, request, p, body):
        msg = self.messages.get(p[3])
        if msg is None or msg["channel_id"] != p[1]:
            return self._error(404, 10008, "Unknown Message")
        return _json(msg)

    async def _history(self, request, p, body):
        limit = int(request.query.get("limit", 50))
        before = request.query.get("before")
        msgs = [m for m in self.messages.values() if m["channel_id"] == p[1]
                and (before is None or int(m["id"]) < int(before))]
        msgs.sort(key=lambda m: int(m["id"]), reverse=True)
        return _json(msgs[:limit])

    async def _edit_message(self, request, p, body):
        msg = self.messages.get(p[3])
        if msg is None:
            return self._error(404, 10008, "Unknown Message")
        if msg["author"]["id"] != self.bot.id:
            return self._error(403, 50005, "Cannot edit a message authored by another user")
        if "content" in body:
            err = self._check_content(body["content"])
            if err is not None:
                return err
            msg["content"] = body["content"]
        msg["edited_timestamp"] = _now_iso()
        self.edits.setdefault(msg["id"], []).append(time.monotonic())
        return _json(msg)

    async def _delete_message(self, request, p, body):
        msg = self.messages.get(p[3])
        if msg is None or msg["channel_id"] != p[1]:
            return self._error(404, 10008, "Unknown Message")
        if msg["author"]["id"] != self.bot.id:
            return self._error(403, 50013, "Missing Permissions")
        del self.messages[p[3]]
        return web.Response(status=204)

    async def _add_reaction(self, request, p, body):
        msg = self.messages.get(p[3])
        if msg is None:
            return self._error(404, 10008, "Unknown Message")
        emoji = request.match_info["tail"].split("/")[5]
        from urllib.parse import unquote

        emoji = unquote(emoji)
        self.reactions.append((msg["id"], emoji, self.bot.id))
        # Discord sends the bot its own reaction too; the adapter must ignore it.
        event = {"user_id": self.bot.id, "channel_id": msg["channel_id"], "message_id": msg["id"],
                 "emoji": {"id": None, "name": emoji}, "message_author_id": msg["author"]["id"],
                 "burst": False, "burst_colors": [], "type": 0}
        if msg.get("guild_id"):
            event.update(guild_id=msg["guild_id"], member=self.bot.member())
        await self.dispatch("MESSAGE_REACTION_ADD", event)
        return web.Response(status=204)

    async def _get_channel(self, request, p, body):
        ch = self.channels.get(p[1])
        if ch is None:
            return self._error(404, 10003, "Unknown Channel")
        return _json(ch)

    async def _callback(self, request, p, body):
        self.callbacks.append({"interaction_id": p[1], "token": p[2], "type": body["type"],
                               "data": body.get("data") or {}})
        resource: dict[str, Any] = {"type": body["type"]}
        if body["type"] == 4:
            resource["message"] = {**self._message(self.general, self.bot, body["data"].get("content", ""),
                                                             store=False),
                                   "flags": body["data"].get("flags", 0)}
        return _json({
            "interaction": {"id": p[1], "type": 2, "response_message_loading": body["type"] == 5,
                            "response_message_ephemeral": bool((body.get("data") or {}).get("flags", 0) & 64)},
            "resource": resource})

    async def _followup(self, request, p, body):
        err = self._check_content(body.get("content"))
        if err is not None:
            return err
        self.followups.append({"token": p[2], "content": body["content"], "flags": body.get("flags", 0)})
        msg = {**self._message(self.general, self.bot, body["content"], store=False), "flags": body.get("flags", 0),
               "webhook_id": p[1]}
        return _json(msg)

    async def _edit_followup(self, request, p, body):
        self.followups.append({"token": p[2], "content": body.get("content"), "flags": body.get("flags", 0)})
        return _json({**self._message(self.general, self.bot, body.get("content") or "…", store=False),
                                  "webhook_id": p[1]})


def _json(data: Any, status: int = 200) -> web.Response:
    # discord.py parses a body as JSON only when the content type is exactly this, as Discord sends it.
    return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"})


async def wait_until(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; return that or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        await asyncio.sleep(interval)
