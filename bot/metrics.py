"""Prometheus metrics of one serving process, in a registry of its own.

Boundary: the core reports what happened, for every platform alike (an
exchange answered or refused in ``Chat.respond``, a rating or correction
stored in ``Feedback``); the web adapter adds its HTTP errors and serves the
exposition; the engine's load is read from ``engine.stats()`` at scrape time.
Each ``Metrics`` owns a ``CollectorRegistry`` rather than the global one, so
several apps (tests) can live in one process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tuneloop import errors

log = logging.getLogger(__name__)

# Seconds: a small model on CPU answers in tens of ms, a remote one in seconds.
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TOTAL_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: the ``outcome`` label of a request that got no reply, by error class; the most specific wins
_REFUSALS: list[tuple[type[BaseException], str]] = [
    (errors.BusyError, "busy"),
    (errors.InputError, "invalid"),
    (errors.CancelledError, "cancelled"),
    (errors.EngineError, "engine_error"),
    (errors.TuneloopError, "error"),
    # The client went away (a closed HTTP stream, a cancelled handler).
    (ConnectionResetError, "abandoned"),
    (asyncio.CancelledError, "abandoned"),
]


def refusal(error: BaseException) -> str:
    """The ``outcome`` label of a request that ``error`` ended before its reply: busy, invalid, ..."""
    for cls, label in _REFUSALS:
        if isinstance(error, cls):
            return label
    return "failed"  # the platform could not take the reply (a Slack or Discord API error)


class Metrics:
    """Counters and histograms of requests, tokens, latency, load and ratings."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("tuneloop_requests", "Chat requests by platform and outcome",
                                ["platform", "outcome"], registry=r)
        self.prompt_tokens = Counter("tuneloop_prompt_tokens", "Prompt tokens processed",
                                     ["platform"], registry=r)
        self.completion_tokens = Counter("tuneloop_completion_tokens", "Reply tokens generated",
                                         ["platform"], registry=r)
        self.ttft = Histogram("tuneloop_time_to_first_token_seconds",
                              "Seconds from submit to the first reply text", ["platform"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.latency = Histogram("tuneloop_request_duration_seconds",
                                 "Seconds from submit to the end of the reply", ["platform"],
                                 buckets=_TOTAL_BUCKETS, registry=r)
        self.ratings = Counter("tuneloop_ratings", "Ratings stored (none: a rating removed)",
                               ["platform", "rating"], registry=r)
        self.corrections = Counter("tuneloop_corrections", "Corrections stored", ["platform"], registry=r)
        self.http_errors = Counter("tuneloop_http_errors", "HTTP answers with an error status",
                                   ["status", "type"], registry=r)
        self._engine_stats = engine_stats
        self.queue_depth = Gauge("tuneloop_engine_queue_depth", "Requests waiting for a batch slot",
                                 registry=r)
        self.active = Gauge("tuneloop_engine_active_sequences", "Sequences being decoded", registry=r)
        self.tokens_per_s = Gauge("tuneloop_engine_tokens_per_second", "Recent decoding throughput",
                                  registry=r)
        self.queue_depth.set_function(lambda: self._stat("queued"))
        self.active.set_function(lambda: self._stat("active"))
        self.tokens_per_s.set_function(lambda: self._stat("tokens_per_s"))

    def _stat(self, key: str) -> float:
        if self._engine_stats is None:
            return 0.0
        try:
            return float(self._engine_stats().get(key) or 0)
        except Exception:  # noqa: BLE001 — a scrape must not fail because the engine is stopping
            log.debug("engine stats unavailable", exc_info=True)
            return 0.0

    def exchange(self, platform: str, *, prompt_tokens: int | None, completion_tokens: int | None,
                 ttft_ms: float | None, total_ms: float | None, finish_reason: str | None) -> None:
        self.requests.labels(platform, finish_reason or "stop").inc()
        self.prompt_tokens.labels(platform).inc(prompt_tokens or 0)
        self.completion_tokens.labels(platform).inc(completion_tokens or 0)
        if ttft_ms is not None:
            self.ttft.labels(platform).observe(ttft_ms / 1000)
        if total_ms is not None:
            self.latency.labels(platform).observe(total_ms / 1000)

    def refused(self, platform: str, error: BaseException | str) -> None:
        self.requests.labels(platform, error if isinstance(error, str) else refusal(error)).inc()

    def rating(self, platform: str, rating: str | None) -> None:
        self.ratings.labels(platform, rating or "none").inc()

    def correction(self, platform: str) -> None:
        self.corrections.labels(platform).inc()

    def http_error(self, status: int, error_type: str) -> None:
        self.http_errors.labels(str(status), error_type).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
