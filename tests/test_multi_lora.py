"""Per-request LoRA adapters in one batch (issue 12): each row decodes with its own adapter, unmerged."""

from __future__ import annotations

import asyncio

import pytest
import torch

from tuneloop.engine.base import SamplingParams
from tuneloop.errors import ModelError

pytestmark = pytest.mark.timeout(120)

CONVS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is your name? Tell me about yourself, please."}],
    [{"role": "user", "content": "Do you like music?"}],
    [{"role": "user", "content": "How are you today, my friend?"}],
]


def write_adapter(tiny_model, folder, seed: int, targets="all-linear", **extra) -> str:
    """A random LoRA adapter of the tiny model, as the trainer saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    config = LoraConfig(r=4 + seed % 3, lora_alpha=8, target_modules=targets, init_lora_weights=False, **extra)
    get_peft_model(model, config).save_pretrained(str(folder))
    return str(folder)


def merged_greedy(tiny_model, adapter: str | None, ids: list[int], n: int, pad: int) -> list[int]:
    """transformers' greedy generate on the model with ``adapter`` merged by peft (or on the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    x = torch.tensor([ids])
    out = model.eval().generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                                pad_token_id=pad)
    return out[0, x.shape[1]:].tolist()


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a1": write_adapter(tiny_model, root / "a1", 1),
        "a2": write_adapter(tiny_model, root / "a2", 2, targets=["q_proj", "v_proj", "down_proj"]),
        "a3": write_adapter(tiny_model, root / "a3", 3, use_rslora=True),
    }


async def started(tiny_model, **kw):
    from tuneloop.engine.local import LocalEngine

    engine = LocalEngine(str(tiny_model), version="base", max_batch=8, max_queue=8, **kw)
    await engine.start()
    return engine


@pytest.mark.asyncio
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transformers"])
async def test_each_row_decodes_as_its_adapter_merged(tiny_model, adapters, fused):
    engine = await started(tiny_model, fused_decode=fused)
    try:
        assert engine.decode_step == ("fused" if fused else "transformers")
        for name in ("a1", "a2", "a3"):  # a3 loaded, used by no row: only the rows' adapters are stacked
            await engine.load_adapter(name, adapters[name])
        assert engine.adapter_names() == ["a1", "a2", "a3"]
        rows = [(CONVS[0], "a1"), (CONVS[1], None), (CONVS[2], "a2"), (CONVS[3], "a1"), (CONVS[1], "a2")]
        params = SamplingParams(max_new_tokens=12)
        done = await asyncio.gather(*(engine.complete(c, params, adapter=a) for c, a in rows))
        tok = engine.tokenizer
        for (conv, name), got in zip(rows, done, strict=True):
            want = merged_greedy(tiny_model, None if name is None else adapters[name], engine.encode(conv),
                                 12, tok.pad_token_id)
            assert got.text == tok.decode(want, skip_special_tokens=True), (name, conv)
            assert got.model_version == (name or "base")
        # The adapters really change the replies (else the test above proves little).
        plain = await engine.complete(CONVS[1], params)
        assert len({plain.text, done[4].text, (await engine.complete(CONVS[1], params, adapter="a1")).text}) == 3
    finally:
        await engine.stop(grace=0)


@pytest.mark.asyncio
async def test_unknown_or_unservable_adapters_are_one_line_model_errors(tiny_model, adapters, tmp_path):
    engine = await started(tiny_model)
    try:
        with pytest.raises(ModelError, match=r"^unknown adapter 'nope'; loaded: none$"):
            engine.submit(CONVS[0], SamplingParams(max_new_tokens=4), adapter="nope")
        with pytest.raises(ModelError, match=r"^unknown adapter 'nope'"):
            await engine.unload_adapter("nope")
        with pytest.raises(ModelError, match="has no adapter_config.json"):
            await engine.load_adapter("x", str(tmp_path))
        dora = write_adapter(tiny_model, tmp_path / "dora", 4, use_dora=True)
        with pytest.raises(ModelError) as e:
            await engine.load_adapter("d", dora)
        assert "it is DORA" in str(e.value) and "\n" not in str(e.value)
        assert engine.adapter_names() == []
        # The engine still serves.
        got = await engine.complete(CONVS[0], SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert got.completion_tokens == 4
    finally:
        await engine.stop(grace=0)


@pytest.mark.asyncio
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_the_check_at_load_catches_a_wrong_delta(tiny_model, adapters, dtype):
    from tuneloop.engine.lora import read_adapter

    engine = await started(tiny_model, dtype=dtype)
    try:
        runner = engine.runner
        good = read_adapter("a3", adapters["a3"], runner.model)
        assert runner.check_adapter(good) == ""
        bad = read_adapter("a3", adapters["a3"], runner.model)
        path = next(iter(bad.weights))
        a, b = bad.weights[path]
        bad.weights[path] = (a, b * 1.5)  # not what the folder (and peft's merge) says
        assert "differ from the merged model's" in runner.check_adapter(bad)
        await engine.load_adapter("a3", adapters["a3"])
        assert engine.adapter_names() == ["a3"]
    finally:
        await engine.stop(grace=0)


@pytest.mark.asyncio
async def test_load_and_unload_between_steps_with_requests_in_flight(tiny_model, adapters):
    engine = await started(tiny_model)
    long = SamplingParams(max_new_tokens=150, ignore_eos=True)
    try:
        await engine.load_adapter("c", adapters["a1"])
        alone_a1 = await engine.complete(CONVS[1], long, adapter="c")
        await engine.load_adapter("tmp", adapters["a2"])
        alone_a2 = await engine.complete(CONVS[1], long, adapter="tmp")
        alone_base = await engine.complete(CONVS[1], long)
        await engine.unload_adapter("tmp")
        assert alone_a1.text != alone_a2.text

        # A request on "c" (a1) is decoding when "c" is replaced by a2 and then unloaded.
        first = engine.submit(CONVS[1], long, adapter="c")
        plain = engine.submit(CONVS[1], long)
        it = first.__aiter__()
        head = await it.__anext__()
        await engine.load_adapter("c", adapters["a2"])  # between two steps: the batch keeps running
        second = engine.submit(CONVS[1], long, adapter="c")
        third_it = second.__aiter__()
        second_head = await third_it.__anext__()
        await engine.unload_adapter("c")
        with pytest.raises(ModelError):
            engine.submit(CONVS[1], long, adapter="c")
        rest = [d async for d in it]
        second_rest = [d async for d in third_it]
        [d async for d in plain]
        assert head + "".join(rest) == alone_a1.text and first.result.model_version == "c"
        assert second_head + "".join(second_rest) == alone_a2.text
        assert plain.result.text == alone_base.text
        assert engine.adapter_names() == []
        await engine.complete(CONVS[0], SamplingParams(max_new_tokens=2))  # idle again: old stacks dropped
        assert engine.runner.bank.live == []
    finally:
        await engine.stop(grace=0)


def test_the_adapters_bench_runs_every_count_on_the_tiny_model(tiny_model):
    from bot.bench import format_adapters_table, run_adapters_bench

    result = run_adapters_bench(str(tiny_model), [1, 3], rank=4, alpha=8, targets="q_proj,v_proj", batch=6,
                                rounds=1, new_tokens=4, progress=False)
    assert [r["adapters"] for r in result["adapters"]] == [0, 1, 3]
    assert all(r["tokens_per_s"] > 0 for r in result["adapters"])
    assert result["adapters"][1]["vs_fewest"] == 1.0
    table = format_adapters_table(result)
    assert "none (base)" in table and "targets q_proj,v_proj" in table
