"""Weight-only quantized copies of the fused step's weights: int8 and int4, on a CPU.

Why. Decoding one request at a time reads every weight once per token, so
its speed is memory traffic: SmolLM2-135M reads 540 MB a token in float32,
270 in bfloat16, 68 in int4. torch ships CPU kernels that multiply by
quantized weights without widening them in memory
(``_weight_int4pack_mm_for_cpu``, ``_weight_int8pack_mm``; gpt-fast and
torchao build their weight-only inference on the same ones), but they take
bfloat16 activations, scales and zero points only (float32 activations
measured 10-30x slower, docs/benchmarks.md), and those roundings alone made
the quantized engine's greedy replies differ from float32's on 4-5 of 16
prompts. So int4 has a kernel of our own (``int4_kernel.c``, built and
loaded by ``_int4``): float32 activations times the exact weights, float32
sums, and faster than torch's besides: SmolLM2's 121 projections at one row,
weights from memory, 4.7 against 5.9 ms on two threads (8.4 against 10.3 on
one), 1.3-1.4x at 2-16 rows (alternating in one process, a 2-core Xeon
with AVX-512, 2026-12-02); its AVX2 build, on CPUs without AVX-512, 2.2x
torch's at 1 and at 16 rows (a 2-core AMD EPYC with AVX2, 2026-12-06;
docs/benchmarks.md). On AVX2 it rounds activations to 16-bit integers per
group of 32 (``_int4.activations``): integer dot products, 1.2x the float32
form at 1 row and 1.3-1.4x at 16-64, replies still float32's on 15-16 of 16
prompts where 8 bits kept 6. Where it cannot be built (no C compiler, no AVX2) or
``TUNELOOP_INT4_KERNEL=torch`` asks so, torch's serves
(``QuantizedWeight.backend`` says which, and one log line).

Formats (``[model] quantize``):

- ``int4``: groups of 32 inputs per output row, each with its own scale and
  minimum (asymmetric, 16 levels), the layout of GGUF's Q4_1 blocks. A
  weight that came from Q4_1 blocks (the default model's GGUF, dequantized
  by the conversion) is requantized to the very codes of the file: each
  block's minimum and maximum are codes 0 and 15, so they give back its
  scale and minimum (``tests/test_quant.py`` checks it against the file's
  blocks). Our kernel keeps scales and minimums in float16 where that holds
  them (a GGUF's are float16: its weights are then the file's exactly),
  else in float32; torch's takes them in bfloat16, which rounds them (a
  relative 2^-9).
- ``int8``: one scale per output row, symmetric (torch's kernel).

With torch's kernels a float32 model's activations are rounded to bfloat16
for the multiply and the result widened back; ours multiplies them as they
are and returns float32. Either way the residual stream stays in float32.
At more rows than ``QuantizedWeight.rows`` the dense weights are faster,
so the fused step keeps both and picks per call; ``crossover`` measures
where, with the kernel in use (torch's bfloat16 kernels lose from ~16 rows;
our AVX2 integer kernel still won at 256, a prefill of a busy channel's
prompts, 1.1-1.2x torch's float32 product on two threads).

Public surface: ``FORMATS``, ``quantize``, ``QuantizedWeight``, ``pick_format``, ``crossover``.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from tuneloop.engine import _int4
from tuneloop.errors import ModelError

log = logging.getLogger(__name__)

FORMATS = ("auto", "none", "int8", "int4")
#: Inputs per int4 group (GGUF's Q4_0/Q4_1 block size).
GROUP = 32
#: The quantized kernel must be at least this much faster at one row to be picked by ``auto``.
MIN_SPEEDUP = 1.3


class QuantizedWeight:
    """A ``[out, in]`` weight in ``kind`` (int8/int4) for ``x @ W^T`` on up to ``rows`` rows."""

    def __init__(self, weight: torch.Tensor, kind: str, rows: int = 1, activations: str | None = None) -> None:
        if weight.device.type != "cpu":
            raise ModelError(f"model.quantize: {kind} weights run on a CPU only, not {weight.device.type}")
        w = weight.detach().float().contiguous()
        self.kind, self.rows = kind, rows
        #: Which kernel multiplies: ``float32 kernel`` (ours, ``_int4``), ``torch bfloat16 kernel`` or
        #: ``torch int8 kernel``.
        self.backend = "torch int8 kernel"
        self._lib = None
        #: What our int4 kernel multiplies the weights by: ``float`` (float32 activations as they are),
        #: ``int16`` or ``int8`` (rounded per group of 32, ``_int4.activations``).
        self.activations = "float"
        self.out_features, self.in_features = w.shape
        if kind == "int4":
            codes, scale, minimum = int4_codes(w)
            self._lib = _int4.library()
            if self._lib is not None:
                # Scales and minimums that float16 holds (a GGUF's, whose blocks store them so) are kept
                # in it: exact, and a quarter less to read per weight than float32's.
                half = _holds(scale) and _holds(minimum)
                self.activations = _int4.activations(self._lib)
                if activations is not None and self.activations != "float":
                    self.activations = activations  # a build with the integer kernel: as the caller asks
                pack = _int4.pack if self.activations == "float" else _int4.pack_q
                self._codes, self._sm = pack(codes, scale, minimum, half)
                self.backend = "float32 kernel" if self.activations == "float" else f"{self.activations} kernel"
            else:
                # torch's layout: w = (code - 8) * scale + zero, scale and zero [in / 32, out, 2].
                zero = minimum + 8 * scale
                self._sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
                self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                self._codes = codes.to(torch.uint8)  # for ``codes`` only: a byte a weight, not int32's four
                self.backend = "torch bfloat16 kernel"
        elif kind == "int8":
            scale = (w.abs().amax(1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            self._q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self._scale = scale.to(torch.bfloat16)
        else:
            raise ModelError(f"model.quantize: must be one of {', '.join(FORMATS)}, got {kind!r}")

    @property
    def nbytes(self) -> int:
        if self.kind == "int4":
            if self._lib is not None:
                return self._codes.numel() + self._sm.numel() * self._sm.element_size()
            return self._packed.numel() * self._packed.element_size() + self._sz.numel() * 2
        return self._q.numel() + self._scale.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` in ``x``'s dtype."""
        y = self.raw(x)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W^T`` in the kernel's own output dtype (a residual add widens it for free).

        Our int4 kernel: float32 from float32 activations (a bfloat16 ``x``
        is widened, exactly, and the result narrowed back). torch's kernels:
        bfloat16, from activations rounded to it.
        """
        if self.kind == "int4" and self._lib is not None:
            y = _int4.matmul(self._lib, x if x.dtype == torch.float32 else x.float(), self._codes, self._sm,
                             self.out_features, activations=self.activations)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
        if self.kind == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self._packed, GROUP, self._sz)
        return torch.ops.aten._weight_int8pack_mm(xb, self._q, self._scale)

    @property
    def codes(self) -> torch.Tensor:
        """int4 codes ``[out, in]`` (int32, 0-15)."""
        if self._lib is None:
            return self._codes.to(torch.int32)
        return _int4.unpack(self._codes, self._sm, self.out_features, self.in_features)[0]

    def scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int4 scales and minimums ``[out, in / 32]`` in float32, as the kernel holds them."""
        if self._lib is None:
            scale, zero = self._sz.float().transpose(0, 1).unbind(-1)
            return scale, zero - 8 * scale
        return _int4.unpack(self._codes, self._sm, self.out_features, self.in_features)[1:]

    def dequantized(self) -> torch.Tensor:
        """The weight as the kernel sees it, float32 ``[out, in]`` (for tests and checks)."""
        if self.kind == "int4":
            codes = self.codes.view(self.out_features, -1, GROUP).float()
            if self._lib is None:  # torch's own arithmetic: (code - 8) * scale + zero
                sz = self._sz.float().transpose(0, 1)  # [out, in / 32, 2]
                w = (codes - 8) * sz[..., :1] + sz[..., 1:]
            else:
                scale, minimum = self.scales()
                w = codes * scale[..., None] + minimum[..., None]
            return w.view(self.out_features, self.in_features)
        return self._q.float() * self._scale.float()[:, None]


