"""A whole decoding step in C (``decode_step.c``) for a ``Decoder`` on our int4 kernel.

Why. At one row a step of SmolLM2 on int4 weights spent about a third of its
time in ~750 small torch operations (norms, rotation, cache writes,
attention, activation, residual adds) between its 121 matrix multiplies:
dispatch, not arithmetic (docs/benchmarks.md, "Weight formats"). The C step
runs every layer in one call with the same float32 arithmetic; the torch step
(``_decode._Layer``) stays the reference and serves everything this does not
cover: steps with adapter rows (``lora.Plan``), steps above the quantized
weights' row limit, half-precision models, and any layer this cannot describe
(``Native.build`` returns why). ``Decoder.verify`` checks the steps it takes
against transformers' forward like any other.

``TUNELOOP_NATIVE_STEP=0`` turns it off (to compare the two).

Public surface: ``Native``.
"""

from __future__ import annotations

import ctypes
import os

import torch

from tuneloop.engine import _int4

_ACT = {"float": 0, "int16": 1, "int8": 2}


class _QWeight(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("sm", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("inp", ctypes.c_long), ("out", ctypes.c_long), ("half", ctypes.c_int), ("act", ctypes.c_int)]


class _QLayer(ctypes.Structure):
    _fields_ = [("qkv", _QWeight), ("o", _QWeight), ("gate_up", _QWeight), ("down", _QWeight),
                ("in_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p)]


class _QModel(ctypes.Structure):
    _fields_ = [("layer", ctypes.POINTER(_QLayer)), ("layers", ctypes.c_int), ("heads", ctypes.c_int),
                ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int), ("hidden", ctypes.c_int),
                ("inter", ctypes.c_int), ("eps", ctypes.c_float), ("scaling", ctypes.c_float)]


class Native:
    """The C step over a decoder's quantized layers."""

    def __init__(self, lib: ctypes.CDLL, layers: list, eps: float) -> None:
        self._lib = lib
        self._limit = layers[0].qkv.quant  # its ``rows`` is the quantized weights' limit, 0 while switched off
        self._keep: list[torch.Tensor] = []  # what the structures point into
        first = layers[0]
        self._layers = (_QLayer * len(layers))(*(self._layer(layer) for layer in layers))
        self._model = _QModel(self._layers, len(layers), first.heads, first.kv_heads, first.head_dim,
                              first.qkv.quant.in_features, first.inter, eps, first.scaling)

    @classmethod
    def build(cls, decoder) -> tuple[Native | None, str]:
        """The C step for ``decoder`` (a ``_decode.Decoder`` with quantized weights), or None and why not."""
        if os.environ.get("TUNELOOP_NATIVE_STEP", "1") == "0":
            return None, "TUNELOOP_NATIVE_STEP=0"
        lib = _int4.library()
        if lib is None or not hasattr(lib, "decode_step"):
            return None, "our int4 kernel is not in use"
        if decoder.embed.weight.dtype != torch.float32:
            return None, f"{decoder.embed.weight.dtype} weights (the C step is float32)"
        layers = decoder.layers
        for layer in layers:
            fused = (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)
            if any(f.quant is None or f.quant.kind != "int4" or f.quant._lib is None for f in fused):
                return None, "a projection without our int4 kernel's weights"
            if type(layer.act).__name__ not in ("SiLU", "SiLUActivation"):
                return None, f"activation {type(layer.act).__name__} (the C step has SiLU)"
            if layer.head_dim > 512:
                return None, f"head width {layer.head_dim} (the C step takes up to 512)"
            if layer.heads // layer.kv_heads > 16:
                return None, f"{layer.heads // layer.kv_heads} query heads a key/value head (the C step takes 16)"
        norms = [n for layer in layers for n in (layer.in_norm, layer.post_norm)]
        eps = {n.eps for n in norms}
        if len(eps) != 1:
            return None, "layers with different norm epsilons"
        return cls(lib, layers, eps.pop()), ""

    @property
    def rows(self) -> int:
        """The most rows a step it takes: the quantized weights' (0 while ``Decoder.dense`` switches them off)."""
        return self._limit.rows

    def _weight(self, fused) -> _QWeight:
        q = fused.quant
        bias = None
        if fused.bias is not None:
            bias = fused.bias.detach().float().contiguous()
            self._keep.append(bias)
        self._keep += [q._codes, q._sm]
        return _QWeight(q._codes.data_ptr(), q._sm.data_ptr(), None if bias is None else bias.data_ptr(),
                        q.in_features, q.out_features, int(q._sm.dtype == torch.float16), _ACT[q.activations])

    def _layer(self, layer) -> _QLayer:
        norms = [layer.in_norm.weight.detach().float().contiguous(),
                 layer.post_norm.weight.detach().float().contiguous()]
        self._keep += norms
        return _QLayer(self._weight(layer.qkv), self._weight(layer.o_proj), self._weight(layer.gate_up),
                       self._weight(layer.down_proj), norms[0].data_ptr(), norms[1].data_ptr())

    def step(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch) -> bool:
        """Run every layer on ``h`` ``[B, C]`` in place, writing cache column ``batch.length``.

        False (nothing changed) where the cache is not laid out as the C step
        reads it; the caller then takes the torch step.
        """
        caches = batch.cache.layers
        col = batch.length
        first = caches[0]
        if any(c.kbuf is None or c.length != col or not c.kbuf.is_contiguous() or not c.vbuf.is_contiguous()
               or c.kbuf.dtype != torch.float32 or c.kbuf.shape[2] <= col for c in caches):
            return False
        cap, rows = first.kbuf.shape[2], first.kbuf.shape[0]
        if any(c.kbuf.shape[2] != cap for c in caches):
            return False
        n = len(caches)
        kv = (ctypes.c_void_p * n)(*(c.kbuf.data_ptr() for c in caches))
        vv = (ctypes.c_void_p * n)(*(c.vbuf.data_ptr() for c in caches))
        mask = batch.mask
        cos, sin = cos.reshape(h.shape[0], -1).contiguous(), sin.reshape(h.shape[0], -1).contiguous()
        done = self._lib.decode_step(ctypes.byref(self._model), h.data_ptr(), h.shape[0], cos.data_ptr(),
                                     sin.data_ptr(), kv, vv, rows, cap, col, mask.data_ptr(), mask.stride(0),
                                     torch.get_num_threads())
        if done:
            return False
        end = col + 1
        for c in caches:
            c.length = end
            c.keys = c.kbuf[:, :, :end]
            c.values = c.vbuf[:, :, :end]
        return True
