"""The ``openai`` back end against a real OpenAI-compatible server: tuneloop's own
web app on 127.0.0.1 (LocalEngine, tiny model) stands in for vLLM."""

from __future__ import annotations

import socket

import pytest
import pytest_asyncio

from bot.chat import Chat, Turn
from bot.runtime import services
from tests.serving import serving
from tuneloop.config import parse
from tuneloop.engine import SamplingParams, create_engine
from tuneloop.engine.openai import OpenAIEngine
from tuneloop.errors import EngineError
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


async def test_cancel_mid_stream(engine):
    gen = engine.submit([{"role": "user", "content": "tell me a story"}],
                        SamplingParams(max_new_tokens=200, temperature=1.0, seed=1))
    async for _ in gen:
        engine.cancel(gen.request_id)
    assert gen.result.finish_reason in ("cancelled", "stop", "length")  # a short reply may beat the cancel
    assert engine.stats()["in_flight"] == 0


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


async def test_swap_adapter_switches_the_model_name(remote, engine, tmp_path):
    _, svc = remote
    base = engine.model_version
    # tuneloop's server has no /v1/load_lora_adapter (404): the name is switched all the same.
    await engine.swap_adapter(str(tmp_path), "v7")
    assert engine.model_version == "v7"
    got = await engine.complete([{"role": "user", "content": "hello"}], SamplingParams(max_new_tokens=4))
    assert got.model_version == "v7"
    await engine.swap_adapter(None, base)
    assert engine.model_version == base


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

