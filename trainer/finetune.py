"""Fine-tuning on feedback: SFT, KTO and DPO, with LoRA (default) or full weights.

Boundary: a base model folder and rows in TRL's conversational layouts
(``trainer.data``) in, an adapter folder (or a full model folder) out. It knows
nothing of the store, the registry or the gate.

One config (``FinetuneConfig``) and one loss per method, all over the same
loop. The loss is always masked over prompts: only reply tokens (and their
end-of-turn) carry labels, exactly as the starter's SFT does
(``pretrain.sft_example``).

- ``sft``: mean token NLL of the completions (feedback rows and replay rows).
- ``dpo``: the DPO loss ``-log σ(β((π_c - ref_c) - (π_r - ref_r)))`` on
  (correction, reply) pairs, plus the NLL of the chosen replies and of the
  replay rows (the "RPO" variant: DPO alone raises the chosen reply relative
  to the rejected one, not to what greedy decoding picks).
- ``kto``: the KTO loss with λ_D = λ_U = 1 on labelled completions; replay rows
  are desirable. The reference point z₀ is the batch's mean policy/reference
  log-ratio, detached and clamped at 0 (TRL estimates it the same way from
  mismatched pairs; with batches of a few rows the batch mean is as good).

The reference model is the starting point itself: a fresh LoRA adapter starts
at B = 0, so the policy *is* the reference before the first step. Reference
log-probabilities are therefore computed once, before training, with no
second model in memory (this holds for full fine-tuning too).

Why the project's own loop and not TRL's ``SFTTrainer`` / ``KTOTrainer`` /
``DPOTrainer``: measured on the same rows and the same LoRA, on the starter
and on SmolLM2-135M-Instruct (figures in docs/benchmarks.md), TRL's
``SFTTrainer`` took well over 15% longer per step on a CPU, whose per-step
extras (entropy and token-accuracy metrics, gradient checkpointing on by
default, callbacks, its collator) are what a few dozen feedback rows cannot
amortise. ``KTOTrainer`` would also build a KL dataset and ``DPOTrainer`` a
reference pass per batch; here the reference is scored once (see above). The
semantics are TRL's (same row layouts, same prompt masking): the SFT loss and
the DPO loss (``loss_type = ["sigmoid", "sft"]``) equal TRL's on the same
batch, which ``tests/test_learning_loop.py`` checks with TRL's own code. The
loop runs through ``accelerate``, so plain python, ``accelerate launch`` and
``torchrun`` share one code path.

Adapters (``peft``): LoRA, DoRA, AdaLoRA and IA3, each from peft's own config
and each merged into the weights for serving, so the engine's fused step and
hot-swap treat a version like the base. Prefix tuning is not offered: its
virtual tokens cannot be merged into the weights.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer.pretrain import IGNORE, collate, sft_example
from tuneloop.errors import TrainingError

log = logging.getLogger(__name__)

METHODS = ("sft", "kto", "dpo")
#: adapters that merge into the weights, so the engine's fused step and hot-swap
#: serve them like the base. Prefix tuning cannot merge, so it is not offered.
PEFT_KINDS = ("lora", "dora", "adalora", "ia3")
REPLAY_LOSSES = ("nll", "distill")
#: replay rows are distilled from the starting model's top-k next-token distribution
DISTILL_TOP_K = 32


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (``[trainer]`` in config.toml)."""

    #: training objective: sft, kto or dpo
    method: str = "sft"
    #: train an adapter (False: every weight)
    lora: bool = True
    #: the adapter's kind, peft's own config for each (see ``PEFT_KINDS``)
    peft: str = "lora"
    #: adapter rank and scale (lora, dora, adalora); LoRA adds ``alpha / r`` times ``B @ A``
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    #: peft's name for every linear layer but the output head
    target_modules: str = "all-linear"
    learning_rate: float = 2e-3
    epochs: int = 8
    #: most optimizer steps, whatever ``epochs`` says (0: no cap)
    max_steps: int = 0
    #: examples per optimizer step, over all processes together
    batch_size: int = 8
    seed: int = 0
    #: longest example in tokens (earlier turns are dropped first)
    max_len: int = 256
    #: kto/dpo: how strongly the policy is held to the reference
    beta: float = 0.1
    #: fp32, bf16 or fp16 (mixed precision on CUDA); "auto": bf16 on CUDA, fp32 on CPU
    precision: str = "auto"
    #: replay examples mixed into each epoch per feedback example (see ``steps``)
    replay_ratio: float = 1.0
    #: replay rows: "distill" (cross-entropy to the starting model's top-k next-token
    #: distribution) or "nll" (its greedy reply as the target, like any SFT row)
    replay_loss: str = "nll"
    #: weight of the replay rows' loss beside the feedback rows' (each is a mean over its tokens)
    replay_weight: float = 1.0
    #: stop at an epoch's end once every feedback reply is the greedy continuation of its prompt
    early_stop: bool = True
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0


