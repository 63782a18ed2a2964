"""A fake Slack on 127.0.0.1 for the adapter tests: Web API, Socket Mode websocket, response_url.

It answers the Web API methods the adapter calls with the shapes Slack
documents, keeps the messages and reactions they create, records every
call, and can answer a method with HTTP 429 + Retry-After a number of
times. ``apps.connections.open`` hands out the URL of its own websocket,
where tests push Socket Mode envelopes and read the acks. Helpers build
Events API payloads and sign them the way Slack does for HTTP mode.

Several workspaces: ``grant(code, team)`` is what Slack does when someone
approves an install in ``team``: ``oauth.v2.access`` then exchanges ``code``
(once, with the app's client id and secret) for a bot token of that team.
Every call records the token it came with, ``auth.test`` answers for the
token's team and bot, and a message is posted by the bot of its token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import WSMsgType, web

TEAM = "T0TEAM"
APP = "A0APP"
CLIENT_ID = "1111.2222"
CLIENT_SECRET = "fake-client-secret"


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    status: int
    at: float = field(default_factory=time.monotonic)
    #: the token the call came with (Bearer header or ``token`` argument)
    token: str = ""


@dataclass
class Workspace:
    """A bot token's identity: the workspace it was granted in and its bot."""

    team_id: str
    bot_user_id: str
    bot_id: str


