"""``tuneloop bench --peer llamacpp``: the local engine against llama.cpp on the same GGUF file.

llama.cpp (through ``llama-cpp-python``, the optional extra ``tuneloop[llamacpp]``)
is what a CPU user would run instead of tuneloop's engine. This bench puts the
two side by side in one process, on the same weights (the GGUF file
``[model] base`` names; the engine serves it dequantized, llama.cpp reads its
blocks as they are), the same prompts as token ids (the engine's chat
template, so both see identical prompts), the same number of new tokens,
greedy, and as many threads as the engine's decode step uses; llama.cpp also
on one thread when the engine uses more, because its threads wait for each
other by spinning and a busy machine can make two threads far slower than
one: the engine is compared with llama.cpp's faster thread count.

llama.cpp runs in a process of its own (``LlamaCpp``), as a user would run
it: in the engine's process it shares torch's OpenMP runtime (both load
``libgomp.so.1``, torch's copy first), which, counting the engine's idle
team beside llama.cpp's, sees more threads than cores and all but stops
spin-waiting; ggml meets at an OpenMP barrier after every op, and on 2
threads ran 29 tok/s there against 86 in a process of its own (this
machine, 2026-12-02). Its timings are taken inside that process, pipes
excluded.

Round after round: the engine with one request, llama.cpp with one request,
the engine with 16 requests at once (A B C A B C), so a neighbour's load
falls on all three alike and the ratios hold on a noisy machine. Then each
prompt once more through both, stopping at end of sequence, to count how
many greedy replies are identical.

Reported: tok/s, time to first token and latency for each way, the engine
alone / llama.cpp alone and the engine at 16 / llama.cpp alone, the share of
identical replies. llama-cpp-python's high-level API decodes one sequence at
a time, so llama.cpp is measured one request at a time only.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tuneloop.errors import ModelError

#: issue 14, 2 CPU cores, the default model
PEER_TARGETS = {
    "c1_vs_peer": 1.0,  # engine alone / llama.cpp alone
    "batch_vs_peer": 3.0,  # engine at 16 requests / llama.cpp alone
    "same_as_float32": 0.9,  # quantized engine's greedy replies equal to the float32 engine's
}

PEERS = ("llamacpp",)
EXTRA = "pip install 'tuneloop[llamacpp]'"


async def float32_agreement(model_path: str, device: str, convs: list, new_tokens: int,
                            replies: list[str]) -> dict[str, Any]:
    """How many of ``replies`` (greedy, to ``convs``) a float32 engine on dense weights gives word for word.

    The yardstick of a weight format: the same checkpoint, every weight and
    activation in float32. Batched like the replies it is compared with.
    """
    from tuneloop.engine.base import SamplingParams
    from tuneloop.engine.local import LocalEngine

    engine = LocalEngine(model_path, version="float32", device=device, dtype="float32", quantize="none",
                         max_batch=len(convs), max_queue=len(convs))
    await engine.start()
    try:
        theirs = await asyncio.gather(*(engine.complete(c, SamplingParams(max_new_tokens=new_tokens))
                                        for c in convs))
    finally:
        await engine.stop(grace=0)
    same = sum(mine == t.text for mine, t in zip(replies, theirs, strict=True))
    return {"same": same, "of": len(convs), "share": round(same / len(convs), 3),
            "differ": [{"prompt": c[-1]["content"], "engine": mine, "float32": t.text}
                       for c, mine, t in zip(convs, replies, theirs, strict=True) if mine != t.text]}


def weights_label(result: dict[str, Any]) -> str:
    """``bfloat16 weights`` or ``float32 weights, int4 (int16 activations, steps in C) for steps of up to 64 rows``."""
    label = f"{result['dtype']} weights"
    if result.get("quantize", "none") != "none":
        kernel = f" ({result['kernel']})" if result.get("kernel") else ""
        label += f", {result['quantize']}{kernel} for steps of up to {result['quant_rows']} rows"
        if result.get("half"):
            label += " (a bfloat16 copy above)"
    return label


def kernel_label(engine) -> str:
    """How the engine's quantized steps run: ``int16 activations, steps in C``; '' on dense weights."""
    decoder = engine._decoder
    if decoder is None or decoder.quantize == "none":
        return ""
    q = decoder.layers[0].qkv.quant
    parts = [f"{q.activations} activations" if q._lib is not None else q.backend]
    if decoder.native is not None:
        parts.append("steps in C")
    return ", ".join(parts)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Linux ``/proc/cpuinfo``): where ggml picks its AMX buffer type."""
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False


def peer_buffers() -> str:
    """How ``load_llamacpp`` lays llama.cpp's weights out on this machine, for the report."""
    if cpu_has_amx():
        return ("no extra buffer types: ggml's AMX path segfaults on prompts of more than one token "
                "(ggml-org/llama.cpp#20824)")
    return "ggml's defaults"


