"""What happens to a message, for every platform alike.

An adapter turns a platform event into a ``Turn``; ``Chat.respond`` checks
it, builds the model's context (system prompt, earlier turns of the
conversation, the new message), streams the reply from the engine and logs
the exchange. Adapters decide nothing; this module knows no platform.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bot.learning import adapter_for, taught_for
from bot.metrics import Metrics
from tuneloop.community import LOCAL
from tuneloop.config import Config
from tuneloop.engine import Engine, Message, SamplingParams
from tuneloop.errors import InputError, TuneloopError
from tuneloop.memory import Memory
from tuneloop.memory.reach import Reach
from tuneloop.store import Exchange, Store

log = logging.getLogger(__name__)

DeltaCallback = Callable[[str], Awaitable[None] | None]


@dataclass
class Turn:
    """One user message, as any adapter sees it."""

    text: str
    user: str
    platform: str
    #: whose data this is (``tuneloop.community``): context and memory come from it alone
    community: str = LOCAL
    channel: str = ""
    thread: str = ""
    #: continue this conversation; None starts a new one
    conversation_id: str | None = None
    #: the conversation so far when the platform knows it better than the store
    #: (a Slack thread, a Discord reply chain); None reads it from the store
    history: list[Message] | None = None
    #: per-channel persona; None uses ``[model] system_prompt``
    system_prompt: str | None = None
    params: dict = field(default_factory=dict)


async def _maybe_await(value) -> None:
    if inspect.isawaitable(value):
        await value


def new_conversation_id(platform: str) -> str:
    return f"{platform}-{uuid.uuid4().hex[:12]}"


def check_text(text: str, limit: int, what: str = "message") -> str:
    """The text itself, or an ``InputError`` naming what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what} is empty")
    if len(text) > limit:
        raise InputError(f"{what} is {len(text)} characters; the limit is {limit} "
                         f"(model.max_input_chars)")
    return text


