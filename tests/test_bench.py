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
