"""The HTTP adapter: OpenAI-compatible API, feedback API, web chat, dashboard, metrics.

Thin: it turns HTTP requests into ``Turn``s and feedback calls, and core
results and errors into HTTP answers. It decides nothing.

Routes
    POST /v1/chat/completions           OpenAI chat completions, streaming (SSE) or not
    GET  /v1/models                     the served model version
    POST /api/exchanges/{id}/feedback   {"user", "rating": "up"|"down"|null} and/or {"correction"}
    GET  /api/dashboard                 figures behind /dashboard (``?bucket=SECONDS``), the review queue
    POST /api/corrections/{id}/review   {"decision": "approve"|"reject"}: the dashboard's review buttons
    GET  /                              the web chat page
    GET  /dashboard                     the dashboard page
    GET  /static/{file}                 the pages' scripts and styles
    GET  /metrics                       Prometheus text format
    GET  /healthz                       {"status": "ok"}; 503 while shutting down
    GET  /login, POST /login            a form that keeps an API key in a cookie (when keys are set)

Authentication (``[[server.api_keys]]``): with no keys configured the server
binds only a loopback address (``check_exposure``), every request acts in the
``local`` community and the dashboard is open. With keys, ``/v1/*``,
``/api/*`` and ``/metrics`` need ``Authorization: Bearer KEY`` (or the
cookie ``/login`` sets): 401 without a valid one. A key acts within its
community: its completions are that community's exchanges, its feedback can
reach only those (another community's exchange is 404, as a missing one),
and its dashboard shows only their figures. The dashboard, its review
endpoint and ``/metrics`` need an admin key (403 otherwise); an admin key
reviews its own community's corrections only (another's is 404). Keys are read from the environment at
each request, so unsetting or changing a key's variable revokes it at once.

Every completion is an exchange logged through ``Chat.respond``; the answer's
``id`` is the exchange id, in every chunk of a streamed reply too (the
exchange is logged as pending when the engine accepts the request), and the
final chunk(s) also carry it as ``exchange_id``. ``finish_reason`` is the
engine's, as it is: ``stop``, ``length``, or ``cancelled`` for a reply cut
short (not one of OpenAI's own values, as vLLM's ``abort`` is not: a client
must not take a cut reply for a whole one).

Errors are JSON, ``{"error": {"message", "type"}}``: a ``TuneloopError`` maps
to a 4xx/5xx by its class, aiohttp's own (413 body too large, 405, 404) keep
their status, anything unexpected is logged with its traceback and answered
500.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.chat import Turn, check_text, new_conversation_id
from bot.feedback import parse_rating
from bot.metrics import CONTENT_TYPE, Metrics
from tuneloop import errors
from tuneloop.community import LOCAL
from tuneloop.config import ApiKey, Config
from tuneloop.learning import trust

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"

#: (status, type) per error class; the most specific class wins.
ERROR_STATUS: list[tuple[type[errors.TuneloopError], int, str]] = [
    (errors.BusyError, 503, "engine_busy"),
    (errors.CancelledError, 503, "cancelled"),
    (errors.EngineError, 503, "engine_error"),
    (errors.InputError, 400, "invalid_request_error"),
    (errors.NotFoundError, 404, "not_found_error"),
    (errors.PermissionDenied, 403, "permission_error"),
    (errors.TrainingError, 409, "training_error"),
    (errors.ModelError, 500, "model_error"),
    (errors.StoreError, 500, "store_error"),
    (errors.ConfigError, 500, "config_error"),
    (errors.TuneloopError, 500, "server_error"),
]

SERVICES = web.AppKey("services", Any)
METRICS = web.AppKey("metrics", Metrics)
DRAINING = web.AppKey("draining", asyncio.Event)

_ROLES = ("system", "developer", "user", "assistant", "tool")
_MAX_STOP = 4
_MAX_ID_CHARS = 200


def error_body(message: str, error_type: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": None}}


def json_error(status: int, message: str, error_type: str, param: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, error_type, param), status=status, headers=headers)


def _classify(e: errors.TuneloopError) -> tuple[int, str]:
    for cls, status, kind in ERROR_STATUS:
        if isinstance(e, cls):
            return status, kind
    raise AssertionError(e)


_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "method_not_allowed", 413: "request_too_large",
               415: "invalid_request_error"}


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    metrics = request.app.get(METRICS)
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = _HTTP_TYPES.get(e.status, "http_error")
        if e.status == 413:
            limit = request.app[SERVICES].config.server.max_body_bytes
            message = f"request body is larger than the limit of {limit} bytes (server.max_body_bytes)"
        elif e.status == 404:
            message = f"no route {request.method} {request.path}"
        elif e.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        else:
            message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if metrics:
            metrics.http_error(e.status, kind)
        headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return json_error(e.status, message, kind, headers=headers)
    except errors.TuneloopError as e:
        status, kind = _classify(e)
        if status >= 500 and not isinstance(e, errors.EngineError):
            log.exception("request failed: %s %s", request.method, request.path)
        else:
            log.info("request refused: %s %s -> %d %s", request.method, request.path, status, e)
        if metrics:
            metrics.http_error(status, kind)
        headers = {"Retry-After": "1"} if isinstance(e, errors.BusyError) else None
        return json_error(status, str(e), kind, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:  # noqa: BLE001 — the one place unexpected errors become a 500
        log.exception("unexpected error: %s %s", request.method, request.path)
        if metrics:
            metrics.http_error(500, "server_error")
        return json_error(500, f"internal error ({type(e).__name__}); see the server log", "server_error")


# -- authentication ----------------------------------------------------------------------

COOKIE = "tuneloop_key"
#: paths that need a key when keys are configured, and those that need an admin key
_KEYED = ("/v1/", "/api/")
_ADMIN_ONLY = ("/api/dashboard", "/metrics")
_ADMIN_PREFIXES = ("/api/corrections/",)


@dataclass(frozen=True)
class Identity:
    """Who a request acts as: a community, and whether with an admin key."""

    community: str = LOCAL
    admin: bool = False
    #: the env var of the key used; None without keys (loopback only)
    key: str | None = None


IDENTITY = web.RequestKey("identity", Identity)


class Keys:
    """``[[server.api_keys]]``, each resolved from its environment variable at every request."""

    def __init__(self, entries: list[ApiKey]):
        self.entries = list(entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def identify(self, token: str | None) -> Identity | None:
        if not token:
            return None
        found = None
        for entry in self.entries:
            value = os.environ.get(entry.key_env)
            # Compared in constant time, and every entry compared, so timing tells nothing.
            if value and hmac.compare_digest(value.encode(), token.encode()):
                found = found or Identity(entry.community, entry.admin, entry.key_env)
        return found

    def check(self) -> None:
        """At start: one line for keys that are unset, an error for one key shared by two entries."""
        seen: dict[str, str] = {}
        for entry in self.entries:
            value = os.environ.get(entry.key_env)
            if not value:
                log.warning("api key not set: env=%s community=%s (requests with it get 401)", entry.key_env,
                            entry.community)
                continue
            if value in seen and seen[value] != entry.key_env:
                raise errors.ConfigError(f"server.api_keys: {seen[value]} and {entry.key_env} hold the same key; "
                                         "each key must name one community")
            seen[value] = entry.key_env


KEYS = web.AppKey("keys", Keys)


def check_exposure(config: Config) -> None:
    """Refuse to serve beyond this machine without API keys: one ``ConfigError`` line saying why."""
    host = config.server.host
    if config.server.api_keys or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise errors.ConfigError(
            f"server.host: {host!r} is reachable from other machines, and without [[server.api_keys]] anyone "
            "there could chat, rate, correct and read the dashboard; add API keys or bind 127.0.0.1")


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.cookies.get(COOKIE)


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    keys: Keys = request.app[KEYS]
    path = request.path
    if not keys:
        request[IDENTITY] = Identity()
        return await handler(request)
    identity = keys.identify(_token(request))
    request[IDENTITY] = identity
    if path in ("/", "/dashboard") and (identity is None or (path == "/dashboard" and not identity.admin)):
        raise web.HTTPFound(f"/login?next={path}")
    admin_only = path in _ADMIN_ONLY or path.startswith(_ADMIN_PREFIXES)
    if path.startswith(_KEYED) or admin_only:
        if identity is None:
            log.info("request refused: %s %s -> 401 (no valid API key)", request.method, path)
            raise web.HTTPUnauthorized(
                text="a valid API key is required: send Authorization: Bearer KEY",
                headers={"WWW-Authenticate": 'Bearer realm="tuneloop"'})
        if admin_only and not identity.admin:
            raise errors.PermissionDenied(f"{path} needs an admin API key")
    return await handler(request)


_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tuneloop: sign in</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/style.css"></head>
<body><main class="dash"><section class="card"><h2>Sign in with an API key</h2>{note}
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<input type="password" name="key" autocomplete="current-password" aria-label="API key" required autofocus>
<button type="submit">Sign in</button></form></section></main></body></html>
"""


