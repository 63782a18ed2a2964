"""The engine benchmark returns every figure (speed itself is reported, never asserted)."""

from __future__ import annotations

import pytest

from bot.bench import format_table, run_bench

pytestmark = pytest.mark.timeout(120)


def test_bench_reports_every_figure(tiny_model):
    result = run_bench(str(tiny_model), concurrencies=(1, 4), new_tokens=8, rounds=2, progress=False)
    figures = ("tokens_per_s", "ttft_p50", "ttft_p95", "latency_p50", "latency_p95", "requests")
    for key in figures:
        assert result["naive"][key] >= 0
    assert [r["concurrency"] for r in result["engine"]] == [1, 4]
    for r in result["engine"]:
        for key in figures + ("vs_naive",):
            assert r[key] >= 0
        assert r["tokens"] == r["requests"] * 8
    assert result["tight_loop"]["batch"] == 4 and result["tight_loop"]["tokens_per_s"] > 0
    # The tiny model is a Llama: the engine decodes with the fused step, and the
    # bench measures transformers' forward beside it.
    assert result["decode_step"] == "fused" and result["tight_loop"]["step"] == "fused"
    assert result["tight_loop_transformers"]["step"] == "transformers"
    assert result["tight_loop_transformers"]["tokens_per_s"] > 0
    assert result["engine_vs_tight"] > 0
    assert "engine >= 70% of tight loop" in result["targets"]
    table = format_table(result)
    assert "naive generate" in table and "engine c=4" in table and "tight loop b=4 (fused)" in table
    # The machine's own limits, measured in the same run, and the engine against them.
    machine, bounds = result["machine"], result["bounds"]
    assert machine["read_gb_s"] > 0 and machine["fp32_gemm_gflop_s"] > 0 and machine["gemm_rows"] == 16
    n = result["parameters"]
    assert bounds["bandwidth_tokens_per_s"] == pytest.approx(machine["read_gb_s"] * 1e9 / (4 * n), rel=1e-3)
    assert bounds["compute_tokens_per_s"] == pytest.approx(machine["fp32_gemm_gflop_s"] * 1e9 / (2 * n), rel=1e-3)
    c1 = result["engine"][0]["tokens_per_s"]
    assert bounds["c1_share"] == pytest.approx(c1 / bounds["bandwidth_tokens_per_s"], abs=1e-3)
    assert "c=1 >= 50% of the float32 weight-streaming bound" in result["targets"]
    assert "c=16 >= 30% of the float32 compute bound" not in result["targets"]  # no 16 clients measured
    assert "float32 bounds:" in table and "GB/s read" in table


def test_a_quantized_bench_says_so_and_compares_with_float32(tiny_model):
    result = run_bench(str(tiny_model), concurrencies=(1, 2), new_tokens=6, rounds=1, progress=False,
                       dtype="float32", quantize="int4")
    assert result["quantize"] == "int4" and result["quant_rows"] >= 1
    same = result["same_as_float32"]
    assert same["of"] == 16 and 0 <= same["same"] <= 16 and len(same["differ"]) == 16 - same["same"]
    assert same["share"] == pytest.approx(same["same"] / 16, abs=1e-3)
    assert "greedy replies equal to float32's >= 90%" in result["targets"]
    table = format_table(result)
    from bot.bench_peer import weights_label

    kernel = f" ({result['kernel']})" if result["kernel"] else ""  # e.g. "int16 activations, steps in C"
    assert weights_label(result).startswith(f"float32 weights, int4{kernel} for ")
    assert weights_label(result) in table
    assert f"identical to a float32 engine's greedy replies: {same['same']}/16" in table


def test_plan_scales_to_the_model(tiny_model):
    from transformers import AutoModelForCausalLM

    from bot.bench import model_parameters, plan

    n = model_parameters(str(tiny_model))
    assert n == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    assert plan(n)["concurrencies"] == (1, 8, 32)
    big = plan(135_000_000)
    assert big["concurrencies"] == (1, 16) and big["rounds"] * big["new_tokens"] < 16 * 64


def test_write_markdown_rewrites_its_own_section(tmp_path):
    from bot.bench import write_markdown

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nIntro kept.\n")
    fake = {"model": "m", "parameters": 1e6, "device": "cpu", "torch_threads": 1, "dtype": "float32",
            "decode_step": "fused", "new_tokens": 8, "naive": {"tokens_per_s": 10.0, "ttft_p50": 0.1,
            "ttft_p95": 0.1, "latency_p50": 1, "latency_p95": 1}, "engine": [],
            "tight_loop": {"batch": 4, "step": "fused", "tokens_per_s": 40.0},
            "tight_loop_transformers": {"batch": 4, "step": "fused", "tokens_per_s": 40.0},
            "engine_vs_tight": 1.0, "targets": {}}
    write_markdown(doc, "a", "model a", "tuneloop bench --write x", [fake])
    write_markdown(doc, "b", "model b", "tuneloop bench", [fake])
    write_markdown(doc, "a", "model a", "tuneloop bench --dtype bfloat16", [{**fake, "dtype": "bfloat16"}])
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nIntro kept.\n")
    assert text.count("<!-- bench:a -->") == 1 and text.count("<!-- bench:b -->") == 1
    assert "### bfloat16 weights" in text and "--write x" not in text  # section a was replaced
    assert text.index("<!-- bench:a -->") < text.index("<!-- bench:b -->")  # in place, not moved
    assert "Measured 20" in text and " cores" in text


@pytest.fixture(scope="module")
def banning_model(tiny_model, tmp_path_factory):
    """The tiny model with a generation_config that bans repeats, as the starter's once did."""
    import shutil

    from transformers import GenerationConfig

    folder = tmp_path_factory.mktemp("banning") / "model"
    shutil.copytree(tiny_model, folder)
    config = GenerationConfig.from_pretrained(folder)
    config.no_repeat_ngram_size, config.repetition_penalty = 2, 1.5
    config.save_pretrained(folder)
    return folder


async def test_baseline_and_starter_eval_decode_as_the_engine_does(banning_model):
    """One decoding policy: generate with ``generate_kwargs`` and starter_eval give the engine's replies."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.starter_eval import generate_replies
    from tuneloop.engine.base import SamplingParams
    from tuneloop.engine.local import LocalEngine
    from tuneloop.engine.policy import generate_kwargs

    prompts = ["hi", "What is your name?", "Do you like music?", "Tell me a joke.", "Good morning!"]
    engine = LocalEngine(str(banning_model), version="base", max_batch=4)
    await engine.start()
    try:
        ids = [engine.encode([{"role": "user", "content": p}]) for p in prompts]
        params = SamplingParams(max_new_tokens=24)
        served = [(await engine.complete([{"role": "user", "content": p}], params)).text for p in prompts]
    finally:
        await engine.stop(grace=0)
    model = AutoModelForCausalLM.from_pretrained(banning_model).eval()
    tok = AutoTokenizer.from_pretrained(banning_model)
    banned_differs = False
    for prompt, text in zip(ids, served, strict=True):
        x = torch.tensor([prompt])
        with torch.inference_mode():
            ours = model.generate(x, **generate_kwargs(max_new_tokens=24, pad_token_id=0))
            theirs = model.generate(x, max_new_tokens=24, do_sample=False, pad_token_id=0)
        assert tok.decode(ours[0, x.shape[1]:], skip_special_tokens=True) == text
        banned_differs |= not torch.equal(ours, theirs)
    assert banned_differs, "the model's own generation_config should change some reply (else this proves nothing)"
    assert generate_replies(model, tok, prompts, max_new_tokens=24) == [t.strip() for t in served]
