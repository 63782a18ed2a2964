"""The Discord adapter: discord.py events to core calls, and the answers back.

Boundary: this module translates. A message becomes a ``Turn`` for
``Chat.respond``; a 👍/👎 reaction becomes ``Feedback.rate``; a reply that
starts with the correction prefix, or the "Suggest a better reply" modal,
becomes ``Feedback.correct``; ``/tuneloop ...`` becomes ``Admin.run``. What
to answer, who is an admin and what is stored is decided by the core.

Who gets an answer: a DM, a message that mentions the bot, any message in a
channel of ``[discord] channels`` (or a thread under one), and a reply to one
of the bot's messages. Never the bot itself, other bots or webhooks.

Context: inside a thread, the thread is the conversation (from the store,
else read back from Discord); elsewhere a reply chain is (walked from the
store where the bot's replies are known, fetched from Discord where not).
A message that is neither starts a new conversation.

The reply streams (``bot.replies.ReplyStream``): the first text is posted at
once, then the message is edited at most once a second; text past 2,000
characters continues in a new message. The exchange's ``reply_ref`` is the
id of the last message of the reply so far, where 👍 and 👎 are added; the
store knows every part from the moment it is posted, so a reaction or a
``!fix`` on any of them reaches the exchange, also while the reply streams.

Every incoming message and reaction ends in one ``handled`` signal
(``bot.adapters.handled``), the ignored ones too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import time
from typing import Any

import discord
import yarl
from discord import app_commands

from bot import replies
from bot.adapters.handled import HandledSignal
from bot.admin import Caller
from bot.chat import Turn
from bot.replies import Clock, ReplyStream
from bot.services import Services
from tuneloop import community
from tuneloop.engine import Message
from tuneloop.errors import ConfigError, NotFoundError, PermissionDenied, TuneloopError

log = logging.getLogger(__name__)

PLATFORM = "discord"
#: Discord's limit on the content of one message.
MAX_CHARS = 2000
#: seconds between two edits of a streaming reply
EDIT_INTERVAL = 1.0
#: how far back a reply chain or a thread is read from Discord
MAX_CONTEXT_MESSAGES = 20
CONTEXT_MENU_NAME = "Suggest a better reply"
_SKIN_TONES = re.compile("[\U0001f3fb-\U0001f3ff]")


def intents() -> discord.Intents:
    """The gateway intents the adapter needs; ``message_content`` is privileged."""
    i = discord.Intents.none()
    i.guilds = True  # channels, threads and roles (role-based admins)
    i.guild_messages = True
    i.dm_messages = True
    i.guild_reactions = True
    i.dm_reactions = True
    i.message_content = True  # text of messages that do not mention the bot
    return i


def split_text(text: str, limit: int = MAX_CHARS) -> list[str]:
    """``text`` in pieces of at most ``limit`` characters, cut at a line or word end when one is near."""
    return replies.split_text(text, limit)


def _emoji_key(emoji: Any) -> set[str]:
    """Names a configured emoji may match: the character without skin tone, or a custom emoji's name/id."""
    keys = {_SKIN_TONES.sub("", str(emoji))}
    name = getattr(emoji, "name", None)
    if name:
        keys.add(_SKIN_TONES.sub("", name))
    if getattr(emoji, "id", None):
        keys.add(str(emoji.id))
    return keys


class _Poster:
    """One reply's messages: the first answers the user's message, the others follow in its channel."""

    def __init__(self, source: discord.Message):
        self.source = source
        self.sent: dict[str, discord.Message] = {}

    async def post(self, text: str) -> str:
        if not self.sent:
            msg = await self.source.reply(text, mention_author=False)
        else:
            msg = await self.source.channel.send(text)
        self.sent[str(msg.id)] = msg
        return str(msg.id)

    async def edit(self, ref: str, text: str) -> None:
        self.sent[ref] = await self.sent[ref].edit(content=text)

    async def delete(self, ref: str) -> None:
        await self.sent.pop(ref).delete()


