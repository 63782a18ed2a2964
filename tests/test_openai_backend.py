"""The ``openai`` back end against a real OpenAI-compatible server: tuneloop's own
web app on 127.0.0.1 (LocalEngine, tiny model) stands in for vLLM."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import pytest_asyncio
from aiohttp import web

from bot.chat import Chat, Turn
from bot.runtime import services
from tests.serving import serving
from tuneloop.config import parse
from tuneloop.engine import SamplingParams, create_engine
from tuneloop.engine.openai import OpenAIEngine
from tuneloop.errors import EngineError, ModelError
from tuneloop.store import Store

pytestmark = pytest.mark.asyncio(loop_scope="module")

CONVERSATION = [{"role": "system", "content": "You are helpful."},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi there"},
                {"role": "user", "content": "how are you?"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def remote(tiny_model, tmp_path_factory):
    """The stand-in model server: (its /v1 URL, its services)."""
    d = tmp_path_factory.mktemp("remote")
    config = parse({"model": {"base": str(tiny_model), "device": "cpu", "max_new_tokens": 32},
                    "storage": {"path": str(d / "remote.db")}, "trainer": {"enabled": False}}, d)
    async with services(config) as svc, serving(svc) as base:
        yield f"{base}/v1", svc


@pytest_asyncio.fixture(loop_scope="module")
async def engine(remote):
    url, _ = remote
    e = OpenAIEngine(url, api_key="unused", timeout=30)
    await e.start()
    yield e
    await e.stop()


async def test_greedy_reply_equals_the_local_engine(remote, engine):
    _, svc = remote
    params = SamplingParams(max_new_tokens=20)
    local = await svc.engine.complete(CONVERSATION, params)
    gen = engine.submit(CONVERSATION, params)
    deltas = [d async for d in gen]
    got = gen.result
    assert got.text == local.text == "".join(deltas)
    assert len(deltas) >= 2  # streamed, not one block
    assert got.model_version == svc.engine.model_version == engine.model_version  # the server's first model
    assert (got.prompt_tokens, got.completion_tokens) == (local.prompt_tokens, local.completion_tokens)
    assert got.finish_reason == local.finish_reason
    assert got.time_to_first_token is not None and got.total_time >= got.time_to_first_token
    assert engine.context_window > 0 and engine.stats()["in_flight"] == 0


async def test_chat_over_the_openai_backend_from_config(remote, tmp_path, monkeypatch):
    url, svc = remote
    monkeypatch.setenv("TEST_REMOTE_KEY", "secret")
    config = parse({"model": {"backend": "openai", "api_base": url, "api_key_env": "TEST_REMOTE_KEY",
                              "max_new_tokens": 16, "system_prompt": "You are helpful."},
                    "storage": {"path": str(tmp_path / "local.db")}, "trainer": {"enabled": False}}, tmp_path)
    e = create_engine(config)
    assert isinstance(e, OpenAIEngine) and e.api_key == "secret"
    store = Store(config.storage.path)
    await e.start()
    try:
        ex = await Chat(config, store, e).respond(Turn(text="hello", user="u", platform="cli"))
    finally:
        await e.stop()
        store.close()
    local = await svc.engine.complete([{"role": "system", "content": "You are helpful."},
                                       {"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=16))
    assert ex.reply == local.text and ex.model_version == svc.engine.model_version


async def test_sampling_parameters_reach_the_server(remote, engine):
    _, svc = remote
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, stop=("\n",))
    a = await engine.complete(CONVERSATION, params)
    b = await engine.complete(CONVERSATION, params)
    assert a.text == b.text  # the seed travelled
    last = svc.store.query("SELECT messages, completion_tokens FROM exchanges ORDER BY id DESC LIMIT 1")[0]
    assert last["completion_tokens"] <= 12


async def test_cancel_before_it_starts(engine):
    gen = engine.submit([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=8))
    engine.cancel(gen.request_id)
    assert [d async for d in gen] == []
    assert gen.result.finish_reason == "cancelled"
    assert engine.stats()["in_flight"] == 0


async def test_server_refusal_is_one_engine_error_line(engine):
    with pytest.raises(EngineError) as e:
        await engine.complete([{"role": "user", "content": "x" * 10_000}], SamplingParams(max_new_tokens=8))
    message = str(e.value)
    assert "answered 400" in message and "max_input_chars" in message and "\n" not in message


async def test_unreachable_server_is_one_line():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = OpenAIEngine(f"http://127.0.0.1:{port}/v1", timeout=5)
    with pytest.raises(EngineError) as err:
        await e.start()
    message = str(err.value)
    assert message.startswith(f"cannot reach the model server at http://127.0.0.1:{port}/v1 (model.api_base)")
    assert "\n" not in message


async def test_swap_to_a_version_the_server_cannot_load_is_a_model_error(remote, engine, tmp_path):
    base = engine.model_version
    # tuneloop's server has no /v1/load_lora_adapter (404) and does not list v7.
    with pytest.raises(ModelError) as e:
        await engine.swap_adapter(str(tmp_path), "v7")
    message = str(e.value)
    assert message.startswith("cannot serve v7: the model server at ") and "404" in message
    assert "\n" not in message
    assert engine.model_version == base  # still serving what it served
    got = await engine.complete([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=4))
    assert got.model_version == base


async def test_fit_context_drops_oldest_turns():
    e = OpenAIEngine("http://127.0.0.1:9/v1", context_window=100)
    long = [{"role": "system", "content": "sys"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "w" * 40} for i in range(20)]
    fitted = e.fit_context(long, max_new_tokens=20)
    assert fitted[0] == long[0] and fitted[-1] == long[-1] and len(fitted) < len(long)
    huge = [{"role": "user", "content": "z" * 10_000}]
    (only,) = e.fit_context(huge, max_new_tokens=20)
    assert 0 < len(only["content"]) < 400


async def test_stop_refuses_new_requests(remote):
    url, _ = remote
    e = OpenAIEngine(url, timeout=30)
    await e.start()
    await e.stop(grace=1)
    with pytest.raises(EngineError):
        e.submit([{"role": "user", "content": "hi"}], SamplingParams())



# ------------------------------------------------- a vLLM-like server's answers


class FakeServer:
    """An OpenAI-compatible server on 127.0.0.1 that answers as vLLM does, as each test sets it.

    It keeps every request body it was sent. ``pieces`` are streamed, then
    ``finish`` (None: the stream just ends), then ``usage`` when the client
    asked for it (None: never sent). With ``hold`` set it waits after the
    first piece until the test ends.
    """

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[tuple[str, dict]] = []
        self.models = ["base-model"]
        self.lora_loading = False  # vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING answers 404
        self.pieces = ["Hel", "lo"]
        self.finish: str | None = "stop"
        self.usage: dict | None = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}
        self.hold = False
        self.release = asyncio.Event()

    async def list_models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake", "max_model_len": 2048}
                for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((request.path, body))
        if not self.lora_loading:
            return web.json_response({"detail": "Not Found"}, status=404)
        self.models.append(body["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((request.path, body))
        if not self.lora_loading or body["lora_name"] not in self.models:
            return web.json_response({"detail": "Not Found"}, status=404)
        self.models.remove(body["lora_name"])
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((request.path, body))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(choices: list, **extra) -> None:
            obj = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                   "choices": choices, **extra}
            await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i, piece in enumerate(self.pieces):
            await send([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
            if self.hold and i == 0:
                await self.release.wait()
        if self.finish is not None:
            await send([{"index": 0, "delta": {}, "finish_reason": self.finish}])
        if self.usage is not None and (body.get("stream_options") or {}).get("include_usage"):
            await send([], usage=self.usage)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def chats(self) -> list[dict]:
        return [b for path, b in self.requests if path.endswith("/chat/completions")]


@pytest_asyncio.fixture(loop_scope="module")
async def fake():
    server = FakeServer()
    app = web.Application()
    app.router.add_get("/v1/models", server.list_models)
    app.router.add_post("/v1/load_lora_adapter", server.load_lora_adapter)
    app.router.add_post("/v1/unload_lora_adapter", server.unload_lora_adapter)
    app.router.add_post("/v1/chat/completions", server.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="module")
async def on_fake(fake):
    e = OpenAIEngine(fake.url, timeout=10)
    await e.start()
    yield e
    await e.stop(grace=1)


HELLO = [{"role": "user", "content": "hello"}]


async def test_token_counts_are_the_servers_usage(fake, on_fake):
    got = await on_fake.complete(HELLO, SamplingParams(max_new_tokens=8))
    assert fake.chats()[-1]["stream_options"] == {"include_usage": True}
    assert (got.text, got.finish_reason) == ("Hello", "stop")
    assert (got.prompt_tokens, got.completion_tokens) == (11, 2)
    assert on_fake.stats()["total_tokens"] == 2


async def test_no_usage_from_the_server_is_no_count(fake, on_fake, tmp_path):
    fake.usage = None
    got = await on_fake.complete(HELLO, SamplingParams(max_new_tokens=8))
    assert got.text == "Hello" and got.prompt_tokens is None and got.completion_tokens is None
    assert on_fake.stats()["total_tokens"] == 0  # nothing counted, nothing added

    # Stored as unknown, not as an estimate.
    config = parse({"model": {"backend": "openai", "api_base": fake.url, "max_new_tokens": 8},
                    "storage": {"path": str(tmp_path / "s.db")}, "trainer": {"enabled": False}}, tmp_path)
    store = Store(config.storage.path)
    try:
        ex = await Chat(config, store, on_fake).respond(Turn(text="hello", user="u", platform="cli"))
        (row,) = store.query("SELECT reply, prompt_tokens, completion_tokens FROM exchanges WHERE id = ?",
                             [ex.id])
    finally:
        store.close()
    assert row == {"reply": "Hello", "prompt_tokens": None, "completion_tokens": None}


async def test_cancel_mid_stream_reports_cancelled(fake, on_fake):
    fake.hold = True  # the server sends one piece, then waits: the cancel surely comes first
    gen = on_fake.submit(HELLO, SamplingParams(max_new_tokens=50))
    deltas = []
    async for d in gen:
        deltas.append(d)
        on_fake.cancel(gen.request_id)
    assert deltas == ["Hel"]
    assert (gen.result.finish_reason, gen.result.text) == ("cancelled", "Hel")
    assert gen.result.completion_tokens is None  # the stream ended before the server's usage
    assert on_fake.stats()["in_flight"] == 0


async def test_a_reply_the_server_aborted_is_cancelled(fake, on_fake):
    fake.finish = "abort"  # vLLM's finish reason for a request aborted on the server
    got = await on_fake.complete(HELLO, SamplingParams(max_new_tokens=8))
    assert (got.text, got.finish_reason) == ("Hello", "cancelled")


async def test_a_stream_without_a_finish_reason_is_an_error(fake, on_fake):
    fake.finish = None
    with pytest.raises(EngineError) as e:
        await on_fake.complete(HELLO, SamplingParams(max_new_tokens=8))
    assert str(e.value) == f"model server at {fake.url} ended the reply without a finish reason after 5 characters"


async def test_swap_loads_the_adapter_on_the_server(fake, on_fake, tmp_path):
    fake.lora_loading = True
    await on_fake.swap_adapter(str(tmp_path), "v7")
    assert fake.requests[-1] == ("/v1/load_lora_adapter", {"lora_name": "v7", "lora_path": str(tmp_path)})
    got = await on_fake.complete(HELLO, SamplingParams(max_new_tokens=8))
    assert fake.chats()[-1]["model"] == "v7" and got.model_version == "v7"
    await on_fake.swap_adapter(None, "base-model")
    await on_fake.complete(HELLO, SamplingParams(max_new_tokens=8))
    assert fake.chats()[-1]["model"] == "base-model"


async def test_swap_without_runtime_loading_needs_a_preloaded_version(fake, on_fake, tmp_path):
    fake.models.append("v3")  # as with --lora-modules v3=/path
    await on_fake.swap_adapter(str(tmp_path), "v3")
    got = await on_fake.complete(HELLO, SamplingParams(max_new_tokens=8))
    assert fake.chats()[-1]["model"] == "v3" and got.model_version == "v3"

    with pytest.raises(ModelError) as e:
        await on_fake.swap_adapter(str(tmp_path / "v8"), "v8")
    message = str(e.value)
    assert message.startswith(f"cannot serve v8: the model server at {fake.url} has no runtime LoRA loading")
    assert f"--lora-modules v8={tmp_path / 'v8'}" in message and "\n" not in message
    assert on_fake.model_version == "v3"


async def test_each_request_sends_its_adapter_as_the_model(fake, on_fake, tmp_path):
    fake.lora_loading = True
    await on_fake.load_adapter("c1-v2", str(tmp_path / "a"))
    await on_fake.load_adapter("c2-v1", str(tmp_path / "b"))
    assert fake.requests[-1] == ("/v1/load_lora_adapter", {"lora_name": "c2-v1", "lora_path": str(tmp_path / "b")})
    assert on_fake.adapter_names() == ["c1-v2", "c2-v1"]
    done = await asyncio.gather(*(on_fake.complete(HELLO, SamplingParams(max_new_tokens=8), adapter=a)
                                  for a in ("c1-v2", None, "c2-v1")))
    assert sorted(b["model"] for b in fake.chats()[-3:]) == ["base-model", "c1-v2", "c2-v1"]
    assert [c.model_version for c in done] == ["c1-v2", "base-model", "c2-v1"]

    # Loaded again: unloaded on the server first (vLLM refuses a name it has).
    await on_fake.load_adapter("c1-v2", str(tmp_path / "a2"))
    assert fake.requests[-2:] == [("/v1/unload_lora_adapter", {"lora_name": "c1-v2"}),
                                  ("/v1/load_lora_adapter", {"lora_name": "c1-v2", "lora_path": str(tmp_path / "a2")})]
    await on_fake.unload_adapter("c1-v2")
    assert fake.requests[-1] == ("/v1/unload_lora_adapter", {"lora_name": "c1-v2"})
    with pytest.raises(ModelError, match=r"^unknown adapter 'c1-v2'; loaded: c2-v1$"):
        on_fake.submit(HELLO, SamplingParams(max_new_tokens=8), adapter="c1-v2")
    with pytest.raises(ModelError, match=r"^unknown adapter 'zz'"):
        await on_fake.unload_adapter("zz")
    await on_fake.unload_adapter("c2-v1")
    assert on_fake.adapter_names() == []
