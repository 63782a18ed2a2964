"""Keys and values of prompt beginnings many requests share, so a prefill computes only the rest.

Why. Every request a bot sends starts the same way: the chat template, the
system prompt, often a community's instructions. On SmolLM2 the bench's
prompts share their first 24 of 31-44 tokens, so a prefill of 16 of them
spent two thirds of its time recomputing keys and values it had already
computed (docs/benchmarks.md, "Weight formats"); llama.cpp keeps the last
prompt's cache for the same reason. A prefix's keys and values depend only on
its tokens, the weights and the adapter, so they are kept per adapter (None:
the base) and dropped with the ``Decoder`` (rebuilt after every weight swap).

What is kept: after a prefill, each prompt's longest beginning shared with a
recent prompt (``REMEMBERED`` of them, or another in the same batch), when at
least ``MIN_TOKENS`` long; at most ``ENTRIES`` and ``MAX_BYTES``, least
recently used dropped first. A prompt then takes the longest kept beginning it starts with, always
leaving its last token to compute (its logits are the reply's first).

The reused keys and values were computed in whichever precision that
prefill's size chose (int4 weights for a few tokens, dense above), so a reply
can differ in its last digits from one computed without them, as it already
can between batch sizes.

Public surface: ``PrefixCache``.
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch

#: Shortest beginning worth keeping (tokens).
MIN_TOKENS = 16
#: Beginnings kept.
ENTRIES = 8
#: Recent prompts (tokens only) a new prompt is compared with.
REMEMBERED = 32
#: Most bytes of keys and values kept in all (a conversation's earlier turns are a beginning its next
#: prompt shares: SmolLM2 keeps 46 KB a token, a 1.7B model 390 KB).
MAX_BYTES = 256 << 20


def _common(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int], cap: int) -> int:
    n = min(len(a), len(b), cap)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Per (adapter, tokens): each layer's keys and values ``[P, kv_heads, head_dim]``."""

    def __init__(self) -> None:
        self._kv: OrderedDict[tuple[object, tuple[int, ...]], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._seen: deque[tuple[object, tuple[int, ...]]] = deque(maxlen=REMEMBERED)
        self.hits = 0  # prompts that reused a beginning
        self.reused = 0  # tokens not computed thanks to it

    def __len__(self) -> int:
        return len(self._kv)

    def lookup(self, prompt: list[int], owner: object) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The longest kept beginning of ``prompt`` (at most all but its last token) for ``owner``: its length
        and the layers' keys and values (None, 0 without one)."""
        best, found, key = 0, None, None
        for k, layers in self._kv.items():
            if k[0] is not owner:
                continue
            n = _common(k[1], prompt, len(prompt) - 1)
            if n > best:
                best, found, key = n, layers, k
        if best < MIN_TOKENS:
            return 0, None
        self._kv.move_to_end(key)
        return best, found

    def learn(self, prompts: list[list[int]], owners: list[object], used: list[int]) -> list[int]:
        """How long a beginning of each prompt to keep after its prefill (0: none) and remember the prompts.

        ``used``: the beginning each one reused. A beginning is kept when it is
        shared with a recent prompt or another of these, longer than the one
        used and not kept already.
        """
        keep, chosen = [], set()
        for i, (p, owner) in enumerate(zip(prompts, owners, strict=True)):
            cap = len(p) - 1
            others = [q for o, q in self._seen if o is owner]
            others += [q for j, (q, o) in enumerate(zip(prompts, owners, strict=True)) if j != i and o is owner]
            n = max((_common(q, p, cap) for q in others), default=0)
            key = (owner, tuple(p[:n]))
            if n < MIN_TOKENS or n <= used[i] or key in self._kv or key in chosen:
                n = 0
            chosen.add(key)
            keep.append(n)
        for p, owner in zip(prompts, owners, strict=True):
            self._seen.append((owner, tuple(p)))
        return keep

    @property
    def nbytes(self) -> int:
        return sum(_size(layers) for layers in self._kv.values())

    def store(self, tokens: list[int], owner: object, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if _size(layers) > MAX_BYTES:
            return
        key = (owner, tuple(tokens))
        self._kv[key] = layers
        self._kv.move_to_end(key)
        while len(self._kv) > ENTRIES or self.nbytes > MAX_BYTES:
            self._kv.popitem(last=False)


def _size(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