def _not_installed() -> ModelError:
    return ModelError(f"bench --peer llamacpp: llama-cpp-python is not installed; {EXTRA} "
                      "(it compiles llama.cpp: about 10 minutes on 2 cores)")


def check_installed() -> None:
    """A one-line ``ModelError`` naming the extra when llama-cpp-python is absent; it is not imported here."""
    try:
        found = importlib.util.find_spec("llama_cpp") is not None
    except (ImportError, ValueError):  # ValueError: hidden by a None in sys.modules
        found = False
    if not found:
        raise _not_installed()


def load_llamacpp(gguf_path: str | Path, threads: int, n_ctx: int):
    """``llama_cpp.Llama`` on ``gguf_path``, in this process; a one-line ``ModelError`` when the package or the file fails."""
    try:
        import llama_cpp
        import llama_cpp.llama as llama_module
    except ImportError:
        raise _not_installed() from None
    defaults = llama_module.llama_cpp.llama_model_default_params
    if cpu_has_amx():
        # On a CPU with AMX ggml repacks the weights into its AMX buffer type, whose
        # matrix multiply segfaults on any prompt longer than one token (reproduced here
        # with llama-cpp-python 0.3.36; ggml-org/llama.cpp#20824, closed unfixed). Turning
        # off extra buffer types (llama_model_params.use_extra_bufts) is the runtime way
        # round it, and Llama() takes no argument for it: wrap the defaults it reads.
        # It also turns off ggml's CPU repacking, which for this file's Q4_1 blocks
        # does not exist (its q8_0 embedding loses it).
        def no_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_module.llama_cpp.llama_model_default_params = no_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads,
                               n_ctx=n_ctx, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"bench --peer llamacpp: llama.cpp cannot load {gguf_path}: {e}") from None
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def _greedy(llm, prompt: list[int]):
    """llama.cpp's greedy token stream for ``prompt``.

    As a user runs it: ``generate`` keeps the previous request's cache for the
    beginning the two prompts share (the chat template and system prompt), as
    the engine keeps shared beginnings (``tuneloop.engine._prefix``); both
    compute only the rest of each prompt.
    """
    return llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)


def peer_one(llm, prompt: list[int], new_tokens: int) -> tuple[int, float, float]:
    """Exactly ``new_tokens`` greedy tokens (end of sequence ignored): count, time to first token, total."""
    t0 = time.perf_counter()
    first, made = None, 0
    for _ in _greedy(llm, prompt):
        made += 1
        if first is None:
            first = time.perf_counter()
        if made >= new_tokens:
            break
    t1 = time.perf_counter()
    return made, (first or t1) - t0, t1 - t0


