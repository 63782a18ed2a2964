"""The project's web app on a free port of 127.0.0.1, for tests that talk to it over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from bot.adapters.web import create_app
from bot.services import Services


@asynccontextmanager
async def serving(svc: Services) -> AsyncIterator[str]:
    """``create_app(svc)`` served until the block ends; its base URL."""
    app, _ = create_app(svc)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
