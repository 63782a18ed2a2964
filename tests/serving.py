"""Helpers for tests that serve: the project's web app on a free port of 127.0.0.1,
a real engine whose stream can be held mid-reply, and a clock that steps instead of sleeping."""

from __future__ import annotations

import asyncio
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


class HeldEngine:
    """A real engine whose next reply stops after its first visible text until ``release`` is set.

    ``held`` is set once that text has been handed on (and, by an adapter,
    posted); ``request_ids`` are the requests submitted through it.
    """

    def __init__(self, engine):
        self._engine = engine
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.request_ids: list[str] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, messages, params, request_id=None, adapter=None):
        gen = (self._engine.submit(messages, params, request_id) if adapter is None
               else self._engine.submit(messages, params, request_id, adapter=adapter))
        self.request_ids.append(gen.request_id)
        inner = gen.deltas

        async def deltas():
            shown = ""
            try:
                async for delta in inner:
                    yield delta
                    shown += delta
                    if shown.strip() and not self.held.is_set():
                        self.held.set()
                        await self.release.wait()
            finally:
                await inner.aclose()

        gen.deltas = deltas()
        return gen


class StepClock:
    """Time that moves ``step`` seconds each time it is read, and at once when slept on.

    A reply stream on it edits every ``interval / step`` deltas, whatever the
    machine's load; ``sleeps`` records what it was asked to wait.
    """

    def __init__(self, step: float = 0.25):
        self.t = 0.0
        self.step = step
        self.sleeps: list[float] = []

    def now(self) -> float:
        self.t += self.step
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
        await asyncio.sleep(0)
