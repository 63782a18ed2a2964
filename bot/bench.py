"""``tuneloop bench``: the local engine against naive generation, same model, same process.

Three ways to produce the same greedy tokens (a fixed count, eos ignored):

- naive: ``model.generate`` once per request, one request after another;
- engine: ``LocalEngine`` with 1, 8, 32 concurrent clients;
- tight loop: the model's own batched forward pass, prefill a batch then
  decode step after step, no engine around it: once with the decode step the
  engine uses (the fused step of ``tuneloop/engine/_decode.py`` where it applies)
  and once with transformers' ``forward`` and its ``DynamicCache``.

It reports generated tokens/s, time to first token and end-to-end latency
(p50 / p95) for each, the engine's speed-up over naive and its share of the
tight loop's speed at the same batch size. Timings are only as quiet as the
machine; nothing here asserts a speed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

PROMPTS: tuple[str, ...] = (
    "hi",
    "What is your name?",
    "Tell me a joke about computers.",
    "How are you today?",
    "What do you like to do in your free time?",
    "Can you help me write an email to my team about the release?",
    "What is the capital of France?",
    "Do you like music? What kind?",
    "Explain what a neural network is in simple words.",
    "Good morning! Any plans for the weekend?",
    "What is the difference between a list and a tuple in Python?",
    "Recommend a good book, please.",
    "Why is the sky blue?",
    "I feel tired today.",
    "What time is it?",
    "Tell me about yourself.",
)

#: What the issue asks of the engine on the starter model, 2 CPU cores.
TARGETS = {
    "speedup_at_32": 20.0,  # engine tokens/s at concurrency 32 / naive
    "ttft_p95_s": 1.0,
    "vs_tight_loop": 0.70,
    "slowdown_at_1": 0.10,  # engine at concurrency 1 at most this much slower than naive
}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _summary(tokens: int, wall: float, ttfts: list[float], latencies: list[float]) -> dict[str, float]:
    return {
        "requests": len(latencies),
        "tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else 0.0,
        "ttft_p50": round(_pct(ttfts, 0.5), 4),
        "ttft_p95": round(_pct(ttfts, 0.95), 4),
        "latency_p50": round(_pct(latencies, 0.5), 4),
        "latency_p95": round(_pct(latencies, 0.95), 4),
    }


class _FirstToken:
    """A ``generate`` streamer that notes when the first new token arrives."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2 and self.first is None:  # the first call carries the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _naive_one(model, prompt: list[int], new_tokens: int, pad_id: int) -> tuple[int, float, float]:
    """One ``model.generate``: tokens made, time to first token, total time."""
    import torch

    from tuneloop.engine.policy import generate_kwargs

    with torch.inference_mode():
        ids = torch.tensor([prompt], device=model.device)
        streamer = _FirstToken()
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            streamer=streamer,
            # the engine's decoding policy, whatever the model's generation_config adds
            **generate_kwargs(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id),
        )
        t1 = time.perf_counter()
    return out.shape[1] - ids.shape[1], (streamer.first or t1) - t0, t1 - t0


def _tight_loop(model, prompts: list[list[int]], new_tokens: int, pad_id: int, decoder=None) -> dict[str, Any]:
    """Batched decoding with nothing around it: prefill, then one step after another.

    With ``decoder`` (the engine's fused step) the cache is the engine's own
    slab; without, transformers' ``forward`` and ``DynamicCache``.
    """
    import torch
    from transformers import DynamicCache

    from tuneloop.engine._batch import Batch, last_logits, left_pad
    from tuneloop.engine._decode import greedy

    with torch.inference_mode():
        t0 = time.perf_counter()
        if decoder is not None:
            batch, logits = decoder.prefill(prompts)
            batch = Batch.merge([(batch, None)], new_tokens)

            def step(nxt: torch.Tensor) -> torch.Tensor:
                logits = decoder.step(nxt, batch)
                batch.advance()
                return logits

        else:
            ids, mask, pos = left_pad(prompts, pad_id, model.device)
            cache = DynamicCache(config=model.config)
            ones = mask.new_ones(len(prompts), 1)

            logits = last_logits(model, ids, mask, pos, cache)
            pos = pos[:, -1:] + 1

            def step(nxt: torch.Tensor) -> torch.Tensor:
                nonlocal mask, pos
                mask = torch.cat([mask, ones], dim=1)
                logits = last_logits(model, nxt, mask, pos, cache)
                pos = pos + 1
                return logits

        nxt = greedy(logits).unsqueeze(1)
        produced = len(prompts)
        for _ in range(new_tokens - 1):
            nxt = greedy(step(nxt)).unsqueeze(1)
            nxt.tolist()  # the host sees every token, as any server must
            produced += len(prompts)
        wall = time.perf_counter() - t0
    return {
        "batch": len(prompts),
        "step": "fused" if decoder is not None else "transformers",
        "tokens": produced,
        "seconds": wall,
        "tokens_per_s": round(produced / wall, 1),
    }


