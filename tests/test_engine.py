"""The local engine on the tiny model: batching, streaming, stops, cancel, swap, shutdown."""

from __future__ import annotations

import asyncio

import pytest

from tuneloop.engine.base import SamplingParams
from tuneloop.errors import BusyError, EngineError

pytestmark = pytest.mark.timeout(60)

CONVS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is your name? Tell me about yourself, please."}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Do you like music?"},
    ],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "How are you today, my friend?"},
    ],
]


def fixed(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True, **kw)


@pytest.fixture
async def engine(tiny_model):
    from tuneloop.engine.local import LocalEngine

    eng = LocalEngine(str(tiny_model), version="base", max_batch=8, max_queue=4)
    await eng.start()
    yield eng
    await eng.stop(grace=0)


async def collect(gen) -> tuple[list[str], object]:
    deltas = [d async for d in gen]
    return deltas, gen.result


@pytest.mark.asyncio
async def test_greedy_same_alone_and_in_a_batch(engine, tiny_model):
    alone = [await engine.complete(c, fixed(24)) for c in CONVS]
    batched = await asyncio.gather(*(engine.complete(c, fixed(24)) for c in CONVS))
    assert [c.text for c in batched] == [c.text for c in alone]
    assert all(c.completion_tokens == 24 and c.finish_reason == "length" for c in batched)
    assert len({c.text for c in alone}) > 1  # the prompts really differ

    # The same as transformers' own greedy generate (both stop at eos here).
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    ids = torch.tensor([engine.encode(CONVS[1])])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=24,
        do_sample=False,
        pad_token_id=engine.tokenizer.pad_token_id,
    )
    ours = await engine.complete(CONVS[1], SamplingParams(max_new_tokens=24))
    assert engine.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True) == ours.text


@pytest.mark.asyncio
async def test_a_request_joins_a_running_batch(engine):
    long_alone = await engine.complete(CONVS[1], fixed(120))
    short_alone = await engine.complete(CONVS[0], fixed(4))

    long_gen = engine.submit(CONVS[1], fixed(120))
    it = long_gen.__aiter__()
    await it.__anext__()  # the long reply is decoding
    short = await engine.complete(CONVS[0], fixed(4))
    assert engine.stats()["active"] == 1  # the short one finished while the long one runs
    rest = [d async for d in it]
    assert long_gen.result.finish_reason == "length"
    assert long_gen.result.text == long_alone.text
    assert short.text == short_alone.text
    assert rest  # the long one kept streaming after the short one was done


@pytest.mark.asyncio
async def test_own_limits_and_stop_strings(engine):
    ref = await engine.complete(CONVS[1], fixed(30))
    text = ref.text
    assert len(text) > 8
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.find(stop)]

    gens = [
        engine.submit(CONVS[1], fixed(30, stop=(stop, "never-seen-xyz"))),
        engine.submit(CONVS[1], fixed(5)),
        engine.submit(CONVS[2], fixed(17)),
    ]
    (deltas, stopped), (_, five), (_, seventeen) = await asyncio.gather(*(collect(g) for g in gens))
    assert stopped.finish_reason == "stop"
    assert stopped.text == cut
    assert "".join(deltas) == cut  # no piece of the stop string leaked into the stream
    assert five.completion_tokens == 5 and five.finish_reason == "length"
    assert seventeen.completion_tokens == 17
    assert five.prompt_tokens == len(engine.encode(CONVS[1]))
    assert stopped.time_to_first_token is not None and 0 < stopped.time_to_first_token <= stopped.total_time


@pytest.mark.asyncio
async def test_seeded_sampling_repeats(engine):
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    alone = await engine.complete(CONVS[0], params)
    batched = await asyncio.gather(
        engine.complete(CONVS[0], params),
        engine.complete(CONVS[1], fixed(20)),
        engine.complete(CONVS[0], SamplingParams(max_new_tokens=20, temperature=1.0)),
    )
    assert batched[0].text == alone.text and alone.completion_tokens == 20


