"""Seconds per SFT step: TRL's ``SFTTrainer`` against ``trainer.finetune``'s loop, in one process.

    python -m trainer.trl_compare [--base MODEL] [--steps K] [--rounds N] [--gradient-checkpointing]

The same 16 rows (the 8 made-up facts of ``trainer.facts`` and 8 replay-sized
rows), the same LoRA (r 16, all linear layers), batch 8, fp32 on the CPU; the
two take turns, K steps each, N rounds (A B A B), so a machine whose speed
drifts shows in both. TRL's config defaults to gradient checkpointing, which
the loop does not do: off here unless asked for. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from trainer.facts import CONTROLS, FACTS
    from trainer.finetune import FinetuneConfig, Finetuner

    p = argparse.ArgumentParser(prog="python -m trainer.trl_compare", description=__doc__.splitlines()[0])
    p.add_argument("--base", default="/tmp/smollm2-hf", help="model folder")
    p.add_argument("--steps", type=int, default=3, help="steps per turn")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; the loop has none")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    reply = "Here is a short answer that a model gave to this prompt, about thirty tokens long, as replay rows are."
    rows = [{"prompt": system + [{"role": "user", "content": f.prompt}],
             "completion": [{"role": "assistant", "content": f.correction}]} for f in FACTS]
    rows += [{"prompt": system + [{"role": "user", "content": c}],
              "completion": [{"role": "assistant", "content": reply}]} for c in CONTROLS[:8]]

    class Clock(TrainerCallback):
        """Time inside TRL's steps only (its set-up per ``train()`` call is left out, in its favour)."""

        def on_train_begin(self, *a, **k):
            self.spent = 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.spent += time.perf_counter() - self.start

    clock = Clock()
    k = args.steps
    cfg = SFTConfig(output_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "trl-compare"),
                    per_device_train_batch_size=8, max_steps=k, learning_rate=3e-3, logging_steps=10**6,
                    report_to=[], save_strategy="no", bf16=False, fp16=False, use_cpu=True, max_length=256,
                    dataloader_num_workers=0, seed=0, lr_scheduler_type="cosine",
                    gradient_checkpointing=args.gradient_checkpointing, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", bias="none",
                      task_type="CAUSAL_LM")
    trl = SFTTrainer(model=args.base, args=cfg, train_dataset=Dataset.from_list(rows), peft_config=lora,
                     callbacks=[clock])
    ours = Finetuner(args.base, [dict(r) for r in rows], FinetuneConfig(
        epochs=10**6, max_steps=k, batch_size=8, learning_rate=3e-3, early_stop=False, replay_ratio=0.0))
    out: dict[str, list[float]] = {"trl": [], "loop": []}
    for _ in range(args.rounds):
        trl.train()
        out["trl"].append(round(clock.spent / k, 2))
        stats = ours.train()
        out["loop"].append(round(stats["seconds"] / stats["steps"], 2))
        print(f"trl {out['trl'][-1]} s/step, loop {out['loop'][-1]} s/step", flush=True)
    print(json.dumps({"base": args.base, "steps_per_turn": k, "gradient_checkpointing": args.gradient_checkpointing,
                      **out, "trl_over_loop": [round(a / b, 3) for a, b in zip(out["trl"], out["loop"])]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
