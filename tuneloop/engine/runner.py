"""The local engine's model runner: weights, the batch's KV cache, the forward passes.

Boundary: token ids in, logits out. It loads the tokenizer and the model,
keeps the base weights to swap adapters over, and holds the running batch's
cache (``_batch.Batch``) with one row per running ``Sequence``, in the
scheduler's order. A step is a prefill of newcomers (merged into the batch)
or one decoding step of every row, through tuneloop's fused decoder
(``_decode.Decoder``) where the architecture has one, else transformers'
``forward``. It samples nothing and knows no text.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from tuneloop.engine._batch import Batch, last_logits, prefill
from tuneloop.engine._decode import Decoder
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
    ) -> None:
        self.model_path = str(model_path)
        self.version = version  # the version whose weights are loaded
        self.device_name = device
        self.dtype_name = dtype
        self.threads = threads
        self.fused_decode = fused_decode
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
        self._base_state: dict[str, torch.Tensor] | None = None
        self._torch_threads = 1

    # --------------------------------------------------------------- weights

    def load(self) -> None:
        """Load tokenizer and model (blocking)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from tuneloop.engine.device import pick_device, pick_dtype

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
        dtype = pick_dtype(self.dtype_name, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
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
        self._base_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._build_decoder()

    def _build_decoder(self) -> None:
        """Pick the decode step for the current weights (after a load or a swap)."""
        self.decoder = None
        if self.fused_decode:
            self.decoder, why = Decoder.for_model(self.model)
            if self.decoder is not None and self.device == "cpu":
                self.decoder.widen(self._torch_threads, os.cpu_count() or 1)
        else:
            why = "[model] fused_decode = false"
        log.info("decode step: %s (%s)", self.decode_step, why)

    @property
    def decode_step(self) -> str:
        """``fused`` (``_decode.Decoder``) or ``transformers`` (the model's ``forward``)."""
        return "fused" if self.decoder is not None else "transformers"

    def swap(self, adapter_path: str | None, version: str) -> None:
        """Serve ``version``: an adapter or fully fine-tuned folder over the base weights, or the base.

        Runs with no row in the batch (the scheduler drains it first). On
        failure the previous weights are restored and ``ModelError`` raised.
        """
        try:
            self._load_weights(adapter_path)
        except Exception as e:
            log.exception("adapter swap failed")
            try:
                self._load_weights(self._adapter)  # keep serving the old weights
            except Exception:  # noqa: BLE001
                log.exception("restoring the previous weights failed")
            self._build_decoder()
            raise ModelError(f"cannot load adapter {adapter_path}: {type(e).__name__}: {e}") from None
        self._adapter = adapter_path
        self.version = version
        self._build_decoder()
        log.info("now serving %s", version)

    def _load_weights(self, adapter_path: str | None) -> None:
        with torch.no_grad():
            self.model.load_state_dict(self._base_state)
            if not adapter_path:
                return
            if (Path(adapter_path) / "adapter_config.json").exists():
                from peft import PeftModel

                merged = PeftModel.from_pretrained(self.model, adapter_path).merge_and_unload()
                self.model = merged.to(self.device).eval()
            else:
                # A fully fine-tuned version ([trainer] lora = false): the same
                # architecture, every weight replaced.
                from transformers import AutoModelForCausalLM

                full = AutoModelForCausalLM.from_pretrained(adapter_path, dtype=self.model.dtype)
                self.model.load_state_dict(full.state_dict())

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
            logits = self.decoder.step(ids, self.kv)
        else:
            mask, pos = self.kv.step_inputs()
            logits = last_logits(self.model, ids, mask, pos, self.kv.cache)
        self.kv.advance()
        return logits

    def reset(self) -> None:
        """Forget the batch (after a failed step)."""
        self.kv, self.rows = None, []

    def _prefill(self, newcomers: list[Sequence], kept: list[Sequence]) -> torch.Tensor:
        for seq in newcomers:
            seq.version = self.version
        prompts = [seq.prompt for seq in newcomers]
        if self.decoder is not None:
            fresh, logits = self.decoder.prefill(prompts)
        else:
            fresh, logits = prefill(self.model, prompts, self.pad, self.device)
        parts = [(fresh, None)]
        if kept:
            parts.insert(0, (self.kv, self._rows_of(kept)))
        rows = kept + newcomers
        # Room for every column the rows may still write (``Batch`` grows if a guess falls short).
        self.kv = Batch.merge(parts, max(s.room for s in rows) + 1)
        self.rows = rows
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

    def _rows_of(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Indices of ``seqs`` among the cache's rows; None when they are all of them."""
        if len(seqs) == len(self.rows):
            return None
        where = {id(s): i for i, s in enumerate(self.rows)}
        return torch.tensor([where[id(s)] for s in seqs], device=self.kv.mask.device)
