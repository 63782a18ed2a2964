"""The ``local`` back end: a transformers model in this process, continuously batched.

Boundary: conversations and sampling parameters in, text deltas and a
``Completion`` out. It knows the tokenizer and the model; it knows nothing of
platforms, storage or the trainer.

How it runs. One background thread owns the model and the running batch
(``_batch.Batch``); ``step()`` is: admit waiting requests (prefill them together
and merge them into the batch), decode one token for every row, post-process
(sample, detokenize, stop), drop finished rows. Deltas reach the asyncio loop
with one ``call_soon_threadsafe`` per step.

Why a hand-written decode loop rather than transformers' continuous-batching
manager (``generate_batch``, paged cache). Measured on a 5M-parameter GPT-2
(6 layers, 256 wide, 512 positions), 32 prompts of 27 tokens, 64 new tokens,
greedy, 2 CPU threads, same machine, same minutes:

    transformers generate_batch (paged, page 32, 256 blocks)     600-860 tok/s
    plain loop model(...) + DynamicCache, batch 32             3,450-3,800 tok/s

The paged manager's per-step bookkeeping dominates a model this small on
CPU. Left padding + attention mask + per-row position ids let any causal LM
in transformers decode a ragged batch through its ordinary ``forward``. For
Llama, Qwen2 and Mistral models the prefill and the step itself are
tuneloop's own (``_decode.Decoder``, checked against ``forward`` at load).
The engine's own per-step work (sampling, incremental detokenizing, stops)
is ~6% of the engine thread's time at 32 clients on the starter (0.13 of
2.22 s over 16 waves of 32 requests, timed around ``_postprocess``).
``bot/bench.py`` measures the rest.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers.decoders import DecodeStream

from tuneloop.engine._batch import Batch, last_logits, prefill
from tuneloop.engine._decode import Decoder, greedy
from tuneloop.engine.base import Completion, Engine, Generation, Message, SamplingParams, drain
from tuneloop.errors import BusyError, EngineError, ModelError

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"
# Seconds of history behind stats()["tokens_per_s"].
_RATE_WINDOW = 5.0


@dataclass(eq=False)
class _Request:
    """One request's state; mutated only by the engine thread once admitted."""

    id: str
    prompt: list[int]
    params: SamplingParams
    max_new: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    generator: torch.Generator | None = None
    version: str = ""
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # stable decoded text, stop strings cut
    sent: int = 0  # characters of ``text`` released to the stream (pending or delivered)
    pending: str = ""  # released text not yet handed to the loop
    stream: DecodeStream | None = None  # incremental detokenizer (tokenizers with a Rust backend)
    decoded: str = ""  # the text decoded so far (tokenizers without one)
    first_delta: float | None = None
    cancelled: bool = False
    done: bool = False


