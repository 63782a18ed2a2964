"""What the local engine makes of each step's logits: tokens, text, completions.

Boundary: logits and ``Sequence`` objects in; text deltas and ``Completion``
objects out, handed to each request's asyncio queue. It samples (greedy,
temperature, top-p, per-request seeds), detokenizes incrementally without
splitting a character, holds back text that may begin a stop string, ends
sequences (eos, stop string, length, cancel) and streams on one engine-wide
tick. It knows the tokenizer, not the model.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import torch
from tokenizers.decoders import DecodeStream

from tuneloop.engine._decode import greedy
from tuneloop.engine.base import Completion
from tuneloop.engine.scheduler import ScheduledBatch
from tuneloop.engine.sequence import Sequence

REPLACEMENT = "\ufffd"
# Seconds of history behind stats()["tokens_per_s"].
RATE_WINDOW = 5.0


def sample(seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
    """One token id per row of ``logits`` [B, vocab], by each sequence's own parameters."""
    if all(s.params.temperature <= 0 for s in seqs):
        return greedy(logits)
    logits = logits.float()
    temps = torch.tensor(
        [s.params.temperature if s.params.temperature > 0 else 1.0 for s in seqs], device=logits.device
    )
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    top_p = [s.params.top_p for s in seqs]
    if any(p < 1.0 for p in top_p):
        tp = torch.tensor(top_p, device=logits.device)[:, None]
        sorted_p, order = probs.sort(-1, descending=True)
        cum = sorted_p.cumsum(-1)
        sorted_p = sorted_p.masked_fill(cum - sorted_p > tp, 0.0)  # keeps at least the top token
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    sampled = greedy(logits)  # greedy rows keep it; sampled rows are overwritten below
    plain = [i for i, s in enumerate(seqs) if s.params.temperature > 0 and s.generator is None]
    if plain:
        idx = torch.tensor(plain, device=logits.device)
        sampled[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
    for i, s in enumerate(seqs):
        if s.params.temperature > 0 and s.generator is not None:
            sampled[i] = torch.multinomial(probs[i], 1, generator=s.generator)[0]
    return sampled


def held(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def cut_stop(seq: Sequence) -> bool:
    """Cut ``seq.text`` at the first stop string that has appeared; whether one had."""
    longest = max(len(s) for s in seq.params.stop)
    start = max(0, seq.sent - longest)
    hits = [i for i in (seq.text.find(s, start) for s in seq.params.stop if s) if i >= 0]
    if not hits:
        return False
    seq.text = seq.text[: min(hits)]
    return True


class OutputProcessor:
    """Sampling, detokenizing, stops and streaming for the engine thread."""

    def __init__(
        self,
        tokenizer,
        eos: set[int],
        *,
        stream_interval: float,
        version: Callable[[], str],
    ) -> None:
        self.tokenizer = tokenizer
        # tokenizers' Rust tokenizer when there is one: it decodes incrementally.
        self.fast = getattr(tokenizer, "backend_tokenizer", None)
        self.eos = eos
        # Deltas are coalesced for this long, every request's on one engine-wide
        # tick (a first delta or a finished request goes at once, and takes the
        # others' text along): each wake-up of the event loop costs the engine
        # thread the GIL it needs for the model's Python, so per-request timers
        # would spend the engine's time on hand-overs.
        self.stream_interval = stream_interval
        self.version = version  # the version served now, for sequences never prefilled
        self.last_flush = 0.0
        self.rate: collections.deque[tuple[float, int]] = collections.deque()
        self.total_tokens = 0
        self.out: list[tuple[Sequence, Any]] = []  # (sequence, delta or Completion) not yet delivered

    def process(self, batch: ScheduledBatch, logits: torch.Tensor | None) -> None:
        """Everything after the forward pass of one step; ``deliver`` hands the results over."""
        out = self.out
        now = time.perf_counter()
        for seq in batch.cancelled:
            self.complete(seq, now, out)
        if logits is not None:
            ids = sample(batch.seqs, logits).tolist()
            now = time.perf_counter()
            self.count(len(ids), now)
            for seq, tok in zip(batch.seqs, ids, strict=True):
                if self.append(seq, tok, now, out):
                    batch.ended += 1
        if out or now - self.last_flush >= self.stream_interval:
            for seq in batch.running:
                self.flush(seq, out)
            self.last_flush = now

    def deliver(self) -> None:
        """Hand this step's deltas and completions to their event loops."""
        out, self.out = self.out, []
        deliver(out)

    def count(self, n: int, now: float) -> None:
        self.rate.append((now, n))
        while self.rate and now - self.rate[0][0] > RATE_WINDOW:
            self.rate.popleft()
        self.total_tokens += n

    def tokens_per_s(self) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.rate) if now - t <= RATE_WINDOW]
        if not recent:
            return 0.0
        span = max(now - recent[0][0], 1e-3) if len(recent) > 1 else RATE_WINDOW
        return sum(n for _, n in recent) / span

    def append(self, seq: Sequence, tok: int, now: float, out: list) -> bool:
        """Add one sampled token to ``seq``: detokenize, check stops and length, queue its delta.

        True when this ended the sequence.
        """
        if seq.cancel_requested:
            self.end(seq, "cancelled", now, out)
            return True
        if tok in self.eos and not seq.params.ignore_eos:
            self.end(seq, "stop", now, out)
            return True
        seq.tokens.append(tok)
        piece = self.detokenize(seq, tok)
        if piece:
            seq.text += piece
            stops = seq.params.stop
            if stops:
                if cut_stop(seq):
                    self.end(seq, "stop", now, out)
                    return True
                end = len(seq.text) - held(seq.text, stops)
            else:
                end = len(seq.text)
            if end > seq.sent:
                seq.pending += seq.text[seq.sent : end]
                seq.sent = end
                if seq.first_delta is None:
                    seq.first_delta = now
                    self.flush(seq, out)
        if len(seq.tokens) >= seq.max_new:
            self.end(seq, "length", now, out)
            return True
        return False

    def detokenize(self, seq: Sequence, tok: int) -> str:
        """The text ``tok`` completes: '' while it is part of an unfinished character."""
        if self.fast is not None:
            # tokenizers' own incremental decoder: one call per token, and it
            # holds back bytes of a character split across tokens.
            if seq.stream is None:
                seq.stream = DecodeStream(skip_special_tokens=True)
            return seq.stream.step(self.fast, tok) or ""
        # A tokenizer without a Rust backend: decode everything, emit what is new.
        full = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        if full.endswith(REPLACEMENT) or len(full) <= len(seq.decoded):
            return ""
        piece, seq.decoded = full[len(seq.decoded) :], full
        return piece

    def end(self, seq: Sequence, reason: str, now: float, out: list) -> None:
        seq.finish(reason)
        self.complete(seq, now, out)

    def complete(self, seq: Sequence, now: float, out: list) -> None:
        """Queue the rest of an ended sequence's text and its ``Completion``."""
        assert seq.finish_reason is not None, "complete() follows Sequence.finish()"
        if seq.finish_reason == "cancelled":
            # A cancelled reply is what its reader has been sent, nothing held back.
            seq.text = seq.text[: seq.sent]
        elif len(seq.text) > seq.sent:
            # Held-back text that turned out not to start a stop string.
            seq.pending += seq.text[seq.sent :]
            seq.sent = len(seq.text)
            if seq.first_delta is None:
                seq.first_delta = now
        self.flush(seq, out)
        out.append(
            (
                seq,
                Completion(
                    text=seq.text,
                    finish_reason=seq.finish_reason,
                    prompt_tokens=len(seq.prompt),
                    completion_tokens=len(seq.tokens),
                    time_to_first_token=None if seq.first_delta is None else seq.first_delta - seq.submitted,
                    total_time=now - seq.submitted,
                    model_version=seq.version or self.version(),
                ),
            )
        )

    @staticmethod
    def flush(seq: Sequence, out: list) -> None:
        if seq.pending:
            out.append((seq, seq.pending))
            seq.pending = ""

    @staticmethod
    def fail(seqs: list[Sequence], error: Exception) -> None:
        deliver([(seq, error) for seq in seqs])


def deliver(out: list[tuple[Sequence, Any]]) -> None:
    """Hand deltas, completions and errors to their requests' queues, one wake-up per event loop."""
    if not out:
        return
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for seq, item in out:
        by_loop.setdefault(seq.loop, []).append((seq.queue, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:
            pass  # the loop is closed: nobody is listening any more


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