async def _wave(engine, convs: list, clients: int, first: int, params) -> tuple[float, list]:
    """``clients`` requests sent at once (conversations from ``first`` on); wall time and completions."""
    start = time.perf_counter()
    done = await asyncio.gather(
        *(engine.complete(convs[(first + k) % len(convs)], params) for k in range(clients))
    )
    return time.perf_counter() - start, list(done)


def _loops_summary(loops: list[dict[str, Any]]) -> dict[str, Any]:
    tokens, seconds = sum(t["tokens"] for t in loops), sum(t["seconds"] for t in loops)
    return {**loops[0], "tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def _completions_summary(wall: float, done: list) -> dict[str, Any]:
    ttfts = [c.time_to_first_token if c.time_to_first_token is not None else c.total_time for c in done]
    return _summary(sum(c.completion_tokens for c in done), wall, ttfts, [c.total_time for c in done])


def run_bench(
    model_path: str,
    *,
    concurrencies: tuple[int, ...] = (1, 8, 32),
    new_tokens: int = 64,
    prompts: tuple[str, ...] | list[str] = PROMPTS,
    device: str = "auto",
    rounds: int = 16,
    progress: bool = True,
    threads: int | None = None,
    fused_decode: bool = True,
) -> dict[str, Any]:
    """Measure naive generate, the engine at each concurrency and the tight batched loop."""
    return asyncio.run(
        _bench(
            model_path,
            concurrencies=tuple(concurrencies),
            new_tokens=new_tokens,
            prompts=list(prompts),
            device=device,
            rounds=rounds,
            progress=progress,
            threads=threads,
            fused_decode=fused_decode,
        )
    )


async def _bench(
    model_path: str,
    *,
    concurrencies,
    new_tokens,
    prompts,
    device,
    rounds,
    progress,
    threads,
    fused_decode,
) -> dict[str, Any]:
    import torch

    from tuneloop.engine.base import SamplingParams
    from tuneloop.engine.local import LocalEngine

    def say(msg: str) -> None:
        if progress:
            print(f"bench: {msg}", flush=True)

    engine = LocalEngine(
        str(model_path),
        version="bench",
        device=device,
        max_batch=max(concurrencies),
        max_queue=max(concurrencies) * 4,
        threads=threads,
        fused_decode=fused_decode,
    )
    await engine.start()
    try:
        model = engine.model
        convs = [[{"role": "user", "content": p}] for p in prompts]
        encoded = [engine.encode(c) for c in convs]
        pad = engine._pad
        # Warm both paths (allocator, kernels) before any clock runs.
        await asyncio.gather(
            *(engine.complete(c, SamplingParams(max_new_tokens=4, ignore_eos=True)) for c in convs[:4])
        )
        _naive_one(model, encoded[0], 4, pad)

        # Round after round: one naive generate, one engine request alone, then
        # one request from each of c clients at once for every c. Every way is
        # timed in every round, so a neighbour's load on the machine falls on
        # all of them alike and the ratios hold even when the machine is noisy.
        multi = [c for c in concurrencies if c > 1]
        say(f"{rounds} rounds of: naive generate, engine alone" + "".join(f", {c} clients" for c in multi)
            + f", tight loops of batch {max(concurrencies)}; {new_tokens} tokens per request")
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        naive_runs, alone = [], []
        waves: dict[int, list[tuple[float, list]]] = {c: [] for c in multi}
        # The tight loops run on the engine's own thread, as the engine runs its
        # steps: torch's thread settings and OpenMP workers belong to a thread.
        batch = max(concurrencies)
        batch_prompts = [encoded[i % len(encoded)] for i in range(batch)]
        decoder = engine._decoder
        tights: dict[str, list[dict]] = {"engine": [], "transformers": []}
        for i in range(rounds):
            naive_runs.append(_naive_one(model, encoded[i % len(encoded)], new_tokens, pad))
            alone.append(await engine.complete(convs[i % len(convs)], params))
            for c in multi:
                waves[c].append(await _wave(engine, convs, c, i * c, params))
            tights["engine"].append(
                await engine.run_exclusive(lambda: _tight_loop(model, batch_prompts, new_tokens, pad, decoder))
            )
            if decoder is not None:
                tights["transformers"].append(
                    await engine.run_exclusive(lambda: _tight_loop(model, batch_prompts, new_tokens, pad))
                )
        tight = _loops_summary(tights["engine"])
        tight_hf = _loops_summary(tights["transformers"]) if decoder is not None else tight
        naive = _summary(
            sum(n for n, _, _ in naive_runs),
            sum(t for _, _, t in naive_runs),
            [f for _, f, _ in naive_runs],
            [t for _, _, t in naive_runs],
        )
        runs = []
        for c in concurrencies:
            if c == 1:
                r = _completions_summary(sum(a.total_time for a in alone), alone)
            else:
                r = _completions_summary(sum(w for w, _ in waves[c]), [x for _, done in waves[c] for x in done])
            r["concurrency"] = c
            r["vs_naive"] = round(r["tokens_per_s"] / naive["tokens_per_s"], 2)
            runs.append(r)
        at_batch = next(r for r in runs if r["concurrency"] == batch)
        n_params = sum(p.numel() for p in model.parameters())
    finally:
        await engine.stop(grace=0)

    result: dict[str, Any] = {
        "model": str(model_path),
        "parameters": n_params,
        "device": str(engine.device),
        "torch_threads": torch.get_num_threads(),
        "decode_step": engine.decode_step,
        # intra-op threads the fused step and prefill take when measured faster
        "wide_threads": engine._decoder.wide_threads if engine._decoder is not None else None,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "naive": naive,
        "engine": runs,
        "tight_loop": tight,
        "tight_loop_transformers": tight_hf,
        "engine_vs_tight": round(at_batch["tokens_per_s"] / tight["tokens_per_s"], 3),
        "engine_vs_tight_transformers": round(at_batch["tokens_per_s"] / tight_hf["tokens_per_s"], 3),
    }
    checks = {}
    if 32 in concurrencies:
        r32 = next(r for r in runs if r["concurrency"] == 32)
        checks["speedup_at_32 >= 20x"] = r32["vs_naive"] >= TARGETS["speedup_at_32"]
        checks["ttft_p95 at 32 < 1s"] = r32["ttft_p95"] < TARGETS["ttft_p95_s"]
    if 1 in concurrencies:
        r1 = next(r for r in runs if r["concurrency"] == 1)
        checks["concurrency 1 within 10% of naive"] = r1["vs_naive"] >= 1 - TARGETS["slowdown_at_1"]
    checks["engine >= 70% of tight loop"] = result["engine_vs_tight"] >= TARGETS["vs_tight_loop"]
    result["targets"] = checks
    return result


def format_table(result: dict[str, Any]) -> str:
    """The bench result as a plain-text table."""
    w = 26
    head = f"{'run':<{w}}{'tok/s':>10}{'ttft p50':>10}{'ttft p95':>10}{'lat p50':>10}{'lat p95':>10}{'vs naive':>10}"
    lines = [
        f"model {result['model']} ({result['parameters'] / 1e6:.1f}M params) on {result['device']}, "
        f"{result['torch_threads']} torch threads"
        + (f" ({result['wide_threads']} per step where measured faster)" if result.get("wide_threads") else "")
        + f", {result['decode_step']} decode step, "
        f"{result['new_tokens']} new tokens per request, greedy",
        head,
        "-" * len(head),
    ]
    naive = result["naive"]["tokens_per_s"]

    def row(name: str, r: dict) -> str:
        ratio = f"{r['tokens_per_s'] / naive:.2f}x" if naive else "-"
        if "ttft_p50" not in r:
            return f"{name:<{w}}{r['tokens_per_s']:>10.1f}{'':>40}{ratio:>10}"
        return (
            f"{name:<{w}}{r['tokens_per_s']:>10.1f}{r['ttft_p50']:>10.3f}{r['ttft_p95']:>10.3f}"
            f"{r['latency_p50']:>10.3f}{r['latency_p95']:>10.3f}{ratio:>10}"
        )

    lines.append(row("naive generate", result["naive"]))
    for r in result["engine"]:
        lines.append(row(f"engine c={r['concurrency']}", r))
    tights = [result["tight_loop"]]
    if result["tight_loop_transformers"]["step"] != tights[0]["step"]:
        tights.append(result["tight_loop_transformers"])
    for t in tights:
        lines.append(row(f"tight loop b={t['batch']} ({t['step']})", t))
    t = tights[0]
    share = f"engine / tight loop at batch {t['batch']}: {result['engine_vs_tight']:.0%} ({t['step']} step)"
    if len(tights) > 1:
        share += f", {result['engine_vs_tight_transformers']:.0%} (transformers' forward)"
    lines.append(share)
    for name, ok in result.get("targets", {}).items():
        lines.append(f"  [{'ok' if ok else 'MISSED'}] {name}")
    return "\n".join(lines)


def bench_main(config, json_out: bool = False) -> int:
    """``tuneloop bench``: resolve ``[model] base`` and print the table (or JSON)."""
    from trainer.models import resolve_base

    path = resolve_base(config.model.base, progress=not json_out)
    result = run_bench(
        path, device=config.model.device, progress=not json_out, fused_decode=config.model.fused_decode
    )
    print(json.dumps(result, indent=2) if json_out else format_table(result))
    return 0
