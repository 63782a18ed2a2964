"""Prefill and decoding step of a Llama-family model, written out for the engine's batch.

Why this exists. transformers' ``forward`` is written for every use (training,
generation, every cache and attention back end); for one new token per row it
spends more time in its own Python and small operations than in arithmetic.
The decode step is nearly all of the engine's cost at batch 32, so it decides
how far the engine gets past naive ``generate``; ``tuneloop bench`` measures
both steps side by side (figures: docs/benchmarks.md). Greedy tokens are the
same; float32 logits agree to ~1e-5.

What it does differently, each for fewer operations per step (at this size
a step is ~180 small operations more than it is arithmetic): q/k/v and
gate/up are each one matrix multiply on fused weights (stored ``[in, out]`` on
a CPU, see ``_Fused``), residuals are multiply-adds; norms are one
``F.rms_norm``; cos/sin come from a table the model's own ``rotary_emb``
filled (every rope type transformers knows; per step for those that change
with length) and queries and keys turn together in three operations; the one
new query per row meets its keys in one ``baddbmm`` against the
``_batch.SlabLayer`` buffers, with the padding bias folded in and query heads
grouped under the key/value head they share, nothing copied. A prefill packs
every prompt's tokens into one matrix instead of left-padding them.

It covers the architectures in ``SUPPORTED``, whose layers are the same up to
biases; anything else, or a model whose prefill or first steps disagree with
transformers' (``Decoder.verify``, run at every load), decodes through
transformers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from tuneloop.engine import _int4
from tuneloop.engine._batch import Batch, SlabLayer, last_logits, prefill
from tuneloop.engine._native import Native
from tuneloop.engine._prefix import PrefixCache
from tuneloop.engine.lora import Plan
from tuneloop.engine.quant import QuantizedWeight
from tuneloop.engine.quant import quantize as quantized

log = logging.getLogger(__name__)

#: ``config.model_type`` values whose layers this step reproduces.
SUPPORTED = ("llama", "mistral", "qwen2")
#: Largest logit distance from float32's (relative to the largest logit) that quantized weights may
#: show in ``Decoder.verify``; measured in docs/benchmarks.md ("Weight formats").
QUANT_TOLERANCE = {"int8": 0.1, "int4": 0.1}
#: The same for the bfloat16 copy a float32 model's large steps read beside quantized weights.
HALF_TOLERANCE = 0.05
#: A greedy choice is clear when float32's top two logits are this far apart (relative).
CLEAR_MARGIN = 0.05
#: Leading candidates whose half-precision logits are computed again in float32 (see ``Decoder._logits``).
RESCORE = 8
#: The same for a quantized output projection, whose int4 product ranks candidates more roughly.
RESCORE_QUANTIZED = 64
#: The leading candidates (of float32's logits) whose logits ``Decoder.verify`` compares for quantized weights.
COMPARED = RESCORE_QUANTIZED


class Decoder:
    """The fused weights of one model and its decoding step over a ``Batch``.

    With ``quantize_weights``, steps of a few rows multiply by weight-only
    quantized copies of the weights, larger ones by the dense weights.
    """

    def __init__(self, model: nn.Module, transposed: bool | None = None) -> None:
        if transposed is None:
            # The layout the CPU's float32 kernels read fastest (see ``_Fused``);
            # bfloat16 ones read [out, in] at least as fast (one row: faster),
            # and GPUs take either.
            weight = model.lm_head.weight
            transposed = weight.device.type == "cpu" and weight.dtype == torch.float32
        inner = model.model
        self.model = model
        self.embed = inner.embed_tokens
        self.rotary = inner.rotary_emb
        self.norm = _rms_norm(inner.norm)
        self.norm_fp32 = _rms_norm(inner.norm, torch.float32)
        self.lm_head = model.lm_head
        self.layers = [_Layer(layer, transposed, i) for i, layer in enumerate(inner.layers)]
        self.quantize = "none"
        self.head_q: QuantizedWeight | None = None
        #: Steps without adapters on quantized weights run every layer in C (``_native``); None: not here.
        self.native: Native | None = None
        self.native_why = "dense weights"
        #: Keys and values of prompt beginnings shared across requests (``_prefix``).
        self.prefixes = PrefixCache()
        first = self.layers[0]
        self.kv_heads, self.group = first.kv_heads, first.heads // first.kv_heads
        self._steps = self._packed = _direct
        self._cos, self._sin = self._rope_tables(model.config, first.head_dim)

    def _rope_tables(self, config, head_dim: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """cos and signed sin of every position, where the rope type does not change with length.

        Computed by the model's own ``rotary_emb``, so the values are its
        values; a step then reads two rows instead of running the module.
        """
        positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        kind = getattr(self.rotary, "rope_type", "default")
        if kind not in _STATIC_ROPE or not 0 < positions * head_dim <= _ROPE_TABLE_MAX:
            return None, None
        weight = self.embed.weight
        with torch.no_grad():
            cos, sin = self.rotary(weight[:1], torch.arange(positions, device=weight.device)[None])
        return cos[0], _signed(sin[0])

    def _rope(self, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin ``[N, 1, D]`` for positions ``pos`` ``[N, 1]``."""
        if self._cos is not None:
            return self._cos[pos], self._sin[pos]
        cos, sin = self.rotary(h, pos)
        return cos.to(h.dtype), _signed(sin.to(h.dtype))

    def widen(self, threads: int, cores: int) -> None:
        """Let steps and prefills use ``cores`` intra-op threads when that is faster.

        Small operations (most of a step) gain nothing from a second thread,
        and its OpenMP worker waits on whichever core is busiest: with
        transformers' forward, or with a neighbour on the machine, two threads
        were far slower than one. The fused step's matrix multiplies do gain
        (docs/benchmarks.md, "Design measurements"). So ``_Widen`` measures
        both, and keeps measuring.
        """
        if cores > threads:
            self._steps, self._packed = _Widen(threads, cores), _Widen(threads, cores)

    def quantize_weights(self, kind: str, rows: int, half: bool = False) -> None:
        """Steps of at most ``rows`` rows read ``kind`` (``quant.FORMATS``) copies of the weights from now on.

        ``half``: larger steps and prefills of a float32 model read a
        bfloat16 copy of the weights, its activations staying float32 (on a
        CPU whose bfloat16 matrix multiply is the faster, as ``dtype = "auto"``
        measures it): 16 rows through int4 ran slower than through bfloat16
        weights, and a float32 model keeps its float32 attention and residual
        stream for the one-row steps (docs/benchmarks.md, "Weight formats").

        The output projection (a fifth of SmolLM2's weights) is int4 for
        either format: int8's kernel read it at a third of int4's speed. Its
        int4 logits are rough (0.16 of the largest from float32's on SmolLM2,
        where int8 gave 0.03; docs/benchmarks.md, "Weight formats"), so they
        only rank candidates: the ``RESCORE_QUANTIZED`` leading ones are
        computed again in float32 (``_logits``).
        """
        self.quantize = kind
        half = half and kind != "none" and self.embed.weight.dtype == torch.float32
        for f in self._fused():
            f.quant = quantized(f.out_in, kind, rows)
            f.half = f.out_in.to(torch.bfloat16).contiguous() if half else None
        # Its product only ranks candidates for float32 to score again (``_logits``), so where the kernel
        # rounds activations at all it rounds them to 8 bits: half the work of 15 (docs/benchmarks.md).
        self.head_q = quantized(self.lm_head.weight.detach(), "none" if kind == "none" else "int4", rows, "int8")
        self.native, self.native_why = (None, "dense weights") if kind == "none" else Native.build(self)

    def _fused(self) -> list[_Fused]:
        return [f for layer in self.layers for f in (layer.qkv, layer.o_proj, layer.gate_up, layer.down_proj)]

    @property
    def wide_threads(self) -> int | None:
        return self._steps.wide if isinstance(self._steps, _Widen) else None

    @classmethod
    def for_model(cls, model: nn.Module, transposed: bool | None = None, quantize: str = "none",
                  quant_rows: int = 1, half: bool = False) -> tuple[Decoder | None, str]:
        """A decoder for ``model``, or None and the reason it decodes through transformers.

        ``quantize`` (not ``auto``) for steps of at most ``quant_rows`` rows;
        quantized weights that fail their check are dropped, with the reason.
        """
        cfg = model.config
        kind = getattr(cfg, "model_type", "")
        if kind not in SUPPORTED:
            return None, f"model type {kind!r} has no fused decode step"
        if getattr(cfg, "use_sliding_window", False) or (
            kind == "mistral" and getattr(cfg, "sliding_window", None)
        ):
            return None, "sliding-window attention has no fused decode step"
        inner = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
            return None, f"{type(model).__name__} is not laid out as a {kind} causal LM"
        if not hasattr(inner.norm, "variance_epsilon"):
            return None, f"{type(inner.norm).__name__} is not an RMSNorm this step knows"
        if hasattr(inner.layers[0].self_attn, "q_norm"):
            return None, "per-head query/key norms have no fused decode step"
        decoder = cls(model, transposed)
        problem = decoder.verify()
        if problem:
            log.warning("fused decode step disabled: %s", problem)
            return None, problem
        why = "matches transformers' forward on a test batch"
        if quantize == "none":
            return decoder, why
        decoder.quantize_weights(quantize, quant_rows, half)
        problem = decoder.verify()
        if problem:
            log.warning("quantized weights not used: %s", problem)
            decoder.quantize_weights("none", 0)
            return decoder, f"{why}; dense weights, {problem}"
        above = "a bfloat16 copy" if decoder.half else "dense weights"
        native = "in C" if decoder.native is not None else f"in torch ({decoder.native_why})"
        return decoder, f"{why}; {quantize} weights for steps of up to {quant_rows} rows ({native}), {above} above"

    def step(self, ids: torch.Tensor, batch: Batch, lora: Plan | None = None) -> torch.Tensor:
        """Logits ``[B, vocab]`` for the next token after ``ids`` ``[B, 1]``; writes one cache column.

        Mirrors ``model(input_ids=ids, attention_mask=..., position_ids=...,
        past_key_values=batch.cache)`` for one new token per row. ``lora``
        adds each row's own adapter (``lora.Plan``, by row), unmerged.
        """
        return self._steps(ids.shape[0], self._step, ids, batch, lora)

    def _step(self, ids: torch.Tensor, batch: Batch, lora: Plan | None) -> torch.Tensor:
        mask, pos = batch.step_inputs()
        n, length = mask.shape
        h = self.embed(ids.view(n))  # [B, C]
        cos, sin = self._rope(h, pos)  # [B, 1, D] each
        native = self.native
        if native is not None and lora is None and n <= native.rows and native.step(h, cos, sin, batch):
            return self._logits(h)
        # Additive attention bias, 0 where a row has a token and -inf in its
        # padding, one row per query group: [B * Hk, G, L] as baddbmm takes it.
        bias = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(mask == 0, float("-inf"))
        bias = bias[:, None, None, :].expand(n, self.kv_heads, self.group, length)
        bias = bias.reshape(n * self.kv_heads, self.group, length)
        for layer, cache in zip(self.layers, batch.cache.layers, strict=True):
            h = layer(h, cos, sin, bias, cache, lora)
        return self._logits(h)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, vocab]`` of the last hidden states ``h`` ``[B, C]``.

        In a half precision the output projection rounds every logit to 8
        bits of mantissa (steps of 0.125 at 20), which flips near-ties between
        the leading candidates: SmolLM2 in bfloat16 answered "What is the
        capital of France?" with a French word loop instead of "The capital of
        France is Paris." (float32's answer). So the half-precision product
        only picks the ``RESCORE`` leading candidates, and those are computed
        again in float32 from the same weights: greedy decoding then picks
        what float32 arithmetic on these weights picks. Quantized weights'
        product (``head_q``) picks ``RESCORE_QUANTIZED`` candidates the same
        way: the rest of a row's logits (what sampling's tail sees) keep its
        rounding.
        """
        head_q = self.head_q
        if head_q is not None and h.shape[0] <= head_q.rows:
            # Quantized, the same: its product picks the candidates.
            x = self.norm_fp32(h.float())
            logits = head_q(x)
            lib = head_q._lib
            weight = self.lm_head.weight
            if (self.lm_head.bias is None and lib is not None and weight.dtype == torch.float32
                    and weight.is_contiguous()):
                # One C pass a row: topk, index_select, bmm and scatter took 2.7-6 ms of a 16-row step.
                _int4.top_rescore(lib, logits, RESCORE_QUANTIZED, weight.detach(), x.contiguous())
                return logits
            if self.lm_head.bias is not None:
                logits += self.lm_head.bias.float()
        elif h.dtype == torch.float32:
            return self.lm_head(self.norm(h))
        else:
            x = self.norm_fp32(h.float())
            logits = self.lm_head(x.to(h.dtype)).float()
        k = RESCORE if head_q is None or h.shape[0] > head_q.rows else RESCORE_QUANTIZED
        top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices  # [B, k]
        # index_select, not weight[top]: the same rows, 4x faster (a 16-row step of SmolLM2: 0.55 -> 0.14 ms)
        weight = self.lm_head.weight.index_select(0, top.reshape(-1)).view(*top.shape, -1).float()  # [B, k, C]
        exact = torch.bmm(weight, x.unsqueeze(-1)).squeeze(-1)
        if self.lm_head.bias is not None:
            exact += self.lm_head.bias[top].float()
        return logits.scatter_(-1, top, exact)

    def prefill(self, prompts: list[list[int]], lora: Plan | Callable[[list[int]], Plan | None] | None = None,
                owners: list[object] | None = None) -> tuple[Batch, torch.Tensor]:
        """``_batch.prefill`` without padding (see ``_prefill``); ``lora`` by token, prompt after prompt.

        With ``owners`` (each prompt's adapter, None for the base) a prompt
        starts from the keys and values of a beginning kept in ``prefixes``
        and computes only the rest; ``lora`` is then a function of the
        computed tokens' count per prompt giving their plan (a ``Plan``
        itself turns the reuse off, its rows being every token).
        """
        return self._packed(sum(len(p) for p in prompts), self._prefill, prompts, lora, owners)

    def _prefill(self, prompts: list[list[int]], lora, owners: list[object] | None) -> tuple[Batch, torch.Tensor]:
        """``_batch.prefill`` without padding: every prompt's computed tokens in one matrix.

        The linear layers see only real tokens (the bench's 32 prompts of 12-26
        tokens are a quarter padding when left-padded) and none of a reused
        beginning. On a CPU each prompt's tokens attend over its own columns
        of the left-padded layout the cache keeps (``_prompt_attention``);
        elsewhere attention runs once per layer over that layout, with a
        causal mask that also hides each row's padding.
        """
        dev = self.embed.weight.device
        n = len(prompts)
        reuse = owners is not None and (lora is None or callable(lora))
        found = [self.prefixes.lookup(p, o) if reuse else (0, None) for p, o in zip(prompts, owners or [None] * n,
                                                                                     strict=True)]
        used = [u for u, _ in found]
        if callable(lora):
            lora = lora([len(p) - u for p, u in zip(prompts, used, strict=True)])
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        skip = torch.tensor(used, device=dev)
        counts = lens - skip
        width = int(lens.max())
        ids = torch.tensor([t for p, u in zip(prompts, used, strict=True) for t in p[u:]], dtype=torch.long,
                           device=dev)
        rows = torch.repeat_interleave(torch.arange(n, device=dev), counts)  # [N] row of each computed token
        starts = torch.cumsum(counts, 0) - counts
        pos = torch.arange(ids.shape[0], device=dev) - starts[rows] + skip[rows]  # [N] position in its prompt
        cols = pos + (width - lens)[rows]  # [N] column in the right-aligned cache
        mask = (torch.arange(width, device=dev)[None] >= (width - lens)[:, None]).long()  # [B, width]
        prefix = None
        if any(used):
            prows = torch.repeat_interleave(torch.arange(n, device=dev), skip)
            pstarts = torch.cumsum(skip, 0) - skip
            pcols = torch.arange(int(skip.sum()), device=dev) - pstarts[prows] + (width - lens)[prows]
            prefix = (prows, pcols, [kv for u, kv in found if u], [u for u in used if u])
        h = self.embed(ids)  # [N, C]
        cos, sin = self._rope(h, pos[:, None])  # [N, 1, D] each
        if dev.type == "cpu":
            # Each prompt's computed tokens over its own columns (``_prompt_attention``).
            allowed = [(width - ln, width - ln + u, ln - u) for ln, u in zip(lens.tolist(), used, strict=True)]
        else:
            causal = torch.ones(width, width, dtype=torch.bool, device=dev).tril_()
            allowed = causal[None, None] & mask.bool()[:, None, None, :]  # [B, 1, T, T]
        layers = []
        for i, layer in enumerate(self.layers):
            kept = None
            if prefix is not None:
                prows, pcols, kvs, us = prefix
                kept = (prows, pcols, torch.cat([kv[i][0][:u] for kv, u in zip(kvs, us, strict=True)]),
                        torch.cat([kv[i][1][:u] for kv, u in zip(kvs, us, strict=True)]))
            h, cache = layer.prefill(h, cos, sin, allowed, rows, cols, n, width, lora, kept)
            layers.append(cache)
        last = starts + counts - 1
        logits = self._logits(h[last])
        if reuse:
            self._keep_prefixes(prompts, owners, used, layers, width)
        return Batch(Cache(layers=layers), mask, lens.clone(), width), logits

    def _keep_prefixes(self, prompts, owners, used, layers: list[SlabLayer], width: int) -> None:
        """Keep the beginnings ``PrefixCache.learn`` picks, from the cache just written."""
        cache = self.prefixes
        cache.hits += sum(1 for u in used if u)
        cache.reused += sum(used)
        for i, keep in enumerate(cache.learn(prompts, owners, used)):
            if keep:
                c0 = width - len(prompts[i])
                kv = [(c.kbuf[i, :, c0 : c0 + keep].transpose(0, 1).clone(),
                       c.vbuf[i, :, c0 : c0 + keep].transpose(0, 1).clone()) for c in layers]
                cache.store(prompts[i][:keep], owners[i], kv)
                log.debug("prefix of %d tokens kept (%d kept in all)", keep, len(cache))

    @torch.inference_mode()
    def verify(self) -> str:
        """``_verify_dense``, then for quantized weights ``_verify_quantized``; '' if all agree."""
        with self.dense():
            problem = self._verify_dense()
        if problem or self.quantize == "none":
            return problem
        return self._verify_quantized()

    def _verify_dense(self) -> str:
        """Compare a prefill and three steps with transformers' on a ragged batch; '' if they agree.

        In float32 the two must agree to ``1e-3`` (relative to the largest
        logit). In a half precision two correct implementations differ by their
        rounding, which grows with depth (on SmolLM2's 30 layers in bfloat16,
        transformers' forward and this step were each 1-2% from float32 and
        as far from each other), so a small defect would hide in that noise.
        There the step is first checked in float32 on a float32 copy of the
        model, to ``1e-3``; then, in the model's own precision, against
        transformers' forward on that copy: at most twice as far from it as
        transformers' own half-precision forward.
        """
        if self.embed.weight.dtype == torch.float32:
            return self._compare(self.model, None)
        reference = _float32_copy(self.model)
        problem = Decoder(reference, self.layers[0].qkv.transposed)._compare(reference, None)
        if problem:
            return f"in float32, {problem}"
        return self._compare(reference, self.model)

    def _verify_quantized(self) -> str:
        """The quantized steps against transformers' float32 forward, within ``QUANT_TOLERANCE``.

        Rounding weights to 4 or 8 bits moves logits far more than the dense
        step's arithmetic does, so the check is not that they are equal but
        that float32's ``COMPARED`` leading candidates' logits are close
        (relative to the largest logit) and, where float32's choice is clear,
        the same token is chosen: a wrong layout or scale moves logits by
        their whole size and picks noise.
        """
        reference = self.model if self.embed.weight.dtype == torch.float32 else _float32_copy(self.model)
        ways = [(self.quantize, QUANT_TOLERANCE[self.quantize], contextlib.nullcontext())]
        if self.half:
            ways.append(("bfloat16 copy", HALF_TOLERANCE, self._without_quantized()))
        for name, tol, inside in ways:
            with inside:
                err, flips = self._quantized_distance(reference)
            if err > tol or flips:
                return (f"{name} weights: logits {err:.2g} from float32's (relative, tolerance {tol}), "
                        f"{flips} clear greedy choices changed")
            log.info("fused decode step: %s weights within %.2g of float32's logits (tolerance %s)", name, err, tol)
        return ""

    @property
    def half(self) -> bool:
        """Whether large steps read a bfloat16 copy of a float32 model's weights."""
        return any(f.half is not None for f in self._fused())

    def _quantized_distance(self, reference: nn.Module) -> tuple[float, int]:
        """Largest relative logit distance from ``reference``'s and count of flipped clear choices."""
        gen = torch.Generator().manual_seed(0)
        vocab = self.embed.num_embeddings
        prompts = [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in (5, 2, 7)]
        device = next(reference.parameters()).device
        ours, first = self.prefill(prompts)
        theirs, ref_first = prefill(reference, prompts, 0, device)
        ours, theirs = Batch.merge([(ours, None)], 4), Batch.merge([(theirs, None)], 4)
        pairs = [(first, ref_first)]
        ids = ref_first.argmax(-1, keepdim=True)
        for _ in range(3):
            a = self.step(ids, ours)
            ours.advance()
            mask, pos = theirs.step_inputs()
            ref = last_logits(reference, ids, mask, pos, theirs.cache)
            theirs.advance()
            pairs.append((a, ref))
            ids = ref.argmax(-1, keepdim=True)
        err, flips = 0.0, 0
        for a, ref in pairs:
            a, ref = a.float(), ref.float()
            scale = max(1.0, float(ref.abs().max()))
            lead = ref.topk(min(COMPARED, ref.shape[-1]), dim=-1).indices  # what choices are made from
            err = max(err, float((a.gather(-1, lead) - ref.gather(-1, lead)).abs().max()) / scale)
            top2 = ref.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > CLEAR_MARGIN * scale
            flips += int((clear & (a.argmax(-1) != ref.argmax(-1))).sum())
        return err, flips

    @contextlib.contextmanager
    def dense(self):
        """Every step and prefill through the model's own weights while inside (checks of the rest of the step)."""
        fused = self._fused()
        halves = [f.half for f in fused]
        for f in fused:
            f.half = None
        try:
            with self._without_quantized():
                yield
        finally:
            for f, half in zip(fused, halves, strict=True):
                f.half = half

    @contextlib.contextmanager
    def _without_quantized(self):
        weights = self._quantized_weights()
        saved = [w.rows for w in weights]
        for w in weights:
            w.rows = 0
        try:
            yield
        finally:
            for w, rows in zip(weights, saved, strict=True):
                w.rows = rows

    def _quantized_weights(self) -> list[QuantizedWeight]:
        return [w for w in [self.head_q, *(f.quant for f in self._fused())] if w is not None]

    @property
    def quantized_bytes(self) -> int:
        """Bytes of the quantized copies (0 when dense)."""
        return sum(w.nbytes for w in self._quantized_weights())

    def _compare(self, reference: nn.Module, own: nn.Module | None) -> str:
        """``verify`` against ``reference``'s forward and, when given, ``own`` forward's distance from it."""
        device = next(reference.parameters()).device
        vocab = self.embed.num_embeddings
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in (5, 2, 7)]
        models = [reference] if own is None else [reference, own]

        def differs(a: torch.Tensor, refs: list[torch.Tensor]) -> str:
            ref = refs[0].float()
            scale = max(1.0, float(ref.abs().max()))
            err = float((a.float() - ref).abs().max()) / scale
            if len(refs) == 1:
                tol, why = 1e-3, "tolerance 1e-3"
            else:
                own = float((refs[1].float() - ref).abs().max()) / scale
                tol = max(1e-3, 2 * own)
                why = f"transformers' {self.embed.weight.dtype} forward: {own:.2g}, tolerance {tol:.2g}"
            if err <= tol:
                return ""
            return f"its logits differ from transformers' by {err:.2g} (relative; {why})"

        # The same prompts through each, with room for the steps (as
        # ``Batch.merge`` gives the engine).
        ours, first = self.prefill(prompts)
        theirs = [prefill(m, prompts, 0, device) for m in models]
        problem = differs(first, [logits for _, logits in theirs])
        if problem:
            return problem
        ours = Batch.merge([(ours, None)], 4)
        batches = [Batch.merge([(b, None)], 4) for b, _ in theirs]
        ids = theirs[0][1].argmax(-1, keepdim=True)
        for _ in range(3):
            a = self.step(ids, ours)
            ours.advance()
            refs = []
            for m, b in zip(models, batches, strict=True):
                mask, pos = b.step_inputs()
                refs.append(last_logits(m, ids, mask, pos, b.cache))
                b.advance()
            problem = differs(a, refs)
            if problem:
                return problem
            ids = refs[0].argmax(-1, keepdim=True)
        return ""


