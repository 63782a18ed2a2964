"""The ``local`` back end: a transformers model in this process, continuously batched.

Boundary: conversations and sampling parameters in, text deltas and a
``Completion`` out. It knows the tokenizer and the model; it knows nothing of
platforms, storage or the trainer.

How it runs. One background thread owns the model and the running batch and
loops over ``step()``, which is three parts, each in its own module:

- ``scheduler.Scheduler``: the waiting queue and the running batch, admission
  (``max_batch``, ``max_queue``), cancellation, the drain before a weight swap;
- ``runner.ModelRunner``: the weights and the batch's KV cache; a prefill of
  the newcomers or one decoding step of every row, giving logits;
- ``output.OutputProcessor``: sampling, incremental detokenizing, stop
  strings, completions, and the delivery of deltas to the asyncio loop (one
  ``call_soon_threadsafe`` per step).

Why a hand-written decode loop rather than transformers' continuous-batching
manager (``generate_batch``, paged cache): on the small models tuneloop
starts with, on CPU, the paged manager's per-step bookkeeping costs more than
the model. Left padding + attention mask + per-row position ids let any
causal LM in transformers decode a ragged batch through its ordinary
``forward``; for Llama, Qwen2 and Mistral models the prefill and the step
itself are tuneloop's own (``_decode.Decoder``, checked against ``forward``
at load). ``tuneloop bench`` (``bot/bench.py``) measures the engine against
naive generation and against a bare batched loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

import torch

from tuneloop.engine.base import Engine, Generation, Message, SamplingParams, drain
from tuneloop.engine.lora import read_adapter
from tuneloop.engine.output import REPLACEMENT, OutputProcessor
from tuneloop.engine.runner import ModelRunner
from tuneloop.engine.scheduler import Scheduler
from tuneloop.engine.sequence import Sequence
from tuneloop.errors import EngineError, ModelError

log = logging.getLogger(__name__)


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
        quantize: str = "none",
    ) -> None:
        self.model_path = str(model_path)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.stream_interval = stream_interval
        self.scheduler = Scheduler(max_batch, max_queue)
        self.runner = ModelRunner(
            model_path,
            version=version,
            device=device,
            dtype=dtype,
            threads=threads,
            fused_decode=fused_decode,
            quantize=quantize,
        )
        self.output: OutputProcessor | None = None  # needs the tokenizer: made by load()
        self._thread: threading.Thread | None = None
        self._running = False
        self._closing = False
        self._job_lock: asyncio.Lock | None = None

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
            quantize=m.quantize,
        )

    # The runner's state, read by the engine's users (chat, trainer, bench).
    @property
    def model_version(self) -> str:
        return self.runner.version

    @property
    def context_window(self) -> int:
        return self.runner.context_window

    @property
    def model(self):
        return self.runner.model

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    @property
    def device(self) -> str:
        return self.runner.device

    @property
    def decode_step(self) -> str:
        """``fused`` (``_decode.Decoder``) or ``transformers`` (the model's ``forward``)."""
        return self.runner.decode_step

    @property
    def _pad(self) -> int:  # bot/bench.py reads it
        return self.runner.pad

    @property
    def _decoder(self):  # bot/bench.py reads it
        return self.runner.decoder

    # ----------------------------------------------------------------- life cycle

    def load(self) -> None:
        """Load tokenizer and model (blocking); ``start`` calls it in an executor."""
        self.runner.load()
        self.output = OutputProcessor(
            self.runner.tokenizer,
            self.runner.eos,
            stream_interval=self.stream_interval,
            version=lambda: self.runner.version,
        )

    async def start(self) -> None:
        if self._running:
            return
        loop = asyncio.get_running_loop()
        if self.output is None:
            await loop.run_in_executor(None, self.load)
        self._job_lock = asyncio.Lock()
        self._closing = False
        self._running = True
        self.scheduler.open()
        self._thread = threading.Thread(target=self._run, name="tuneloop-engine", daemon=True)
        self._thread.start()

    async def stop(self, grace: float = 5.0) -> None:
        if not self._running:
            return
        self._closing = True
        deadline = time.monotonic() + grace
        while not self.scheduler.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.scheduler.cancel_all()
        while not self.scheduler.idle:
            await asyncio.sleep(0.005)
        self._running = False
        self.scheduler.close()
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
        self,
        messages: list[Message],
        params: SamplingParams,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> Generation:
        if self._closing:
            raise EngineError("engine is shutting down")
        if not self._running:
            raise EngineError("engine is not started")
        lora = None if adapter is None else self.runner.bank.get(adapter)  # ModelError if unknown
        loop = asyncio.get_running_loop()
        prompt = self.encode(messages)
        window = self.context_window
        max_new = max(1, min(params.max_new_tokens, window - 1))
        if len(prompt) + max_new > window:
            if len(prompt) < window:
                max_new = window - len(prompt)
            else:
                max_new = min(max_new, window // 2)
                prompt = prompt[len(prompt) - (window - max_new) :]
        rid = request_id or uuid.uuid4().hex[:12]
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        seq = Sequence(rid, prompt, params, max_new, loop, asyncio.Queue(), time.perf_counter(), gen, lora=lora)
        self.scheduler.add(seq)
        generation = Generation(rid, None)  # type: ignore[arg-type]
        generation.deltas = drain(
            seq.queue, generation, lambda: None if seq.is_finished else self.cancel(seq.id)
        )
        generation.extra["prompt_tokens"] = len(prompt)
        return generation

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

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
            last["content"] = self.tokenizer.decode(ids[-keep:], skip_special_tokens=True).lstrip(REPLACEMENT)
            msgs[-1] = last
        return msgs

    async def swap_adapter(self, adapter_path: str | None, version: str) -> None:
        await self.run_exclusive(lambda: self.runner.swap(adapter_path, version))

    async def load_adapter(self, name: str, path: str) -> None:
        if not self._running:
            raise EngineError("engine is not started")
        # Read and checked off the engine thread (the check takes seconds on a
        # 135M model, and decoding goes on meanwhile); stacked on it, between
        # two steps, and checked again there if the weights were swapped meanwhile.
        loop = asyncio.get_running_loop()
        adapter = await loop.run_in_executor(None, read_adapter, name, path, self.runner.model)
        generation = None
        if self.runner.decoder is not None:
            # Through transformers' forward the check hooks the live model's
            # own linears: it runs on the engine thread (add_adapter) instead.
            generation = self.runner.weights_generation
            problem = await loop.run_in_executor(None, self.runner.check_adapter, adapter)
            if problem:
                raise ModelError(f"cannot serve adapter {name} per request: {problem}")
        await self.run_between(lambda: self.runner.add_adapter(adapter, checked=generation))

    async def unload_adapter(self, name: str) -> None:
        if not self._running:
            raise EngineError("engine is not started")
        await self.run_between(lambda: self.runner.remove_adapter(name))

    def adapter_names(self) -> list[str]:
        bank = self.runner.bank
        return sorted(bank.named) if bank is not None else []

    async def run_between(self, fn):
        """Run ``fn()`` on the engine thread between two steps; the running rows stay in the batch."""
        fut = asyncio.get_running_loop().create_future()
        self.scheduler.add_between((fn, fut))
        return await fut

    async def run_exclusive(self, fn):
        """Run ``fn()`` on the engine thread once the running requests have finished.

        Requests that arrive meanwhile wait for it. A weight swap is one; the
        bench's tight loops are another (on the engine thread, torch keeps one
        OpenMP team: a second thread's team slows every step that follows).
        """
        if not self._running:
            raise EngineError("engine is not started")
        assert self._job_lock is not None
        async with self._job_lock:
            fut = asyncio.get_running_loop().create_future()
            self.scheduler.set_job((fn, fut))
            return await fut

    def stats(self) -> dict[str, Any]:
        queued, active = self.scheduler.load()
        output = self.output
        return {
            "backend": "local",
            "model_version": self.model_version,
            "device": self.device,
            "queued": queued,
            "active": active,
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "tokens_per_s": round(output.tokens_per_s(), 1) if output else 0.0,
            "total_requests": self.scheduler.total_requests,
            "total_tokens": output.total_tokens if output else 0,
            "context_window": self.context_window,
            "decode_step": self.decode_step,
            **self._step_stats(),
        }

    def _step_stats(self) -> dict[str, Any]:
        """Whether steps run in C (``_native``) and what shared prompt beginnings saved (``_prefix``)."""
        decoder = self.runner.decoder if self.runner is not None else None
        if decoder is None:
            return {}
        kept = decoder.prefixes
        return {"c_step": decoder.native is not None,
                "prefix_cache": {"entries": len(kept), "hits": kept.hits, "tokens_reused": kept.reused}}

    # ------------------------------------------------------------- engine thread

    def step(self) -> None:
        """One prefill of newcomers or one decoding step of the batch, and its outputs delivered."""
        batch = self.scheduler.schedule()
        logits = self.runner.run(batch)
        self.output.process(batch, logits)
        self.scheduler.postprocess(batch)  # before delivery: a reader who sees the end sees the row gone
        self.output.deliver()

    def _run(self) -> None:
        while self.scheduler.wait_for_work():
            try:
                betweens = self.scheduler.take_between()
                for between in betweens:
                    self._do_job(*between)
                if betweens and self.scheduler.idle:
                    continue
                job = self.scheduler.take_job()
                if job is not None:
                    self._do_job(*job)
                    continue
                with torch.inference_mode():
                    self.step()
                if not self.scheduler.running:
                    self.runner.reset()  # no cache kept while idle
            except Exception as e:  # noqa: BLE001 — fail the requests in flight, keep serving
                log.exception("engine step failed")
                self._fail_all(EngineError(f"inference failed: {type(e).__name__}: {e}"))
        # Whatever is left (stop() cancels first, so normally nothing).
        self._fail_all(EngineError("engine is shutting down"))
        for _, fut in self.scheduler.take_between():
            self._settle(fut, None, EngineError("engine is shutting down"))

    def _fail_all(self, error: Exception) -> None:
        # What the failed step had already made goes first: a reader that got
        # its Completion never reads the error queued after it.
        self.output.deliver()
        seqs = self.scheduler.abort_all()
        self.runner.reset()
        OutputProcessor.fail(seqs, error)

    @staticmethod
    def _do_job(fn, fut: asyncio.Future) -> None:
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 — the caller gets it; the engine keeps serving
            error = e
        LocalEngine._settle(fut, result, error)

    @staticmethod
    def _settle(fut: asyncio.Future, result, error: Exception | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            if error is None:
                fut.set_result(result)
            else:
                fut.set_exception(error)

        fut.get_loop().call_soon_threadsafe(settle)
