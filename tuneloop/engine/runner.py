"""The local engine's model runner: weights, the batch's KV cache, the forward passes.

Boundary: token ids in, logits out. It loads the tokenizer and the model,
keeps the base weights to swap adapters over, and holds the running batch's
cache (``_batch.Batch``) with one row per running ``Sequence``, in the
scheduler's order. A step is a prefill of newcomers (merged into the batch)
or one decoding step of every row, through tuneloop's fused decoder
(``_decode.Decoder``) where the architecture has one, else transformers'
``forward``. It samples nothing and knows no text.

Adapters served per request (``lora.AdapterBank``) are added row by row to
the base weights' outputs, in the fused step and (through forward hooks) in
transformers' forward; ``swap`` instead merges one version into the weights
for every request. A per-request adapter is a delta over whatever weights
are loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from tuneloop.engine._batch import Batch, last_logits, prefill
from tuneloop.engine._decode import Decoder
from tuneloop.engine.lora import Adapter, AdapterBank, Hooks, Plan, fused_groups, linear_groups, read_adapter
from tuneloop.engine.scheduler import ScheduledBatch
from tuneloop.engine.sequence import Sequence
from tuneloop.errors import ModelError

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model_path: str,
        *,
        version: str,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        fused_decode: bool = True,
        quantize: str = "none",
    ) -> None:
        self.model_path = str(model_path)
        self.version = version  # the version whose weights are loaded
        self.device_name = device
        self.dtype_name = dtype
        self.threads = threads
        self.fused_decode = fused_decode
        self.quantize_name = quantize  # [model] quantize
        self.quantize = "none"  # the format chosen at load (``quant.pick_format``)
        self.quant_rows = 0
        self._half = False  # large steps of a float32 model read a bfloat16 copy
        self._quant_why = ""
        # The live version's LoRA adapter, applied unmerged to every row that
        # names none, where the base weights are quantized (see ``swap``).
        self._live: Adapter | None = None
        self.device = device
        self.model = None
        self.tokenizer = None
        self.decoder: Decoder | None = None
        self.context_window = 0
        self.eos: set[int] = set()
        self.pad = 0
        self.kv: Batch | None = None  # the running rows' cache
        self.rows: list[Sequence] = []  # the sequence of each row of ``kv``
        self._adapter: str | None = None
        self._merged: str | None = None  # the version merged into the weights, if any
        self._base_state: dict[str, torch.Tensor] | None = None
        self._torch_threads = 1
        self.bank: AdapterBank | None = None  # adapters named per request
        self._hooks: Hooks | None = None  # the bank's way into transformers' forward
        self._plan: Plan | None = None  # the running rows grouped by adapter
        self.weights_generation = 0  # changes with every swap: an adapter checked before is checked again

    # --------------------------------------------------------------- weights

    def load(self) -> None:
        """Load tokenizer and model (blocking)."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from tuneloop.engine.device import pick_device

        self.device = pick_device(self.device_name)
        threads = self.threads
        if threads is None and self.device == "cpu":
            # Leave a core to the event loop, the adapters and the tokenizer:
            # with every core given to torch, its worker threads spin against
            # the loop thread. The fused decode step takes the other cores back
            # where it measures that they help (``Decoder.widen``).
            threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1))
        if threads:
            torch.set_num_threads(threads)
        # Threads started later (the engine's own) take this count; record it
        # for the decoder, which may widen its steps (``Decoder.widen``).
        self._torch_threads = torch.get_num_threads()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            dtype = self._pick_weights(AutoConfig.from_pretrained(self.model_path))
            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load model {self.model_path}: {e}") from None
        self.model.to(self.device).eval()
        cfg = self.model.config
        self.context_window = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        eos = set()
        for src in (
            getattr(self.model.generation_config, "eos_token_id", None),
            cfg.eos_token_id,
            self.tokenizer.eos_token_id,
        ):
            if isinstance(src, int):
                eos.add(src)
            elif src:
                eos.update(src)
        self.eos = eos
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (min(eos) if eos else 0)
        if self.quantize == "none":
            # Swaps merge versions into the weights: keep the base to restore.
            # Over quantized weights versions sit beside them, and the base is
            # read again from its folder in the rare case that one merges.
            self._base_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._build_decoder()

    def _pick_weights(self, config) -> torch.dtype:
        """The dense weights' dtype, and the quantized format small steps read (``self.quantize``).

        With quantized weights on a CPU, ``dtype = "auto"`` is float32: the
        activations, attention and residual stream then stay in float32,
        which measured faster than bfloat16 at one row (bfloat16's small
        attention products are slow) and as fast at 16, and closer to
        float32's replies; prefills and steps above the crossover read the
        float32 weights beside our float32 int4 kernel (replies equal to
        float32's), else a bfloat16 copy where bfloat16 multiplies faster
        (``Decoder.quantize_weights``; docs/benchmarks.md, "Weight formats").
        """
        from tuneloop.engine import _int4, quant
        from tuneloop.engine._decode import SUPPORTED
        from tuneloop.engine.device import BF16_MIN_SPEEDUP, cpu_bf16_speedup, pick_dtype

        self.quantize, self._quant_why = "none", f"[model] quantize = \"{self.quantize_name}\""
        if self.quantize_name != "none":
            if not self.fused_decode:
                self._quant_why = "quantized weights need the fused decode step ([model] fused_decode = false)"
            elif getattr(config, "model_type", "") not in SUPPORTED:
                self._quant_why = f"model type {getattr(config, 'model_type', '')!r} has no fused decode step"
            else:
                dense = torch.float32 if self.dtype_name == "auto" else getattr(torch, self.dtype_name)
                width = int(getattr(config, "hidden_size", 0) or 0)
                self.quantize, self._quant_why = quant.pick_format(self.quantize_name, self.device, width, dense)
        if self.quantize == "none":
            return pick_dtype(self.dtype_name, self.device)
        # A float32 model's large steps read a bfloat16 copy where bfloat16 is the faster
        # (``Decoder.quantize_weights``); the crossover is against what they would read.
        # Not beside our float32 int4 kernel (``_int4``): its steps give float32's replies
        # (16/16 greedy replies equal on the bench's prompts), and a bfloat16 copy for the
        # larger steps and prefills would be the one source of differences left (10-13/16
        # with it); against float32 weights the kernel stays the faster up to 32-256 rows (``quant.SIZES``).
        exact = self.quantize == "int4" and _int4.library() is not None
        self._half = (not exact and self.dtype_name == "auto" and dense == torch.float32
                      and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP)
        self.quant_rows = quant.crossover(self.quantize, torch.bfloat16 if self._half else dense)
        return dense

    def _build_decoder(self) -> None:
        """Pick the decode step for the current weights (after a load or a swap)."""
        self.decoder = None
        if self.fused_decode:
            # A version merged into the weights (not plain LoRA) is served dense:
            # its change is smaller than a 4-bit step and would round away.
            kind = self.quantize if self._merged is None else "none"
            self.decoder, why = Decoder.for_model(self.model, quantize=kind, quant_rows=self.quant_rows,
                                                  half=self._half)
            if self.quantize != "none":
                why = f"{why}; quantize: {self._quant_why}" if kind != "none" else \
                    f"{why}; version {self.version} merged into the weights, served dense"
            if self.decoder is not None and self.device == "cpu":
                self.decoder.widen(self._torch_threads, os.cpu_count() or 1)
        else:
            why = "[model] fused_decode = false"
        log.info("decode step: %s (%s)", self.decode_step, why)
        self._build_bank()

    def _build_bank(self) -> None:
        """The adapter bank laid out for the decode step in use; adapters already loaded stay."""
        old = self.bank
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        groups = fused_groups(self.model) if self.decoder is not None else linear_groups(self.model)
        self.bank = AdapterBank(self.model, groups)
        if old is not None:
            self.bank.named = old.named
            self.bank.sync(self._loras(self.rows))
        if self.decoder is None:
            self._hooks = Hooks(self.bank)
        self._plan = self.bank.plan(self._loras(self.rows))

    @property
    def weights_format(self) -> str:
        """The quantized format steps read now (``none``: dense), after the load's check and the version."""
        return self.decoder.quantize if self.decoder is not None else "none"

    @property
    def decode_step(self) -> str:
        """``fused`` (``_decode.Decoder``) or ``transformers`` (the model's ``forward``)."""
        return "fused" if self.decoder is not None else "transformers"

    def swap(self, adapter_path: str | None, version: str) -> None:
        """Serve ``version``: an adapter or fully fine-tuned folder over the base weights, or the base.

        Runs with no row in the batch (the scheduler drains it first). On
        failure the previous weights are restored and ``ModelError`` raised.
        Over quantized base weights a plain LoRA adapter is not merged but
        applied beside them to every row (``_live``): merged, its change
        would round away in 4-bit steps, and the base (dense and quantized)
        stays as it is, so nothing is rebuilt.
        """
        try:
            changed = self._load_weights(adapter_path, version)
        except Exception as e:
            log.exception("adapter swap failed")
            try:
                self._load_weights(self._adapter, self.version)  # keep serving the old weights
            except Exception:  # noqa: BLE001
                log.exception("restoring the previous weights failed")
            self._build_decoder()
            raise ModelError(f"cannot load adapter {adapter_path}: {type(e).__name__}: {e}") from None
        self._adapter = adapter_path
        self.version = version
        self.weights_generation += 1
        if changed:
            self._build_decoder()
        else:
            self.bank.sync(self._loras(self.rows))
            self._plan = self.bank.plan(self._loras(self.rows))
        log.info("now serving %s%s", version, " (LoRA beside the quantized weights)" if self._live else "")

    def _load_weights(self, adapter_path: str | None, version: str) -> bool:
        """Put ``adapter_path``'s weights in place; whether the model's weights changed."""
        lora = adapter_path is not None and (Path(adapter_path) / "adapter_config.json").exists()
        if self.quantize != "none" and (lora or not adapter_path):
            live = None
            if adapter_path:
                try:
                    live = read_adapter(version, adapter_path, self.model)
                except ModelError as e:  # DoRA and the like change the weights themselves
                    log.info("version %s merged into the weights and served dense: %s", version, e)
            if live is not None or not adapter_path:
                self._live = live
                if self._merged is None:
                    return False
                with torch.no_grad():
                    self.model.load_state_dict(self._base_weights())
                self._merged = None
                return True
        self._live = None
        with torch.no_grad():
            if self._merged is not None or self._base_state is not None:
                self.model.load_state_dict(self._base_weights())
            self._merged = adapter_path
            if not adapter_path:
                return True
            if lora:
                from peft import PeftModel

                merged = PeftModel.from_pretrained(self.model, adapter_path).merge_and_unload()
                self.model = merged.to(self.device).eval()
            else:
                # A fully fine-tuned version ([trainer] lora = false): the same
                # architecture, every weight replaced.
                from transformers import AutoModelForCausalLM

                full = AutoModelForCausalLM.from_pretrained(adapter_path, dtype=self.model.dtype)
                self.model.load_state_dict(full.state_dict())
        return True

    def _base_weights(self) -> dict[str, torch.Tensor]:
        """The base model's weights: the copy kept at load, or read again from its folder."""
        if self._base_state is not None:
            return self._base_state
        from transformers import AutoModelForCausalLM

        log.info("reading the base weights again from %s", self.model_path)
        return AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.model.dtype).state_dict()

    def _loras(self, seqs: list[Sequence]) -> list[Adapter | None]:
        """Each row's adapter: its own, else the live version's where that is served unmerged."""
        live = self._live
        return [s.lora if s.lora is not None else live for s in seqs]

    # ----------------------------------------------------------------- steps

    def run(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Logits ``[len(batch.seqs), vocab]`` for each computed row's next token; None if none."""
        if batch.is_prefill:
            return self._prefill(batch.seqs, batch.running[: len(batch.running) - len(batch.seqs)])
        self._keep(batch.seqs)
        if not batch.seqs:
            return None
        ids = torch.tensor([[s.tokens[-1]] for s in batch.seqs], device=self.device)
        if self.decoder is not None:
            logits = self.decoder.step(ids, self.kv, self._plan)
        else:
            mask, pos = self.kv.step_inputs()
            with self._hooked(self._plan):
                logits = last_logits(self.model, ids, mask, pos, self.kv.cache)
        self.kv.advance()
        return logits

    def _hooked(self, plan: Plan | None):
        """Context in which transformers' forward adds ``plan``'s per-row deltas."""
        hooks = self._hooks

        @contextlib.contextmanager
        def active():
            hooks.plan = plan
            try:
                yield
            finally:
                hooks.plan = None

        return active() if hooks is not None and plan is not None else contextlib.nullcontext()

    def reset(self) -> None:
        """Forget the batch (after a failed step, or idle)."""
        self.kv, self.rows, self._plan = None, [], None
        if self.bank is not None and len(self.bank.live) != len(self.bank.named) + (self._live is not None):
            self.bank.sync([self._live])  # adapters replaced or unloaded while rows used them

    def _prefill(self, newcomers: list[Sequence], kept: list[Sequence]) -> torch.Tensor:
        for seq in newcomers:
            seq.version = seq.lora.name if seq.lora is not None else self.version
        prompts = [seq.prompt for seq in newcomers]
        bank = self.bank
        bank.sync(self._loras(kept + newcomers))
        adapters = self._loras(newcomers)
        if self.decoder is not None:
            # A packed prefill: the plan's rows are the tokens it computes, those after a kept beginning.
            fresh, logits = self.decoder.prefill(prompts, lambda lens: bank.plan(adapters, lens), owners=adapters)
        else:
            with self._hooked(bank.plan(adapters)):
                fresh, logits = prefill(self.model, prompts, self.pad, self.device)
        parts = [(fresh, None)]
        if kept:
            parts.insert(0, (self.kv, self._rows_of(kept)))
        rows = kept + newcomers
        # Room for every column the rows may still write (``Batch`` grows if a guess falls short).
        self.kv = Batch.merge(parts, max(s.room for s in rows) + 1)
        self.rows = rows
        self._plan = bank.plan(self._loras(rows))
        return logits

    def _keep(self, seqs: list[Sequence]) -> None:
        """Shrink the cache to the rows of ``seqs`` (the rows still running, in order)."""
        if len(seqs) == len(self.rows):
            return  # rows only ever leave between prefills, so the same count is the same rows
        if not seqs:
            self.reset()
            return
        self.kv = Batch.merge([(self.kv, self._rows_of(seqs))], max(s.room for s in seqs) + 1)
        self.rows = list(seqs)
        self._plan = self.bank.plan(self._loras(seqs))

    def _rows_of(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Indices of ``seqs`` among the cache's rows; None when they are all of them."""
        if len(seqs) == len(self.rows):
            return None
        where = {id(s): i for i, s in enumerate(self.rows)}
        return torch.tensor([where[id(s)] for s in seqs], device=self.kv.mask.device)

    # -------------------------------------------------------------- adapters

    def add_adapter(self, adapter: Adapter, checked: int | None = None) -> None:
        """Serve ``adapter`` under its name from the next step on (on the engine thread, between steps).

        Checked first (``check_adapter``) unless it was checked on these
        weights already (``checked`` is the ``weights_generation`` it was
        checked on, off the engine thread); a name loaded before is replaced
        for new requests, while running rows finish on the one they began with.
        """
        problem = self.check_adapter(adapter) if checked != self.weights_generation else ""
        if problem:
            raise ModelError(f"cannot serve adapter {adapter.name} per request: {problem}")
        self.bank.load(adapter)
        self.bank.sync(self._loras(self.rows))
        self._plan = self.bank.plan(self._loras(self.rows))
        log.info("adapter %s loaded from %s (rank %d, %d modules, %s step)", adapter.name, adapter.path,
                 adapter.rank, len(adapter.weights), self.decode_step)

    def remove_adapter(self, name: str) -> None:
        self.bank.unload(name)
        self.bank.sync(self._loras(self.rows))
        self._plan = self.bank.plan(self._loras(self.rows))
        log.info("adapter %s unloaded", name)

    @torch.inference_mode()
    def check_adapter(self, adapter: Adapter) -> str:
        """Per-row logits against the merged model's on a test batch; '' when they agree.

        A ragged batch of three prompts, the first and last with ``adapter``
        and the middle one without, through this runner's own prefill and
        three decoding steps; the reference is transformers' forward on a
        float32 copy of the weights, with the adapter merged by peft for the
        first and last rows and without it for the middle one. In float32 the
        logits must agree to 1e-3 (relative to the largest). In a half
        precision, as ``Decoder.verify`` does, the same step is first checked
        in float32 on a float32 copy, to 1e-3, and then in the model's own
        precision: at most twice as far from the reference as transformers'
        own half-precision forward of the merged model (rounding alone, on
        SmolLM2 in bfloat16, moved the adapter rows 3% where the plain row
        moved 1%: a fixed multiple of the plain row was no bound).
        """
        import copy

        from peft import PeftModel

        vocab = self.model.get_input_embeddings().num_embeddings
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab, (k,), generator=gen).tolist() for k in (5, 2, 7)]
        base = copy.deepcopy(self.model).float()
        merged = PeftModel.from_pretrained(copy.deepcopy(base), adapter.path).merge_and_unload().eval()
        pick = [0, 1, 0]  # which model each row follows: merged, base, merged
        want, ids = self._reference(merged, base, pick, prompts)

        def error(got: list[torch.Tensor]) -> float:
            return max(float((g.float() - w).abs().max()) / max(1.0, float(w.abs().max()))
                       for g, w in zip(got, want, strict=True))

        rows = [adapter, None, adapter]
        # Through the dense weights: quantized ones are checked at load
        # (``Decoder.verify``) and would hide a wrong delta in their rounding.
        with self.decoder.dense() if self.decoder is not None else contextlib.nullcontext():
            own = error(self._rows_logits(self.decoder, self.model, adapter, rows, prompts, ids))
        if self.model.dtype == torch.float32:
            tol, why = 1e-3, "tolerance 1e-3"
        else:
            decoder = Decoder(base, self.decoder.layers[0].qkv.transposed) if self.decoder is not None else None
            exact = read_adapter(adapter.name, adapter.path, base)
            in_fp32 = error(self._rows_logits(decoder, base, exact, [exact, None, exact], prompts, ids))
            if in_fp32 > 1e-3:
                return f"in float32, its rows' logits differ from the merged model's by {in_fp32:.2g} (relative)"
            half, _ = self._reference(merged.to(self.model.dtype), base.to(self.model.dtype), pick, prompts, ids)
            theirs = error(half)
            tol = max(1e-3, 2 * theirs)
            why = f"transformers' {self.model.dtype} forward of the merged model: {theirs:.2g}, tolerance {tol:.2g}"
        if own <= tol:
            return ""
        return f"its rows' logits differ from the merged model's by {own:.2g} (relative; {why})"

    def _reference(self, merged, base, pick, prompts, ids=None):
        """transformers' logits of a prefill and three steps, row ``i`` from ``(merged, base)[pick[i]]``.

        The tokens fed are ``ids`` when given, else each step's argmax (returned).
        """
        outs = [prefill(m, prompts, 0, self.device) for m in (merged, base)]
        batches = [Batch.merge([(b, None)], 4) for b, _ in outs]

        def mixed(logits):
            return torch.stack([logits[k][i].float() for i, k in enumerate(pick)])

        got = [mixed([logits for _, logits in outs])]
        chosen = []
        for step in range(3):
            nxt = ids[step] if ids is not None else got[-1].argmax(-1, keepdim=True)
            chosen.append(nxt)
            logits = []
            for m, b in zip((merged, base), batches, strict=True):
                mask, pos = b.step_inputs()
                logits.append(last_logits(m, nxt, mask, pos, b.cache))
                b.advance()
            got.append(mixed(logits))
        return got, chosen

    def _rows_logits(self, decoder, model, adapter, rows, prompts, ids) -> list[torch.Tensor]:
        """This runner's way (the fused step, or forward hooks) over ``prompts``, rows with ``rows``' adapters."""
        groups = fused_groups(model) if decoder is not None else linear_groups(model)
        bank = AdapterBank(model, groups)
        bank.load(adapter)
        bank.sync([])
        hooks = None if decoder is not None else Hooks(bank)
        plan = bank.plan(rows)
        try:
            if hooks is not None:
                hooks.plan = plan
            if decoder is not None:
                batch, first = decoder.prefill(prompts, bank.plan(rows, [len(p) for p in prompts]))
            else:
                batch, first = prefill(model, prompts, self.pad, self.device)
            batch = Batch.merge([(batch, None)], 4)
            got = [first]
            for nxt in ids:
                if decoder is not None:
                    got.append(decoder.step(nxt, batch, plan))
                else:
                    mask, pos = batch.step_inputs()
                    got.append(last_logits(model, nxt, mask, pos, batch.cache))
                batch.advance()
            return got
        finally:
            if hooks is not None:
                hooks.remove()
