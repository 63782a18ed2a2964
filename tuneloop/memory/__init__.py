"""The fast memory of corrections: the very next reply uses what a user taught.

Every correction is a memory item the moment it is stored (a trigger in the
store); ``Memory.recall`` finds the items whose prompt asks what a new
message asks (``matcher``: encoder cosine, Chinese character overlap, and
guards against near misses), ``Memory.apply`` puts them in the model's
context, and ``Memory.record`` links the reply to them so its ratings rate
them too. Training consolidates items into the weights (``Store.
memory_training_rows`` / ``Store.set_memory_status``); consolidated items
leave the fast path.

This layer knows no platform; the encoder loads only once an item exists.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from tuneloop.community import LOCAL
from tuneloop.config import MemoryConfig
from tuneloop.engine.base import Completion, Generation
from tuneloop.errors import TuneloopError
from tuneloop.memory.encoder import Encoder
from tuneloop.memory.index import Index, Match
from tuneloop.memory.matcher import Thresholds
from tuneloop.store import Store

__all__ = ["Hit", "Memory", "note"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    item_id: int
    prompt: str
    reply: str
    score: float


def note(hits: list[Hit]) -> str:
    """The system-prompt note that makes a reply use the corrections it matched."""
    lines = [f"Question: {h.prompt}\nCorrect answer: {h.reply}" for h in hits]
    return ("A user corrected an earlier answer of yours. When asked this again, "
            "give the correct answer.\n" + "\n".join(lines))


class Memory:
    def __init__(self, config: MemoryConfig, store: Store, encoder=None):
        self.config = config
        self.store = store
        self._encoder = encoder
        self.thresholds = Thresholds(config.min_cosine, config.min_lexical, config.substitution_cosine)
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._indexes: dict[str, Index] = {}

    @property
    def encoder(self):
        if self._encoder is None:
            t0 = time.perf_counter()
            self._encoder = Encoder(self.config.encoder, int8=self.config.encoder_int8)
            log.info("memory encoder loaded: encoder=%s int8=%s ms=%.0f", self.config.encoder,
                     self._encoder.int8, (time.perf_counter() - t0) * 1000)
        return self._encoder

    @property
    def encoder_key(self) -> str:
        if self._encoder is not None:
            return Encoder.key(self._encoder.name, self._encoder.int8)
        return Encoder.key(self.config.encoder, self.config.encoder_int8)

    def refresh(self) -> None:
        """Rebuild the cached index when the store's memory changed; encode items not encoded yet."""
        generation = self.store.memory_generation()
        if generation == self._generation:
            return
        with self._lock:
            if generation == self._generation:
                return
            rows = self.store.memory_index_rows(self.encoder_key)
            missing = [r for r in rows if r["vector"] is None]
            if missing:
                t0 = time.perf_counter()
                vectors = self.encoder.encode([r["prompt"] for r in missing])
                self.store.set_memory_vectors(self.encoder_key,
                                              [(r["id"], v.astype("<f4").tobytes()) for r, v in zip(missing, vectors)])
                for r, v in zip(missing, vectors):
                    r["vector"] = v.astype("<f4").tobytes()
                log.info("memory items encoded: n=%d ms=%.0f", len(missing), (time.perf_counter() - t0) * 1000)
            indexes: dict[str, Index] = {}
            for r in rows:
                vec = np.frombuffer(r["vector"], dtype="<f4")
                index = indexes.setdefault(r["community"], Index(len(vec)))
                index.add(r["id"], r["prompt"], vec)
            self._indexes = indexes
            self._generation = generation

    def recall(self, text: str, community: str = LOCAL) -> list[Hit]:
        """The memory items a reply to ``text`` should use (none when off or nothing matches)."""
        if not self.config.enabled:
            return []
        self.refresh()
        index = self._indexes.get(community)
        if index is None or not len(index):
            return []
        vector = self.encoder.vector(text)
        _, judged = index.search(text, vector, self.thresholds)
        for m in judged:
            if not m.verdict.accepted:
                continue
            item = self.store.memory_item(m.item_id)
            if item["rated_down"] - item["rated_up"] >= self.config.max_bad_ratings:
                log.info("memory item skipped: item=%d reason=rated down=%d up=%d", m.item_id,
                         item["rated_down"], item["rated_up"])
                continue
            log.info("memory matched: item=%d score=%.3f cosine=%.3f", m.item_id, m.verdict.score, m.cosine)
            return [Hit(m.item_id, item["prompt"], item["reply"], round(m.verdict.score, 4))]
        return []

    async def arecall(self, text: str, community: str = LOCAL) -> list[Hit]:
        """``recall`` off the event loop: encoding takes milliseconds of CPU."""
        if not self.config.enabled:
            return []
        try:
            return await asyncio.to_thread(self.recall, text, community)
        except TuneloopError as e:
            # A memory that cannot load its encoder must not stop the bot
            # answering: the reply goes out from the weights alone.
            log.error("memory unavailable: %s", e)
            return []

    def explain(self, text: str, community: str = LOCAL) -> list[Match]:
        """Every candidate judged for ``text``, best first: why a message did or did not match."""
        self.refresh()
        index = self._indexes.get(community)
        if index is None:
            return []
        return index.search(text, self.encoder.encode([text])[0], self.thresholds)[1]

    def apply(self, messages: list[dict[str, str]], hits: list[Hit]) -> list[dict[str, str]]:
        """``messages`` with the hits' note appended to the system prompt (or as one), in context mode.

        A verbatim reply keeps the plain context: a 👍 on it then trains the
        weights to answer without the note, which is what consolidation wants.
        """
        if not hits or self.config.reply != "context":
            return messages
        text = note(hits)
        if messages and messages[0].get("role") == "system":
            first = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}".strip()}
            return [first, *messages[1:]]
        return [{"role": "system", "content": text}, *messages]

    def answer(self, hits: list[Hit], model_version: str) -> Generation | None:
        """With ``[memory] reply = "verbatim"``, the matched correction itself as the reply: a
        ``Generation`` that streams it in one piece (``finish_reason`` "memory"); else None."""
        if not hits or self.config.reply != "verbatim":
            return None
        text, t0 = hits[0].reply, time.perf_counter()
        gen = Generation(request_id=f"memory-{uuid.uuid4().hex[:12]}", deltas=None)  # type: ignore[arg-type]

        async def deltas():
            yield text
            took = time.perf_counter() - t0
            # No token was generated or read: zero, not an estimate.
            gen.result = Completion(text=text, finish_reason="memory", prompt_tokens=0, completion_tokens=0,
                                    time_to_first_token=took, total_time=took, model_version=model_version)

        gen.deltas = deltas()
        return gen

    def record(self, exchange_id: int, hits: list[Hit]) -> None:
        if hits:
            self.store.record_memory_use(exchange_id, [(h.item_id, h.score) for h in hits])
