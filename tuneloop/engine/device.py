"""Which device and dtype a model runs on: ``[model] device`` and ``dtype`` made concrete.

``dtype = "auto"`` is bfloat16 on CUDA. On a CPU it is decided by
measurement, once per process: a decode-sized matrix multiply (16 rows
through a 576 x 1536 weight, the shape of SmolLM2's MLP, the default model's)
in bfloat16 and in float32; bfloat16 wins only where it is clearly faster
(CPUs with AVX-512 BF16 or AMX run it natively; elsewhere it is emulated and
slower than float32). Decoding a token reads every weight once, so halving
the bytes also halves the memory traffic that bounds one request at a time.
``TUNELOOP_CPU_DTYPE`` (float32 or bfloat16) overrides the measurement, for
runs that must be the same on every machine (the test suite sets float32).
"""

from __future__ import annotations

import functools
import logging
import os
import time

from tuneloop.errors import ModelError

log = logging.getLogger(__name__)

#: bfloat16 must be at least this much faster than float32 to be the CPU default.
BF16_MIN_SPEEDUP = 1.3
_NAMES = ("float32", "bfloat16", "float16")


def pick_device(device: str) -> str:
    """``auto`` means CUDA when present, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"model.device: {device!r} asked for but no CUDA device is available")
    return device


def pick_dtype(dtype: str, device: str):
    """``auto``: bfloat16 on CUDA; on a CPU, whichever of bfloat16 and float32 measures faster."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        if device == "cpu":
            forced = os.environ.get("TUNELOOP_CPU_DTYPE", "")
            if forced:
                if forced not in _NAMES:
                    raise ModelError(f"TUNELOOP_CPU_DTYPE: must be one of {', '.join(_NAMES)}, got {forced!r}")
                return getattr(torch, forced)
            return torch.bfloat16 if cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else torch.float32
        return torch.float32
    return getattr(torch, dtype)


@functools.cache
def cpu_bf16_speedup(rows: int = 16, width: int = 576, out: int = 1536, repeats: int = 7) -> float:
    """float32 time / bfloat16 time of a decode-sized matrix multiply on this CPU (this thread's threads).

    Alternating runs, best of ``repeats`` each, so a busy neighbour slows both
    alike rather than one (about 20 ms in all).
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    x32, w32 = torch.randn(rows, width, generator=gen), torch.randn(width, out, generator=gen)
    pairs = {torch.float32: (x32, w32), torch.bfloat16: (x32.bfloat16(), w32.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    with torch.inference_mode():
        for x, w in pairs.values():  # first calls pay for the library's set-up
            torch.mm(x, w)
        for _ in range(repeats):
            for dt, (x, w) in pairs.items():
                t0 = time.perf_counter()
                for _ in range(8):
                    torch.mm(x, w)
                best[dt] = min(best[dt], time.perf_counter() - t0)
    speedup = best[torch.float32] / best[torch.bfloat16]
    log.info("cpu dtype: bfloat16 matrix multiply %.2fx float32's (bfloat16 when >= %.1fx)",
             speedup, BF16_MIN_SPEEDUP)
    return speedup