def _next(value: str | None) -> str:
    # Only our own pages: an open redirect would hand the cookie's user to anyone's page.
    return value if value in ("/", "/dashboard") else "/"


# -- request parsing -------------------------------------------------------------------


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or an ``InputError`` saying what is wrong with it."""
    raw = await request.read()  # 413 beyond client_max_size
    if not raw.strip():
        raise errors.InputError("request body is empty; send a JSON object")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise errors.InputError("request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise errors.InputError(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise errors.InputError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _type_name(value: Any) -> str:
    return {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
            list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _opt(body: dict, key: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    if value is None:
        return None
    # bool is an int in Python; JSON true is never a number here.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise errors.InputError(f"{key} must be {what}, got {_type_name(value)} {json.dumps(value)[:50]}")
    return value


def _number(body: dict, key: str, lo: float, hi: float, integer: bool = False) -> Any:
    value = _opt(body, key, (int,) if integer else (int, float), "an integer" if integer else "a number")
    if value is not None and not lo <= value <= hi:
        raise errors.InputError(f"{key} must be between {lo:g} and {hi:g}, got {value}")
    return value


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        if message.get("role") == "assistant":
            return ""
        raise errors.InputError(f"messages[{i}].content is missing")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise errors.InputError(f"messages[{i}].content[{j}] must be a text part "
                                        "{\"type\": \"text\", \"text\": ...}; only text is supported")
            parts.append(part["text"])
        return "".join(parts)
    raise errors.InputError(f"messages[{i}].content must be a string or a list of text parts, "
                            f"got {_type_name(content)}")


def parse_messages(body: dict) -> tuple[str | None, list[dict[str, str]], str]:
    """(system prompt or None, earlier turns, the last user message) of a request."""
    if "messages" not in body:
        raise errors.InputError("messages is required: a list of {\"role\", \"content\"} objects")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise errors.InputError(f"messages must be a list, got {_type_name(messages)}")
    if not messages:
        raise errors.InputError("messages is empty; send at least one user message")
    system: list[str] = []
    turns: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise errors.InputError(f"messages[{i}] must be an object, got {_type_name(m)}")
        role = m.get("role")
        if role not in _ROLES:
            raise errors.InputError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}")
        text = _content(m, i)
        if role in ("system", "developer"):
            system.append(text)
        else:
            turns.append({"role": "user" if role == "user" else "assistant", "content": text})
    if not turns or messages[-1].get("role") != "user":
        raise errors.InputError("the last message must have role \"user\"")
    last = turns.pop()
    return ("\n\n".join(system) if system else None), turns, last["content"]


def sampling_overrides(body: dict) -> dict[str, Any]:
    """The request's sampling fields as ``Chat.sampling`` overrides, checked."""
    if body.get("n") not in (None, 1):
        raise errors.InputError(f"n must be 1 (one reply per request), got {body.get('n')!r}")
    max_tokens = _number(body, "max_completion_tokens", 1, 32768, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", 1, 32768, integer=True)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if (not isinstance(stop, list) or len(stop) > _MAX_STOP
                or not all(isinstance(s, str) and s for s in stop)):
            raise errors.InputError(f"stop must be a string or a list of up to {_MAX_STOP} non-empty strings")
    return {
        "max_new_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0, 2),
        "top_p": _number(body, "top_p", 0, 1),
        "stop": tuple(stop) if stop else None,
        "seed": _number(body, "seed", -(2**63), 2**63 - 1, integer=True),
    }