def _holds(t: torch.Tensor) -> bool:
    """Whether float16 holds ``t``'s values, up to float32 rounding (2^-18 relative)."""
    back = t.to(torch.float16).float()
    return bool(torch.isfinite(back).all() and ((back - t).abs() <= t.abs() * 2**-18).all())


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


def quantize(weight: torch.Tensor, kind: str, rows: int, activations: str | None = None) -> QuantizedWeight | None:
    """``weight`` in ``kind``, or None for ``none``; ``activations``: see ``QuantizedWeight``."""
    return None if kind == "none" else QuantizedWeight(weight, kind, rows, activations)


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

    32 distinct weights per timing, more than the caches hold, so they are
    read from memory as in a real step rather than from cache; alternating,
    best of ``repeats``; on torch's threads, as steps run: on one thread
    torch's float32 product at 256 rows kept up with our int4 kernel, on two
    it ran 1.1-1.2x slower (it gains less from the second core).
    """
    return _speedup(_timed_weights(kind, dense, width, out), kind, rows, dense, repeats)


def _timed_weights(kind: str, dense: str, width: int = 576, out: int = 1536) -> tuple[list, list]:
    """32 random ``[out, width]`` weights in ``dense`` and in ``kind``."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, width, generator=gen) * 0.02 for _ in range(32)]
    return [w.to(getattr(torch, dense)) for w in weights], [QuantizedWeight(w, kind) for w in weights]


