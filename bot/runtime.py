"""Opening the parts a command needs: config, store, engine, core services.

The commands' layer: it resolves the base model (``trainer.models``, which may
build the starter or convert a GGUF file) before the engine sees a folder.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.admin import Admin
from bot.chat import Chat
from bot.feedback import Feedback
from bot.services import Services
from tuneloop.config import Config
from tuneloop.engine import Engine, create_engine
from tuneloop.errors import TuneloopError
from tuneloop.store import Store

log = logging.getLogger(__name__)


def open_store(config: Config) -> Store:
    return Store(config.storage.path)


async def serve_live_version(config: Config, engine: Engine) -> None:
    """Swap in the registry's live version when it is not the base model (after promote / rollback)."""
    from tuneloop.learning.registry import Registry

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
    if engine is None:
        model_path = None
        if config.model.backend == "local":
            from trainer.models import resolve_base

            model_path = resolve_base(config.model.base)
        engine = create_engine(config, model_path)
    try:
        await engine.start()
        await serve_live_version(config, engine)
        yield Services(config, store, engine, Chat(config, store, engine),
                       Feedback(store, config.model.max_input_chars), Admin(config, store))
    finally:
        await engine.stop()
        store.close()