def _conversation_id(request: web.Request, body: dict, platform: str) -> str:
    cid = request.headers.get("X-Conversation-Id") or _opt(body, "conversation_id", (str,), "a string")
    if not cid:
        return new_conversation_id(platform)
    if len(cid) > _MAX_ID_CHARS:
        raise errors.InputError(f"conversation id is longer than {_MAX_ID_CHARS} characters")
    return cid


def _user(body: dict, default: str) -> str:
    user = _opt(body, "user", (str,), "a string")
    if user is not None and len(user) > _MAX_ID_CHARS:
        raise errors.InputError(f"user is longer than {_MAX_ID_CHARS} characters")
    return user or default


# -- handlers ----------------------------------------------------------------------------


class WebAdapter:
    """Adds the web routes to the process's one aiohttp application."""

    name = "web"

    def __init__(self, services, metrics: Metrics | None = None) -> None:
        self.services = services
        # The core counts every platform's traffic; this adapter serves it and adds its HTTP errors.
        self.metrics = metrics or services.chat.metrics
        self.draining = asyncio.Event()
        self.url: str | None = None
        self.keys = Keys(services.config.server.api_keys)
        self.keys.check()

    def describe(self) -> str:
        return f"web chat: {self.url}" if self.url else "web chat: not listening"

    def attach(self, app: web.Application) -> None:
        app[SERVICES] = self.services
        app[METRICS] = self.metrics
        app[DRAINING] = self.draining
        app[KEYS] = self.keys
        if error_middleware not in app.middlewares:
            app.middlewares.append(error_middleware)
        app.middlewares.append(auth_middleware)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/api/exchanges/{id}/feedback", self.feedback)
        app.router.add_get("/api/dashboard", self.dashboard_data)
        app.router.add_post("/api/corrections/{id}/review", self.review)
        app.router.add_get("/", self.page("index.html"))
        app.router.add_get("/dashboard", self.page("dashboard.html"))
        app.router.add_static("/static/", STATIC, append_version=False)
        app.router.add_get("/login", self.login_page)
        app.router.add_post("/login", self.login)
        app.router.add_get("/metrics", self.metrics_text)
        app.router.add_get("/healthz", self.healthz)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.draining.set()

    # -- OpenAI API ----------------------------------------------------------

    def _model_entry(self) -> dict[str, Any]:
        return {"id": self.services.engine.model_version, "object": "model", "created": 0,
                "owned_by": "tuneloop"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_entry()]})

    async def model(self, request: web.Request) -> web.Response:
        entry = self._model_entry()
        if request.match_info["model"] != entry["id"]:
            raise errors.NotFoundError(f"model {request.match_info['model']!r} not found; "
                                       f"this server serves {entry['id']!r}")
        return web.json_response(entry)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        if self.draining.is_set():
            raise errors.EngineError("server is shutting down; try again later")
        body = await read_json(request)
        platform = "web" if request.headers.get("X-Tuneloop-Client") == "web" else "api"
        system, history, text = parse_messages(body)
        overrides = sampling_overrides(body)
        _opt(body, "model", (str,), "a string")
        stream = _opt(body, "stream", (bool,), "true or false") or False
        options = _opt(body, "stream_options", (dict,), "an object") or {}
        include_usage = bool(options.get("include_usage"))
        identity: Identity = request[IDENTITY]
        turn = Turn(text=text, user=_user(body, f"{platform}-anonymous"), platform=platform,
                    community=identity.community,
                    conversation_id=_conversation_id(request, body, platform), history=history,
                    system_prompt=system, params=overrides)
        if stream:
            return await self._stream(request, turn, include_usage)
        ex = await self.services.chat.respond(turn)
        return web.json_response({
            "id": str(ex.id),
            "object": "chat.completion",
            "created": int(ex.created_at),
            "model": ex.model_version,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ex.reply},
                         "finish_reason": ex.finish_reason, "logprobs": None}],
            "usage": _usage(ex),
            "conversation_id": ex.conversation_id,
            "exchange_id": ex.id,
        }, headers={"X-Conversation-Id": ex.conversation_id, "X-Exchange-Id": str(ex.id)})

    async def _stream(self, request: web.Request, turn: Turn, include_usage: bool) -> web.StreamResponse:
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Conversation-Id": turn.conversation_id or ""})
        ids: dict[str, Any] = {"id_": ""}
        created = int(time.time())
        model = self.services.engine.model_version

        def chunk(delta: dict, finish: str | None = None, id_: str | None = None, **extra) -> bytes:
            id_ = id_ or ids["id_"]
            obj = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                   **extra}
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

        async def begin() -> None:
            # Headers go out with the first text: an error before it (busy, bad
            # input) still gets its proper status.
            if not resp.prepared:
                await resp.prepare(request)
                await resp.write(chunk({"role": "assistant", "content": ""}))

        async def on_start(exchange_id: int) -> None:
            ids["id_"] = str(exchange_id)
            resp.headers["X-Exchange-Id"] = str(exchange_id)

        async def on_delta(delta: str) -> None:
            await begin()
            await resp.write(chunk({"content": delta}))

        try:
            ex = await self.services.chat.respond(turn, on_delta, on_start)
        except ConnectionResetError:
            # The client went away: its request is cancelled in the engine and,
            # never seen, not logged as an exchange.
            log.info("stream abandoned by the client: conversation=%s", turn.conversation_id)
            return resp
        except errors.TuneloopError as e:
            if not resp.prepared:
                raise
            _, kind = _classify(e)
            log.info("stream ended by an error: conversation=%s: %s", turn.conversation_id, e)
            try:
                await resp.write(b"data: " + json.dumps(error_body(str(e), kind)).encode() + b"\n\n")
                await resp.write_eof()
            except ConnectionResetError:
                pass
            return resp
        model = ex.model_version  # the version that produced the reply, should a swap have happened
        ids = {"id_": str(ex.id), "exchange_id": ex.id, "conversation_id": ex.conversation_id}
        try:
            await begin()
            await resp.write(chunk({}, ex.finish_reason, **ids))
            if include_usage:
                obj = {"id": str(ex.id), "object": "chat.completion.chunk", "created": created,
                       "model": model, "choices": [], "usage": _usage(ex), "exchange_id": ex.id}
                await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            log.info("client left before the end of exchange %d", ex.id)
        return resp

    # -- feedback ------------------------------------------------------------------

    async def feedback(self, request: web.Request) -> web.Response:
        raw_id = request.match_info["id"]
        try:
            exchange_id = int(raw_id)
        except ValueError:
            raise errors.InputError(f"exchange id must be a whole number, got {raw_id!r}") from None
        body = await read_json(request)
        user = _opt(body, "user", (str,), "a string")
        if not user or not user.strip():
            raise errors.InputError("user is required: who gives this feedback")
        if len(user) > _MAX_ID_CHARS:
            raise errors.InputError(f"user is longer than {_MAX_ID_CHARS} characters")
        has_rating, has_correction = "rating" in body, "correction" in body
        if not has_rating and not has_correction:
            raise errors.InputError("send \"rating\" (up, down or null) and/or \"correction\" (a better reply)")
        rating = parse_rating(body["rating"]) if has_rating else None
        correction = body.get("correction") if has_correction else None
        if has_correction and not isinstance(correction, str):
            raise errors.InputError(f"correction must be a string, got {_type_name(correction)}")
        svc = self.services
        identity: Identity = request[IDENTITY]
        svc.store.exchange(exchange_id, identity.community)  # 404 before storing anything
        platform = "web" if request.headers.get("X-Tuneloop-Client") == "web" else "api"
        out: dict[str, Any] = {"exchange_id": exchange_id, "user": user}
        if has_correction:
            # Checked first so that a bad correction stores nothing at all.
            check_text(correction, svc.feedback.max_chars, what="correction")
        if has_rating:
            svc.feedback.rate(exchange_id, user, rating, platform=platform, community=identity.community)
            out["rating"] = rating
        if has_correction:
            decision = svc.feedback.correct(exchange_id, user, correction, platform=platform,
                                            community=identity.community,
                                            channel="web" if identity.key is None else "http",
                                            admin=identity.admin)
            out["correction"] = {"id": decision.correction_id, "text": correction.strip(),
                                 "status": decision.status}
        return web.json_response(out)

    # -- pages, dashboard, metrics, health --------------------------------------------

    @staticmethod
    def page(name: str):
        async def handler(request: web.Request) -> web.FileResponse:
            return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
        return handler

    async def dashboard_data(self, request: web.Request) -> web.Response:
        from bot.dashboard import dashboard

        bucket = request.query.get("bucket")
        if bucket is not None:
            try:
                bucket = int(bucket)
            except ValueError:
                raise errors.InputError(f"bucket must be a whole number of seconds, got {bucket!r}") from None
            if not 60 <= bucket <= 31 * 86400:
                raise errors.InputError(f"bucket must be between 60 and {31 * 86400} seconds, got {bucket}")
        identity: Identity = request[IDENTITY]
        # With keys, an admin key sees its own community; without, the machine's operator sees all.
        store = self.services.store.scoped(identity.community if identity.key else None)
        data = await asyncio.get_running_loop().run_in_executor(None, dashboard, store, bucket)
        data["engine"] = self.services.engine.stats()
        return web.json_response(data)

    async def review(self, request: web.Request) -> web.Response:
        """Approve (live: memory and training data at once) or reject a correction waiting for review."""
        # Only a JSON request: a page elsewhere cannot send one to this server without a CORS
        # preflight, which is never granted, so it cannot approve through the operator's browser.
        if request.content_type != "application/json":
            raise errors.InputError("send the decision as JSON (Content-Type: application/json): "
                                    '{"decision": "approve"} or {"decision": "reject"}')
        raw_id = request.match_info["id"]
        try:
            correction_id = int(raw_id)
        except ValueError:
            raise errors.InputError(f"correction id must be a whole number, got {raw_id!r}") from None
        decision = (await read_json(request)).get("decision")
        if decision not in ("approve", "reject"):
            raise errors.InputError(f'decision must be "approve" or "reject", got {json.dumps(decision)[:50]}')
        identity: Identity = request[IDENTITY]
        # With keys, an admin key reviews its own community; without, the operator reviews all.
        row = trust.review(self.services.store, correction_id, decision == "approve",
                           by=f"web:{identity.key or 'operator'}",
                           community=identity.community if identity.key else None)
        return web.json_response({"correction": {k: row[k] for k in (
            "id", "exchange_id", "status", "community", "user", "text", "reviewed_by")}})

    async def login_page(self, request: web.Request, note: str = "") -> web.Response:
        html = _LOGIN_PAGE.format(note=f'<p class="muted">{note}</p>' if note else "",
                                  next=_next(request.query.get("next")))
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        key, target = str(form.get("key") or ""), _next(str(form.get("next") or ""))
        identity = self.keys.identify(key)
        if identity is None or (target == "/dashboard" and not identity.admin):
            log.info("login refused: next=%s reason=%s", target, "no such key" if identity is None else "not admin")
            return await self.login_page(request, "That key is not valid here." if identity is None
                                         else "The dashboard needs an admin key.")
        log.info("login: env=%s community=%s admin=%s", identity.key, identity.community, identity.admin)
        resp = web.HTTPFound(target)
        resp.set_cookie(COOKIE, key, httponly=True, samesite="Strict", secure=request.secure, path="/")
        raise resp

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        if self.draining.is_set():
            return web.json_response({"status": "shutting down"}, status=503)
        return web.json_response({"status": "ok", "model_version": self.services.engine.model_version})


def _usage(ex) -> dict[str, int] | None:
    # A back end that counted nothing (an OpenAI-compatible server that sends
    # no usage) gives null usage, not zeros that read as counted.
    p, c = ex.prompt_tokens, ex.completion_tokens
    if p is None or c is None:
        return None
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def create_app(services, metrics: Metrics | None = None) -> tuple[web.Application, WebAdapter]:
    """An aiohttp app with the web routes; ``tuneloop run`` adds the other adapters' routes."""
    app = web.Application(client_max_size=services.config.server.max_body_bytes,
                          middlewares=[error_middleware])
    adapter = WebAdapter(services, metrics)
    adapter.attach(app)
    return app, adapter