class LocalEngine(Engine):
    """transformers on CUDA or CPU, batching every adapter's requests together."""

    def __init__(
        self,
        model_path: str,
        *,
        version: str,
        device: str = "auto",
        dtype: str = "auto",
        max_batch: int = 32,
        max_queue: int = 256,
        threads: int | None = None,
        stream_interval: float = 0.05,
        fused_decode: bool = True,
    ) -> None:
        self.model_path = str(model_path)
        self.model_version = version
        self.device_name = device
        self.dtype_name = dtype
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.threads = threads
        self.fused_decode = fused_decode
        self._decoder: Decoder | None = None
        # Deltas are coalesced for this long, every request's on one engine-wide
        # tick (a first delta or a finished request goes at once, and takes
        # the others' text along): each wake-up of the event loop costs the
        # engine thread the GIL it needs for the model's Python. Per-request
        # timers woke it ~110 times a second at 32 clients; 8% of the engine's
        # time went to those hand-overs (the self-pipe send, then the wait).
        self.stream_interval = stream_interval
        self._last_flush = 0.0
        self.context_window = 0
        self.model = None
        self.tokenizer = None
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._rows: list[_Request] = []  # engine thread only
        self._n_active = 0  # admitted and not yet finished; under _lock
        self._batch: Batch | None = None  # engine thread only
        self._next: torch.Tensor | None = None  # [B, 1] token each row feeds next
        self._thread: threading.Thread | None = None
        self._running = False
        self._closing = False
        self._job: tuple | None = None  # (callable, future) for run_exclusive
        self._job_lock: asyncio.Lock | None = None
        self._adapter: str | None = None
        self._base_state: dict[str, torch.Tensor] | None = None
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._total_requests = 0
        self._total_tokens = 0
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config, model_path: str) -> LocalEngine:
        """The engine ``[model]`` describes, on the base model already resolved to ``model_path``."""
        m = config.model
        return cls(
            model_path,
            version=m.base,
            device=m.device,
            dtype=m.dtype,
            max_batch=m.max_batch,
            max_queue=m.max_queue,
            fused_decode=m.fused_decode,
        )

    # ----------------------------------------------------------------- life cycle

    def load(self) -> None:
        """Load tokenizer and model (blocking); ``start`` calls it in an executor."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tuneloop.engine.device import pick_device, pick_dtype

        self.device = pick_device(self.device_name)
        threads = self.threads
        if threads is None and self.device == "cpu":
            # Leave a core to the event loop, the adapters and the tokenizer. With
            # every core given to torch, its worker threads spin against the
            # loop thread: 2 cores shared with a busy neighbour, 5M-param model,
            # transformers' forward, naive generate 213 vs 85 tok/s and engine
            # at 32 clients 1,011 vs 480 tok/s with 1 vs 2 torch threads. The
            # fused decode step takes the other cores back where it measures
            # that they help (``Decoder.widen``).
            threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))
        if threads:
            torch.set_num_threads(threads)
        # Threads started later (the engine's own) take this count; record it
        # for the decoder, which may widen its steps (``Decoder.widen``).
        self._torch_threads = torch.get_num_threads()
        dtype = pick_dtype(self.dtype_name, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load model {self.model_path}: {e}") from None
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.context_window = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self._fast = getattr(self.tokenizer, "backend_tokenizer", None)
        eos = set()
        for src in (
            getattr(self.model.generation_config, "eos_token_id", None),
            cfg.eos_token_id,
            self.tokenizer.eos_token_id,
        ):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(src)
        self._eos = eos
        pad = self.tokenizer.pad_token_id
        self._pad = pad if pad is not None else (min(eos) if eos else 0)
        self._base_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._build_decoder()

    def _build_decoder(self) -> None:
        """Pick the decode step for the current weights (after a load or a swap)."""
        self._decoder = None
        if self.fused_decode:
            self._decoder, why = Decoder.for_model(self.model)
            if self._decoder is not None and self.device == "cpu":
                self._decoder.widen(self._torch_threads, os.cpu_count() or 1)
        else:
            why = "[model] fused_decode = false"
        log.info("decode step: %s (%s)", self.decode_step, why)

    @property
    def decode_step(self) -> str:
        """``fused`` (``_decode.Decoder``) or ``transformers`` (the model's ``forward``)."""
        return "fused" if self._decoder is not None else "transformers"

    async def start(self) -> None:
        if self._running:
            return
        loop = asyncio.get_running_loop()
        if self.model is None:
            await loop.run_in_executor(None, self.load)
        self._job_lock = asyncio.Lock()
        self._closing = False
        self._running = True
        self._thread = threading.Thread(target=self._run, name="tuneloop-engine", daemon=True)
        self._thread.start()

    async def stop(self, grace: float = 5.0) -> None:
        if not self._running:
            return
        self._closing = True
        deadline = time.monotonic() + grace
        while (self._waiting or self._n_active) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        with self._lock:
            for req in list(self._waiting) + list(self._rows):
                req.cancelled = True
            self._lock.notify()
        while self._waiting or self._n_active:
            await asyncio.sleep(0.005)
        with self._lock:
            self._running = False
            self._lock.notify()
        thread = self._thread
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, thread.join)

    # ------------------------------------------------------------------- requests

    def encode(self, messages: list[Message]) -> list[int]:
        """Token ids of the conversation rendered with the chat template, ready for a reply."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            text += "<|im_start|>assistant\n"
        return tok(text, add_special_tokens=False)["input_ids"]

    def submit(
        self, messages: list[Message], params: SamplingParams, request_id: str | None = None
    ) -> Generation:
        if self._closing:
            raise EngineError("engine is shutting down")
        if not self._running:
            raise EngineError("engine is not started")
        loop = asyncio.get_running_loop()
        prompt = self.encode(messages)
        max_new = max(1, min(params.max_new_tokens, self.context_window - 1))
        if len(prompt) + max_new > self.context_window:
            if len(prompt) < self.context_window:
                max_new = self.context_window - len(prompt)
            else:
                max_new = min(max_new, self.context_window // 2)
                prompt = prompt[len(prompt) - (self.context_window - max_new) :]
        rid = request_id or uuid.uuid4().hex[:12]
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        req = _Request(rid, prompt, params, max_new, loop, asyncio.Queue(), time.perf_counter(), gen)
        with self._lock:
            free = max(0, self.max_batch - self._n_active)
            queued = max(0, len(self._waiting) - free)
            if len(self._waiting) >= free and queued >= self.max_queue:
                raise BusyError(f"engine busy: {queued} requests queued; try again shortly")
            self._waiting.append(req)
            self._total_requests += 1
            self._lock.notify()
        generation = Generation(rid, None)  # type: ignore[arg-type]
        generation.deltas = self._stream(req, generation)
        generation.extra["prompt_tokens"] = len(prompt)
        return generation

    def _stream(self, req: _Request, gen: Generation):
        return drain(req.queue, gen, lambda: None if req.done else self.cancel(req.id))

    def cancel(self, request_id: str) -> None:
        with self._lock:
            for req in itertools.chain(self._waiting, self._rows):
                if req.id == request_id:
                    req.cancelled = True
            self._lock.notify()

    def fit_context(self, messages: list[Message], max_new_tokens: int) -> list[Message]:
        limit = self.context_window - min(max_new_tokens, self.context_window // 2)
        msgs = list(messages)
        while len(self.encode(msgs)) > limit:
            droppable = [i for i, m in enumerate(msgs[:-1]) if m.get("role") != "system"]
            if droppable:
                del msgs[droppable[0]]
                continue
            # Only system messages and the last one left: cut the last from its start.
            last = dict(msgs[-1])
            ids = self.tokenizer(last["content"], add_special_tokens=False)["input_ids"]
            over = len(self.encode(msgs)) - limit
            keep = len(ids) - over
            if keep <= 0:
                # System prompts alone fill the window: keep only the last message.
                if len(msgs) > 1:
                    msgs = [last]
                    continue
                last["content"] = ""
                msgs[-1] = last
                break
            last["content"] = self.tokenizer.decode(ids[-keep:], skip_special_tokens=True).lstrip(
                _REPLACEMENT
            )
            msgs[-1] = last
        return msgs

    async def swap_adapter(self, adapter_path: str | None, version: str) -> None:
        await self.run_exclusive(lambda: self._swap_weights(adapter_path, version))

    async def run_exclusive(self, fn):
        """``fn()`` on the engine thread once no request is in flight; its result or its exception.

        Requests that arrive meanwhile wait for it. A weight swap is one; the
        bench's tight loops are another (on the engine thread, torch keeps one
        OpenMP team: a second thread's team slows every step that follows).
        """
        if not self._running:
            raise EngineError("engine is not started")
        assert self._job_lock is not None
        async with self._job_lock:
            fut = asyncio.get_running_loop().create_future()
            with self._lock:
                self._job = (fn, fut)
                self._lock.notify()
            return await fut

    def stats(self) -> dict[str, Any]:
        now = time.perf_counter()
        rate = list(self._rate)
        recent = [(t, n) for t, n in rate if now - t <= _RATE_WINDOW]
        tps = 0.0
        if recent:
            span = max(now - recent[0][0], 1e-3) if len(recent) > 1 else _RATE_WINDOW
            tps = sum(n for _, n in recent) / span
        free = max(0, self.max_batch - self._n_active)
        return {
            "backend": "local",
            "model_version": self.model_version,
            "device": getattr(self, "device", self.device_name),
            "queued": max(0, len(self._waiting) - free),
            "active": self._n_active + min(len(self._waiting), free),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "tokens_per_s": round(tps, 1),
            "total_requests": self._total_requests,
            "total_tokens": self._total_tokens,
            "context_window": self.context_window,
            "decode_step": self.decode_step,
        }

    # ------------------------------------------------------------- engine thread

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._waiting and not self._rows and self._job is None:
                    self._lock.wait()
                if not self._running:
                    break
            try:
                if self._job is not None and not self._rows:
                    self._do_job()
                    continue
                with torch.inference_mode():
                    self.step()
            except Exception as e:  # noqa: BLE001 — fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(EngineError(f"inference failed: {type(e).__name__}: {e}"))
        # Whatever is left (stop() cancels first, so normally nothing).
        self._fail_all(EngineError("engine is shutting down"))

    def step(self) -> None:
        """Admit, decode one token for every row, deliver, drop finished rows."""
        out: list[tuple[_Request, Any]] = []
        self._drop_cancelled(out)
        self._compact()
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers, out)
        if self._rows:
            if self._decoder is not None:
                logits = self._decoder.step(self._next, self._batch)
            else:
                mask, pos = self._batch.step_inputs()
                logits = last_logits(self.model, self._next, mask, pos, self._batch.cache)
            self._batch.advance()
            self._next = self._postprocess(self._rows, logits, out)
        self._compact()
        now = time.perf_counter()
        if out or now - self._last_flush >= self.stream_interval:
            for req in self._rows:
                self._flush(req, out)
            self._last_flush = now
        self._deliver(out)

    def _admit(self) -> list[_Request]:
        if self._job is not None:
            return []  # drain: in-flight rows finish on the weights they started with
        with self._lock:
            n = min(self.max_batch - len(self._rows), len(self._waiting))
            self._n_active += n
            return [self._waiting.popleft() for _ in range(n)]

    def _prefill(self, reqs: list[_Request], out: list) -> None:
        for r in reqs:
            r.version = self.model_version
        prompts = [r.prompt for r in reqs]
        if self._decoder is not None:
            batch, logits = self._decoder.prefill(prompts)
        else:
            batch, logits = prefill(self.model, prompts, self._pad, self.device)
        first = self._postprocess(reqs, logits, out)
        parts = []
        if self._rows:
            parts.append((self._batch, None))
        parts.append((batch, None))
        # Newcomers' first tokens were sampled from the prefill; they feed them next.
        rows = self._rows + reqs
        budget = max(r.max_new - len(r.tokens) for r in rows) + 1
        self._batch = Batch.merge(parts, budget)
        self._rows = rows
        self._next = first if self._next is None else torch.cat([self._next, first])

    def _postprocess(self, rows: list[_Request], logits: torch.Tensor, out: list) -> torch.Tensor:
        """Sample one token per row and advance each request; the tokens as a [B, 1] tensor."""
        chosen = self._sample(rows, logits)
        ids = chosen.tolist()
        now = time.perf_counter()
        self._rate.append((now, len(ids)))
        while self._rate and now - self._rate[0][0] > _RATE_WINDOW:
            self._rate.popleft()
        self._total_tokens += len(ids)
        for req, tok in zip(rows, ids, strict=True):
            if not req.done:
                self._advance(req, tok, now, out)
        return chosen.unsqueeze(1)

    def _sample(self, rows: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        if all(r.params.temperature <= 0 for r in rows):
            return greedy(logits)
        logits = logits.float()
        temps = torch.tensor(
            [r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows], device=logits.device
        )
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        top_p = [r.params.top_p for r in rows]
        if any(p < 1.0 for p in top_p):
            tp = torch.tensor(top_p, device=logits.device)[:, None]
            sorted_p, order = probs.sort(-1, descending=True)
            cum = sorted_p.cumsum(-1)
            sorted_p = sorted_p.masked_fill(cum - sorted_p > tp, 0.0)  # keeps at least the top token
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        sampled = greedy(logits)  # greedy rows keep it; sampled rows are overwritten below
        plain = [i for i, r in enumerate(rows) if r.params.temperature > 0 and r.generator is None]
        if plain:
            idx = torch.tensor(plain, device=logits.device)
            sampled[idx] = torch.multinomial(probs[idx], 1).squeeze(1)
        for i, r in enumerate(rows):
            if r.params.temperature > 0 and r.generator is not None:
                sampled[i] = torch.multinomial(probs[i], 1, generator=r.generator)[0]
        return sampled

    def _advance(self, req: _Request, tok: int, now: float, out: list) -> None:
        """Add one token to a request: detokenize, check stops, queue its delta."""
        if req.cancelled:
            self._finish(req, "cancelled", now, out)
            return
        if tok in self._eos and not req.params.ignore_eos:
            self._finish(req, "stop", now, out)
            return
        req.tokens.append(tok)
        piece = self._detokenize(req, tok)
        if piece:
            req.text += piece
            stops = req.params.stop
            if stops:
                if self._cut_stop(req):
                    self._finish(req, "stop", now, out)
                    return
                end = len(req.text) - _held(req.text, stops)
            else:
                end = len(req.text)
            if end > req.sent:
                req.pending += req.text[req.sent : end]
                req.sent = end
                if req.first_delta is None:
                    req.first_delta = now
                    self._flush(req, out)
        if len(req.tokens) >= req.max_new:
            self._finish(req, "length", now, out)

    def _detokenize(self, req: _Request, tok: int) -> str:
        """The text ``tok`` completes: '' while it is part of an unfinished character."""
        if self._fast is not None:
            # tokenizers' own incremental decoder: one call per token, and it
            # holds back bytes of a character split across tokens.
            if req.stream is None:
                req.stream = DecodeStream(skip_special_tokens=True)
            return req.stream.step(self._fast, tok) or ""
        # A tokenizer without a Rust backend: decode everything, emit what is new.
        full = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        if full.endswith(_REPLACEMENT) or len(full) <= len(req.decoded):
            return ""
        piece, req.decoded = full[len(req.decoded) :], full
        return piece

    @staticmethod
    def _cut_stop(req: _Request) -> bool:
        longest = max(len(s) for s in req.params.stop)
        start = max(0, req.sent - longest)
        hits = [i for i in (req.text.find(s, start) for s in req.params.stop if s) if i >= 0]
        if not hits:
            return False
        req.text = req.text[: min(hits)]
        return True

    def _finish(self, req: _Request, reason: str, now: float, out: list) -> None:
        if req.done:
            return
        req.done = True
        if reason != "cancelled" and len(req.text) > req.sent:
            # Held-back text that turned out not to start a stop string.
            req.pending += req.text[req.sent :]
            req.sent = len(req.text)
            if req.first_delta is None:
                req.first_delta = now
        if reason == "cancelled":
            req.text = req.text[: req.sent]
        self._flush(req, out)
        out.append(
            (
                req,
                Completion(
                    text=req.text,
                    finish_reason=reason,
                    prompt_tokens=len(req.prompt),
                    completion_tokens=len(req.tokens),
                    time_to_first_token=None if req.first_delta is None else req.first_delta - req.submitted,
                    total_time=now - req.submitted,
                    model_version=req.version or self.model_version,
                ),
            )
        )

    @staticmethod
    def _flush(req: _Request, out: list) -> None:
        if req.pending:
            out.append((req, req.pending))
            req.pending = ""

    def _drop_cancelled(self, out: list) -> None:
        now = time.perf_counter()
        with self._lock:
            if any(r.cancelled for r in self._waiting):
                keep = collections.deque()
                for r in self._waiting:
                    if r.cancelled:
                        self._finish(r, "cancelled", now, out)
                    else:
                        keep.append(r)
                self._waiting = keep
        for r in self._rows:
            if r.cancelled:
                self._finish(r, "cancelled", now, out)

    def _compact(self) -> None:
        if not any(r.done for r in self._rows):
            return
        keep = [i for i, r in enumerate(self._rows) if not r.done]
        if not keep:
            self._rows, self._batch, self._next = [], None, None
            with self._lock:
                self._n_active = 0
            return
        rows = [self._rows[i] for i in keep]
        idx = torch.tensor(keep, device=self._next.device)
        budget = max(r.max_new - len(r.tokens) for r in rows) + 1
        self._batch = Batch.merge([(self._batch, idx)], budget)
        self._next = self._next[idx]
        self._rows = rows
        with self._lock:
            self._n_active = len(rows)

    def _deliver(self, out: list) -> None:
        if not out:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for req, item in out:
            by_loop.setdefault(req.loop, []).append((req.queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:
                pass  # the loop is closed: nobody is listening any more

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            reqs = [r for r in itertools.chain(self._rows, self._waiting) if not r.done]
            self._waiting = collections.deque()
            self._n_active = 0
        self._rows, self._batch, self._next = [], None, None
        out = []
        for r in reqs:
            r.done = True
            out.append((r, error))
        self._deliver(out)

    def _do_job(self) -> None:
        fn, fut = self._job
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 — the caller gets it; the engine keeps serving
            error = e
        with self._lock:
            self._job = None

        def settle() -> None:
            if fut.done():
                return
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

        fut.get_loop().call_soon_threadsafe(settle)

    def _swap_weights(self, path: str | None, version: str) -> None:
        try:
            self._load_weights(path)
        except Exception as e:
            log.exception("adapter swap failed")
            try:
                self._load_weights(self._adapter)  # keep serving the old weights
            except Exception:  # noqa: BLE001
                log.exception("restoring the previous weights failed")
            self._build_decoder()
            raise ModelError(f"cannot load adapter {path}: {type(e).__name__}: {e}") from None
        self._adapter = path
        self.model_version = version
        self._build_decoder()
        log.info("now serving %s", self.model_version)

    def _load_weights(self, adapter_path: str | None) -> None:
        with torch.no_grad():
            self.model.load_state_dict(self._base_state)
            if not adapter_path:
                return
            if (Path(adapter_path) / "adapter_config.json").exists():
                from peft import PeftModel

                merged = PeftModel.from_pretrained(self.model, adapter_path).merge_and_unload()
                self.model = merged.to(self.device).eval()
            else:
                # A fully fine-tuned version ([trainer] lora = false): the same
                # architecture, every weight replaced.
                from transformers import AutoModelForCausalLM

                full = AutoModelForCausalLM.from_pretrained(adapter_path, dtype=self.model.dtype)
                self.model.load_state_dict(full.state_dict())


def _held(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that could begin a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _put_all(items: list) -> None:
    for queue, item in items:
        queue.put_nowait(item)