class Chat:
    """The conversation core: one per process, shared by every adapter."""

    def __init__(self, config: Config, store: Store, engine: Engine, metrics: Metrics | None = None):
        self.config = config
        self.store = store
        self.engine = engine
        #: every platform's exchanges and refusals are counted here, once
        self.metrics = metrics if metrics is not None else Metrics(engine.stats)
        self.memory = Memory(config.memory, store)
        #: adapter name -> (its taught prompts, their ``Reach``), for the versions served now
        self._reach: dict[str, tuple[list[str], Reach]] = {}

    def sampling(self, **overrides) -> SamplingParams:
        m = self.config.model
        base = dict(max_new_tokens=m.max_new_tokens, temperature=m.temperature, top_p=m.top_p)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**base)

    def context(self, turn: Turn) -> list[Message]:
        """System prompt + earlier turns + the new message, oldest first."""
        system = self.config.model.system_prompt if turn.system_prompt is None else turn.system_prompt
        messages: list[Message] = [{"role": "system", "content": system}] if system else []
        if turn.history is not None:
            messages += [m for m in turn.history if m.get("role") != "system"]
        elif turn.conversation_id:
            # The latest exchange holds the whole context it was answered in
            # (including turns a platform supplied, such as other people's
            # messages in a Slack thread); continue from it.
            last = self.store.conversation(turn.conversation_id, limit=1, community=turn.community)
            if last:
                messages += [m for m in last[0].messages if m.get("role") != "system"]
                messages.append({"role": "assistant", "content": last[0].reply})
        messages.append({"role": "user", "content": turn.text})
        return messages

    async def respond(self, turn: Turn, on_delta: DeltaCallback | None = None,
                      on_start: Callable[[int], Awaitable[None] | None] | None = None) -> Exchange:
        """Answer ``turn``, streaming deltas to ``on_delta``; the exchange is committed on return.

        ``on_start(exchange_id)`` runs once the request is accepted, before the
        first delta, for streams that show the exchange id from the start.
        """
        try:
            check_text(turn.text, self.config.model.max_input_chars)
            if turn.conversation_id is None:
                turn.conversation_id = new_conversation_id(turn.platform)
            params = self.sampling(**turn.params)
            hits = await self.memory.arecall(turn.text, turn.community)  # corrections this reply must use
            messages = self.engine.fit_context(self.memory.apply(self.context(turn), hits), params.max_new_tokens)
            # The community's own live version, when it has one (bot.learning.LiveFollower loads it)
            # and the message lies within what it was taught.
            adapter, reach = await self.reach(adapter_for(self.engine, turn.community), turn.text)
            version = adapter or self.engine.model_version
            # BusyError from submit logs nothing; no adapter= when none, for engines that serve one model
            gen = self.memory.answer(hits, version) or (
                self.engine.submit(messages, params) if adapter is None
                else self.engine.submit(messages, params, adapter=adapter))
        except BaseException as e:
            self.metrics.refused(turn.platform, e)
            raise
        exchange_id = self.store.begin_exchange(
            platform=turn.platform, community=turn.community, channel=turn.channel, thread=turn.thread, user=turn.user,
            conversation_id=turn.conversation_id, messages=messages, prompt=turn.text,
            model_version=version)
        self.memory.record(exchange_id, hits)
        try:
            if on_start is not None:
                await _maybe_await(on_start(exchange_id))
            async for delta in gen:
                if on_delta is not None:
                    await _maybe_await(on_delta(delta))
        except BaseException as e:
            self.engine.cancel(gen.request_id)
            self.store.discard_exchange(exchange_id)
            self.metrics.refused(turn.platform, e)
            raise
        done = gen.result
        assert done is not None
        ex = self.store.finish_exchange(
            exchange_id, reply=done.text, finish_reason=done.finish_reason,
            model_version=done.model_version, prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            ttft_ms=None if done.time_to_first_token is None else done.time_to_first_token * 1000,
            total_ms=done.total_time * 1000)
        self.metrics.exchange(ex.platform, prompt_tokens=ex.prompt_tokens, completion_tokens=ex.completion_tokens,
                              ttft_ms=ex.ttft_ms, total_ms=ex.total_ms, finish_reason=ex.finish_reason)
        log.info("exchange logged: id=%d platform=%s community=%s channel=%s user=%s conversation=%s "
                 "version=%s tokens=%s+%s ms=%.0f finish=%s%s", ex.id, ex.platform, ex.community, ex.channel,
                 ex.user, ex.conversation_id, ex.model_version, done.prompt_tokens, done.completion_tokens,
                 done.total_time * 1000, done.finish_reason, "" if reach is None else f" reach={reach:.2f}")
        return ex

    async def reach(self, adapter: str | None, text: str) -> tuple[str | None, float | None]:
        """``adapter`` if its version answers ``text`` (else None: the base weights), and the reach score.

        ``[trainer] reach = "taught"``: a version answers the messages near what
        it was taught (``tuneloop.memory.reach``; score >= 1); a version that
        recorded nothing, or ``reach = "all"``, answers every message (score None).
        """
        t = self.config.trainer
        taught = taught_for(self.engine, adapter) if adapter is not None and t.reach == "taught" else None
        if taught is None:
            return adapter, None
        try:
            cached = self._reach.get(adapter)
            if cached is None or cached[0] is not taught:
                # Encodes the taught prompts once per version served.
                cached = (taught, await asyncio.to_thread(Reach, taught, self.memory.encoder, t.reach_cosine,
                                                          t.reach_lexical))
                self._reach = {k: v for k, v in self._reach.items() if taught_for(self.engine, k) is v[0]}
                self._reach[adapter] = cached
            score = await asyncio.to_thread(cached[1].score, text)
        except TuneloopError as e:
            # No encoder, no routing: the version answers, as it would without reach.
            log.error("reach unavailable for %s: %s; it answers every message", adapter, e)
            return adapter, None
        return (adapter if score >= 1.0 else None), score
