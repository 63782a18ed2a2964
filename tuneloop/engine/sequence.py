"""One request as the local engine sees it: its tokens, its text, its status.

Boundary: plain state, no torch work and no locking. The scheduler moves a
``Sequence`` between its queues and sets its status; the output processor
fills its tokens and text; the model runner reads its prompt and last token.
Only the engine thread writes a sequence once it is queued, except for
``cancel_requested``, which any thread may set (under the scheduler's lock).
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream

from tuneloop.engine.base import SamplingParams
from tuneloop.engine.lora import Adapter


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, not yet prefilled
    RUNNING = "running"  # in the batch, decoding
    FINISHED = "finished"  # ended by eos, a stop string, its length or an error
    CANCELLED = "cancelled"  # ended early on request (cancel() or the engine stopping)


@dataclass(eq=False)
class Sequence:
    """One request's state, from submission to its ``Completion``."""

    id: str
    prompt: list[int]
    params: SamplingParams
    max_new: int  # tokens it may still be given, after the context window's cut
    loop: asyncio.AbstractEventLoop | None  # where its deltas are delivered
    queue: asyncio.Queue | None
    submitted: float  # perf_counter() at submit
    generator: torch.Generator | None = None  # its own random stream when it has a seed
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error" once it has ended
    cancel_requested: bool = False
    version: str = ""  # the model version whose weights prefilled it
    # The adapter the request named, held from submit to its end: a reload or
    # an unload of that name meanwhile does not change what it decodes with.
    lora: Adapter | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # stable decoded text, stop strings cut
    sent: int = 0  # characters of ``text`` released to the stream (pending or delivered)
    pending: str = ""  # released text not yet handed to the loop
    stream: DecodeStream | None = None  # incremental detokenizer (tokenizers with a Rust backend)
    decoded: str = ""  # the text decoded so far (tokenizers without one)
    first_delta: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.CANCELLED)

    @property
    def room(self) -> int:
        """Tokens this sequence may still produce."""
        return self.max_new - len(self.tokens)

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.CANCELLED if reason == "cancelled" else SequenceStatus.FINISHED
        self.finish_reason = reason