def _env_int(name: str) -> int | None:
    try:
        return max(1, int(os.environ.get(name, "")))
    except ValueError:
        return None


def _examples(tokenizer, rows: list[dict[str, Any]], cfg: FinetuneConfig) -> list[dict[str, Any]]:
    """Rows to token ids: ``{"sft": (ids, labels)}``, ``{"pair": ..}`` or ``{"kto": .., "label": b}``."""
    def enc(prompt, completion):
        return sft_example(tokenizer, prompt, completion[0]["content"], cfg.max_len)

    out = []
    for row in rows:
        if row.get("replay"):
            e = enc(row["prompt"], row["completion"])
            if e and row.get("cut") and e[1][-1] == tokenizer.eos_token_id:
                # The reply was cut at a length limit: no end-of-turn to learn there.
                e = (e[0][:-1], e[1][:-1])
            if e:
                out.append({"distill": e, "replay": True} if cfg.replay_loss == "distill"
                           else {"sft": e, "replay": True})
        elif "chosen" in row:
            c, r = enc(row["prompt"], row["chosen"]), enc(row["prompt"], row["rejected"])
            if c and r:
                out.append({"pair": (c, r)})
        elif "label" in row or cfg.method == "kto":
            e = enc(row["prompt"], row["completion"])
            if e:
                out.append({"kto": e, "label": bool(row.get("label", True))})
        else:
            e = enc(row["prompt"], row["completion"])
            if e:
                out.append({"sft": e})
    return out


def _seq_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: sum of label-token log-probabilities, and the number of label tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def _nll(model, examples: list[tuple[list[int], list[int]]], pad: int, device) -> torch.Tensor:
    batch = {k: v.to(device) for k, v in collate(examples, pad).items()}
    return model(**batch).loss