@pytest.mark.asyncio
async def test_sampling_depends_on_the_seed(engine):
    """Would fail if sampling were silently greedy: greedy gives one reply, seeds give several."""
    greedy = {(await engine.complete(CONVS[0], fixed(16))).text for _ in range(2)}
    assert len(greedy) == 1

    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)

    replies = await asyncio.gather(*(engine.complete(CONVS[0], seeded(s)) for s in range(4)))
    texts = [r.text for r in replies]
    assert len(set(texts)) > 1 and set(texts) != greedy
    again = await engine.complete(CONVS[0], seeded(2))
    assert again.text == texts[2]


@pytest.mark.asyncio
async def test_eos_ends_a_reply_unless_ignored(engine):
    # The trained tiny model ends its replies: at least one of these stops on eos.
    results = await asyncio.gather(*(engine.complete(c, SamplingParams(max_new_tokens=60)) for c in CONVS))
    assert any(r.finish_reason == "stop" and r.completion_tokens < 60 for r in results)


@pytest.mark.asyncio
async def test_cancel_running_and_queued(tiny_model):
    from tuneloop.engine.local import LocalEngine

    eng = LocalEngine(str(tiny_model), version="base", max_batch=1, max_queue=4)
    await eng.start()
    try:
        running = eng.submit(CONVS[1], fixed(200))
        queued = eng.submit(CONVS[0], fixed(200))
        it = running.__aiter__()
        await it.__anext__()
        eng.cancel(queued.request_id)
        eng.cancel(running.request_id)
        _ = [d async for d in it]
        _, q = await collect(queued)
        assert running.result.finish_reason == "cancelled"
        assert running.result.completion_tokens < 200
        assert q.finish_reason == "cancelled" and q.completion_tokens == 0
        # The engine still serves afterwards.
        assert (await eng.complete(CONVS[0], fixed(3))).completion_tokens == 3
    finally:
        await eng.stop(grace=0)


@pytest.mark.asyncio
async def test_full_queue_refuses(tiny_model):
    from tuneloop.engine.local import LocalEngine

    eng = LocalEngine(str(tiny_model), version="base", max_batch=1, max_queue=1)
    await eng.start()
    try:
        a = eng.submit(CONVS[1], fixed(200))
        b = eng.submit(CONVS[0], fixed(200))
        with pytest.raises(BusyError, match=r"engine busy: 1 requests queued; try again shortly"):
            eng.submit(CONVS[2], fixed(5))
        assert eng.stats()["queued"] + eng.stats()["active"] == 2
        for g in (a, b):
            eng.cancel(g.request_id)
        await asyncio.gather(collect(a), collect(b))
        assert (await eng.complete(CONVS[2], fixed(2))).completion_tokens == 2  # room again
    finally:
        await eng.stop(grace=0)


@pytest.mark.asyncio
async def test_graceful_stop(tiny_model):
    from tuneloop.engine.local import LocalEngine

    eng = LocalEngine(str(tiny_model), version="base")
    await eng.start()
    gens = [eng.submit(c, fixed(8)) for c in CONVS]
    tasks = [asyncio.ensure_future(collect(g)) for g in gens]
    await eng.stop(grace=10)
    with pytest.raises(EngineError, match="shutting down"):
        eng.submit(CONVS[0], fixed(2))
    assert all(r.finish_reason == "length" for _, r in await asyncio.gather(*tasks))

    eng = LocalEngine(str(tiny_model), version="base")
    await eng.start()
    gen = eng.submit(CONVS[1], fixed(250))
    task = asyncio.ensure_future(collect(gen))
    await asyncio.sleep(0.05)
    await eng.stop(grace=0)
    _, result = await task
    assert result.finish_reason == "cancelled"


