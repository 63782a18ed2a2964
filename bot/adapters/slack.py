"""The Slack adapter: slack-bolt events to core calls and back. It translates; the core decides.

``SlackAdapter(services)`` builds a slack-bolt ``AsyncApp``. ``attach(web_app)``
adds ``POST /slack/events`` to ``tuneloop run``'s aiohttp server in HTTP
mode (bolt verifies the signature: a bad or stale one gets 401 and nothing
runs); ``start()`` checks the bot token and, in Socket Mode, connects the
websocket; ``stop()`` disconnects and lets replies in flight finish.

With ``[slack] oauth = true`` (HTTP mode) there is no one bot token: any
workspace installs the app through bolt's OAuth flow (``GET install_path``,
then Slack sends the installer to ``GET redirect_uri_path``), and slack_sdk's
SQLite installation and state stores keep each workspace's bot token in the
``[storage]`` database file. Bolt's authorize finds the token of the
workspace of each request; every Web API call made for that request uses it
(``SlackAdapter.api``), and the workspace's team id is its community, as
with one token. A workspace that uninstalls the app has its tokens deleted.

What arrives and where it goes:

- ``app_mention``, a DM, a message in ``[slack] channels`` -> ``Chat.respond``,
  answered in the message's thread (conversation ``slack:{channel}:{thread_ts}``,
  context from the store, else from ``conversations.replies``), streamed by
  editing one message (``bot.replies.ReplyStream``); the first message is the
  exchange's ``reply_ref`` from the moment it is posted.
- a thread reply starting with ``[slack] correction_prefix``, and the message
  shortcut's modal -> ``Feedback.correct`` of the bot reply it follows.
- ``reaction_added`` / ``reaction_removed`` on a bot reply -> ``Feedback.react``.
- ``/tuneloop ...`` and the App Home buttons -> ``Admin.run``, answered ephemerally.

Every event id is recorded in the store (``first_sight``) before anything
runs, so a retried delivery does nothing, also after a restart. Every
event ends in one log line with its ids and what came of it, and in one
``handled`` signal (``bot.adapters.handled``), duplicates and refusals too.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.listener.async_builtins import AsyncTokenRevocationListeners
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.oauth.installation_store.sqlite3 import SQLite3InstallationStore
from slack_sdk.oauth.state_store.sqlite3 import SQLite3OAuthStateStore
from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters.handled import HandledSignal
from bot.adapters.slack_text import ENTITY, MAX_MESSAGE_CHARS, SlackPoster, escape, plain_text
from bot.adapters.slack_views import (
    HOME_ACTIONS,
    REVIEW_ACTIONS,
    SUGGEST_SHORTCUT,
    SUGGEST_VIEW,
    home_view,
    submitted_exchange,
    submitted_text,
    suggest_view,
)
from bot.admin import Caller
from bot.chat import Turn
from bot.replies import Clock, ReplyStream
from bot.services import Services
from tuneloop import community
from tuneloop.engine import Message
from tuneloop.errors import BusyError, ConfigError, InputError, NotFoundError, TuneloopError
from tuneloop.learning import trust

log = logging.getLogger(__name__)

PLATFORM = "slack"
EVENTS_PATH = "/slack/events"
COMMAND = "/tuneloop"
#: message subtypes that are a person talking; edits, joins and bot posts are not
_SPOKEN_SUBTYPES = (None, "file_share", "thread_broadcast")
#: earlier thread messages read from Slack for a thread the store does not know
_HISTORY_LIMIT = 40
_CORRECTION_STORED = "white_check_mark"
#: what the event being handled came to, as ``_done`` logs it; read when the handler ends
_OUTCOME: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("slack_outcome", default=None)
#: OAuth installs: the Web API client with the token of the workspace being served (bolt's ``context.client``)
_WORKSPACE_CLIENT: contextvars.ContextVar[AsyncWebClient | None] = contextvars.ContextVar(
    "slack_workspace_client", default=None)
#: set by the first of our middlewares: a request that never sets it was refused by bolt's own
_REACHED: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("slack_reached", default=None)
#: how long an install's state (the OAuth ``state`` parameter) is accepted, as Slack's docs suggest
_STATE_SECONDS = 600


def conversation_id(channel: str, thread_ts: str) -> str:
    return f"{PLATFORM}:{channel}:{thread_ts}"


def _ts(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


class SlackAdapter:
    """One Slack workspace, in Socket Mode or over the Events API."""

    def __init__(self, services: Services, *, edit_interval: float = 1.0,
                 max_message_chars: int = MAX_MESSAGE_CHARS, rate_limit_retries: int = 10,
                 ping_interval: float = 10.0, clock: Clock | None = None,
                 sampling: dict[str, Any] | None = None):
        self.svc = services
        self.config = services.config.slack
        cfg = self.config
        self.edit_interval = edit_interval
        #: the reply streams' clock; tests drive it instead of sleeping
        self.clock = clock
        #: sampling overrides for every reply (``Turn.params``); benchmarks and tests use it
        self.sampling = dict(sampling or {})
        #: fired once per incoming request when it is fully processed, whatever came of it
        self.handled = HandledSignal()
        self.max_message_chars = max_message_chars
        self.ping_interval = ping_interval
        #: OAuth installs: each workspace's token comes from the installation store, per request
        self.oauth = cfg.mode == "http" and cfg.oauth
        self.bot_token = (None if self.oauth else
                          self._secret(cfg.bot_token_env, "bot_token_env", "the bot token, xoxb-..."))
        self.app_token = (self._secret(cfg.app_token_env, "app_token_env", "the app-level token, xapp-...")
                          if cfg.mode == "socket" else None)
        signing_secret = (self._secret(cfg.signing_secret_env, "signing_secret_env", "the signing secret")
                          if cfg.mode == "http" else None)
        # A 429 waits out Retry-After and tries again rather than losing a reply.
        self.client = AsyncWebClient(token=self.bot_token, base_url=cfg.api_base_url, retry_handlers=[
            AsyncRateLimitErrorRetryHandler(max_retry_count=rate_limit_retries),
            AsyncConnectionErrorRetryHandler(max_retry_count=2),
            AsyncServerErrorRetryHandler(max_retry_count=2),
        ])
        bolt_log = logging.getLogger("slack_bolt")
        # bolt reads $SLACK_BOT_TOKEN on its own and warns that the client's token wins; it is the same token.
        quiet = _Drop("`token` will be unused")
        bolt_log.addFilter(quiet)
        self.installations: SQLite3InstallationStore | None = None
        oauth_settings = self._oauth_settings() if self.oauth else None
        try:
            self.app = AsyncApp(client=self.client, signing_secret=signing_secret or "",
                                oauth_settings=oauth_settings,
                                request_verification_enabled=cfg.mode == "http",
                                process_before_response=False, logger=bolt_log,
                                # The handlers ignore the bot's own events themselves, so that
                                # every event ends in one log line and one ``handled`` signal.
                                ignoring_self_events_enabled=False)
        finally:
            bolt_log.removeFilter(quiet)
        self.bot_user_id: str | None = None
        self.bot_id: str | None = None
        #: the token's own workspace: the community of a payload that names none
        self.team_id: str | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._connecting: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._thread_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._register()

    def _community(self, body: dict) -> str:
        """The workspace an event, command, shortcut or action came from: ``slack:TEAM``."""
        team = (body.get("team_id") or (body.get("team") or {}).get("id")
                or (body.get("user") or {}).get("team_id") or self.team_id)
        return community.slack(team)

    def _is_admin(self, user: str, body: dict) -> bool:
        return self.svc.admin.is_admin(Caller(PLATFORM, user, community=self._community(body)))

    def _oauth_settings(self) -> AsyncOAuthSettings:
        """Bolt's OAuth flow, its installations and states in the store's own database file."""
        cfg = self.config
        client_id = self._secret(cfg.client_id_env, "client_id_env", "the app's client id, for OAuth installs")
        client_secret = self._secret(cfg.client_secret_env, "client_secret_env",
                                     "the app's client secret, for OAuth installs")
        database = str(self.svc.store.path)
        self.installations = SQLite3InstallationStore(database=database, client_id=client_id)
        return AsyncOAuthSettings(
            client_id=client_id, client_secret=client_secret, scopes=list(cfg.scopes), user_scopes=[],
            redirect_uri=cfg.redirect_uri or None, install_path=cfg.install_path,
            redirect_uri_path=cfg.redirect_uri_path, installation_store=self.installations,
            # Only bot tokens are asked for: a workspace's bot is all that answers there.
            installation_store_bot_only=True,
            state_store=SQLite3OAuthStateStore(database=database, expiration_seconds=_STATE_SECONDS),
            state_expiration_seconds=_STATE_SECONDS, logger=logging.getLogger("slack_bolt.oauth"))

    @property
    def api(self) -> AsyncWebClient:
        """The Web API client for the request being handled: with an OAuth install, the one holding
        that workspace's token; else the one token's client."""
        return _WORKSPACE_CLIENT.get() or self.client

    def _secret(self, env: str, key: str, what: str) -> str:
        value = self.svc.config.secret(env)
        if not value:
            raise ConfigError(f"slack.{key}: environment variable {env} is not set ({what}); "
                              f"see docs/slack.md")
        return value

    # ------------------------------------------------------------------ life cycle

    def attach(self, web_app: web.Application) -> None:
        """HTTP mode: serve the Events API, commands and interactivity at ``POST /slack/events``."""
        if self.config.mode == "http":
            web_app.router.add_post(EVENTS_PATH, self.handle_http)
        if self.oauth:
            web_app.router.add_get(self.config.install_path, self.handle_oauth)
            web_app.router.add_get(self.config.redirect_uri_path, self.handle_oauth)

    async def start(self) -> None:
        if self.oauth:  # no token of its own: each workspace's is checked by bolt's authorize per request
            self.installations.init()  # its tables, now: a database that cannot take them fails the start
            log.info("slack: OAuth installs at GET %s (redirect %s); tokens in %s", self.config.install_path,
                     self.config.redirect_uri_path, self.svc.store.path)
            return
        try:
            auth = await self.client.auth_test()
            self.bot_user_id, self.bot_id = auth.get("user_id"), auth.get("bot_id")
            self.team_id = auth.get("team_id")
            log.info("slack: signed in as bot_user=%s team=%s mode=%s", self.bot_user_id, auth.get("team_id"),
                     self.config.mode)
        except SlackApiError as e:
            raise ConfigError(f"slack.bot_token_env: Slack refused the token in {self.config.bot_token_env} "
                              f"({e.response.get('error')})") from None
        except Exception as e:  # noqa: BLE001 — Slack unreachable now; bolt retries per request
            log.error("slack: cannot reach %s (%s: %s); events will be retried when they arrive",
                      self.config.api_base_url, type(e).__name__, e)
        if self.config.mode == "socket":
            self._socket = AsyncSocketModeHandler(self.app, self.app_token, web_client=self.client,
                                                  ping_interval=self.ping_interval)
            # Ask for the websocket URL ourselves: a refused app token fails the start with its
            # key's name, where the socket client would retry it forever.
            try:
                opened = await self.client.apps_connections_open(app_token=self.app_token)
                self._socket.client.wss_uri = opened["url"]
            except SlackApiError as e:
                await self._socket.close_async()
                self._socket = None
                raise ConfigError(f"slack.app_token_env: Slack refused the token in {self.config.app_token_env} "
                                  f"({e.response.get('error')}); it needs the connections:write scope") from None
            except Exception as e:  # noqa: BLE001 — unreachable now: the client keeps trying
                log.error("slack: cannot open socket mode (%s: %s); retrying", type(e).__name__, e)
            # The client retries a failed connect forever; don't hold `tuneloop run` hostage to it.
            self._connecting = asyncio.ensure_future(self._socket.connect_async())
            try:
                await asyncio.wait_for(asyncio.shield(self._connecting), timeout=30)
                log.info("slack: socket mode connected")
            except TimeoutError:
                log.warning("slack: socket mode not connected after 30 s; still trying")

    async def stop(self, grace: float = 10.0) -> None:
        if self._socket is not None:
            if self._connecting is not None and not self._connecting.done():
                self._connecting.cancel()
            await self._socket.close_async()
            self._socket = None
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            done, late = await asyncio.wait(pending, timeout=grace)
            for t in late:
                t.cancel()
            log.info("slack: stopped; %d replies finished, %d cancelled", len(done), len(late))

    def describe(self) -> str:
        where = "POST " + EVENTS_PATH if self.config.mode == "http" else "socket mode"
        if self.oauth:
            where += f", installs at GET {self.config.install_path}"
        return (f"slack: running ({where}) as {self.bot_user_id or '?'}; answering mentions, DMs and "
                f"{len(self.config.channels)} channel(s)")

    async def handle_http(self, request: web.Request) -> web.Response:
        """``POST /slack/events``: aiohttp request -> bolt -> aiohttp response."""
        try:
            bolt_req = await to_bolt_request(request)
        except ValueError:  # a body that is not JSON nor a form; its signature is not even checked
            log.warning("slack: unreadable request body on %s; refused", EVENTS_PATH)
            self.handled.fire("http", "refused")
            return web.json_response({"error": "unreadable body"}, status=400)
        reached: list[bool] = []
        _REACHED.set(reached)
        resp = await self.app.async_dispatch(bolt_req)
        if resp.status >= 400:  # refused before any listener ran (a bad signature, nothing matched)
            self.handled.fire("http", "refused")
        elif self.oauth and not reached and bolt_req.body.get("type") != "url_verification":
            # bolt's authorize found no installation for the workspace: it answers 200 and runs nothing
            log.warning("slack: request from team=%s refused: the app is not installed there (%s)",
                        bolt_req.context.team_id, self.config.install_path)
            self.handled.fire("http", "refused")
        return await to_aiohttp_response(resp)

    async def handle_oauth(self, request: web.Request) -> web.Response:
        """``GET install_path`` (a state, a cookie and the "Add to Slack" link) and ``GET
        redirect_uri_path`` (state checked, code exchanged by ``oauth.v2.access``, installation stored)."""
        flow = self.app.oauth_flow
        bolt_req = await to_bolt_request(request)
        if request.path == self.config.install_path:
            resp = await flow.handle_installation(bolt_req)
        else:
            resp = await flow.handle_callback(bolt_req)
            # bolt answers a refused install (bad state, denied, a refused code) with a page, not an error
            log.info("slack oauth: install %s (HTTP %d)", "done" if resp.status == 200 else "refused", resp.status)
        return await to_aiohttp_response(resp)

    # ------------------------------------------------------------------ wiring

    def _register(self) -> None:
        app = self.app
        app.middleware(self._workspace_client)
        app.middleware(self._dedupe)
        app.event("app_mention")(self._tracked(self._on_mention))
        app.event("message")(self._tracked(self._on_message))
        app.event("reaction_added")(self._tracked(self._on_reaction))
        app.event("reaction_removed")(self._tracked(self._on_reaction))
        app.event("app_home_opened")(self._tracked(self._on_home_opened))
        app.command(COMMAND)(self._tracked(self._on_command))
        app.shortcut(SUGGEST_SHORTCUT)(self._tracked(self._on_suggest))
        app.view(SUGGEST_VIEW)(self._tracked(self._on_suggest_submit))
        app.action(re.compile("^(" + "|".join(HOME_ACTIONS) + ")$"))(self._tracked(self._on_home_action))
        app.action(re.compile("^(" + "|".join(REVIEW_ACTIONS) + ")$"))(self._tracked(self._on_review_action))
        if self.oauth:
            app.event("app_uninstalled")(self._tracked(self._on_uninstalled))
            app.event("tokens_revoked")(self._tracked(self._on_tokens_revoked))
        # Whatever else Slack sends is acknowledged and dropped: an unhandled
        # request would get a 404, and Slack retries those.
        any_id = re.compile(".*")
        app.event(any_id)(self._tracked(self._on_other_event))
        app.command(any_id)(self._on_other_command)
        for register in (app.shortcut, app.action, app.view, app.options):
            register(any_id)(self._ack_only)
        app.error(self._on_error)

    def _tracked(self, handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """Count the handler's task as in flight so ``stop`` can let it finish."""

        @functools.wraps(handler)
        async def run(*args: Any, **kwargs: Any) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.add(task)
            outcome: list[str] = []
            _OUTCOME.set(outcome)  # the task's own context: no other handler sees it
            try:
                await handler(*args, **kwargs)
            except BaseException:
                outcome.append("failed")
                raise
            finally:
                if task is not None:
                    self._tasks.discard(task)
                self.handled.fire(_key(kwargs.get("body") or {}, handler.__name__),
                                  outcome[-1] if outcome else "done")

        return run

    async def _workspace_client(self, context: dict, next: Callable[[], Awaitable[BoltResponse]]) -> BoltResponse:
        reached = _REACHED.get()
        if reached is not None:
            reached.append(True)
        if self.oauth:  # the listener's task is created after this and inherits the variable
            _WORKSPACE_CLIENT.set(context.client)
        return await next()

    async def _dedupe(self, body: dict, next: Callable[[], Awaitable[BoltResponse]]) -> BoltResponse | None:
        event_id = body.get("event_id") if body.get("type") == "event_callback" else None
        if event_id and not self.svc.store.first_sight(str(event_id)):
            event = body.get("event") or {}
            log.info("slack event: event_id=%s type=%s channel=%s ts=%s outcome=duplicate", event_id,
                     event.get("type"), _channel_of(event), event.get("ts") or event.get("event_ts"))
            self.handled.fire(_key(body, "event"), "duplicate")
            return BoltResponse(status=200, body="")
        return await next()

    async def _on_error(self, error: Exception, body: dict) -> None:
        log.error("slack: handler failed: %s: %s (event_id=%s type=%s)", type(error).__name__, error,
                  body.get("event_id"), (body.get("event") or {}).get("type") or body.get("type"),
                  exc_info=error)

    def _done(self, body: dict, event: dict, outcome: str, exchange: int | None = None, **extra: Any) -> None:
        """The one log line every event ends with."""
        more = "".join(f" {k}={v}" for k, v in extra.items())
        box = _OUTCOME.get()
        if box is not None:
            box.append(outcome)
        log.info("slack event: event_id=%s type=%s channel=%s ts=%s user=%s exchange=%s outcome=%s%s",
                 body.get("event_id"), event.get("type"), _channel_of(event),
                 event.get("ts") or (event.get("item") or {}).get("ts") or event.get("event_ts"),
                 event.get("user"), exchange if exchange is not None else "-", outcome, more)

    # ------------------------------------------------------------------ conversations

    async def _on_mention(self, body: dict, event: dict, context: dict) -> None:
        await self._on_text(body, event, context, mentioned=True)

    async def _on_message(self, body: dict, event: dict, context: dict) -> None:
        await self._on_text(body, event, context, mentioned=False)

    async def _on_text(self, body: dict, event: dict, context: dict, *, mentioned: bool) -> None:
        me = context.get("bot_user_id") or self.bot_user_id
        channel, ts, user = event.get("channel"), event.get("ts"), event.get("user")
        raw = event.get("text") or ""
        if event.get("bot_id") or event.get("subtype") not in _SPOKEN_SUBTYPES or not user or user == me:
            return self._done(body, event, "ignored", why="not a person's message")
        if not channel or not ts:
            return self._done(body, event, "ignored", why="no channel or ts")
        thread_ts = event.get("thread_ts") or ts
        text = plain_text(raw, me)
        prefix = self.config.correction_prefix
        is_correction = bool(prefix) and re.match(re.escape(prefix) + r"(\s|$)", text) is not None
        is_dm = event.get("channel_type") == "im" or channel.startswith("D")
        if mentioned:
            if is_correction or is_dm:  # the message event stores or answers it
                return self._done(body, event, "ignored", why="the message event handles it")
        else:
            if is_correction:
                return await self._correct_by_prefix(body, event, text[len(prefix):].strip(), thread_ts)
            if me and f"<@{me}>" in raw and not is_dm:  # its app_mention event answers it
                return self._done(body, event, "ignored", why="mention")
            if not (is_dm or channel in self.config.channels):
                return self._done(body, event, "ignored", why="channel not answered")
        if not text:
            return self._done(body, event, "ignored", why="no text")
        await self._answer(body, event, text, thread_ts, me)

    async def _answer(self, body: dict, event: dict, text: str, thread_ts: str, me: str | None) -> None:
        channel, ts, user = event["channel"], event["ts"], event["user"]
        cid = conversation_id(channel, thread_ts)
        # One reply at a time per thread, so a follow-up sees the answer before it.
        lock = self._thread_locks.get(cid)
        if lock is None:
            lock = self._thread_locks[cid] = asyncio.Lock()
        async with lock:
            history = None
            where = self._community(body)
            if thread_ts != ts and not self.svc.store.conversation_exists(cid, where):
                history = await self._thread_history(channel, thread_ts, ts, me)
            turn = Turn(text=text, user=user, platform=PLATFORM, community=where, channel=channel, thread=thread_ts,
                        conversation_id=cid, history=history, params=dict(self.sampling))
            # The first message is the reply's reference as soon as it is posted:
            # a reaction while the reply still streams rates it.
            stream = ReplyStream(SlackPoster(self.api, channel, thread_ts), self.svc.store,
                                 max_chars=self.max_message_chars, interval=self.edit_interval,
                                 anchor="first", clock=self.clock, render=escape, keep_whole=ENTITY)
            try:
                ex = await self.svc.chat.respond(turn, on_delta=stream.add, on_start=stream.start)
                refs = await stream.finish(ex.reply)
            except SlackApiError as e:  # the reply cannot be shown; the exchange may be stored
                log.error("slack: cannot post the reply: %s", e.response.get("error"))
                return self._done(body, event, "failed", why=e.response.get("error"))
            except InputError as e:
                await stream.finish(f"Sorry, I can't answer that: {e}.", failed=True)
                return self._done(body, event, "refused", why=f'"{e}"')
            except BusyError:
                await stream.finish("Sorry, I'm busy right now. Please ask again in a minute.", failed=True)
                return self._done(body, event, "busy")
            except TuneloopError as e:
                log.error("slack: reply failed: %s: %s", type(e).__name__, e)
                await stream.finish("Sorry, something went wrong while I was answering.", failed=True)
                return self._done(body, event, "failed", why=type(e).__name__)
        if self.config.add_reactions:
            for names in (self.config.up_reactions, self.config.down_reactions):
                if names:
                    await self._react(channel, refs[0], names[0])
        self._done(body, event, "replied", ex.id, reply_ts=refs[0], messages=len(refs))

    async def _thread_history(self, channel: str, thread_ts: str, before: str, me: str | None) -> list[Message]:
        """The thread so far, read from Slack, as chat messages (the bot's own are the assistant's)."""
        try:
            r = await self.api.conversations_replies(channel=channel, ts=thread_ts, limit=200)
        except SlackApiError as e:
            log.warning("slack: cannot read thread channel=%s ts=%s (%s); answering without it", channel,
                        thread_ts, e.response.get("error"))
            return []
        history: list[Message] = []
        for m in r.get("messages") or []:
            if _ts(m.get("ts")) >= _ts(before) or m.get("subtype") not in _SPOKEN_SUBTYPES + ("bot_message",):
                continue
            mine = (me is not None and m.get("user") == me) or (
                self.bot_id is not None and m.get("bot_id") == self.bot_id)
            if m.get("bot_id") and not mine:
                continue  # other bots are not part of the conversation
            content = plain_text(m.get("text") or "", me)
            if content:
                history.append({"role": "assistant" if mine else "user", "content": content})
        return history[-_HISTORY_LIMIT:]

    async def _correct_by_prefix(self, body: dict, event: dict, text: str, thread_ts: str) -> None:
        channel, ts, user = event["channel"], event["ts"], event["user"]
        where = self._community(body)
        earlier = [ex for ex in self.svc.store.conversation(conversation_id(channel, thread_ts), community=where)
                   if ex.reply_ref and _ts(ex.reply_ref) < _ts(ts)]
        if not earlier:
            await self._ephemeral(channel, user, "To correct me, reply in the thread of my answer with "
                                  f"`{self.config.correction_prefix} a better reply`.", thread_ts)
            return self._done(body, event, "ignored", why="no bot reply to correct")
        ex = earlier[-1]
        try:
            decision = self.svc.feedback.correct(ex.id, user, text, platform=PLATFORM, community=where,
                                                 admin=self._is_admin(user, body))
        except InputError as e:
            await self._ephemeral(channel, user, f"Correction not stored: {e}.", thread_ts)
            return self._done(body, event, "refused", ex.id, why=f'"{e}"')
        await self._react(channel, ts, _CORRECTION_STORED)
        if decision.status == "pending":
            await self._ephemeral(channel, user, "Thanks! An admin will review your correction before I learn it.",
                                  thread_ts)
        self._done(body, event, "corrected", ex.id, correction=decision.correction_id, status=decision.status)

    # ------------------------------------------------------------------ ratings

    async def _on_reaction(self, body: dict, event: dict, context: dict) -> None:
        item, user = event.get("item") or {}, event.get("user")
        name = (event.get("reaction") or "").split("::")[0]  # "+1::skin-tone-2"
        rating = ("up" if name in self.config.up_reactions else
                  "down" if name in self.config.down_reactions else None)
        me = context.get("bot_user_id") or self.bot_user_id
        if item.get("type") != "message" or not user or user == me or rating is None:
            return self._done(body, event, "ignored", why="not a rating")
        where = self._community(body)
        ex = self.svc.store.exchange_by_ref(PLATFORM, str(item.get("ts")), where)
        if ex is None or ex.channel != item.get("channel"):
            return self._done(body, event, "ignored", why="not a bot reply")
        added = event.get("type") == "reaction_added"
        try:
            outcome = self.svc.feedback.react(ex.id, user, rating, added=added, platform=PLATFORM, community=where)
        except NotFoundError:  # forgotten, or its reply failed, since it was posted
            return self._done(body, event, "ignored", ex.id, why="exchange gone")
        if outcome == "ignored":
            return self._done(body, event, outcome, ex.id, why="not the current rating")
        self._done(body, event, outcome, ex.id, **({"rating": rating} if added else {}))

    # ------------------------------------------------------------------ corrections by modal

    async def _on_suggest(self, ack: Callable, body: dict, shortcut: dict, respond: Callable) -> None:
        await ack()
        message, channel = shortcut.get("message") or {}, (shortcut.get("channel") or {}).get("id", "")
        ex = self.svc.store.exchange_by_ref(PLATFORM, str(message.get("ts")), self._community(body))
        user = (shortcut.get("user") or {}).get("id")
        if ex is None:
            await respond(text="That message is not one of my replies; I can only take suggestions for those.",
                          response_type="ephemeral")
            log.info("slack shortcut: user=%s ts=%s outcome=ignored why=not a bot reply", user, message.get("ts"))
            return
        await self.api.views_open(trigger_id=shortcut["trigger_id"], view=suggest_view(ex, channel))
        log.info("slack shortcut: user=%s ts=%s exchange=%d outcome=modal opened", user, message.get("ts"), ex.id)

    async def _on_suggest_submit(self, ack: Callable, body: dict, view: dict) -> None:
        user = (body.get("user") or {}).get("id", "")
        ex_id, text = submitted_exchange(view), submitted_text(view)
        try:
            if ex_id is None:
                raise NotFoundError("that reply is unknown")
            decision = self.svc.feedback.correct(ex_id, user, text, platform=PLATFORM,
                                                 community=self._community(body), admin=self._is_admin(user, body))
        except (InputError, NotFoundError) as e:
            await ack(response_action="errors", errors={"correction": f"Not saved: {e}."})
            log.info("slack modal: user=%s exchange=%s outcome=refused why=%s", user, ex_id, e)
            return
        await ack()
        log.info("slack modal: user=%s exchange=%s correction=%d status=%s outcome=corrected", user, ex_id,
                 decision.correction_id, decision.status)

    # ------------------------------------------------------------------ admin

    async def _on_command(self, ack: Callable, command: dict, respond: Callable) -> None:
        await ack()  # within Slack's 3 s; the work and the answer come after
        user, text = command.get("user_id", ""), (command.get("text") or "").strip()
        reply = self._admin(user, text, self._community(command))
        await self._respond(respond, command.get("channel_id"), user, reply)
        log.info("slack command: user=%s channel=%s command=%r", user, command.get("channel_id"),
                 text.split()[0] if text else "help")

    def _admin(self, user: str, text: str, where: str) -> str:
        try:
            return self.svc.admin.run(Caller(PLATFORM, user, community=where), text)
        except TuneloopError as e:
            return f"Sorry: {e}"
        except Exception:  # a failing learning loop must still get the caller an answer
            log.exception("slack: admin command failed: user=%s command=%r", user, text)
            return "Sorry, that failed; the bot's log has the details."

    async def _respond(self, respond: Callable, channel: str | None, user: str, text: str) -> None:
        try:
            await respond(text=text, response_type="ephemeral")
        except Exception as e:  # noqa: BLE001 — an expired response_url: say it another way
            log.warning("slack: response_url failed (%s); using chat.postEphemeral", e)
            if channel:
                await self._ephemeral(channel, user, text)

    async def _on_home_opened(self, body: dict, event: dict) -> None:
        if event.get("tab") != "home" or not event.get("user"):
            return self._done(body, event, "ignored", why="not the home tab")
        await self._publish_home(event["user"], self._community(body))
        self._done(body, event, "home published")

    async def _on_home_action(self, ack: Callable, body: dict, action: dict) -> None:
        await ack()
        user = (body.get("user") or {}).get("id", "")
        command = HOME_ACTIONS[action["action_id"]]
        where = self._community(body)
        note = None if command == "status" else self._admin(user, command, where)
        await self._publish_home(user, where, note)
        log.info("slack home action: user=%s command=%s", user, command)

    async def _on_review_action(self, ack: Callable, body: dict, action: dict) -> None:
        await ack()
        user, where = (body.get("user") or {}).get("id", ""), self._community(body)
        command = f"{REVIEW_ACTIONS[action['action_id']]} {action.get('value', '')}"
        note = self._admin(user, command, where)  # refuses non-admins, and other workspaces' ids
        await self._publish_home(user, where, note)
        log.info("slack review action: user=%s community=%s command=%s", user, where, command)

    async def _publish_home(self, user: str, where: str, note: str | None = None) -> None:
        status = self._admin(user, "status", where)
        admin = self.svc.admin.is_admin(Caller(PLATFORM, user, community=where))
        queue = trust.pending(self.svc.store, where) if admin else None
        view = home_view(status, is_admin=admin, note=note, queue=queue)
        await self.api.views_publish(user_id=user, view=view)

    # ------------------------------------------------------------------ installs

    async def _on_uninstalled(self, body: dict, event: dict, context: dict) -> None:
        await AsyncTokenRevocationListeners(self.installations).handle_app_uninstalled_events(context)
        self._done(body, event, "uninstalled", team=context.team_id)

    async def _on_tokens_revoked(self, body: dict, event: dict, context: dict) -> None:
        await AsyncTokenRevocationListeners(self.installations).handle_tokens_revoked_events(event, context)
        self._done(body, event, "tokens revoked", team=context.team_id)

    # ------------------------------------------------------------------ the rest

    async def _on_other_event(self, body: dict, event: dict) -> None:
        self._done(body, event, "ignored", why="event not used")

    async def _on_other_command(self, ack: Callable, command: dict) -> None:
        await ack(text=f"I only know `{COMMAND}`.")
        self.handled.fire("command", "ignored")

    async def _ack_only(self, ack: Callable, body: dict) -> None:
        await ack()
        log.info("slack: ignored %s payload", body.get("type"))
        self.handled.fire(_key(body, "payload"), "ignored")

    async def _react(self, channel: str, ts: str, name: str) -> None:
        try:
            await self.api.reactions_add(channel=channel, timestamp=ts, name=name)
        except SlackApiError as e:  # a hint only: a missing scope must not lose the reply
            if e.response.get("error") != "already_reacted":
                log.warning("slack: reactions.add %s failed: %s", name, e.response.get("error"))

    async def _ephemeral(self, channel: str, user: str, text: str, thread_ts: str | None = None) -> None:
        try:
            await self.api.chat_postEphemeral(channel=channel, user=user, text=text, thread_ts=thread_ts)
        except SlackApiError as e:
            log.warning("slack: chat.postEphemeral failed: %s", e.response.get("error"))


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _key(body: dict, kind: str) -> str:
    """What a handled request was: its event id, else its payload type."""
    if body.get("event_id"):
        return f"event:{body['event_id']}"
    return str(body.get("type") or kind)


def _channel_of(event: dict) -> str | None:
    return event.get("channel") or (event.get("item") or {}).get("channel")
