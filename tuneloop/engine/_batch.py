"""The running batch of the local engine: one KV cache for every sequence in flight.

This module knows tensors and nothing else: no tokenizer, no asyncio, no
requests. Rows are left-padded so that every sequence writes its next key and
value at the same column; an attention mask hides the padding and each row
carries its own position id.

Each layer's keys and values live in a buffer preallocated for the batch's
remaining token budget: a step writes one column in place (``DynamicCache``
re-concatenates the whole cache every step), and the buffer is rebuilt only
when rows join or leave, which is also when left padding nobody needs any
more is trimmed. Against ``DynamicCache`` in the same decode loop it measured
on par with short prompts and faster with long ones (docs/benchmarks.md,
"Design measurements").
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class SlabLayer(DynamicLayer):
    """One layer's keys and values in a ``[B, H, capacity, D]`` buffer, written in place."""

    def __init__(
        self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, length: int = 0
    ) -> None:
        super().__init__()
        self.kbuf = keys
        self.vbuf = values
        self.length = length
        if keys is not None:
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self.keys = keys[:, :, :length]
            self.values = values[:, :, :length]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self.kbuf is None or end > self.kbuf.shape[2]:
            self._grow(key_states, value_states, end)
        self.kbuf[:, :, self.length : end] = key_states
        self.vbuf[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.kbuf[:, :, :end]
        self.values = self.vbuf[:, :, :end]
        return self.keys, self.values

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``update`` for one new column, ``[B, H, D]`` each, without its checks (the fused step)."""
        end = self.length + 1
        if end > self.kbuf.shape[2]:
            self._grow(key.unsqueeze(2), value.unsqueeze(2), end)
        self.kbuf[:, :, self.length] = key
        self.vbuf[:, :, self.length] = value
        self.length = end
        self.keys = self.kbuf[:, :, :end]
        self.values = self.vbuf[:, :, :end]
        return self.keys, self.values

    def _grow(self, k: torch.Tensor, v: torch.Tensor, end: int) -> None:
        # Only reached by a prefill (sized exactly) or a batch whose budget was
        # underestimated; doubling keeps the latter amortised.
        cap = end if self.kbuf is None else max(end, 2 * self.kbuf.shape[2])
        b, h, _, d = k.shape
        kb = k.new_zeros(b, h, cap, d)
        vb = v.new_zeros(b, v.shape[1], cap, v.shape[3])
        if self.kbuf is not None and self.length:
            kb[:, :, : self.length] = self.kbuf[:, :, : self.length]
            vb[:, :, : self.length] = self.vbuf[:, :, : self.length]
        self.kbuf, self.vbuf = kb, vb

    def get_seq_length(self) -> int:
        return self.length


def new_cache() -> Cache:
    """An empty cache whose layers appear as the model writes them (for a prefill)."""
    return Cache(layer_class_to_replicate=SlabLayer)


class Batch:
    """Keys, values, mask and positions of the rows decoded together.

    ``length`` columns are filled; row ``i`` holds real tokens where
    ``mask[i] == 1`` (a suffix of the filled columns) and its next position id
    is ``pos[i]``.
    """

    def __init__(self, cache: Cache, mask: torch.Tensor, pos: torch.Tensor, length: int) -> None:
        self.cache = cache
        self.mask = mask  # [B, capacity] int64
        self.pos = pos  # [B] int64
        self.length = length

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask and position ids for one decoding step (column ``length``)."""
        if self.length >= self.capacity:
            self._extend(max(16, self.capacity))
        self.mask[:, self.length] = 1
        return self.mask[:, : self.length + 1], self.pos.unsqueeze(1)

    def advance(self) -> None:
        """Record that the model wrote column ``length`` for every row."""
        self.length += 1
        self.pos += 1

    def _extend(self, extra: int) -> None:
        layers = [_realloc(layer, None, 0, self.length, self.length + extra) for layer in self.cache.layers]
        self.cache = Cache(layers=layers)
        mask = self.mask.new_zeros(self.size, self.length + extra)
        mask[:, : self.length] = self.mask[:, : self.length]
        self.mask = mask

    @staticmethod
    def merge(parts: list[tuple[Batch, torch.Tensor | None]], budget: int) -> Batch:
        """One batch from the kept rows of several, right-aligned, with ``budget`` free columns.

        ``parts`` pairs a batch with the indices of its rows to keep (None: all).
        Leading columns where no kept row has a token are dropped.
        """
        trimmed = []
        for batch, keep in parts:
            mask = batch.mask[:, : batch.length] if keep is None else batch.mask[keep, : batch.length]
            if mask.shape[0] == 0:
                continue
            used = mask.any(0).nonzero()
            start = int(used[0]) if used.numel() else batch.length
            trimmed.append((batch, keep, start, batch.length - start))
        if not trimmed:
            return None  # type: ignore[return-value]
        length = max(n for *_, n in trimmed)
        cap = length + budget
        rows = sum((b.size if k is None else k.numel()) for b, k, _, _ in trimmed)
        first = trimmed[0][0]
        mask = first.mask.new_zeros(rows, cap)
        pos = torch.cat([b.pos if k is None else b.pos[k] for b, k, _, _ in trimmed])
        layers = []
        for li in range(len(first.cache.layers)):
            ref = first.cache.layers[li].kbuf
            _, h, _, d = ref.shape
            hv, dv = first.cache.layers[li].vbuf.shape[1], first.cache.layers[li].vbuf.shape[3]
            kb = ref.new_zeros(rows, h, cap, d)
            vb = ref.new_zeros(rows, hv, cap, dv)
            r = 0
            for b, k, start, n in trimmed:
                src = b.cache.layers[li]
                ks = src.kbuf[:, :, start : b.length] if k is None else src.kbuf[k, :, start : b.length]
                vs = src.vbuf[:, :, start : b.length] if k is None else src.vbuf[k, :, start : b.length]
                kb[r : r + ks.shape[0], :, length - n : length] = ks
                vb[r : r + vs.shape[0], :, length - n : length] = vs
                r += ks.shape[0]
            layers.append(SlabLayer(kb, vb, length))
        r = 0
        for b, k, start, n in trimmed:
            m = b.mask[:, start : b.length] if k is None else b.mask[k, start : b.length]
            mask[r : r + m.shape[0], length - n : length] = m
            r += m.shape[0]
        return Batch(Cache(layers=layers), mask, pos, length)


def _realloc(layer: SlabLayer, keep, start: int, end: int, cap: int) -> SlabLayer:
    k = layer.kbuf[:, :, start:end] if keep is None else layer.kbuf[keep, :, start:end]
    v = layer.vbuf[:, :, start:end] if keep is None else layer.vbuf[keep, :, start:end]
    kb = k.new_zeros(k.shape[0], k.shape[1], cap, k.shape[3])
    vb = v.new_zeros(v.shape[0], v.shape[1], cap, v.shape[3])
    kb[:, :, : end - start] = k
    vb[:, :, : end - start] = v
    return SlabLayer(kb, vb, end - start)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and position ids of the prompts, right-aligned in one matrix."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_(min=0)


def last_logits(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Cache) -> torch.Tensor:
    """transformers' forward over ``ids`` [B, T] with ``cache``; the logits of each row's last token."""
    return model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]


def prefill(model, prompts: list[list[int]], pad_id: int, device) -> tuple[Batch, torch.Tensor]:
    """Run the prompts (left-padded) through the model; the batch and each row's last logits."""
    ids, mask, pos = left_pad(prompts, pad_id, device)
    cache = new_cache()
    logits = last_logits(model, ids, mask, pos, cache)
    if not bool(mask.all()):
        # Padded positions can hold NaN (a query that sees no key); zero them so
        # that masked columns contribute exactly nothing later (0 * NaN is NaN).
        hole = (mask == 0)[:, None, :, None]
        for layer in cache.layers:
            layer.kbuf.masked_fill_(hole, 0)
            layer.vbuf.masked_fill_(hole, 0)
    batch = Batch(cache, mask, pos[:, -1] + 1, ids.shape[1])
    return batch, logits
