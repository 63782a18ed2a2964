"""The ``openai`` back end: the same requests, sent to an OpenAI-compatible server.

Boundary: conversations and sampling parameters in, text deltas and a
``Completion`` out, exactly like ``local``; the decoding happens elsewhere
(vLLM, SGLang, ``transformers serve``, another tuneloop) through the official
``openai`` client (``AsyncOpenAI``), streaming.

Configuration (``[model]``): ``api_base`` (e.g. ``http://gpu-box:8000/v1``),
``api_key_env`` (the environment variable holding the key; servers that need
none accept any), ``api_model`` (the model name on the server; empty: the
first entry of its ``/v1/models``), ``request_timeout``, ``max_batch`` +
``max_queue`` (requests in flight before answering busy).

What is counted and what is not. Token counts are the server's own: every
request asks for ``stream_options: {"include_usage": true}`` and the
``Completion`` carries the ``usage`` the server sends, or None for a count it
did not send (a cancelled stream ends before its usage). The tokenizer lives
on the server, so ``fit_context`` can only estimate (about four characters
per token) to keep prompts inside the window. The context window is the
server's ``max_model_len`` when ``/v1/models`` reports it (vLLM does), else
4096. A reply the server aborted (vLLM's ``finish_reason: "abort"``) is
``cancelled``; a stream that ends without any finish reason is an error.

Serving a trained version (``swap_adapter``). With vLLM and runtime LoRA
loading (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, ``--enable-lora``), the
adapter folder is loaded under the version's name with
``POST /v1/load_lora_adapter`` and later requests name that version as their
``model``. The folder must be readable by the server at the same path. A
server without runtime loading answers 404 there: the version is then served
only if the server lists it in ``/v1/models`` (preloaded with
``--lora-modules v3=/path``), else ``swap_adapter`` raises ``ModelError``.
``swap_adapter(None, ...)`` goes back to the base model name.

Adapters per request (``load_adapter``): each is loaded on the server under
its name the same way (a name loaded again is unloaded there first, with
``POST /v1/unload_lora_adapter``), and a request that names one sends it as
its ``model``; vLLM batches requests for different adapters together.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any

import openai

from tuneloop.engine.base import Completion, Engine, Generation, Message, SamplingParams, drain
from tuneloop.errors import BusyError, EngineError, ModelError

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4
DEFAULT_CONTEXT = 4096
_PER_MESSAGE_TOKENS = 4  # role markers around each message in most chat templates
_RATE_WINDOW = 5.0
# Finish reasons other servers use for ours; any other is passed on as the server said it.
_FINISH = {"abort": "cancelled"}  # vLLM's for a request aborted on the server


def estimate_tokens(messages: list[Message]) -> int:
    """About how many tokens ``messages`` take, for fitting them to the window; never stored."""
    return sum(_PER_MESSAGE_TOKENS + math.ceil(len(m.get("content") or "") / CHARS_PER_TOKEN)
               for m in messages)


class OpenAIEngine(Engine):
    """Any OpenAI-compatible chat completions server, streamed."""

    def __init__(self, api_base: str, *, api_key: str | None = None, model: str = "",
                 timeout: float = 120.0, max_batch: int = 32, max_queue: int = 256,
                 context_window: int | None = None) -> None:
        self.api_base = api_base.rstrip("/")
        self.api_key = api_key
        self.base_model = model
        self.model_version = model
        self.timeout = timeout
        self.max_inflight = max_batch + max_queue
        self.max_batch = max_batch
        self.context_window = context_window or DEFAULT_CONTEXT
        self._fixed_window = context_window is not None
        self.client: openai.AsyncOpenAI | None = None
        self._inflight: dict[str, dict[str, Any]] = {}
        self._running = False
        self._closing = False
        self._rate: list[tuple[float, int]] = []
        self._total_requests = 0
        self._total_tokens = 0
        self._adapters: dict[str, str] = {}  # name -> folder, loaded by load_adapter

    @classmethod
    def from_config(cls, config) -> OpenAIEngine:
        m = config.model
        return cls(m.api_base, api_key=config.secret(m.api_key_env), model=m.api_model,
                   timeout=m.request_timeout, max_batch=m.max_batch, max_queue=m.max_queue)

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._running:
            return
        # Retries are the caller's decision (a busy server is reported, not hidden).
        self.client = openai.AsyncOpenAI(base_url=self.api_base, api_key=self.api_key or "unused",
                                         timeout=self.timeout, max_retries=0)
        try:
            models = [m async for m in self.client.models.list()]
        except openai.OpenAIError as e:
            await self.client.close()
            self.client = None
            raise self._error(e) from None
        if not self.base_model:
            if not models:
                raise EngineError(f"model server at {self.api_base} lists no models; set model.api_model")
            self.base_model = models[0].id
        entry = next((m for m in models if m.id == self.base_model), None)
        window = getattr(entry, "max_model_len", None) if entry is not None else None
        if not self._fixed_window and isinstance(window, int) and window > 0:
            self.context_window = window
        if self.model_version in ("", None):
            self.model_version = self.base_model
        self._closing = False
        self._running = True
        log.info("openai backend: %s model=%s context=%d", self.api_base, self.model_version,
                 self.context_window)

    async def stop(self, grace: float = 5.0) -> None:
        if not self._running:
            return
        self._closing = True
        deadline = time.monotonic() + grace
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for rid in list(self._inflight):
            self.cancel(rid)
        # A cancelled stream ends at its next chunk or when its task is cancelled.
        deadline = time.monotonic() + 2.0
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._running = False
        if self.client is not None:
            await self.client.close()
            self.client = None

    # -- requests -------------------------------------------------------------------------

    def submit(self, messages: list[Message], params: SamplingParams,
               request_id: str | None = None, adapter: str | None = None) -> Generation:
        if self._closing:
            raise EngineError("engine is shutting down")
        if not self._running:
            raise EngineError("engine is not started")
        if adapter is not None and adapter not in self._adapters:
            raise ModelError(f"unknown adapter {adapter!r}; loaded: {', '.join(sorted(self._adapters)) or 'none'}")
        if len(self._inflight) >= self.max_inflight:
            raise BusyError(f"engine busy: {len(self._inflight)} requests in flight; try again shortly")
        rid = request_id or uuid.uuid4().hex[:12]
        queue: asyncio.Queue = asyncio.Queue()
        gen = Generation(rid, None)  # type: ignore[arg-type]
        # The HTTP stream is read by a task of its own, so that cancel() can stop
        # it without touching the caller's task.
        state: dict[str, Any] = {"cancelled": False, "settled": False}
        model, submitted = adapter or self.model_version, time.perf_counter()
        task = asyncio.get_running_loop().create_task(
            self._produce(rid, list(messages), params, queue, state, model), name=f"tuneloop-openai-{rid}")
        state["task"] = task

        def settle(t: asyncio.Task) -> None:
            # A task cancelled before it ran never reached its own clean-up.
            if not state["settled"]:
                self._inflight.pop(rid, None)
                # Nothing came back: no reply tokens, and no count of the prompt's.
                queue.put_nowait(Completion("", "cancelled", None, 0, None,
                                            time.perf_counter() - submitted, model))

        task.add_done_callback(settle)
        self._inflight[rid] = state
        self._total_requests += 1
        gen.deltas = self._stream(rid, queue, gen)
        return gen

    def _stream(self, rid: str, queue: asyncio.Queue, gen: Generation):
        return drain(queue, gen, lambda: self.cancel(rid))  # on abandon: the caller stopped reading

    def _request(self, messages: list[Message], params: SamplingParams, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model, "messages": messages, "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if params.ignore_eos:
            body["extra_body"] = {"ignore_eos": True}  # vLLM's extension; others ignore it
        return body

    async def _produce(self, rid: str, messages: list[Message], params: SamplingParams,
                       queue: asyncio.Queue, state: dict[str, Any], model: str) -> None:
        submitted = time.perf_counter()
        first: float | None = None
        text, finish, usage, stream = "", None, None, None
        try:
            assert self.client is not None
            stream = await self.client.chat.completions.create(**self._request(messages, params, model))
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    piece = choice.delta.content if choice.delta else None
                    if piece:
                        if first is None:
                            first = time.perf_counter()
                        text += piece
                        self._rate.append((time.perf_counter(), 1))
                        queue.put_nowait(piece)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except asyncio.CancelledError:
            finish = "cancelled"  # only cancel() and stop() cancel this task
        except openai.OpenAIError as e:
            queue.put_nowait(self._error(e))
            return
        except Exception as e:  # noqa: BLE001 — reported to the caller, never lost in a task
            queue.put_nowait(EngineError(f"model server at {self.api_base} failed: {type(e).__name__}: {e}"))
            return
        finally:
            state["settled"] = True
            self._inflight.pop(rid, None)
            if stream is not None:
                try:
                    await stream.close()
                except BaseException:  # noqa: BLE001 — closing a dead connection may fail; nothing to keep
                    pass
        if finish is None:
            queue.put_nowait(EngineError(f"model server at {self.api_base} ended the reply without "
                                         f"a finish reason after {len(text)} characters"))
            return
        completion_tokens = getattr(usage, "completion_tokens", None)
        if completion_tokens is not None:
            self._total_tokens += completion_tokens
        queue.put_nowait(Completion(
            text=text, finish_reason=_FINISH.get(finish, finish),
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=completion_tokens,
            time_to_first_token=None if first is None else first - submitted,
            total_time=time.perf_counter() - submitted, model_version=model))

    def cancel(self, request_id: str) -> None:
        state = self._inflight.get(request_id)
        if state is not None and not state["cancelled"]:
            state["cancelled"] = True
            state["task"].cancel()

    def _error(self, e: Exception) -> EngineError:
        if isinstance(e, openai.APITimeoutError):
            return EngineError(f"model server at {self.api_base} did not answer within "
                               f"{self.timeout:g} s (model.request_timeout)")
        if isinstance(e, openai.APIConnectionError):
            cause = e.__cause__ or e
            return EngineError(f"cannot reach the model server at {self.api_base} (model.api_base): "
                               f"{type(cause).__name__}: {cause}".rstrip(": "))
        if isinstance(e, openai.AuthenticationError):
            return EngineError(f"model server at {self.api_base} refused the key (401); "
                               "check the variable model.api_key_env names")
        if isinstance(e, openai.APIStatusError):
            message = e.message
            if isinstance(e.body, dict):
                err = e.body.get("error", e.body)
                if isinstance(err, dict):
                    message = err.get("message") or message
            if e.status_code in (429, 503):
                return BusyError(f"model server at {self.api_base} is busy ({e.status_code}): {message}")
            return EngineError(f"model server at {self.api_base} answered {e.status_code}: {message}")
        return EngineError(f"model server at {self.api_base} failed: {type(e).__name__}: {e}")

    # -- context, versions, load ---------------------------------------------------------------

    def fit_context(self, messages: list[Message], max_new_tokens: int) -> list[Message]:
        limit = self.context_window - min(max_new_tokens, self.context_window // 2)
        msgs = list(messages)
        while estimate_tokens(msgs) > limit:
            droppable = [i for i, m in enumerate(msgs[:-1]) if m.get("role") != "system"]
            if droppable:
                del msgs[droppable[0]]
                continue
            last = dict(msgs[-1])
            room = limit - estimate_tokens(msgs[:-1]) - _PER_MESSAGE_TOKENS
            if room <= 0 and len(msgs) > 1:
                msgs = [last]  # system prompts alone fill the window
                continue
            keep = max(0, room) * CHARS_PER_TOKEN
            last["content"] = last["content"][-keep:] if keep else ""
            msgs[-1] = last
            break
        return msgs

    async def swap_adapter(self, adapter_path: str | None, version: str) -> None:
        if not self._running or self.client is None:
            raise EngineError("engine is not started")
        if adapter_path is None:
            self.model_version = self.base_model
            log.info("openai backend: serving the base model %s", self.base_model)
            return
        await self._load_on_server(version, str(adapter_path))
        self.model_version = version

    async def _load_on_server(self, version: str, adapter_path: str) -> None:
        try:
            await self.client.post("/load_lora_adapter", cast_to=str,
                                   body={"lora_name": version, "lora_path": str(adapter_path)})
            log.info("openai backend: loaded adapter %s as %s on the server", adapter_path, version)
        except openai.NotFoundError:
            # No runtime loading: serve the version only if the server already has it.
            if version not in await self._served_models():
                raise ModelError(
                    f"cannot serve {version}: the model server at {self.api_base} has no runtime LoRA "
                    f"loading (404 on /load_lora_adapter) and does not list {version} in /models; start "
                    f"vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, or preload it "
                    f"with --lora-modules {version}={adapter_path}") from None
            log.info("openai backend: %s is preloaded on %s", version, self.api_base)
        except openai.BadRequestError as e:
            # vLLM answers 400 when that name is already loaded.
            if "already" not in str(e).lower():
                raise self._error(e) from None
        except openai.OpenAIError as e:
            raise self._error(e) from None

    async def load_adapter(self, name: str, path: str) -> None:
        if not self._running or self.client is None:
            raise EngineError("engine is not started")
        if name in self._adapters:
            # vLLM refuses a name it has (400): replace it. Requests already
            # sent finish on the server as it decides (vLLM keeps them on theirs).
            await self._unload_on_server(name)
            self._adapters.pop(name, None)
        await self._load_on_server(name, str(path))
        self._adapters[name] = str(path)

    async def unload_adapter(self, name: str) -> None:
        if not self._running or self.client is None:
            raise EngineError("engine is not started")
        if name not in self._adapters:
            raise ModelError(f"unknown adapter {name!r}; loaded: {', '.join(sorted(self._adapters)) or 'none'}")
        await self._unload_on_server(name)
        del self._adapters[name]

    async def _unload_on_server(self, name: str) -> None:
        try:
            await self.client.post("/unload_lora_adapter", cast_to=str, body={"lora_name": name})
            log.info("openai backend: unloaded adapter %s on the server", name)
        except openai.NotFoundError:
            pass  # no runtime loading (a preloaded adapter stays), or the server no longer has it
        except openai.OpenAIError as e:
            raise self._error(e) from None

    def adapter_names(self) -> list[str]:
        return sorted(self._adapters)

    async def _served_models(self) -> set[str]:
        assert self.client is not None
        try:
            return {m.id async for m in self.client.models.list()}
        except openai.OpenAIError as e:
            raise self._error(e) from None

    def stats(self) -> dict[str, Any]:
        now = time.perf_counter()
        self._rate = [(t, n) for t, n in self._rate if now - t <= _RATE_WINDOW]
        tps = sum(n for _, n in self._rate) / _RATE_WINDOW
        running = len(self._inflight)
        return {
            "backend": "openai",
            "api_base": self.api_base,
            "model_version": self.model_version,
            "queued": max(0, running - self.max_batch),
            "active": min(running, self.max_batch),
            "in_flight": running,
            "max_batch": self.max_batch,
            "max_queue": self.max_inflight - self.max_batch,
            # Stream chunks per second: the load indicator while replies stream
            # (servers send about one token a chunk); counts are in total_tokens.
            "tokens_per_s": round(tps, 1),
            "total_requests": self._total_requests,
            "total_tokens": self._total_tokens,  # reply tokens the server counted in its usage
            "context_window": self.context_window,
        }
