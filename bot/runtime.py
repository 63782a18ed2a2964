"""Opening the parts a command needs: config, store, engine, core services."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bot.admin import Admin
from bot.chat import Chat
from bot.config import Config
from bot.engine import Engine, create_engine
from bot.errors import TuneloopError
from bot.feedback import Feedback
from bot.store import Store

log = logging.getLogger(__name__)


def open_store(config: Config) -> Store:
    return Store(config.storage.path)


@dataclass
class Services:
    config: Config
    store: Store
    engine: Engine
    chat: Chat
    feedback: Feedback
    admin: Admin


async def serve_live_version(config: Config, engine: Engine) -> None:
    """Swap in the registry's live version when it is not the base model (after promote / rollback)."""
    from trainer.registry import Registry

    registry = Registry(config.trainer.registry)
    live = registry.live()
    if live is not None and engine.model_version != live:
        why = registry.base_mismatch(live, getattr(engine, "model_path", None))
        if why:
            log.error("not serving the live version: %s; serving %s", why, engine.model_version)
            return
        try:
            await engine.swap_adapter(str(registry.adapter(live)), live)
        except (TuneloopError, NotImplementedError) as e:
            log.error("cannot serve the live version %s (%s); serving %s", live, e, engine.model_version)


@asynccontextmanager
async def services(config: Config, *, engine: Engine | None = None) -> AsyncIterator[Services]:
    """Store + started engine + core services; everything closed on exit."""
    store = open_store(config)
    engine = engine or create_engine(config)
    try:
        await engine.start()
        await serve_live_version(config, engine)
        yield Services(config, store, engine, Chat(config, store, engine),
                       Feedback(store, config.model.max_input_chars), Admin(config, store))
    finally:
        await engine.stop()
        store.close()