def _float32_copy(model: nn.Module) -> nn.Module:
    """``model`` with float32 weights, for reference logits; the model itself is left as it is."""
    import copy

    return copy.deepcopy(model).float()


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)``, the first maximum of each row.

    torch's CPU argmax is a scalar loop, several times slower than numpy's
    (docs/benchmarks.md, "Design measurements").
    """
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2:
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def _direct(size: int, fn, *args):
    return fn(*args)


class _Widen:
    """Call with ``narrow`` or ``wide`` intra-op threads, whichever lately took less time per unit.

    The first ``2 * probes`` calls of every ``period`` alternate between the
    two and the faster median (time / ``size``) is kept for the rest of the
    period: a neighbour that takes the other core is noticed within a period.
    Probing first, not last: on a busy 2-core machine a step of SmolLM2 on 2
    threads took ten times as long as on 1 (OpenMP waits for the slower core),
    and a reply of a few dozen tokens ended before a period's end. Each OS
    thread measures for itself: torch's thread count, and OpenMP's team of
    workers, belong to the calling thread.
    """

    def __init__(self, narrow: int, wide: int, period: int = 256, probes: int = 4) -> None:
        self.narrow, self.wide = narrow, wide
        self.period, self.probes = period, probes
        self._mine = threading.local()

    @property
    def choice(self) -> int:
        """The thread count this thread uses between probes."""
        return getattr(self._mine, "choice", self.wide)

    def __call__(self, size: int, fn, *args):
        mine = self._mine
        if not hasattr(mine, "calls"):
            mine.calls, mine.choice, mine.times = 0, self.wide, {self.narrow: [], self.wide: []}
        k = mine.calls % self.period  # < 2 * probes: a probe
        mine.calls += 1
        probing = k < 2 * self.probes
        threads = (self.narrow, self.wide)[k % 2] if probing else mine.choice
        prev = torch.get_num_threads()
        if threads != prev:
            torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            out = fn(*args)
            took = (time.perf_counter() - t0) / max(1, size)
        finally:
            if threads != prev:
                torch.set_num_threads(prev)
        if probing:
            mine.times[threads].append(took)
            if k == 2 * self.probes - 1:
                narrow, wide = (statistics.median(mine.times[t]) for t in (self.narrow, self.wide))
                mine.choice = self.wide if wide < narrow else self.narrow
                mine.times = {self.narrow: [], self.wide: []}
        return out


class _Layer:
    """One decoder layer's weights, q/k/v and gate/up fused."""

    def __init__(self, layer: nn.Module, transposed: bool, index: int = 0) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        # Keys of this layer's groups in a ``lora.Plan`` (``lora.fused_groups``).
        self.keys = tuple((index, g) for g in ("qkv", "o", "gate_up", "down"))
        self.in_norm = _rms_norm(layer.input_layernorm)
        self.post_norm = _rms_norm(layer.post_attention_layernorm)
        self.heads = attn.config.num_attention_heads
        self.kv_heads = attn.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        fused = functools.partial(_Fused, transposed=transposed)
        self.qkv = fused(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj = fused(attn.o_proj)
        self.gate_up = fused(mlp.gate_proj, mlp.up_proj)
        self.inter = mlp.gate_proj.out_features
        self.down_proj = fused(mlp.down_proj)
        self.act = mlp.act_fn

    def __call__(self, h, cos, sin, bias, cache: SlabLayer, lora: Plan | None = None) -> torch.Tensor:
        n, hq, hk, d = h.shape[0], self.heads, self.kv_heads, self.head_dim
        x = self.in_norm(h)
        qkv = self.qkv(x)
        if lora is not None:
            lora.add(self.keys[0], x, qkv)
        # Queries and keys sit side by side in ``qkv``: rotate them in one go.
        qk = _rotate(qkv[:, : (hq + hk) * d].view(n, hq + hk, d), cos, sin)
        keys, values = cache.append(qk[:, hq:], qkv[:, (hq + hk) * d :].view(n, hk, d))  # [B, Hk, L, D]
        length = keys.shape[2]
        # Query heads grouped under the key/value head they share: [B * Hk, G, D].
        q = qk[:, :hq].reshape(n * hk, hq // hk, d)
        scores = torch.baddbmm(bias, q, keys.reshape(n * hk, length, d).transpose(1, 2), alpha=self.scaling)
        if scores.dtype == torch.float32:
            probs = scores.softmax(-1)
        else:
            probs = scores.softmax(-1, dtype=torch.float32).to(scores.dtype)
        out = torch.bmm(probs, values.reshape(n * hk, length, d)).view(n, hq * d)
        return self._rest(h, out, lora)

    def _rest(self, h: torch.Tensor, out: torch.Tensor, lora: Plan | None) -> torch.Tensor:
        """The attention's output projection, the residual, and the MLP."""
        h = self.o_proj.add_to(h, out)
        if lora is None:
            x = self.post_norm(h)
            # In the dtype the down projection multiplies in: no casts either side.
            gu = self.gate_up.narrow(x)
            return self.down_proj.add_to(h, self.act(gu[:, : self.inter]) * gu[:, self.inter :])
        o, gate_up, down = self.keys[1:]
        lora.add(o, out, h)
        x = self.post_norm(h)
        gu = lora.add(gate_up, x, self.gate_up(x))
        act = self.act(gu[:, : self.inter]) * gu[:, self.inter :]
        return lora.add(down, act, self.down_proj.add_to(h, act))

    def prefill(
        self, h, cos, sin, allowed, rows, cols, n: int, width: int, lora: Plan | None = None, kept=None
    ) -> tuple[torch.Tensor, SlabLayer]:
        """Packed tokens ``h`` [N, C] through the layer; their keys and values as a cache layer.

        ``allowed``: the ``[B, 1, T, T]`` attention mask, or on a CPU
        each prompt's first column, first computed column and computed count
        (``_prompt_attention``). ``kept``: rows, columns, keys and values
        ``[P, Hk, D]`` of reused beginnings, written beside them.
        """
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        x = self.in_norm(h)
        qkv = self.qkv(x)
        if lora is not None:
            lora.add(self.keys[0], x, qkv)
        qk = _rotate(qkv[:, : (hq + hk) * d].view(-1, hq + hk, d), cos, sin)
        keys = h.new_zeros(n, hk, width, d)
        values = h.new_zeros(n, hk, width, d)
        keys[rows, :, cols] = qk[:, hq:]
        values[rows, :, cols] = qkv[:, (hq + hk) * d :].view(-1, hk, d)
        if kept is not None:
            prows, pcols, pk, pv = kept
            keys[prows, :, pcols] = pk
            values[prows, :, pcols] = pv
        if isinstance(allowed, list):
            out = _prompt_attention(qk[:, :hq], keys, values, allowed, self.scaling)
        else:
            queries = h.new_zeros(n, hq, width, d)
            queries[rows, :, cols] = qk[:, :hq]
            # Padding queries see no key (NaN rows); only real tokens are read back.
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, scale=self.scaling,
                                                 enable_gqa=hq != hk)
            out = out.transpose(1, 2)[rows, cols].reshape(-1, hq * d)
        return self._rest(h, out, lora), SlabLayer(keys, values, width)


class _Fused:
    """Linears that read the same input, as one matrix multiply.

    The linears' own parameters become views of the fused weight, so the
    model keeps working (transformers' forward, a ``load_state_dict``, a LoRA
    merge that writes in place) and no weight is held twice; the engine builds
    a new ``Decoder`` after every weight swap anyway.

    On a CPU the fused weight is stored transposed, ``[in, out]``: MKL reads it
    row after row, which measured faster with the weights no longer in cache,
    as in a real step (docs/benchmarks.md, "Design measurements").

    ``quant``, set by ``Decoder.quantize_weights``, is a quantized copy beside
    the dense weight, used for inputs of at most its ``rows`` rows; ``half``
    a bfloat16 copy of a float32 weight used for larger ones.
    """

    def __init__(self, *linears: nn.Linear, transposed: bool) -> None:
        weight = torch.cat([lin.weight.detach() for lin in linears])  # [out, in]
        self.quant: QuantizedWeight | None = None
        self.half: torch.Tensor | None = None  # a bfloat16 copy [out, in] for a float32 model's large steps
        self.transposed = transposed
        if self.transposed:
            self.weight = weight.t().contiguous()  # [in, out]
            weight = self.weight.t()
        else:
            self.weight = weight
        self.bias = None
        if any(lin.bias is not None for lin in linears):
            self.bias = torch.cat(
                [
                    lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                    for lin in linears
                ]
            )
        start = 0
        for lin in linears:
            end = start + lin.out_features
            lin.weight = nn.Parameter(weight[start:end], requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(self.bias[start:end], requires_grad=False)
            start = end

    @property
    def out_in(self) -> torch.Tensor:
        """The dense weight as ``[out, in]`` (a view)."""
        return self.weight.t() if self.transposed else self.weight

    def _copy(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` through the copy that serves its row count (quantized or bfloat16), bias aside, in
        the copy's own dtype (float32 from our int4 kernel for a float32 ``x``, else bfloat16); None
        where the dense weight does."""
        q = self.quant
        if q is not None and x.shape[0] <= q.rows:
            return q.raw(x)
        if self.half is not None:
            return F.linear(x.to(torch.bfloat16), self.half)
        return None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self._copy(x)
        if y is not None:
            y = y.to(x.dtype)
            return y if self.bias is None else y.add_(self.bias)
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        if self.bias is None:
            return torch.mm(x, self.weight)
        return torch.addmm(self.bias, x, self.weight)

    def narrow(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` in the dtype the weights read for ``x`` multiply in (``_copy``'s for the copies)."""
        y = self._copy(x)
        if y is None:
            return self(x)
        return y if self.bias is None else y.add_(self.bias)

    def add_to(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``h + self(x)`` as one multiply-add (a residual connection)."""
        y = self._copy(x)
        if y is not None:
            out = torch.add(h, y)  # promoted to ``h``'s dtype in the add
        else:
            out = torch.addmm(h, x, self.weight if self.transposed else self.weight.t())
        return out if self.bias is None else out.add_(self.bias)


#: rope types whose cos/sin do not depend on the sequence length (no ``dynamic``, no ``longrope``)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
#: largest rope table kept (positions x head dim): 16 MB in float32
_ROPE_TABLE_MAX = 1 << 22


def _prompt_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, spans: list[tuple[int, int, int]],
                      scale: float) -> torch.Tensor:
    """A prefill's attention prompt by prompt: packed queries ``q`` ``[N, Hq, D]`` -> ``[N, Hq * D]``.

    ``spans``: per prompt (its row of ``keys``/``values`` ``[B, Hk, T, D]``)
    its first column, its first computed column and how many tokens it
    computes (its rows of ``q``, in order). Each prompt's computed tokens
    attend over its own columns only, causally: no padding column enters a
    sum, so a prompt's arithmetic is the same whichever prompts share its
    prefill (padded to the longest, the left padding moved its columns
    across the vector lanes of softmax's and the products' sums, and greedy
    replies of a batch drifted from those of the same prompts one at a
    time); and no query of a reused beginning is computed (attention over
    the padded square computed them all). Torch's CPU kernel for
    ``scaled_dot_product_attention`` took twice as long as three batched
    products on a prefill's short rows (docs/benchmarks.md).
    """
    hq, d = q.shape[1], q.shape[2]
    hk = keys.shape[1]
    group = hq // hk
    outs, at = [], 0
    for b, (start, first, count) in enumerate(spans):
        qb = q[at : at + count].transpose(0, 1).reshape(hk, group * count, d)  # [Hk, G * n, D]
        at += count
        k, v = keys[b, :, start:], values[b, :, start:]  # [Hk, L, D]
        scores = torch.matmul(qb, k.transpose(-1, -2)).mul_(scale).view(hk, group, count, -1)
        # computed token j sits at column first - start + j of the prompt's own and sees up to it
        hidden = torch.ones(count, k.shape[1], dtype=torch.bool, device=q.device).triu_(first - start + 1)
        scores.masked_fill_(hidden, float("-inf"))
        probs = scores.softmax(-1) if q.dtype == torch.float32 else scores.softmax(-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs.view(hk, group * count, -1), v)  # [Hk, G * n, D]
        outs.append(out.view(hq, count, d).transpose(0, 1).reshape(count, hq * d))
    return torch.cat(outs)


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated: ``rotate_half(x) * sin == x.roll(D/2) * _signed(sin)``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``x * cos + rotate_half(x) * sin`` in three operations instead of seven."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def _rms_norm(module: nn.Module, dtype: torch.dtype | None = None):
    """``module`` (an RMSNorm) as one fused op: its Python upcasts and multiplies in six."""
    weight, eps = module.weight, module.variance_epsilon
    if dtype is not None:
        weight = weight.detach().to(dtype)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, weight.shape, weight, eps)

    norm.weight, norm.eps = weight, eps  # for the C step (``_native``)
    return norm
