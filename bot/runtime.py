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
from bot.learning import LiveFollower
from bot.services import Services
from tuneloop.config import Config
from tuneloop.engine import Engine, create_engine
from tuneloop.store import Store

log = logging.getLogger(__name__)


def open_store(config: Config) -> Store:
    return Store(config.storage.path)


@asynccontextmanager
async def services(config: Config, *, engine: Engine | None = None,
                   follow_live: bool = True) -> AsyncIterator[Services]:
    """Store + started engine + core services; everything closed on exit.

    The engine serves the registry's live version (``bot.learning.LiveFollower``);
    ``follow_live=False`` leaves that to a caller that follows it itself.
    """
    store = open_store(config)
    if engine is None:
        model_path = None
        if config.model.backend == "local":
            from trainer.models import resolve_base

            model_path = resolve_base(config.model.base)
        engine = create_engine(config, model_path)
    try:
        await engine.start()
        if follow_live:
            await LiveFollower(config, engine).follow()
        chat = Chat(config, store, engine)  # its metrics count every platform's feedback too
        yield Services(config, store, engine, chat,
                       Feedback(store, config.model.max_input_chars, chat.metrics, config.trust), Admin(config, store))
    finally:
        await engine.stop()
        store.close()