class FakeSlack:
    def __init__(self, bot_user_id: str = "U0BOT", bot_id: str = "B0BOT"):
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.calls: list[Call] = []
        #: channel -> ts -> message, as conversations.replies returns them
        self.messages: dict[str, dict[str, dict[str, Any]]] = {}
        self.reactions: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self.responses: list[dict[str, Any]] = []  # what was POSTed to response_url
        self.acks: dict[str, dict[str, Any]] = {}  # socket mode envelope_id -> ack
        self._ack_event = asyncio.Event()
        self._limits: dict[str, list[int]] = {}  # method -> [times left, retry-after]
        self._ts = itertools.count(1)
        self._ws: web.WebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0
        #: bot tokens handed out by oauth.v2.access; any other xoxb- token is the default workspace's
        self.workspaces: dict[str, Workspace] = {}
        #: install codes not yet exchanged -> the token and workspace they give
        self._codes: dict[str, tuple[str, Workspace]] = {}

    # ------------------------------------------------------------------ server

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)
        app.router.add_post("/response/{token}", self._response_url)
        app.router.add_get("/socket", self._socket)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def response_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/response/{uuid.uuid4().hex}"

    # ------------------------------------------------------------------ test controls

    def rate_limit(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with 429 and Retry-After."""
        self._limits[method] = [times, retry_after]

    def grant(self, code: str, team_id: str, bot_user_id: str | None = None, bot_id: str | None = None) -> str:
        """Someone approved an install in ``team_id``: ``code`` now exchanges for a bot token; that token."""
        token = f"xoxb-{team_id}-{uuid.uuid4().hex[:12]}"
        self._codes[code] = (token, Workspace(team_id, bot_user_id or f"U0BOT{team_id}", bot_id or f"B0BOT{team_id}"))
        return token

    def workspace(self, token: str) -> Workspace:
        return self.workspaces.get(token) or Workspace(TEAM, self.bot_user_id, self.bot_id)

    def calls_to(self, method: str, ok_only: bool = True) -> list[Call]:
        return [c for c in self.calls if c.method == method and (c.status == 200 or not ok_only)]

    def new_ts(self) -> str:
        return f"{1700000000 + next(self._ts)}.000100"

    def thread(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        msgs = self.messages.get(channel, {}).values()
        return sorted((m for m in msgs if m["ts"] == thread_ts or m.get("thread_ts") == thread_ts),
                      key=lambda m: float(m["ts"]))

    def bot_replies(self, channel: str, thread_ts: str) -> list[dict[str, Any]]:
        return [m for m in self.thread(channel, thread_ts) if m.get("bot_id") == self.bot_id]

    def user_message(self, channel: str, user: str, text: str, *, thread_ts: str | None = None,
                     channel_type: str = "channel", **extra: Any) -> dict[str, Any]:
        """A person's message, kept like Slack keeps it; returns its ``message`` event."""
        ts = self.new_ts()
        msg = {"type": "message", "user": user, "text": text, "ts": ts, "team": TEAM,
               "blocks": [{"type": "rich_text", "block_id": "b1", "elements": []}]}
        if thread_ts:
            msg["thread_ts"] = thread_ts
            msg["parent_user_id"] = user
        self.messages.setdefault(channel, {})[ts] = msg
        return {**msg, "channel": channel, "event_ts": ts, "channel_type": channel_type, **extra}

    @staticmethod
    def mention_event(message_event: dict[str, Any]) -> dict[str, Any]:
        """The ``app_mention`` Slack sends alongside a message that mentions the bot."""
        ev = {k: v for k, v in message_event.items() if k != "channel_type"}
        ev["type"] = "app_mention"
        return ev

    async def wait_for(self, predicate, timeout: float = 15.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            await asyncio.sleep(0.02)
        raise AssertionError(f"fake Slack: timed out waiting for {what}")

    # ------------------------------------------------------------------ Web API

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        if request.method == "POST":
            if request.content_type == "application/json":
                args.update(await request.json())
            else:
                args.update(dict(await request.post()))
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") or args.get("token", "")
        limit = self._limits.get(method)
        if limit and limit[0] > 0:
            limit[0] -= 1
            self.calls.append(Call(method, args, 429, token=token))
            return web.json_response({"ok": False, "error": "ratelimited"}, status=429,
                                     headers={"Retry-After": str(limit[1])})
        if method == "oauth.v2.access":  # the app's own credentials, not a token
            return self._reply(method, args, self.oauth_v2_access(auth, args), token)
        want = "xapp-" if method == "apps.connections.open" else "xoxb-"
        if not token.startswith(want):
            return self._reply(method, args, {"ok": False, "error": "not_authed"}, token)
        handler = getattr(self, "api_" + method.replace(".", "_"), None)
        if handler is None:
            return self._reply(method, args, {"ok": False, "error": "unknown_method"}, token)
        args["_token"] = token
        return self._reply(method, args, handler(args), token)

    def _reply(self, method: str, args: dict[str, Any], body: dict[str, Any], token: str = "") -> web.Response:
        args.pop("_token", None)
        self.calls.append(Call(method, args, 200, token=token))
        return web.json_response(body)

    def oauth_v2_access(self, auth: str, a: dict) -> dict:
        """Slack's answer for an approved install: the app's credentials (Basic auth or arguments), a code."""
        client_id, client_secret = a.get("client_id"), a.get("client_secret")
        if auth.startswith("Basic "):
            client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
        if (client_id, client_secret) != (CLIENT_ID, CLIENT_SECRET):
            return {"ok": False, "error": "invalid_client_id" if client_id != CLIENT_ID else "bad_client_secret"}
        grant = self._codes.pop(a.get("code", ""), None)
        if grant is None:
            return {"ok": False, "error": "invalid_code"}
        token, ws = grant
        self.workspaces[token] = ws
        return {"ok": True, "app_id": APP, "authed_user": {"id": "U0INSTALLER"}, "scope": "chat:write,commands",
                "token_type": "bot", "access_token": token, "bot_user_id": ws.bot_user_id,
                "team": {"id": ws.team_id, "name": f"Team {ws.team_id}"}, "enterprise": None,
                "is_enterprise_install": False}

    def api_auth_test(self, a: dict) -> dict:
        ws = self.workspace(a["_token"])
        return {"ok": True, "url": "https://fake.slack.com/", "team": "Fake", "user": "tuneloop",
                "team_id": ws.team_id, "user_id": ws.bot_user_id, "bot_id": ws.bot_id, "app_id": APP,
                "is_enterprise_install": False}

    def api_apps_connections_open(self, a: dict) -> dict:
        return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"}

    def api_chat_postMessage(self, a: dict) -> dict:
        channel, text = a.get("channel"), a.get("text")
        if not channel:
            return {"ok": False, "error": "channel_not_found"}
        if not text and not a.get("blocks"):
            return {"ok": False, "error": "no_text"}
        if len(text or "") > 40000:
            return {"ok": False, "error": "msg_too_long"}
        ts = self.new_ts()
        ws = self.workspace(a["_token"])  # posted by the bot whose token made the call
        msg = {"type": "message", "subtype": "bot_message", "text": text, "ts": ts, "bot_id": ws.bot_id,
               "user": ws.bot_user_id, "app_id": APP}
        if a.get("thread_ts"):
            msg["thread_ts"] = a["thread_ts"]
        self.messages.setdefault(channel, {})[ts] = msg
        return {"ok": True, "channel": channel, "ts": ts, "message": msg}

    def api_chat_update(self, a: dict) -> dict:
        msg = self.messages.get(a.get("channel"), {}).get(a.get("ts"))
        if msg is None:
            return {"ok": False, "error": "message_not_found"}
        if not a.get("text"):
            return {"ok": False, "error": "no_text"}
        msg["text"] = a["text"]
        msg["edited"] = {"user": self.bot_user_id, "ts": self.new_ts()}
        return {"ok": True, "channel": a["channel"], "ts": a["ts"], "text": a["text"]}

    def api_chat_delete(self, a: dict) -> dict:
        if self.messages.get(a.get("channel"), {}).pop(a.get("ts"), None) is None:
            return {"ok": False, "error": "message_not_found"}
        return {"ok": True, "channel": a["channel"], "ts": a["ts"]}

    def api_chat_postEphemeral(self, a: dict) -> dict:
        if not a.get("channel") or not a.get("user"):
            return {"ok": False, "error": "invalid_arguments"}
        return {"ok": True, "message_ts": self.new_ts()}

    def api_reactions_add(self, a: dict) -> dict:
        key = (a.get("channel"), a.get("timestamp"))
        if a.get("timestamp") not in self.messages.get(a.get("channel"), {}):
            return {"ok": False, "error": "message_not_found"}
        have = self.reactions.setdefault(key, [])
        if (a.get("name"), self.bot_user_id) in have:
            return {"ok": False, "error": "already_reacted"}
        have.append((a.get("name"), self.bot_user_id))
        return {"ok": True}

    def api_conversations_replies(self, a: dict) -> dict:
        msgs = self.thread(a.get("channel"), a.get("ts"))
        if not msgs:
            return {"ok": False, "error": "thread_not_found"}
        return {"ok": True, "messages": msgs, "has_more": False,
                "response_metadata": {"next_cursor": ""}}

    def api_views_open(self, a: dict) -> dict:
        view = a.get("view")
        view = json.loads(view) if isinstance(view, str) else view
        if not a.get("trigger_id") or not view:
            return {"ok": False, "error": "invalid_arguments"}
        return {"ok": True, "view": {**view, "id": "V" + uuid.uuid4().hex[:8].upper()}}

    def api_views_publish(self, a: dict) -> dict:
        view = a.get("view")
        view = json.loads(view) if isinstance(view, str) else view
        if not a.get("user_id") or not view:
            return {"ok": False, "error": "invalid_arguments"}
        return {"ok": True, "view": {**view, "id": "V" + uuid.uuid4().hex[:8].upper()}}

    async def _response_url(self, request: web.Request) -> web.Response:
        self.responses.append(await request.json())
        return web.Response(text="ok")

    # ------------------------------------------------------------------ Socket Mode

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._ws = ws
        await ws.send_json({"type": "hello", "num_connections": 1,
                            "debug_info": {"host": "fake", "approximate_connection_time": 3600},
                            "connection_info": {"app_id": APP}})
        self._connected.set()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                data = json.loads(msg.data)
                if "envelope_id" in data:
                    self.acks[data["envelope_id"]] = data
        return ws

    async def socket_send(self, kind: str, payload: dict[str, Any], *, retry_attempt: int = 0,
                          timeout: float = 10.0) -> dict[str, Any]:
        """Push one envelope (events_api, slash_commands, interactive); return its ack."""
        await asyncio.wait_for(self._connected.wait(), timeout)
        envelope_id = str(uuid.uuid4())
        await self._ws.send_json({"envelope_id": envelope_id, "type": kind, "payload": payload,
                                  "accepts_response_payload": kind != "events_api",
                                  "retry_attempt": retry_attempt, "retry_reason": "timeout" if retry_attempt else ""})
        return await self.wait_for(lambda: self.acks.get(envelope_id), timeout, f"ack of {envelope_id}")


# ---------------------------------------------------------------------- payloads


def event_body(event: dict[str, Any], event_id: str | None = None, team: str = TEAM) -> dict[str, Any]:
    """An Events API ``event_callback`` around ``event``, from workspace ``team``."""
    return {"token": "legacy-verification-token", "team_id": team, "api_app_id": APP, "event": event,
            "type": "event_callback", "event_id": event_id or "Ev" + uuid.uuid4().hex[:10].upper(),
            "event_time": int(time.time()), "is_ext_shared_channel": False,
            "authorizations": [{"enterprise_id": None, "team_id": team, "user_id": "U0BOT", "is_bot": True,
                                "is_enterprise_install": False}],
            "event_context": "4-" + uuid.uuid4().hex}


def reaction_event(kind: str, user: str, reaction: str, channel: str, ts: str,
                   item_user: str = "U0BOT") -> dict[str, Any]:
    return {"type": kind, "user": user, "reaction": reaction, "item_user": item_user,
            "item": {"type": "message", "channel": channel, "ts": ts}, "event_ts": f"{time.time():.6f}"}


def command_body(text: str, user: str, channel: str, response_url: str) -> dict[str, str]:
    return {"token": "legacy", "team_id": TEAM, "team_domain": "fake", "channel_id": channel,
            "channel_name": "general", "user_id": user, "user_name": user.lower(), "command": "/tuneloop",
            "text": text, "api_app_id": APP, "is_enterprise_install": "false", "response_url": response_url,
            "trigger_id": "1337.42.abcd"}


def shortcut_body(callback_id: str, user: str, channel: str, message: dict[str, Any],
                  response_url: str) -> dict[str, Any]:
    return {"type": "message_action", "token": "legacy", "action_ts": f"{time.time():.6f}",
            "team": {"id": TEAM, "domain": "fake"}, "user": {"id": user, "username": user.lower(), "team_id": TEAM},
            "channel": {"id": channel, "name": "general"}, "is_enterprise_install": False,
            "callback_id": callback_id, "trigger_id": "1337.42.trigger", "message_ts": message["ts"],
            "message": message, "response_url": response_url}


def view_submission_body(user: str, view: dict[str, Any], value: str) -> dict[str, Any]:
    submitted = {**view, "id": "V0VIEW", "team_id": TEAM, "state": {"values": {
        "correction": {"text": {"type": "plain_text_input", "value": value}}}}}
    return {"type": "view_submission", "team": {"id": TEAM, "domain": "fake"},
            "user": {"id": user, "username": user.lower(), "team_id": TEAM}, "api_app_id": APP,
            "token": "legacy", "trigger_id": "1337.42.submit", "view": submitted, "response_urls": [],
            "is_enterprise_install": False}


def block_action_body(user: str, action_id: str) -> dict[str, Any]:
    return {"type": "block_actions", "team": {"id": TEAM, "domain": "fake"},
            "user": {"id": user, "username": user.lower(), "team_id": TEAM}, "api_app_id": APP,
            "token": "legacy", "trigger_id": "1337.42.action", "container": {"type": "view", "view_id": "V0HOME"},
            "view": {"id": "V0HOME", "type": "home", "team_id": TEAM},
            "actions": [{"action_id": action_id, "block_id": "tuneloop_home", "type": "button",
                         "text": {"type": "plain_text", "text": action_id}, "action_ts": f"{time.time():.6f}"}]}


def sign(secret: str, body: str, timestamp: int | None = None) -> dict[str, str]:
    """The headers Slack sends with an HTTP request signed with ``secret``."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    base = f"v0:{ts}:{body}".encode()
    sig = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": sig}


def form(data: dict[str, Any]) -> str:
    return urlencode(data)
