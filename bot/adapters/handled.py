"""An adapter's "handled" signal: a record of every incoming event it has finished with.

Each platform adapter fires it once per incoming event, after the event is
fully processed, whatever came of it (answered, rated, ignored, a duplicate,
failed). Tests wait on it instead of sleeping.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Handled:
    key: str  # what the event was about, e.g. "message:123", "event:Ev01"
    outcome: str  # "replied", "rated", "ignored", "duplicate", "failed", ...


class HandledSignal:
    #: events kept for ``count(key)`` and ``outcomes``: a serving process must not grow without end
    KEEP = 10_000

    def __init__(self) -> None:
        self.events: deque[Handled] = deque(maxlen=self.KEEP)
        self.total = 0
        self._changed = asyncio.Event()

    def fire(self, key: str, outcome: str) -> None:
        item = Handled(key, outcome)
        self.events.append(item)
        self.total += 1
        # Wake every waiter; each checks its own condition.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def count(self, key: str | None = None) -> int:
        return self.total if key is None else sum(1 for e in self.events if e.key == key)

    def outcomes(self, key: str) -> list[str]:
        return [e.outcome for e in self.events if e.key == key]

    async def wait(self, key: str | None = None, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Until ``count`` events (with ``key``, or of any key) are handled; the outcomes for ``key``."""
        try:
            async with asyncio.timeout(timeout):
                while self.count(key) < count:
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"{self.count(key)} of {count} events handled (key={key}) "
                               f"after {timeout:g} s") from None
        return self.outcomes(key) if key is not None else [e.outcome for e in self.events]