@pytest.mark.asyncio
async def test_fit_context_drops_oldest_turns(engine):
    window = engine.context_window
    turns = [{"role": "system", "content": "You are a helpful assistant."}]
    for i in range(60):
        turns.append({"role": "user", "content": f"question number {i} about something"})
        turns.append({"role": "assistant", "content": f"answer number {i} to that"})
    turns.append({"role": "user", "content": "the last question"})
    assert len(engine.encode(turns)) > window

    fitted = engine.fit_context(turns, 32)
    assert fitted[0] == turns[0] and fitted[-1] == turns[-1]
    assert fitted[1:] == turns[len(turns) - len(fitted) + 1 :]  # a suffix: the oldest went first
    assert len(engine.encode(fitted)) + 32 <= window
    assert len(engine.encode(engine.fit_context(turns[:3], 32))) == len(engine.encode(turns[:3]))

    huge = [{"role": "user", "content": "word " * 2000 + "THE END"}]
    cut = engine.fit_context(huge, 32)
    assert len(engine.encode(cut)) + 32 <= window and cut[0]["content"].endswith("THE END")
    result = await engine.complete(engine.fit_context(turns, 16), fixed(16))
    assert result.completion_tokens == 16


@pytest.mark.asyncio
async def test_swap_adapter(engine, tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    lora.save_pretrained(tmp_path / "adapter")

    base = await engine.complete(CONVS[1], fixed(20))
    assert base.model_version == "base"

    inflight = engine.submit(CONVS[1], fixed(60))
    it = inflight.__aiter__()
    await it.__anext__()
    swap = asyncio.ensure_future(engine.swap_adapter(str(tmp_path / "adapter"), "v1"))
    await asyncio.sleep(0)
    waiting = engine.submit(CONVS[1], fixed(20))  # queued behind the swap, not dropped
    _ = [d async for d in it]
    await swap
    _, tuned = await collect(waiting)
    base60 = inflight.result
    assert base60.model_version == "base" and base60.text.startswith(base.text)  # old weights throughout
    assert tuned.model_version == "v1" and tuned.text != base.text
    assert engine.model_version == "v1" and engine.stats()["model_version"] == "v1"

    await engine.swap_adapter(None, "base")
    back = await engine.complete(CONVS[1], fixed(20))
    assert back.model_version == "base" and back.text == base.text


@pytest.mark.asyncio
async def test_stats(engine):
    s = engine.stats()
    for key in (
        "queued",
        "active",
        "max_batch",
        "tokens_per_s",
        "total_requests",
        "total_tokens",
        "model_version",
    ):
        assert key in s
    before = s["total_requests"]
    await asyncio.gather(*(engine.complete(c, fixed(6)) for c in CONVS))
    s = engine.stats()
    assert s["total_requests"] == before + len(CONVS)
    assert s["total_tokens"] >= 6 * len(CONVS)
    assert s["tokens_per_s"] > 0 and s["active"] == 0 and s["queued"] == 0 and s["max_batch"] == 8


@pytest.mark.asyncio
async def test_swap_to_a_fully_fine_tuned_version(engine, tiny_model, tmp_path):
    """A version trained with ``[trainer] lora = false`` is a whole model folder."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "full")

    base = await engine.complete(CONVS[1], fixed(20))
    await engine.swap_adapter(str(tmp_path / "full"), "v9")
    tuned = await engine.complete(CONVS[1], fixed(20))
    assert tuned.model_version == "v9" and tuned.text != base.text
    await engine.swap_adapter(None, "base")
    back = await engine.complete(CONVS[1], fixed(20))
    assert back.text == base.text


@pytest.mark.asyncio
async def test_run_exclusive_runs_on_the_engine_thread_between_requests(engine):
    import threading

    inflight = engine.submit(CONVS[1], fixed(30))
    it = inflight.__aiter__()
    await it.__anext__()
    seen = {}

    def job():
        seen["thread"] = threading.current_thread().name
        seen["rows"] = len(engine.scheduler.running)  # the request above has finished by now
        return 42

    assert await engine.run_exclusive(job) == 42
    _ = [d async for d in it]
    assert inflight.result.completion_tokens == 30
    assert seen == {"thread": "tuneloop-engine", "rows": 0}

    def broken():
        raise ValueError("no such thing")

    with pytest.raises(ValueError, match="no such thing"):
        await engine.run_exclusive(broken)
    after = await engine.complete(CONVS[0], fixed(5))  # still serving
    assert after.completion_tokens == 5
