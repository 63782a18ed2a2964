"""The engine's interface: what every back end offers the rest of tuneloop.

The engine knows nothing of Slack, Discord, the web or SQLite. It takes a
conversation (a list of ``{"role", "content"}`` chat messages) and sampling
parameters, and gives back an async stream of text deltas and a final
``Completion``. One engine serves every adapter of a process.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Benchmarks decode a fixed number of tokens whatever the model says.
    ignore_eos: bool = False


@dataclass
class Completion:
    """The final result of one request."""

    text: str
    # "stop" (eos or stop string), "length", "cancelled" (ended early on request,
    # never reported as "stop"); a remote server's own reason otherwise.
    finish_reason: str
    # Counted by the model's tokenizer, here or on the server; None when the
    # back end has no count (a server that sent no usage), never an estimate.
    prompt_tokens: int | None
    completion_tokens: int | None
    time_to_first_token: float | None  # seconds from submit to first delta
    total_time: float  # seconds from submit to finish
    model_version: str  # the version whose weights produced every token


@dataclass
class Generation:
    """A submitted request: iterate it for text deltas, then read ``result``.

    Back ends create it; ``deltas`` is the async iterator of text pieces and
    ``result`` is set when the iterator is exhausted.
    """

    request_id: str
    deltas: AsyncIterator[str]
    result: Completion | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __aiter__(self) -> AsyncIterator[str]:
        return self.deltas


async def drain(queue: asyncio.Queue, gen: Generation,
                on_abandon: Callable[[], None]) -> AsyncIterator[str]:
    """A back end's per-request queue as the caller's stream of deltas.

    The queue carries text deltas, then the final ``Completion`` (or an
    exception to raise). ``on_abandon`` runs when the caller stops reading
    before the end, so the back end can cancel the request.
    """
    try:
        while True:
            item = await queue.get()
            if isinstance(item, str):
                yield item
            elif isinstance(item, Completion):
                gen.result = item
                return
            else:
                raise item
    finally:
        if gen.result is None:
            on_abandon()


class Engine(abc.ABC):
    """One inference engine per process, shared by every adapter."""

    #: the version currently served (base model name, or a registry version id)
    model_version: str
    #: tokens the model can attend to (prompt + reply)
    context_window: int

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and start serving."""

    @abc.abstractmethod
    async def stop(self, grace: float = 5.0) -> None:
        """Refuse new requests, finish or cancel in-flight ones within ``grace`` s."""

    @abc.abstractmethod
    def submit(self, messages: list[Message], params: SamplingParams,
               request_id: str | None = None, adapter: str | None = None) -> Generation:
        """Queue a conversation; raise ``BusyError`` when the queue is full.

        ``adapter`` names a loaded adapter (``load_adapter``) for this request
        alone; None: what the engine serves by default (the base, or the
        version ``swap_adapter`` put in). An unknown name raises ``ModelError``.
        """

    async def complete(self, messages: list[Message], params: SamplingParams,
                       adapter: str | None = None) -> Completion:
        """Submit and wait for the whole reply."""
        gen = self.submit(messages, params, adapter=adapter)
        async for _ in gen:
            pass
        assert gen.result is not None
        return gen.result

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Cancel a queued or running request; its stream ends with 'cancelled'."""

    @abc.abstractmethod
    def fit_context(self, messages: list[Message], max_new_tokens: int) -> list[Message]:
        """Drop the oldest non-system turns until prompt + reply fit the window.

        The last message is always kept (truncated from its start if it alone
        is too long).
        """

    @abc.abstractmethod
    async def swap_adapter(self, adapter_path: str | None, version: str) -> None:
        """Serve ``version``: a LoRA adapter folder, or the base model (None).

        Takes effect between decoding steps; in-flight requests finish on the
        weights they started with or are reported with the version that
        produced them.
        """

    @abc.abstractmethod
    async def load_adapter(self, name: str, path: str) -> None:
        """Load the LoRA adapter folder ``path`` under ``name``, for requests that name it.

        Unlike ``swap_adapter``, the weights served by default stay as they
        are: each request names its own adapter, and one batch mixes them.
        Loading a name again replaces it; requests already submitted finish
        on the adapter they started with. ``ModelError`` (one line) for a
        folder that cannot be served this way.
        """

    @abc.abstractmethod
    async def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name`` (``ModelError`` if unknown); requests in flight keep it till they end."""

    @abc.abstractmethod
    def adapter_names(self) -> list[str]:
        """The names ``load_adapter`` loaded, sorted."""

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Load figures: queued, active, tokens/s, totals."""