class Finetuner:
    """One run of ``cfg.method`` on ``rows``; ``train()`` then ``save(folder)`` on the main process."""

    def __init__(self, base_path: str | Path, rows: list[dict[str, Any]], cfg: FinetuneConfig,
                 accelerator=None, init_adapter: str | Path | None = None):
        if cfg.method not in METHODS:
            raise TrainingError(f"trainer.method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
        if cfg.peft not in PEFT_KINDS:
            raise TrainingError(f"trainer.peft must be one of {', '.join(PEFT_KINDS)}, got {cfg.peft!r}")
        if cfg.replay_loss not in REPLAY_LOSSES:
            raise TrainingError(f"trainer.replay_loss must be one of {', '.join(REPLAY_LOSSES)}, "
                                f"got {cfg.replay_loss!r}")
        from accelerate import Accelerator
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        cuda = torch.cuda.is_available()
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
        if precision != "fp32" and not cuda:
            raise TrainingError(f"trainer.precision = {precision!r} needs a CUDA device; use fp32 on CPU")
        self.precision = precision
        self.acc = accelerator or Accelerator(
            cpu=not cuda, mixed_precision={"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision])
        if self.acc.device.type == "cpu":
            # Share the cores between the processes of a multi-process CPU run.
            # OMP_NUM_THREADS caps them as it caps torch's own default: on a
            # machine shared with other work, one thread per process runs
            # faster than threads that spin waiting for a busy core.
            cores = _env_int("OMP_NUM_THREADS") or os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // self.acc.num_processes))
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        self.examples = _examples(self.tokenizer, rows, cfg)
        if not self.examples:
            raise TrainingError("nothing to train on: every example was empty or too long")
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
        if cfg.lora and init_adapter is not None:
            from peft import PeftModel

            # Continue from the live version: the starting point is what users
            # get today, so it is the reference of KTO/DPO and the teacher of replay.
            model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
        elif init_adapter is not None:
            model = AutoModelForCausalLM.from_pretrained(str(init_adapter), dtype=torch.float32)
        elif cfg.lora:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config(cfg, total_steps=len(self.steps())))
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        model.to(self.acc.device)
        self._reference(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                betas=(0.9, 0.99))
        self.model, self.opt = self.acc.prepare(model, opt)

    # -- the reference: the starting point, scored once --------------------------------

    @torch.no_grad()
    def _reference(self, model) -> None:
        model.eval()
        for ex in self.examples:
            if "distill" in ex:
                # The teacher's top-k next-token distribution at every reply position.
                batch = {k: v.to(self.acc.device) for k, v in collate([ex["distill"]], self.pad).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                pos = (batch["labels"][0, 1:] != IGNORE).nonzero().squeeze(-1)
                logp = torch.log_softmax(logits[0, pos].float(), -1)
                top = logp.topk(min(DISTILL_TOP_K, logp.shape[-1]), -1)
                ex["teacher"] = (pos.cpu(), top.indices.cpu(), torch.softmax(top.values, -1).cpu())
                # What "fitted" checks on this row: the teacher's own argmax at each reply
                # position. The row's text is the engine's greedy reply, which (in another
                # dtype) may pick another token where two are close; a distilled row is not
                # pulled toward that token, so early stop would never come.
                ids, labels = ex["distill"]
                labels = list(labels)
                for p, tok in zip(pos.tolist(), top.indices[:, 0].tolist()):
                    labels[p + 1] = tok
                ex["argmax"] = (ids, labels)
        if self.cfg.method == "sft":
            return
        for ex in self.examples:
            seqs = list(ex["pair"]) if "pair" in ex else [ex["kto"]] if "kto" in ex else []
            if seqs:
                batch = {k: v.to(self.acc.device) for k, v in collate(seqs, self.pad).items()}
                ex["ref"] = _seq_logps(model, batch)[0].tolist()

    # -- one step's loss ------------------------------------------------------------------

    def _loss(self, exs: list[dict[str, Any]]) -> torch.Tensor:
        dev, beta, model = self.acc.device, self.cfg.beta, self.model
        terms: list[torch.Tensor] = []
        sft = [e["sft"] for e in exs if "sft" in e and not e.get("replay")]
        replay = [e["sft"] for e in exs if "sft" in e and e.get("replay")]
        pairs = [e for e in exs if "pair" in e]
        kto = [e for e in exs if "kto" in e]
        distill = [e for e in exs if "distill" in e]
        if distill:
            batch = {k: v.to(dev) for k, v in collate([e["distill"] for e in distill], self.pad).items()}
            logp = torch.log_softmax(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float(), -1)
            parts = []
            for row, e in enumerate(distill):
                pos, idx, prob = (t.to(dev) for t in e["teacher"])
                parts.append(-(prob * logp[row, pos].gather(-1, idx)).sum(-1))
            terms.append(self.cfg.replay_weight * torch.cat(parts).mean())
        if replay:
            # Its own mean, so that ``replay_weight`` sets the balance whatever the batch's mix.
            terms.append(self.cfg.replay_weight * _nll(model, replay, self.pad, dev))
        if pairs:
            # Chosen replies first, rejected after: one forward for both.
            seqs = [e["pair"][0] for e in pairs] + [e["pair"][1] for e in pairs]
            batch = {k: v.to(dev) for k, v in collate(seqs, self.pad).items()}
            logp, _ = _seq_logps(model, batch)
            ref = torch.tensor([e["ref"] for e in pairs], device=dev)
            n = len(pairs)
            margin = (logp[:n] - ref[:, 0]) - (logp[n:] - ref[:, 1])
            terms.append(-F.logsigmoid(beta * margin).mean())
            sft = sft + [e["pair"][0] for e in pairs]
        if kto:
            batch = {k: v.to(dev) for k, v in collate([e["kto"] for e in kto], self.pad).items()}
            logp, _ = _seq_logps(model, batch)
            ratio = logp - torch.tensor([e["ref"][0] for e in kto], device=dev)
            z0 = ratio.detach().mean().clamp(min=0)
            good = torch.tensor([e["label"] for e in kto], device=dev)
            value = torch.where(good, torch.sigmoid(beta * (ratio - z0)), torch.sigmoid(beta * (z0 - ratio)))
            terms.append((1 - value).mean())
        if sft:
            terms.append(_nll(model, sft, self.pad, dev))
        return torch.stack(terms).sum()

    # -- the loop ---------------------------------------------------------------------------

    def steps(self) -> list[tuple[int, list[int]]]:
        """``(epoch, global batch of example indices)``, epoch by epoch (seeded).

        An epoch is every feedback example once plus ``replay_ratio`` replay
        examples per feedback example, drawn in turn from a reshuffled cycle
        over the replay set (so a small ratio still covers the whole set over
        a few epochs). A short last batch is filled from the start of the
        epoch, so every process gets rows at every step (DDP steps together).
        At most ``max_steps`` steps (the learning-rate schedule spans those).
        """
        size = max(self.cfg.batch_size, self.acc.num_processes)
        rng = random.Random(self.cfg.seed)
        feedback = [i for i, e in enumerate(self.examples) if not e.get("replay")]
        replay = [i for i, e in enumerate(self.examples) if e.get("replay")]
        per_epoch = round(self.cfg.replay_ratio * len(feedback)) if replay else 0
        if not feedback:
            feedback, per_epoch = replay, 0
        cycle: list[int] = []
        out = []
        for epoch in range(self.cfg.epochs):
            mixed = list(feedback)
            for _ in range(per_epoch):
                if not cycle:
                    cycle = list(replay)
                    rng.shuffle(cycle)
                mixed.append(cycle.pop())
            rng.shuffle(mixed)
            for b in range(0, len(mixed), size):
                chunk = mixed[b:b + size]
                chunk += (mixed * math.ceil(size / len(mixed)))[:size - len(chunk)]
                out.append((epoch, chunk))
        return out[:self.cfg.max_steps] if self.cfg.max_steps else out

    def train(self) -> dict[str, Any]:
        plan = self.steps()
        total = len(plan)
        warmup = max(1, int(self.cfg.warmup_ratio * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(
                math.pi * max(0, s - warmup) / max(1, total - warmup)))))
        rank, world = self.acc.process_index, self.acc.num_processes
        self.model.train()
        losses: list[float] = []
        t0 = last_log = time.perf_counter()
        stopped_at = None
        for step, (epoch, chunk) in enumerate(plan):
            if self.cfg.early_stop and step and epoch != plan[step - 1][0] and self.fitted():
                # Every feedback reply and every replay reply is now the greedy
                # continuation of its prompt: more steps would only move the
                # weights further from the live model's.
                stopped_at = step
                break
            mine = [self.examples[i] for i in chunk[rank::world]]
            loss = self._loss(mine)
            self.acc.backward(loss)
            self.acc.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            if self.cfg.lora and self.cfg.peft == "adalora":
                # AdaLoRA re-allocates rank between steps (peft's documented loop).
                self.acc.unwrap_model(self.model).base_model.update_and_allocate(step)
            sched.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            now = time.perf_counter()
            # Every 20 steps, and at least every half minute on a model whose steps take seconds.
            if step % 20 == 0 or step == total - 1 or now - last_log > 30:
                last_log = now
                log.info("finetune %s: step %d/%d loss %.4f (%.1f s/step)", self.cfg.method, step + 1, total,
                         losses[-1], (now - t0) / (step + 1))
        self.model.eval()
        self.acc.wait_for_everyone()
        tail = losses[-max(1, len(losses) // 5):]
        return {"steps": len(losses), "planned_steps": total, "early_stop": stopped_at is not None, "examples": len(self.examples), "trainable_parameters": self.trainable,
                "processes": world, "precision": self.precision, "first_loss": round(losses[0], 4),
                "final_loss": round(sum(tail) / len(tail), 4),
                "seconds": round(time.perf_counter() - t0, 2)}

    @torch.no_grad()
    def fitted(self) -> bool:
        """Whether greedy decoding (teacher-forced) reproduces every target reply token."""
        # Replay rows too: their targets are the starting model's greedy replies
        # (distilled rows: its argmax at each of their positions), so "fitted" also
        # means "the replay set still gets the same replies".
        seqs = [e["sft"] for e in self.examples if "sft" in e]
        seqs += [e["argmax"] for e in self.examples if "argmax" in e]
        seqs += [e["pair"][0] for e in self.examples if "pair" in e]
        seqs += [e["kto"] for e in self.examples if "kto" in e and e["label"]]
        if not seqs:
            return False
        model = self.acc.unwrap_model(self.model)
        model.eval()
        try:
            for i in range(0, len(seqs), 16):
                b = {k: v.to(self.acc.device) for k, v in collate(seqs[i:i + 16], self.pad).items()}
                pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].argmax(-1)
                labels = b["labels"][:, 1:]
                mask = labels != IGNORE
                if not bool((pred[mask] == labels[mask]).all()):
                    return False
            return True
        finally:
            model.train()

    def save(self, folder: Path) -> None:
        """Write the adapter (or the full model with its tokenizer) to ``folder``; main process only."""
        if not self.acc.is_main_process:
            return
        model = self.acc.unwrap_model(self.model)
        model.save_pretrained(str(folder))
        if not self.cfg.lora:
            self.tokenizer.save_pretrained(str(folder))


def _targets(cfg: FinetuneConfig) -> str | list[str]:
    if cfg.target_modules == "all-linear":
        return "all-linear"
    return [m.strip() for m in cfg.target_modules.split(",") if m.strip()]


def peft_config(cfg: FinetuneConfig, total_steps: int):
    """peft's config for ``cfg.peft``; every kind here merges into the base weights."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig

    common = {"task_type": "CAUSAL_LM"}
    if cfg.peft in ("lora", "dora"):
        return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=_targets(cfg), bias="none", use_dora=cfg.peft == "dora", **common)
    if cfg.peft == "adalora":
        # Starts at 1.5x the rank and prunes to ``lora_r`` over the middle of the run.
        phase = max(1, total_steps // 5)
        return AdaLoraConfig(init_r=max(cfg.lora_r * 3 // 2, cfg.lora_r + 1), target_r=cfg.lora_r,
                             lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=_targets(cfg), total_step=max(total_steps, 3 * phase + 1),
                             tinit=phase, tfinal=phase, deltaT=1, **common)
    if cfg.peft == "ia3":
        # "all-linear" means peft's own choice for the architecture (attention
        # keys/values and the MLP's down projection for Llama): IA3 scales
        # activations, and peft knows where that pays.
        if cfg.target_modules == "all-linear":
            return IA3Config(**common)
        targets = _targets(cfg)
        return IA3Config(target_modules=targets,
                         feedforward_modules=[m for m in targets if "mlp" in m or m in ("down_proj", "fc2")],
                         **common)
    raise TrainingError(f"trainer.peft must be one of {', '.join(PEFT_KINDS)}, got {cfg.peft!r}")


def config_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    return asdict(cfg)
