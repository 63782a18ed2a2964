"""GPT pretraining ("Wiki-GPT") and prompt-masked chat SFT, in plain torch.

This module knows token ids, a causal LM and a training loop; where the text
comes from (``corpus``) and which sizes to use (``starter.Recipe``) live
elsewhere.

Why a plain torch loop and not ``transformers.Trainer`` / TRL's
``SFTTrainer``: the starter's models are tiny (0.3-10 M parameters) and its
steps take milliseconds on a CPU, so per-step framework overhead (callbacks,
logging, dataloader workers, accelerate wrapping) is a visible share of a
budget measured in seconds, and TRL's dataset preparation alone costs more
than the whole TINY build. A 40-line loop with AdamW, warmup + cosine decay
and gradient clipping is all the recipe needs, and it is deterministic under
``torch.manual_seed``. The fine-tuning of live feedback (``finetune.py``) is
where accelerate/TRL earn their keep.

Why a Llama-style model rather than GPT-2: rotary positions, RMSNorm and a
SwiGLU MLP learn faster per step at these sizes than GPT-2's learned
positions and GELU MLP, there is no position table to size, and it is the
architecture every serving stack (vLLM included) and every LoRA recipe
targets (``q_proj``/``v_proj``/... module names).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

IGNORE = -100  # label of a token the loss skips


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    max_positions: int
    kv_heads: int = 0  # 0: as many key/value heads as query heads


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """A freshly initialised causal LM (call ``torch.manual_seed`` first)."""
    config = LlamaConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,  # halves the parameters of a small-vocab model
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_loop(
    model: torch.nn.Module,
    next_batch: Callable[[int], dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float = 0.0,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """``steps`` AdamW steps on ``next_batch(step)``; returns the loss of each step."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    model.train()
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        loss = model(**next_batch(step)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    model.eval()
    return losses


# --- pretraining: next-token prediction on packed text ------------------------


def pack(tokenizer: PreTrainedTokenizerBase, documents: Sequence[str]) -> torch.Tensor:
    """All documents as one id stream, each preceded by the document separator."""
    ids: list[int] = []
    for doc_ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
        ids.append(tokenizer.bos_token_id)
        ids.extend(doc_ids)
    return torch.tensor(ids, dtype=torch.long)


def pretrain_batches(stream: torch.Tensor, block: int, batch: int, seed: int) -> Callable[[int], dict]:
    """Random windows of ``block`` tokens from ``stream`` (deterministic in ``seed``)."""
    block = min(block, len(stream) - 1)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(block)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, len(stream) - block, (batch, 1), generator=gen)
        ids = stream[starts + offsets]
        return {"input_ids": ids, "labels": ids}

    return next_batch


# --- supervised fine-tuning: chat examples, loss on the reply only ------------


def sft_example(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    reply: str,
    max_len: int,
) -> tuple[list[int], list[int]] | None:
    """``(input_ids, labels)`` for ``messages`` answered by ``reply``.

    The prompt is the chat template with the generation prompt; only the reply
    and its ``<|im_end|>`` carry labels, every prompt token is ``-100``. Earlier
    turns are dropped (oldest first, keeping a system message) until the prompt
    leaves room for a reply; a reply that still does not fit is cut, and loses
    its end-of-turn. ``None`` when even the last user turn does not fit.
    """
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    messages = list(messages)
    while True:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        if len(prompt) <= max_len - 4:
            break
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return None
        del messages[first : first + 1]
    reply_ids = reply_ids[: max_len - len(prompt)]
    return prompt + reply_ids, [IGNORE] * len(prompt) + reply_ids


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked from attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def sft_batches(
    examples: Sequence[tuple[list[int], list[int]]], batch: int, pad_id: int, seed: int
) -> Callable[[int], dict]:
    """Batches drawn epoch by epoch in a seeded shuffle.

    Within a window of a few batches, examples of similar length share a batch
    so that a 300-token reply does not pad thirty 20-token ones.
    """
    rng = random.Random(seed)
    queue: list[list[int]] = []

    def refill() -> None:
        order = list(range(len(examples)))
        rng.shuffle(order)
        window = batch * 16
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: len(examples[i][0]))
            batches = [chunk[b : b + batch] for b in range(0, len(chunk), batch)]
            rng.shuffle(batches)
            queue.extend(batches)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        if not queue:
            refill()
        return collate([examples[i] for i in queue.pop(0)], pad_id)

    return next_batch


def sft_variant_batches(
    variants: Sequence[Sequence[tuple[list[int], list[int]]]],
    batch: int,
    pad_id: int,
    seed: int,
    every: Sequence[int] | None = None,
) -> Callable[[int], dict]:
    """Like ``sft_batches`` over items that each have several forms (variants).

    Epoch ``e`` shows form ``(e + offset) % len(forms)`` of each item, with a
    seeded per-item offset, so each epoch costs one example per item and every
    form comes round in turn. ``every[i]``: item ``i`` is shown only every
    ``every[i]``-th epoch (default: every epoch).
    """
    rng = random.Random(seed)
    offsets = [rng.randrange(len(v)) for v in variants]
    queue: list[list[tuple[list[int], list[int]]]] = []
    epoch = 0

    def refill() -> None:
        nonlocal epoch
        items = [
            v[(epoch // every[i] + off) % len(v) if every else (epoch + off) % len(v)]
            for i, (v, off) in enumerate(zip(variants, offsets, strict=True))
            if not every or (epoch + off) % every[i] == 0
        ]
        epoch += 1
        order = list(range(len(items)))
        rng.shuffle(order)
        window = batch * 16
        for w in range(0, len(order), window):
            chunk = sorted(order[w : w + window], key=lambda i: len(items[i][0]))
            batches = [[items[i] for i in chunk[b : b + batch]] for b in range(0, len(chunk), batch)]
            rng.shuffle(batches)
            queue.extend(batches)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        if not queue:
            refill()
        return collate(queue.pop(0), pad_id)

    return next_batch
