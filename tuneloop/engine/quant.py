"""Weight-only quantized copies of the fused step's weights: int8 and int4, on a CPU.

Why. Decoding one request at a time reads every weight once per token, so
its speed is memory traffic: SmolLM2-135M reads 540 MB a token in float32,
270 in bfloat16, 68 in int4. torch ships CPU kernels that multiply by
quantized weights without widening them in memory
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``; gpt-fast and
torchao build their weight-only inference on the same ones), so nothing
here is a kernel of ours: this module only lays weights out for them.

Formats (``[model] quantize``):

- ``int4``: groups of 32 inputs per output row, each with its own scale and
  minimum (asymmetric, 16 levels), the layout of GGUF's Q4_1 blocks. A
  weight that came from Q4_1 blocks (the default model's GGUF, dequantized
  by the conversion) is requantized to the very codes of the file: each
  block's minimum and maximum are codes 0 and 15, so they give back its
  scale and minimum (``tests/test_quant.py`` checks it against the file's
  blocks). The kernels take the scale and zero point in bfloat16, which
  rounds them (a relative 2^-9).
- ``int8``: one scale per output row, symmetric.

The kernels take bfloat16 activations (float32 ones measured 10-30x slower,
docs/benchmarks.md); a float32 model's activations are rounded to bfloat16
for the multiply and the result widened back, its residual stream stays in
float32. At more rows than ``QuantizedWeight.rows`` the dense weights are
faster (the kernels are written for a few rows: at 16 rows int4 took twice
bfloat16's time), so the fused step keeps both and picks per call;
``crossover`` measures where.

Public surface: ``FORMATS``, ``quantize``, ``QuantizedWeight``, ``pick_format``, ``crossover``.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from tuneloop.errors import ModelError

log = logging.getLogger(__name__)

FORMATS = ("auto", "none", "int8", "int4")
#: Inputs per int4 group (GGUF's Q4_0/Q4_1 block size).
GROUP = 32
#: The quantized kernel must be at least this much faster at one row to be picked by ``auto``.
MIN_SPEEDUP = 1.3


class QuantizedWeight:
    """A ``[out, in]`` weight in ``kind`` (int8/int4) for ``x @ W^T`` on up to ``rows`` rows."""

    def __init__(self, weight: torch.Tensor, kind: str, rows: int = 1) -> None:
        if weight.device.type != "cpu":
            raise ModelError(f"model.quantize: {kind} weights run on a CPU only, not {weight.device.type}")
        w = weight.detach().float().contiguous()
        self.kind, self.rows = kind, rows
        self.out_features, self.in_features = w.shape
        if kind == "int4":
            self.codes, self.scale, self.minimum = int4_codes(w)
            # torch's layout: w = (code - 8) * scale + zero, scale and zero [in / 32, out, 2].
            zero = self.minimum + 8 * self.scale
            self._sz = torch.stack([self.scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes, 1)
        elif kind == "int8":
            scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            self._q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self._scale = scale.to(torch.bfloat16)
        else:
            raise ModelError(f"model.quantize: must be one of {', '.join(FORMATS)}, got {kind!r}")

    @property
    def nbytes(self) -> int:
        if self.kind == "int4":
            return self._packed.numel() * self._packed.element_size() + self._sz.numel() * 2
        return self._q.numel() + self._scale.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` in ``x``'s dtype (computed from bfloat16 activations)."""
        y = self.raw(x)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` in bfloat16, the kernels' own output (a residual add widens it for free)."""
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if self.kind == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self._packed, GROUP, self._sz)
        return torch.ops.aten._weight_int8pack_mm(xb, self._q, self._scale)

    def dequantized(self) -> torch.Tensor:
        """The weight as the kernel sees it, float32 ``[out, in]`` (for tests and checks)."""
        if self.kind == "int4":
            sz = self._sz.float().transpose(0, 1)  # [out, in / 32, 2]
            codes = self.codes.view(self.out_features, -1, GROUP).float()
            w = (codes - 8) * sz[..., :1] + sz[..., 1:]
            return w.view(self.out_features, self.in_features)
        return self._q.float() * self._scale.float()[:, None]


def int4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes ``[out, in]`` (int32, 0-15), scales and minimums ``[out, in / 32]`` of float32 ``w``.

    Each group's minimum is code 0 and its maximum code 15, as GGUF's Q4_1
    quantizer makes them, so weights dequantized from Q4_1 give back their
    file's codes.
    """
    out, width = w.shape
    if width % GROUP:
        raise ModelError(f"model.quantize: int4 needs input widths divisible by {GROUP}, got {width}")
    groups = w.view(out, width // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = (hi - lo) / 15
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((groups - lo[..., None]) / safe[..., None]).clamp_(0, 15)
    return codes.to(torch.int32).view(out, width), scale, lo


def quantize(weight: torch.Tensor, kind: str, rows: int) -> QuantizedWeight | None:
    """``weight`` in ``kind``, or None for ``none``."""
    return None if kind == "none" else QuantizedWeight(weight, kind, rows)


def pick_format(setting: str, device: str, width: int, dtype: torch.dtype) -> tuple[str, str]:
    """The format to serve in for ``[model] quantize`` and why.

    ``auto``: int4 on a CPU where its one-row multiply measures at least
    ``MIN_SPEEDUP`` x faster than the dense weights in ``dtype`` (and the
    model's widths allow it); otherwise none. An explicit format off a CPU is an error.
    """
    if setting not in FORMATS:
        raise ModelError(f"model.quantize: must be one of {', '.join(FORMATS)}, got {setting!r}")
    if setting == "none":
        return "none", "[model] quantize = \"none\""
    if device != "cpu":
        if setting == "auto":
            return "none", f"no quantized kernels on {device}"
        raise ModelError(f"model.quantize = {setting!r} runs on a CPU only, not {device}")
    if setting != "auto":
        return setting, f"[model] quantize = \"{setting}\""
    if width % GROUP:
        return "none", f"hidden width {width} is not a multiple of {GROUP}"
    speedup = speedup_at("int4", 1, _name(dtype))
    if speedup < MIN_SPEEDUP:
        return "none", f"int4 one-row multiply {speedup:.2f}x the dense one (< {MIN_SPEEDUP})"
    return "int4", f"int4 one-row multiply {speedup:.2f}x the dense one"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@functools.cache
def speedup_at(kind: str, rows: int, dense: str, width: int = 576, out: int = 1536, repeats: int = 5) -> float:
    """Dense time (weights in dtype ``dense``) / ``kind``'s, ``rows`` rows through ``[width -> out]``.

    32 distinct weights per timing, so they are read from memory as in a real
    step rather than from cache; alternating, best of ``repeats``; on one
    thread, which a busy neighbour slows far less than two (an OpenMP team
    waits for its slowest thread) and which ranks the kernels the same.
    """
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, width, generator=gen) * 0.02 for _ in range(32)]
    x = torch.randn(rows, width, generator=gen)
    dt = getattr(torch, dense)
    ways = {
        "dense": (x.to(dt), [w.to(dt) for w in weights]),
        kind: (x.to(dt), [QuantizedWeight(w, kind, rows) for w in weights]),
    }
    best = dict.fromkeys(ways, float("inf"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _time(ways, kind, repeats, best)
    finally:
        torch.set_num_threads(threads)
    return best["dense"] / best[kind]


def _time(ways: dict, kind: str, repeats: int, best: dict) -> None:
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round pays for the libraries' set-up
            for name, (inp, ws) in ways.items():
                t0 = time.perf_counter()
                for w in ws:
                    w(inp) if name == kind else torch.nn.functional.linear(inp, w)
                best[name] = min(best[name], time.perf_counter() - t0)


@functools.cache
def crossover(kind: str, dtype: torch.dtype) -> int:
    """The most rows at which ``kind`` still beats dense ``dtype`` weights (1 at least), measured once."""
    rows = 1
    for n in (2, 4, 8, 16, 32, 64):
        if speedup_at(kind, n, _name(dtype)) < 1.0:
            break
        rows = n
    log.info("quantized weights: %s up to %d rows a step, %s weights above", kind, rows, _name(dtype))
    return rows
