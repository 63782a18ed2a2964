"""One training run: dataset from the store → fine-tune → gate → registry.

    python -m trainer.run [--config FILE] [--run-id N] [--reason TEXT]
    accelerate launch -m trainer.run ...      torchrun --nproc-per-node 2 -m trainer.run ...

One code path for all three: ``accelerate`` finds the process group the
launcher set up (or none). The main process takes the run lock, reads the
store, generates the replay set with the live model and writes the run's
dataset to its work area; every process trains on its share of each batch;
the main process alone runs the gate and writes the registry and the store.

It runs in its own process, never in the bot's: serving goes on while it
trains, and a running bot picks up a promoted version from the registry's
``LIVE`` pointer. Killed at any moment, it leaves the live version as it was
(the lock dies with the process; the run's row is marked failed by whoever
looks next; its work area is removed by the next run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from trainer import data
from tuneloop.config import Config, load
from tuneloop.errors import TrainingError, TuneloopError
from tuneloop.learning.registry import ADAPTER, Registry
from tuneloop.learning.runs import Runs, run_name

log = logging.getLogger(__name__)


def finetune_config(config: Config):
    from trainer.finetune import FinetuneConfig

    t = config.trainer
    return FinetuneConfig(method=t.method, lora=t.lora, lora_r=t.lora_r, lora_alpha=t.lora_alpha,
                          learning_rate=t.learning_rate, epochs=t.epochs, batch_size=t.batch_size,
                          seed=t.seed, max_len=t.max_len, beta=t.beta, precision=t.precision,
                          target_modules=t.lora_targets, replay_ratio=t.replay_ratio)


def base_languages(base_path: str) -> tuple[str, ...]:
    """The corpus languages the base was fine-tuned on (the starter records them), else English."""
    try:
        meta = json.loads((Path(base_path) / "tuneloop.json").read_text(encoding="utf-8"))
        return tuple(meta["recipe"]["languages"])
    except (OSError, ValueError, KeyError, TypeError):
        return ("english",)


async def greedy(config: Config, base_path: str, adapter: str | Path | None, prompts: list,
                 version: str = "eval") -> list[str]:
    """Greedy replies of base+adapter, decoded by the engine the bot serves with."""
    from tuneloop.engine.base import SamplingParams
    from tuneloop.engine.local import LocalEngine

    if not prompts:
        return []
    full = adapter is not None and not (Path(adapter) / "adapter_config.json").exists()
    engine = LocalEngine(str(adapter) if full else base_path, version=version, device=config.model.device,
                         dtype=config.model.dtype, max_batch=config.model.max_batch,
                         max_queue=max(config.model.max_queue, len(prompts)))
    await engine.start()
    try:
        if adapter is not None and not full:
            await engine.swap_adapter(str(adapter), version)
        n = config.trainer.eval_max_new_tokens
        params = SamplingParams(max_new_tokens=n, temperature=0.0)
        done = await asyncio.gather(*(engine.complete(engine.fit_context(p, n), params) for p in prompts))
        return [c.text for c in done]
    finally:
        await engine.stop()


def build_dataset(config: Config, store, registry: Registry, run_id: int, base_path: str) -> dict[str, Any]:
    """The run's exact data: training rows (feedback + replay) and the gate's evaluation data."""
    t = config.trainer
    cutoff = time.time()
    items = data.feedback_items(store)
    if not items:
        raise TrainingError("no feedback to train on yet")
    train_items, held = data.split_holdout(items, t.holdout_fraction, salt=f"{t.seed}:{run_id}")
    feedback_rows = data.to_rows(train_items, t.method)
    if not feedback_rows:
        raise TrainingError("no trainable feedback (every item is held out or has no usable rating)")
    # The replay set: earlier prompts from the store first, then base SFT
    # prompts, answered by the live model. The gate's controls are its prompts
    # (trained on only when replay is on: with replay off they show the damage).
    # A few more prompts, never trained on, measure what carries over to
    # unseen prompts; they are reported, not gated.
    unseen_n = min(16, t.control_prompts)
    pool = data.replay_prompts(
        store, exclude=[it["exchange_id"] for it in items], limit=t.control_prompts + unseen_n, seed=t.seed,
        system_prompt=config.model.system_prompt, languages=base_languages(base_path),
        exclude_prompts=[it["prompt"][-1]["content"] for it in items if it["prompt"]])
    controls, unseen = pool[:t.control_prompts], pool[t.control_prompts:]
    replay = controls if t.replay_ratio > 0 else []
    live = registry.live()
    adapter = registry.adapter(live)
    corrected = [(it["prompt"], it["corrections"][-1], it in held) for it in items if it["corrections"]]
    replies = asyncio.run(greedy(config, base_path, adapter, controls + unseen + [c[0] for c in corrected],
                                 version=live or "base"))
    control_replies = replies[:len(controls)]
    unseen_replies = replies[len(controls):len(controls) + len(unseen)]
    live_corrected = replies[len(controls) + len(unseen):]
    replay_rows = [{**data.sft_row(p, r), "replay": True} for p, r in zip(replay, control_replies) if r.strip()]
    rows = feedback_rows + replay_rows
    hg, hb = _likelihood(held)
    tg, tb = _likelihood(train_items)
    return {
        "cutoff": cutoff, "live": live, "rows": rows, "dataset_hash": data.dataset_hash(rows),
        "counts": {"feedback_items": len(items), "trained_items": len(train_items), "held_out_items": len(held),
                   "feedback_rows": len(feedback_rows), "replay_rows": len(replay_rows),
                   "controls": len(controls), "corrected": len(corrected)},
        "eval": {"heldout_good": hg, "heldout_bad": hb, "trained_good": tg, "trained_bad": tb,
                 "corrected": corrected, "controls": list(zip(controls, control_replies)),
                 "unseen": list(zip(unseen, unseen_replies))},
        "live_corrected": live_corrected,
    }


def _likelihood(items):
    from trainer.evaluate import likelihood_sets

    return likelihood_sets(items)


def gate(config: Config, base_path: str, ds: dict[str, Any], candidate: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from trainer import evaluate as ev

    e = ds["eval"]
    data_ = ev.EvalData(e["heldout_good"], e["heldout_bad"], e["trained_good"], e["trained_bad"],
                        [tuple(c) for c in e["corrected"]], [tuple(c) for c in e["controls"]])
    unseen = [tuple(u) for u in e.get("unseen", [])]
    prompts = [c[0] for c in data_.controls] + [c[0] for c in data_.corrected] + [u[0] for u in unseen]
    new_replies = asyncio.run(greedy(config, base_path, candidate, prompts, version="candidate"))
    nc = len(data_.controls) + len(data_.corrected)
    new_controls, new_corrected = new_replies[:len(data_.controls)], new_replies[len(data_.controls):nc]
    new_unseen = new_replies[nc:]
    live_controls = [c[1] for c in data_.controls]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    registry = Registry(config.trainer.registry)
    live_model = ev.load_model(base_path, registry.adapter(ds["live"]))
    live = ev.measure(live_model, tokenizer, data_, ds["live_corrected"], live_controls, config.trainer.max_len)
    del live_model
    new_model = ev.load_model(base_path, candidate)
    new = ev.measure(new_model, tokenizer, data_, new_corrected, new_controls, config.trainer.max_len)
    del new_model
    passed, checks = ev.decide(live, new, ev.Thresholds.from_config(config.trainer),
                               heldout_items=ds["counts"]["held_out_items"])
    metrics = ev.summary(live, new)
    # Report only: prompts never trained on, replay or not.
    metrics["unseen_same"] = (round(sum(u[1].strip() == r.strip() for u, r in zip(unseen, new_unseen))
                                    / len(unseen), 4) if unseen else None)
    return {
        "passed": passed, "checks": checks, "metrics": metrics, "live": live, "new": new,
        "corrected": [{"prompt": c[0][-1]["content"], "correction": c[1], "held_out": c[2], "live": lr,
                       "new": nr} for c, lr, nr in zip(data_.corrected, ds["live_corrected"], new_corrected)],
        "controls_changed": [{"prompt": c[0][-1]["content"], "live": c[1], "new": nr}
                             for c, nr in zip(data_.controls, new_controls) if c[1].strip() != nr.strip()],
    }


def run(config: Config, run_id: int | None = None, reason: str = "manual") -> dict[str, Any] | None:
    """One whole run; returns its outcome on the main process (``None`` on the others)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from trainer.finetune import Finetuner, config_dict
    from trainer.models import resolve_base
    from tuneloop.store import Store

    cuda = torch.cuda.is_available()
    acc = Accelerator(cpu=not cuda)
    main = acc.is_main_process
    t = config.trainer
    registry = Registry(t.registry)
    lock = registry.lock()
    store = runs = None
    box: list[Any] = [None, None]
    if main:
        store = Store(config.storage.path)
        runs = Runs(store)
        if run_id is None:
            run_id = runs.create(reason, os.getpid())
        if lock.acquire():
            box = [run_id, None]
        else:
            runs.update(run_id, status="failed", finished_at=time.time(), error="another run is going")
            box = [run_id, "another training run is going; try again when it has finished"]
    if acc.num_processes > 1:
        broadcast_object_list(box)
    run_id, refused = box
    if refused:
        raise TrainingError(refused)
    name = run_name(run_id)
    work = registry.root / ".staging" / name
    try:
        base_path = resolve_base(config.model.base, progress=False)
        if main:
            runs.reap(lock_held=True, keep=run_id)
            runs.update(run_id, status="running", stage="dataset", pid=os.getpid(), started_at=time.time())
            registry.clean_staging(keep=name)
            work = registry.staging(name)
            ds = build_dataset(config, store, registry, run_id, base_path)
            tmp = work / "dataset.json.tmp"
            tmp.write_text(json.dumps(ds, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, work / "dataset.json")
            runs.update(run_id, stage="train", data_cutoff=ds["cutoff"], dataset_hash=ds["dataset_hash"])
            log.info("%s: dataset %s (%s)", name, ds["dataset_hash"], ds["counts"])
        acc.wait_for_everyone()
        ds = json.loads((work / "dataset.json").read_text(encoding="utf-8"))
        fcfg = finetune_config(config)
        tuner = Finetuner(base_path, ds["rows"], fcfg, acc, init_adapter=registry.adapter(ds["live"]))
        stats = tuner.train()
        candidate = work / "version" / ADAPTER
        tuner.save(candidate)
        acc.wait_for_everyone()
        if not main:
            return None
        runs.update(run_id, stage="gate")
        report = gate(config, base_path, ds, candidate)
        verdict = "passed" if report["passed"] else "rejected"
        meta = {"parent": ds["live"], "run_id": name, "reason": reason, "base": config.model.base,
                "data_cutoff": ds["cutoff"], "base_path": str(base_path),
                "dataset_hash": ds["dataset_hash"], "dataset": ds["counts"], "method": t.method,
                "hyperparameters": {**config_dict(fcfg), "replay_ratio": t.replay_ratio,
                                    "holdout_fraction": t.holdout_fraction},
                "train": stats, "metrics": report["metrics"], "checks": report["checks"], "verdict": verdict}
        runs.update(run_id, stage="registry")
        version = registry.add(work / "version", meta, report)
        if report["passed"]:
            registry.set_live(version, action="promote", by=name)
        outcome = {"run_id": name, "status": "done", "version": version, "promoted": report["passed"],
                   "verdict": verdict, "dataset_hash": ds["dataset_hash"], "metrics": report["metrics"],
                   "checks": report["checks"], "train": stats, "live": registry.live() or "base"}
        runs.update(run_id, status="done", stage="", finished_at=time.time(), version=version,
                    promoted=report["passed"], metrics={**report["metrics"], "checks": report["checks"]})
        log.info("%s: %s %s (%s)", name, version, verdict,
                 ", ".join(f"{c['name']}={c['value']}{'' if c['passed'] else ' FAIL'}{'' if c['gating'] else ' (reported)'}"
                          for c in report["checks"]))
        return outcome
    except BaseException as e:
        if main and runs is not None:
            msg = str(e) if isinstance(e, TuneloopError) else f"{type(e).__name__}: {e}"
            runs.update(run_id, status="failed", finished_at=time.time(), error=msg[:2000])
        raise
    finally:
        if main:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
            lock.release()
            if store is not None:
                store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.run", description="one training run")
    p.add_argument("--config", help="config file (default: $TUNELOOP_CONFIG or ./config.toml)")
    p.add_argument("--run-id", type=int, help="the queued run this process carries out")
    p.add_argument("--reason", default="manual")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        outcome = run(load(args.config), args.run_id, args.reason)
    except TuneloopError as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return 1
    if outcome is not None and args.json:
        print(json.dumps(outcome, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