def peer_reply(llm, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    """llama.cpp's greedy reply to ``prompt``: token ids up to end of sequence or ``max_tokens``."""
    out: list[int] = []
    for tok in _greedy(llm, prompt):
        if tok in eos:
            break
        out.append(tok)
        if len(out) >= max_tokens:
            break
    return out


class LlamaCpp:
    """llama.cpp on one GGUF file, in a process of its own (``python -m bot.bench_peer``); see the module doc.

    One JSON line per request and per answer on the child's stdin and stdout.
    A child that cannot load the file, or that dies (ggml can segfault),
    becomes a one-line ``ModelError`` here, not the end of the bench.
    """

    def __init__(self, gguf_path: str | Path, threads: int, n_ctx: int):
        self.threads = threads
        self._proc = subprocess.Popen([sys.executable, "-m", "bot.bench_peer", str(gguf_path), str(threads),
                                       str(n_ctx)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                      cwd=str(Path(__file__).resolve().parents[1]))
        self._ask(None)  # its first line: loaded, or why not

    def _ask(self, request: dict[str, Any] | None) -> dict[str, Any]:
        proc = self._proc
        try:
            if request is not None:
                proc.stdin.write(json.dumps(request) + "\n")
                proc.stdin.flush()
            line = proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            code = proc.wait()
            raise ModelError(f"bench --peer llamacpp: llama.cpp's process ended (exit status {code})")
        answer = json.loads(line)
        if "error" in answer:
            self.close()
            raise ModelError(answer["error"])
        return answer

    def one(self, prompt: list[int], new_tokens: int) -> tuple[int, float, float]:
        """``peer_one`` in the child: tokens made, time to first token, total seconds."""
        a = self._ask({"op": "one", "prompt": prompt, "new_tokens": new_tokens})
        return a["made"], a["first"], a["total"]

    def reply(self, prompt: list[int], max_tokens: int, eos: set[int]) -> list[int]:
        """``peer_reply`` in the child."""
        return self._ask({"op": "reply", "prompt": prompt, "max_tokens": max_tokens, "eos": sorted(eos)})["tokens"]

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own token ids for ``text`` (special tokens parsed, no BOS added)."""
        return self._ask({"op": "tokenize", "text": text})["tokens"]

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            try:
                proc.stdin.close()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _serve(gguf_path: str, threads: int, n_ctx: int) -> int:
    """The child of ``LlamaCpp``: load, say so, answer requests until stdin closes."""
    # Our answers get a private copy of stdout; whatever llama.cpp's C code prints goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def say(answer: dict[str, Any]) -> None:
        out.write(json.dumps(answer) + "\n")
        out.flush()

    try:
        llm = load_llamacpp(gguf_path, threads, n_ctx)
    except ModelError as e:
        say({"error": str(e)})
        return 1
    say({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "one":
            made, first, total = peer_one(llm, req["prompt"], req["new_tokens"])
            say({"made": made, "first": first, "total": total})
        elif req["op"] == "reply":
            say({"tokens": peer_reply(llm, req["prompt"], req["max_tokens"], set(req["eos"]))})
        elif req["op"] == "tokenize":
            say({"tokens": llm.tokenize(req["text"].encode(), add_bos=False, special=True)})
        else:
            say({"error": f"bench --peer llamacpp: unknown request {req['op']!r}"})
    llm.close()  # before the interpreter's teardown, which frees the model after its library
    return 0


def run_peer_bench(gguf_path: str | Path, model_path: str, *, prompts: list[str] | tuple[str, ...],
                   rounds: int, new_tokens: int, batch: int = 16, device: str = "auto", dtype: str = "auto",
                   fused_decode: bool = True, progress: bool = True, quantize: str = "none") -> dict[str, Any]:
    """Measure the engine (alone and at ``batch``) against llama.cpp alone, alternating; see the module doc."""
    return asyncio.run(_peer_bench(Path(gguf_path), str(model_path), list(prompts), rounds=rounds,
                                   new_tokens=new_tokens, batch=batch, device=device, dtype=dtype,
                                   fused_decode=fused_decode, progress=progress, quantize=quantize))


def _rate(tokens: int, seconds: float, ttfts: list[float], totals: list[float]) -> dict[str, Any]:
    import statistics

    return {"tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
            "ttft_p50": round(statistics.median(ttfts), 4), "latency_p50": round(statistics.median(totals), 4)}


async def _peer_bench(gguf_path: Path, model_path: str, prompts: list[str], *, rounds, new_tokens, batch, device,
                      dtype, fused_decode, progress, quantize) -> dict[str, Any]:
    import torch

    from tuneloop.engine.base import SamplingParams
    from tuneloop.engine.local import LocalEngine

    def say(msg: str) -> None:
        if progress:
            print(f"bench: {msg}", flush=True)

    if not gguf_path.is_file():
        raise ModelError(f"bench --peer llamacpp: {gguf_path} is not a file")
    engine = LocalEngine(model_path, version="bench", device=device, dtype=dtype, max_batch=batch,
                         max_queue=batch * 4, fused_decode=fused_decode, quantize=quantize)
    await engine.start()
    llms: dict[int, LlamaCpp] = {}
    try:
        convs = [[{"role": "user", "content": p}] for p in prompts]
        encoded = [engine.encode(c) for c in convs]
        decoder = engine._decoder
        # The engine's steps run on torch's threads, widened where measured
        # faster (Decoder.widen): llama.cpp gets as many.
        threads = max(torch.get_num_threads(), (decoder.wide_threads or 0) if decoder is not None else 0)
        n_ctx = max(len(p) for p in encoded) + max(new_tokens, 64) + 16
        counts = sorted({1, threads})
        say(f"llama.cpp: {gguf_path.name}, " + " and ".join(map(str, counts)) + f" threads, n_ctx {n_ctx}")
        for n in counts:
            llms[n] = LlamaCpp(gguf_path, n, n_ctx)
        llm = llms[threads]
        # Both tokenizers come from the file; the bench feeds both the engine's
        # ids, and says whether llama.cpp would have made the same ones.
        text = [engine.tokenizer.decode(p) for p in encoded]
        same_prompt = sum(llm.tokenize(t) == p for t, p in zip(text, encoded, strict=True))

        fixed = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        await engine.complete(convs[0], SamplingParams(max_new_tokens=4, ignore_eos=True))  # warm both
        for one in llms.values():
            one.one(encoded[0], 4)
        say(f"{rounds} rounds of: engine alone, llama.cpp alone on " + " and ".join(map(str, counts))
            + f" threads, engine with {batch} requests; {new_tokens} tokens per request")
        alone, waves = [], []
        peers: dict[int, list] = {n: [] for n in counts}
        for i in range(rounds):
            alone.append(await engine.complete(convs[i % len(convs)], fixed))
            for n, one in llms.items():
                peers[n].append(one.one(encoded[i % len(encoded)], new_tokens))
            t0 = time.perf_counter()
            done = await asyncio.gather(*(engine.complete(convs[(i * batch + k) % len(convs)], fixed)
                                          for k in range(batch)))
            waves.append((time.perf_counter() - t0, done))

        say(f"greedy replies to {len(prompts)} prompts, up to {new_tokens} tokens, through both")
        replies = await asyncio.gather(*(engine.complete(c, SamplingParams(max_new_tokens=new_tokens))
                                         for c in convs))
        eos = set(engine.runner.eos)
        pairs = []
        for conv, prompt, mine in zip(convs, encoded, replies, strict=True):
            theirs = engine.tokenizer.decode(llm.reply(prompt, new_tokens, eos), skip_special_tokens=True)
            pairs.append({"prompt": conv[0]["content"], "engine": mine.text, "llamacpp": theirs})
        n_params = sum(p.numel() for p in engine.model.parameters())
        model_dtype = str(engine.model.dtype).removeprefix("torch.")
        chosen, rows = engine.runner.weights_format, engine.runner.quant_rows
        half = engine._decoder is not None and engine._decoder.half
        kernel = kernel_label(engine)
    finally:
        for one in llms.values():
            one.close()
        await engine.stop(grace=0)
    same32 = None
    if model_dtype != "float32" or chosen != "none":
        say("the same greedy replies through a float32 engine on dense weights")
        same32 = await float32_agreement(model_path, device, convs, new_tokens, [r.text for r in replies])

    def ttft(c) -> float:
        return c.time_to_first_token if c.time_to_first_token is not None else c.total_time

    e1 = _rate(sum(c.completion_tokens for c in alone), sum(c.total_time for c in alone),
               [ttft(c) for c in alone], [c.total_time for c in alone])
    by_threads = {k: _rate(sum(n for n, _, _ in v), sum(t for _, _, t in v), [f for _, f, _ in v],
                           [t for _, _, t in v]) for k, v in peers.items()}
    best = max(by_threads, key=lambda k: by_threads[k]["tokens_per_s"])
    p1 = by_threads[best]
    flat = [c for _, done in waves for c in done]
    eb = _rate(sum(c.completion_tokens for c in flat), sum(w for w, _ in waves), [ttft(c) for c in flat],
               [c.total_time for c in flat])
    agree = sum(p["engine"] == p["llamacpp"] for p in pairs)
    c1_ratio = e1["tokens_per_s"] / p1["tokens_per_s"]
    batch_ratio = eb["tokens_per_s"] / p1["tokens_per_s"]
    return {
        "peer": "llamacpp", "gguf": str(gguf_path), "model": model_path, "parameters": n_params,
        "device": str(engine.device), "dtype": model_dtype, "quantize": chosen, "quant_rows": rows, "half": half,
        "kernel": kernel, "decode_step": engine.decode_step, "same_as_float32": same32,
        "threads": threads, "new_tokens": new_tokens, "rounds": rounds, "batch": batch,
        "engine_c1": e1, "llamacpp_c1": p1, "llamacpp_threads": best, "engine_batch": eb,
        "llamacpp_by_threads": {str(k): v for k, v in by_threads.items()},
        "c1_vs_peer": round(c1_ratio, 3), "batch_vs_peer": round(batch_ratio, 3),
        "llamacpp_buffers": peer_buffers(), "same_prompt_tokens": same_prompt, "prompts": len(pairs), "identical_replies": agree,
        "agreement": round(agree / len(pairs), 3), "replies": pairs,
        "targets": {
            f"engine c=1 >= {PEER_TARGETS['c1_vs_peer']:.1f}x llama.cpp c=1": c1_ratio >= PEER_TARGETS["c1_vs_peer"],
            f"engine c={batch} >= {PEER_TARGETS['batch_vs_peer']:.0f}x llama.cpp c=1":
                batch_ratio >= PEER_TARGETS["batch_vs_peer"],
            **({f"greedy replies equal to float32's >= {PEER_TARGETS['same_as_float32']:.0%}":
                same32["share"] >= PEER_TARGETS["same_as_float32"]} if same32 else {}),
        },
    }


def format_peer_table(result: dict[str, Any]) -> str:
    """The peer bench as a plain-text table."""
    w = 26
    head = f"{'run':<{w}}{'tok/s':>10}{'ttft p50':>10}{'lat p50':>10}{'vs llama.cpp c=1':>18}"
    rows = [("engine c=1", result["engine_c1"])]
    rows += [(f"llama.cpp c=1, {k} thread" + ("s" if k != "1" else ""), r)
             for k, r in result["llamacpp_by_threads"].items()]
    rows.append((f"engine c={result['batch']}", result["engine_batch"]))
    peer = result["llamacpp_c1"]["tokens_per_s"]
    lines = [
        f"engine: {result['model']} ({result['parameters'] / 1e6:.1f}M params) on {result['device']}, "
        f"{weights_label(result)}, {result['decode_step']} decode step; llama.cpp: {result['gguf']} as it is "
        f"({result.get('llamacpp_buffers', 'ggml defaults')}); "
        f"engine on {result['threads']} threads, {result['new_tokens']} new tokens per request, greedy, "
        f"{result['rounds']} rounds; ratios against llama.cpp on {result['llamacpp_threads']} "
        f"thread{'s' if result['llamacpp_threads'] != 1 else ''}, its faster",
        head,
        "-" * len(head),
    ]
    for name, r in rows:
        ratio = f"{r['tokens_per_s'] / peer:.2f}x" if peer else "-"
        lines.append(f"{name:<{w}}{r['tokens_per_s']:>10.1f}{r['ttft_p50']:>10.3f}{r['latency_p50']:>10.3f}"
                     f"{ratio:>18}")
    lines.append(f"identical greedy replies (up to {result['new_tokens']} tokens): {result['identical_replies']}/"
                 f"{result['prompts']} ({result['agreement']:.0%}); prompt tokens llama.cpp's tokenizer makes "
                 f"the same: {result['same_prompt_tokens']}/{result['prompts']}")
    if result.get("same_as_float32"):
        s = result["same_as_float32"]
        lines.append(f"identical to a float32 engine's greedy replies: {s['same']}/{s['of']} ({s['share']:.0%})")
    for name, ok in result.get("targets", {}).items():
        lines.append(f"  [{'ok' if ok else 'MISSED'}] {name}")
    return "\n".join(lines)


if __name__ == "__main__":  # LlamaCpp's child: python -m bot.bench_peer GGUF THREADS N_CTX
    sys.exit(_serve(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