def _speedup(weights: tuple[list, list], kind: str, rows: int, dense: str, repeats: int = 5, count: int = 32
             ) -> float:
    """``speedup_at`` on ``_timed_weights``' weights, the first ``count`` of them."""
    dense_w, quant_w = weights
    x = torch.randn(rows, dense_w[0].shape[1], generator=torch.Generator().manual_seed(rows))
    dt = getattr(torch, dense)
    ways = {"dense": (x.to(dt), dense_w[:count]), kind: (x.to(dt), quant_w[:count])}
    best = dict.fromkeys(ways, float("inf"))
    _time(ways, kind, repeats, best)
    return best["dense"] / best[kind]


def _time(ways: dict, kind: str, repeats: int, best: dict) -> None:
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round pays for the libraries' set-up
            for name, (inp, ws) in ways.items():
                t0 = time.perf_counter()
                for w in ws:
                    w(inp) if name == kind else torch.nn.functional.linear(inp, w)
                best[name] = min(best[name], time.perf_counter() - t0)


#: The step sizes ``crossover`` tries, each with the number of weights it times: 32 at a few rows, where
#: reading them from memory is most of the cost, fewer at a prefill's hundreds of rows, where multiplying
#: is (and 32 would take seconds at start-up). Past 64 rows our AVX2 int4 kernel with 16-bit activations
#: stayed 1.1-1.5x faster than float32 weights up to 256 (a 2-core AMD EPYC, 2026-12-07): a busy channel's
#: prefill of 15 prompts (~200 new tokens) 1.4x faster in the median through it.
SIZES = ((2, 32), (4, 32), (8, 32), (16, 32), (32, 32), (64, 32), (128, 8), (256, 4))


@functools.cache
def crossover(kind: str, dtype: torch.dtype) -> int:
    """The most rows at which ``kind`` still beats dense ``dtype`` weights (1 at least), measured once."""
    weights = _timed_weights(kind, _name(dtype))  # built once for every size, and not kept
    rows = 1
    for n, count in SIZES:
        if _speedup(weights, kind, n, _name(dtype), count=count) < 1.0:
            break
        rows = n
    log.info("quantized weights: %s up to %d rows a step, %s weights above", kind, rows, _name(dtype))
    return rows