_THANKS = {"live": "Thanks — your reply is stored as a correction.",
           "pending": "Thanks — your reply is stored as a correction; an admin will review it before I learn it.",
           "rejected": "Thanks — your reply is stored."}


class _CorrectionModal(discord.ui.Modal, title=CONTEXT_MENU_NAME):
    text: discord.ui.TextInput = discord.ui.TextInput(
        label="A better reply", style=discord.TextStyle.paragraph, max_length=4000)

    def __init__(self, adapter: DiscordAdapter, exchange_id: int):
        super().__init__(timeout=900)
        self.adapter = adapter
        self.exchange_id = exchange_id

    async def on_submit(self, interaction: discord.Interaction) -> None:
        user = str(interaction.user.id)
        caller = self.adapter.caller(interaction.user, interaction.guild_id)
        try:
            decision = self.adapter.services.feedback.correct(
                self.exchange_id, user, self.text.value or "", platform=PLATFORM, community=caller.community,
                admin=self.adapter.services.admin.is_admin(caller))
        except TuneloopError as e:
            await interaction.response.send_message(f"⚠️ {e}", ephemeral=True)
            return
        log.info("discord correction (modal): guild=%s channel=%s user=%s exchange=%d correction=%d status=%s",
                 interaction.guild_id, interaction.channel_id, user, self.exchange_id, decision.correction_id,
                 decision.status)
        await interaction.response.send_message(_THANKS[decision.status], ephemeral=True)

    async def on_error(self, interaction: discord.Interaction, error: Exception, /) -> None:
        log.error("discord modal failed: interaction=%s exchange=%d", interaction.id, self.exchange_id,
                  exc_info=error)
        await _answer_error(interaction, "Something went wrong storing that; the error is in the bot's log.")


async def _answer_error(interaction: discord.Interaction, text: str) -> None:
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as e:  # the interaction expired; nothing left to tell the user
        log.warning("discord interaction answer failed: interaction=%s error=%s", interaction.id, e)


class _Tree(app_commands.CommandTree):
    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError, /) -> None:
        if isinstance(error, app_commands.CommandNotFound):
            log.warning("discord unknown command: guild=%s channel=%s user=%s interaction=%s name=%s",
                        interaction.guild_id, interaction.channel_id, interaction.user.id, interaction.id,
                        error.name)
            await _answer_error(interaction, "I don't know that command (my commands may have changed; "
                                             "try `/tuneloop`).")
            return
        log.error("discord command failed: guild=%s channel=%s user=%s interaction=%s",
                  interaction.guild_id, interaction.channel_id, interaction.user.id, interaction.id,
                  exc_info=error)
        await _answer_error(interaction, "Something went wrong; the error is in the bot's log.")


class _Client(discord.Client):
    def __init__(self, adapter: DiscordAdapter):
        super().__init__(intents=intents(), allowed_mentions=discord.AllowedMentions.none())
        self.adapter = adapter
        self.tree = _Tree(self)

    async def setup_hook(self) -> None:
        await self.adapter._setup()

    async def on_ready(self) -> None:
        log.info("discord connected: user=%s guilds=%d", self.user.id if self.user else None, len(self.guilds))

    async def on_resumed(self) -> None:
        log.info("discord session resumed")

    async def on_disconnect(self) -> None:
        log.info("discord gateway disconnected; discord.py reconnects")

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter.on_message(message)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter.on_reaction(payload, added=True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.adapter.on_reaction(payload, added=False)


class DiscordAdapter:
    """Runs a discord.py client over the shared services; ``start`` returns at once."""

    def __init__(self, services: Services, *, sampling: dict[str, Any] | None = None,
                 edit_interval: float = EDIT_INTERVAL, clock: Clock | None = None):
        self.services = services
        self.config = services.config.discord
        #: sampling overrides for every reply (``Turn.params``); benchmarks and tests use it
        self.sampling = dict(sampling or {})
        self.edit_interval = edit_interval
        #: the reply streams' clock; tests drive it instead of sleeping
        self.clock = clock
        #: fired once per incoming message or reaction when it is fully processed, whatever came of it
        self.handled = HandledSignal()
        self.client = _Client(self)
        self._task: asyncio.Task | None = None
        self._build_commands()

    # ------------------------------------------------------------------ life cycle

    def attach(self, app: Any) -> None:
        """Nothing to mount: Discord comes to us over the gateway, not HTTP."""

    async def start(self) -> None:
        token = self.services.config.secret(self.config.token_env)
        if not token:
            raise ConfigError(f"discord.token_env: environment variable {self.config.token_env} is not set")
        # discord.py reads both from class attributes; one Discord client per process.
        discord.http.Route.BASE = self.config.api_base_url.rstrip("/")
        if self.config.gateway_url:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.config.gateway_url)
        self._task = asyncio.create_task(self.client.start(token), name="tuneloop-discord")
        self._task.add_done_callback(self._client_ended)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the client is connected and has its guilds; raises if it stopped or timed out."""
        deadline = time.monotonic() + timeout
        while not self.client.is_ready():
            if self._task is None:
                raise RuntimeError("the Discord adapter is not started")
            if self._task.done():
                self._task.result()  # raises the client's error
                raise RuntimeError("the Discord client stopped")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Discord not ready after {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.client.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except (TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001 — logged by _client_ended
                pass

    def _client_ended(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("discord client stopped: %s", exc, exc_info=exc)

    async def _setup(self) -> None:
        """After login, before the gateway: find the gateway, sync the commands."""
        client = self.client
        if not self.config.gateway_url:
            _, url, _ = await client.http.get_bot_gateway()
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
        try:
            if self.config.guilds:
                for gid in self.config.guilds:
                    guild = discord.Object(int(gid))
                    client.tree.copy_global_to(guild=guild)
                    synced = await client.tree.sync(guild=guild)
                    log.info("discord commands synced: guild=%s commands=%d", gid, len(synced))
            else:
                synced = await client.tree.sync()
                log.info("discord commands synced: global commands=%d", len(synced))
        except discord.HTTPException as e:
            # The bot still chats; only the slash commands are missing.
            log.error("discord command sync failed (invite the bot with the applications.commands "
                      "scope): %s", e)

    # ------------------------------------------------------------------ messages

    async def on_message(self, message: discord.Message) -> None:
        outcome = "failed"
        try:
            outcome = await self._on_message(message)
        finally:
            self.handled.fire(f"message:{message.id}", outcome)

    async def _on_message(self, message: discord.Message) -> str:
        me = self.client.user
        if me is None or message.author.bot or message.author.id == me.id or message.webhook_id:
            return "ignored"
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return "ignored"
        parent = await self._referenced(message)
        where = self.community_of(message.guild.id if message.guild else None, message.author.id)
        to_bot = parent is not None and (parent.author.id == me.id or self._exchange_id(parent.id, where) is not None)
        prefix = self.config.correction_prefix
        if to_bot and prefix and message.content.lstrip().startswith(prefix):
            return await self._correct(message, parent)
        if not (to_bot or self._addressed(message)):
            return "ignored"
        ids = _ids(message)
        text = self._clean(message.content)
        if not text:
            if message.attachments:
                log.info("discord message ignored (attachments only): %s", ids)
                await message.reply("I can only read text; please write your message out.",
                                    mention_author=False)
                return "refused"
            return "ignored"
        turn = await self._turn(message, text, parent)
        # Each message is registered with the exchange as soon as it is posted;
        # the last one is the reference, where the bot adds its 👍 / 👎.
        stream = ReplyStream(_Poster(message), self.services.store, max_chars=MAX_CHARS,
                             interval=self.edit_interval, anchor="last", clock=self.clock)
        try:
            ex = await self.services.chat.respond(turn, on_delta=stream.add, on_start=stream.start)
        except TuneloopError as e:
            log.warning("discord reply refused: %s error=%s", ids, e)
            await stream.finish(f"⚠️ {e}", failed=True)
            return "refused"
        await stream.finish(ex.reply)
        last = stream.poster.sent[stream.reply_ref]
        log.info("discord reply: %s reply=%s parts=%d exchange=%d conversation=%s", ids, last.id,
                 len(stream.posted), ex.id, ex.conversation_id)
        if self.config.add_reactions:
            for emoji in (self.config.up_emoji[:1] + self.config.down_emoji[:1]):
                try:
                    await last.add_reaction(emoji)
                except discord.HTTPException as e:
                    log.warning("discord add reaction failed: message=%s emoji=%s error=%s", last.id, emoji, e)
        return "replied"

    def _addressed(self, message: discord.Message) -> bool:
        if message.guild is None:
            return True
        if self.client.user in message.mentions:
            return True
        channels = set(self.config.channels)
        channel = message.channel
        if str(channel.id) in channels:
            return True
        return isinstance(channel, discord.Thread) and str(channel.parent_id) in channels

    def _clean(self, content: str) -> str:
        me = self.client.user
        if me is not None:
            content = content.replace(f"<@{me.id}>", "").replace(f"<@!{me.id}>", "")
        return content.strip()

    async def _referenced(self, message: discord.Message) -> discord.Message | None:
        """The message ``message`` replies to: from the event, the cache, or fetched."""
        ref = message.reference
        if ref is None or ref.message_id is None or ref.type is discord.MessageReferenceType.forward:
            return None
        if isinstance(ref.resolved, discord.Message):
            return ref.resolved
        if isinstance(ref.resolved, discord.DeletedReferencedMessage):
            return None
        if ref.cached_message is not None:
            return ref.cached_message
        channel = message.channel
        if ref.channel_id != channel.id:
            channel = self.client.get_channel(ref.channel_id) or channel
        try:
            return await channel.fetch_message(ref.message_id)  # type: ignore[union-attr]
        except discord.HTTPException as e:
            log.info("discord referenced message unavailable: channel=%s message=%s error=%s",
                     ref.channel_id, ref.message_id, e)
            return None

    def community_of(self, guild_id: int | None, user_id: int) -> str:
        """A server's community; direct messages: ``[discord] dm_community``, else the user's own."""
        return community.discord(guild_id, user_id, dms=self.config.dm_community)

    def caller(self, user: Any, guild_id: int | None) -> Caller:
        return Caller(PLATFORM, str(user.id), tuple(str(r.id) for r in getattr(user, "roles", ())),
                      community=self.community_of(guild_id, user.id))

    async def _turn(self, message: discord.Message, text: str, parent: discord.Message | None) -> Turn:
        channel = message.channel
        thread = isinstance(channel, discord.Thread)
        where = self.community_of(message.guild.id if message.guild else None, message.author.id)
        turn = Turn(text=text, user=str(message.author.id), platform=PLATFORM, community=where,
                    channel=str(channel.parent_id if thread else channel.id),
                    thread=str(channel.id) if thread else "", params=dict(self.sampling))
        if thread:
            turn.conversation_id = f"discord-thread-{channel.id}"
            if not self.services.store.conversation_exists(turn.conversation_id, where):
                turn.history = await self._thread_history(message)
        elif parent is not None:
            turn.conversation_id, turn.history = await self._chain(parent, where)
        return turn

    def _role(self, message: discord.Message) -> str:
        return "assistant" if self.client.user and message.author.id == self.client.user.id else "user"

    async def _chain(self, parent: discord.Message, where: str) -> tuple[str | None, list[Message]]:
        """The reply chain ending at ``parent``, oldest first, and its conversation if the store knows it."""
        later: list[Message] = []
        current: discord.Message | None = parent
        for _ in range(MAX_CONTEXT_MESSAGES):
            if current is None:
                break
            ex_id = self._exchange_id(current.id, where)
            if ex_id is not None:
                try:
                    ex = self.services.store.exchange(ex_id, where)
                except NotFoundError:  # forgotten (forget-me) since: the chain starts here
                    break
                known = [m for m in ex.messages if m.get("role") != "system"]
                known.append({"role": "assistant", "content": ex.reply})
                return ex.conversation_id, known + later[::-1]
            content = self._clean(current.content)
            if content:
                later.append({"role": self._role(current), "content": content})
            current = await self._referenced(current)
        return None, later[::-1]

    async def _thread_history(self, message: discord.Message) -> list[Message]:
        history: list[Message] = []
        try:
            async for m in message.channel.history(limit=MAX_CONTEXT_MESSAGES, before=message):
                if m.author.bot and self._role(m) != "assistant":
                    continue
                content = self._clean(m.content)
                if content:
                    history.append({"role": self._role(m), "content": content})
        except discord.HTTPException as e:
            log.info("discord thread history unavailable: thread=%s error=%s", message.channel.id, e)
        return history[::-1]

    def _exchange_id(self, message_id: int, where: str) -> int | None:
        """The exchange a bot message answers, if it is one of ``where``'s community."""
        ex = self.services.store.exchange_by_ref(PLATFORM, str(message_id), where)
        return ex.id if ex is not None else None

    # ------------------------------------------------------------------ feedback

    async def _correct(self, message: discord.Message, parent: discord.Message) -> str:
        ids = _ids(message)
        caller = self.caller(message.author, message.guild.id if message.guild else None)
        ex_id = self._exchange_id(parent.id, caller.community)
        if ex_id is None:
            log.info("discord correction of an unknown reply: %s reply=%s", ids, parent.id)
            await message.reply("I have no record of that reply, so I can't store a correction for it.",
                                mention_author=False)
            return "ignored"
        text = message.content.lstrip()[len(self.config.correction_prefix):].strip()
        try:
            decision = self.services.feedback.correct(ex_id, str(message.author.id), text, platform=PLATFORM,
                                                      community=caller.community,
                                                      admin=self.services.admin.is_admin(caller))
        except TuneloopError as e:
            await message.reply(f"⚠️ {e}", mention_author=False)
            return "refused"
        log.info("discord correction: %s exchange=%d correction=%d status=%s", ids, ex_id, decision.correction_id,
                 decision.status)
        try:
            await message.add_reaction("✅")
        except discord.HTTPException:
            pass
        return "corrected"

    def _rating(self, emoji: Any) -> str | None:
        keys = _emoji_key(emoji)
        if keys & {_SKIN_TONES.sub("", e) for e in self.config.up_emoji}:
            return "up"
        if keys & {_SKIN_TONES.sub("", e) for e in self.config.down_emoji}:
            return "down"
        return None

    async def on_reaction(self, payload: discord.RawReactionActionEvent, *, added: bool) -> None:
        outcome = "failed"
        try:
            outcome = self._on_reaction(payload, added=added)
        finally:
            self.handled.fire(f"reaction:{payload.message_id}:{payload.user_id}", outcome)

    def _on_reaction(self, payload: discord.RawReactionActionEvent, *, added: bool) -> str:
        me = self.client.user
        if me is None or payload.user_id == me.id or (payload.member is not None and payload.member.bot):
            return "ignored"
        rating = self._rating(payload.emoji)
        if rating is None:
            return "ignored"
        where = self.community_of(payload.guild_id, payload.user_id)
        ex_id = self._exchange_id(payload.message_id, where)
        user = str(payload.user_id)
        if ex_id is None:
            log.info("discord reaction ignored (not a bot reply): message=%s user=%s", payload.message_id, user)
            return "ignored"
        try:
            outcome = self.services.feedback.react(ex_id, user, rating, added=added, platform=PLATFORM,
                                                   community=where)
        except TuneloopError as e:  # the exchange was forgotten meanwhile
            log.info("discord rating not stored: message=%s user=%s error=%s", payload.message_id, user, e)
            return "ignored"
        log.info("discord rating: guild=%s channel=%s message=%s user=%s exchange=%d reaction=%s %s outcome=%s",
                 payload.guild_id, payload.channel_id, payload.message_id, user, ex_id,
                 "added" if added else "removed", rating, outcome)
        return outcome

    # ------------------------------------------------------------------ commands

    def _build_commands(self) -> None:
        group = app_commands.Group(name="tuneloop", description="The learning loop of this bot")
        admin = self._admin_command

        @group.command(name="status", description="Live version, last run, feedback since, next run")
        async def status(interaction: discord.Interaction) -> None:
            await admin(interaction, ["status"])

        @group.command(name="models", description="Every model version with its metrics and verdict")
        async def models(interaction: discord.Interaction) -> None:
            await admin(interaction, ["models"])

        @group.command(name="retrain", description="Start a training run now (admins)")
        async def retrain(interaction: discord.Interaction) -> None:
            await admin(interaction, ["retrain"])

        @group.command(name="promote", description="Make a model version live (admins)")
        @app_commands.describe(version="the version to make live")
        async def promote(interaction: discord.Interaction, version: str) -> None:
            await admin(interaction, ["promote", version])

        @group.command(name="rollback", description="Go back to a version; default: the live one's parent (admins)")
        @app_commands.describe(version="the version to go back to")
        async def rollback(interaction: discord.Interaction, version: str | None = None) -> None:
            await admin(interaction, ["rollback", version] if version else ["rollback"])

        @group.command(name="forget-me", description="Delete everything you said and rated here; never train on you")
        async def forget_me(interaction: discord.Interaction) -> None:
            await admin(interaction, ["forget-me"])

        @group.command(name="review", description="Corrections of this server waiting for review (admins)")
        async def review(interaction: discord.Interaction) -> None:
            await admin(interaction, ["review"])

        @group.command(name="approve", description="Make a pending correction live (admins)")
        @app_commands.describe(correction="the correction id `/tuneloop review` shows")
        async def approve(interaction: discord.Interaction, correction: str) -> None:
            await admin(interaction, ["approve", correction])

        @group.command(name="reject", description="Reject a pending correction (admins)")
        @app_commands.describe(correction="the correction id `/tuneloop review` shows")
        async def reject(interaction: discord.Interaction, correction: str) -> None:
            await admin(interaction, ["reject", correction])

        @group.command(name="block", description="Drop a user's pending corrections; never learn from them (admins)")
        @app_commands.describe(user="the user's id or @mention")
        async def block(interaction: discord.Interaction, user: str) -> None:
            await admin(interaction, ["block", user.strip().removeprefix("<@").removeprefix("!").removesuffix(">")])

        async def suggest(interaction: discord.Interaction, message: discord.Message) -> None:
            ex_id = self._exchange_id(message.id, self.community_of(interaction.guild_id, interaction.user.id))
            if ex_id is None:
                await interaction.response.send_message("That is not one of my replies, so there is "
                                                        "nothing to correct.", ephemeral=True)
                return
            await interaction.response.send_modal(_CorrectionModal(self, ex_id))

        self.client.tree.add_command(group)
        self.client.tree.add_command(app_commands.ContextMenu(name=CONTEXT_MENU_NAME, callback=suggest))

    async def _admin_command(self, interaction: discord.Interaction, words: list[str]) -> None:
        # Training control may take longer than Discord's 3 s: defer, then follow up.
        await interaction.response.defer(ephemeral=True, thinking=True)
        user = interaction.user
        caller = self.caller(user, interaction.guild_id)
        line = shlex.join(words)
        try:
            text = await asyncio.to_thread(self.services.admin.run, caller, line)
            outcome = "ok"
        except PermissionDenied as e:
            text, outcome = f"🚫 {e}", "refused"
        except TuneloopError as e:
            text, outcome = f"⚠️ {e}", "error"
        log.info("discord command: guild=%s channel=%s user=%s interaction=%s command=%r outcome=%s",
                 interaction.guild_id, interaction.channel_id, user.id, interaction.id, line, outcome)
        for part in split_text(text):
            await interaction.followup.send(part, ephemeral=True)


def _ids(message: discord.Message) -> str:
    return (f"guild={message.guild.id if message.guild else None} channel={message.channel.id} "
            f"message={message.id} user={message.author.id}")
