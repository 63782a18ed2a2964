"""One training run: dataset from the store → fine-tune → gate → registry.

    python -m trainer.run [--config FILE] [--run-id N] [--reason TEXT] [--community C]
    accelerate launch -m trainer.run ...      torchrun --nproc-per-node 2 -m trainer.run ...

One code path for all three: ``accelerate`` finds the process group the
launcher set up (or none). The main process takes the run lock, reads the
store, generates the replay set with the live model and writes the run's
dataset to its work area; every process trains on its share of each batch;
the main process alone runs the gate and writes the registry and the store.

A run trains one line of versions (``tuneloop.learning.registry``): under
``[trainer] scope = "community"`` the community's (``--community``, default
``local``), on that community's live, non-blocked feedback only, with the
gate's controls and replay set drawn from that community's own exchanges
(then the shared fixed prompts); under ``"global"`` the one line, on every
community's feedback.

It runs in its own process, never in the bot's: serving goes on while it
trains, and a running bot picks up a promoted version from the registry's
``LIVE`` pointer. Killed at any moment, it leaves the live version as it was
(the lock dies with the process; the run's row is marked failed by whoever
looks next; its work area is removed by the next run).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from trainer import data
from tuneloop import community as communities
from tuneloop.config import Config, load
from tuneloop.errors import TrainingError, TuneloopError
from tuneloop.learning.registry import ADAPTER, GLOBAL, Registry
from tuneloop.learning.runs import Runs, run_name
from tuneloop.memory.reach import write_taught

log = logging.getLogger(__name__)


def finetune_config(config: Config):
    from trainer.finetune import FinetuneConfig

    t = config.trainer
    return FinetuneConfig(method=t.method, lora=t.lora, peft=t.peft, lora_r=t.lora_r, lora_alpha=t.lora_alpha,
                          learning_rate=t.learning_rate, epochs=t.epochs, max_steps=t.max_steps,
                          batch_size=t.batch_size,
                          seed=t.seed, max_len=t.max_len, beta=t.beta, precision=t.precision,
                          target_modules=t.lora_targets, replay_ratio=t.replay_ratio,
                          replay_loss=t.replay_loss, replay_weight=t.replay_weight)


def base_languages(base_path: str) -> tuple[str, ...]:
    """The corpus languages the base was fine-tuned on (the starter records them), else English."""
    try:
        meta = json.loads((Path(base_path) / "tuneloop.json").read_text(encoding="utf-8"))
        return tuple(meta["recipe"]["languages"])
    except (OSError, ValueError, KeyError, TypeError):
        return ("english",)


@functools.lru_cache(maxsize=2)
def _load_encoder(name: str, int8: bool):
    from tuneloop.memory.encoder import Encoder

    return Encoder(name, int8=int8)


def routed(config: Config, adapter: str | Path | None, prompts: list) -> list[bool] | None:
    """Which of ``prompts`` the version at ``adapter`` answers as the bot serves it; None: every one.

    With ``[trainer] reach = "taught"`` (scope community, a LoRA-kind adapter
    that recorded what it was taught) a prompt whose last message lies near
    a taught prompt gets the adapter and the others the base weights
    (``tuneloop.memory.reach``); the gate judges what users get.
    """
    from tuneloop.memory.reach import Reach, read_taught

    t = config.trainer
    if t.reach != "taught" or t.scope != "community" or adapter is None or not prompts:
        return None
    if not (Path(adapter) / "adapter_config.json").exists():
        return None  # a fully fine-tuned version has no base to fall back to
    taught = read_taught(adapter)
    if taught is None:
        return None
    try:
        encoder = _load_encoder(config.memory.encoder, config.memory.encoder_int8)
        reach = Reach(taught, encoder, t.reach_cosine, t.reach_lexical)
    except TuneloopError as e:
        # The bot without an encoder serves the version to every message (``Chat.reach``): so here.
        log.warning("reach unavailable: %s; the version answers every message", e)
        return None
    return reach.mask([p[-1]["content"] if p else "" for p in prompts])


async def greedy(config: Config, base_path: str, adapter: str | Path | None, prompts: list,
                 version: str = "eval", cut: list[bool] | None = None,
                 route: list[bool] | None = None) -> list[str]:
    """Greedy replies of base+adapter, decoded by the engine the bot serves with.

    ``cut``, when given, is filled with whether each reply stopped at
    ``eval_max_new_tokens`` rather than where the model ended it. ``route``
    (``routed``), when given, says per prompt whether the adapter answers it
    (served per request, as the bot serves a community's version) or the
    base weights do.
    """
    from tuneloop.engine.base import SamplingParams
    from tuneloop.engine.local import LocalEngine

    if not prompts:
        return []
    full = adapter is not None and not (Path(adapter) / "adapter_config.json").exists()
    # The bot's engine (``LocalEngine.from_config``): the same dtype, decode step and
    # weight format, so a greedy reply here is the one users get. One reply at a
    # time: batched, a row's arithmetic depends on its neighbours (quantized
    # weights serve steps of a few rows and a bfloat16 copy larger ones; float
    # kernels block by row count), which flipped 3-6 of 16 unchanged controls'
    # 32-token replies on SmolLM2; alone, a reply depends on its prompt and the
    # weights only, so "the same reply" compares weights, not batches.
    engine = LocalEngine(str(adapter) if full else base_path, version=version, device=config.model.device,
                         dtype=config.model.dtype, max_batch=1,
                         max_queue=max(config.model.max_queue, len(prompts)),
                         fused_decode=config.model.fused_decode, quantize=config.model.quantize)
    await engine.start()
    try:
        names: list[str | None] = [None] * len(prompts)
        if adapter is not None and not full:
            if route is None or all(route):
                await engine.swap_adapter(str(adapter), version)
            elif any(route):
                await engine.load_adapter(version, str(adapter))
                names = [version if r else None for r in route]
        n = config.trainer.eval_max_new_tokens
        params = SamplingParams(max_new_tokens=n, temperature=0.0)
        done = await asyncio.gather(*(engine.complete(engine.fit_context(p, n), params, adapter=a)
                                      for p, a in zip(prompts, names)))
        if cut is not None:
            cut[:] = [c.finish_reason == "length" for c in done]
        return [c.text for c in done]
    finally:
        await engine.stop()


def rewordings(base_path: str, adapter: str | Path | None, questions: list[str], n: int) -> list[list[str]]:
    """Up to ``n`` distinct rewordings of each question, written by base+adapter (greedy, few-shot).

    Plain-text few-shot prompts (``data.REWORD_SHOTS``), one per rewording:
    a 135M instruct model asked to "rephrase" in chat mostly answers instead.
    """
    import torch

    from trainer import data
    from trainer.evaluate import load_model

    if not questions or n <= 0:
        return [[] for _ in questions]
    model = load_model(base_path, adapter)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_path)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    shots = data.REWORD_SHOTS[:n]
    texts = [data.reword_prompt(q, s) for q in questions for s in shots]
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(texts), 16):
            enc = tok(texts[i:i + 16], return_tensors="pt", padding=True)
            gen = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    result = []
    for qi, q in enumerate(questions):
        seen: list[str] = []
        for text in out[qi * len(shots):(qi + 1) * len(shots)]:
            line = data.clean_rewording(q, text)
            if line and line.casefold() not in (x.casefold() for x in seen):
                seen.append(line)
        result.append(seen)
    return result


def build_dataset(config: Config, store, registry: Registry, run_id: int, base_path: str) -> dict[str, Any]:
    """The run's exact data: training rows (feedback + rewordings + replay) and the gate's evaluation data.

    Every feedback item is trained on. What the gate judges is never trained on:
    control prompts held out of the replay set, general-knowledge questions,
    and one rewording of each corrected prompt.
    """
    t = config.trainer
    cutoff = time.time()
    items = data.feedback_items(store)
    # The memory of corrections: its items are corrections, trained on once
    # (as feedback); the gate checks each for consolidation.
    extra, memory = data.memory_items(store, items)
    items += extra
    if not items:
        raise TrainingError("no feedback to train on yet")
    live = registry.live()
    adapter = registry.adapter(live)
    corrected_items = [it for it in items if it["corrections"] and it["prompt"]
                       and it["prompt"][-1].get("role") == "user"]
    words = rewordings(base_path, adapter, [it["prompt"][-1]["content"] for it in corrected_items],
                       t.paraphrases)
    # The last rewording of each is the gate's; the others are training rows.
    train_words = {it["exchange_id"]: w[:-1] for it, w in zip(corrected_items, words) if len(w) > 1}
    gate_words = [(it, w[-1]) for it, w in zip(corrected_items, words) if w]
    # Where each memory item's prompt and rewording sit among the gate's probes.
    at_corrected = {it["exchange_id"]: i for i, it in enumerate(it for it in items if it["corrections"])}
    at_paraphrase = {it["exchange_id"]: i for i, (it, _) in enumerate(gate_words)}
    memory = [{**m, "corrected": at_corrected.get(m["exchange_id"]),
               "paraphrase": at_paraphrase.get(m["exchange_id"])} for m in memory]
    feedback_rows = data.to_rows(items, t.method)
    reworded_rows = data.to_rows(data.reworded_items(corrected_items, train_words), t.method)
    if not feedback_rows:
        raise TrainingError("no trainable feedback (no item has a usable rating or a correction)")
    asked = [it["prompt"][-1]["content"] for it in items if it["prompt"]]
    knowledge = data.knowledge_questions(exclude_prompts=asked)
    system = [{"role": "system", "content": config.model.system_prompt}] if config.model.system_prompt else []
    pool = data.replay_prompts(
        store, exclude=[it["exchange_id"] for it in items], limit=t.control_prompts + t.replay_prompts,
        seed=t.seed, system_prompt=config.model.system_prompt, languages=base_languages(base_path),
        exclude_prompts=asked + [q for q, _ in knowledge], general=t.replay_general)
    controls, replay = data.split_controls(pool, t.control_prompts)
    if t.replay_ratio <= 0:
        replay = []
    corrected = [(it["prompt"], it["corrections"][-1]) for it in items if it["corrections"]]
    paraphrases = [([*it["prompt"][:-1], {**it["prompt"][-1], "content": w}], it["corrections"][-1])
                   for it, w in gate_words]
    knowledge_prompts = [(system + [{"role": "user", "content": q}], answers) for q, answers in knowledge]
    groups = {"replay": replay, "controls": controls, "corrected": [c[0] for c in corrected],
              "paraphrases": [p[0] for p in paraphrases], "knowledge": [k[0] for k in knowledge_prompts]}
    cut: list[bool] = []
    probes = [p for g in groups.values() for p in g]
    live_replies = _split(asyncio.run(greedy(config, base_path, adapter, probes, version=live or "base", cut=cut,
                                             route=routed(config, adapter, probes))), groups)
    # A reply cut at eval_max_new_tokens is trained without its end-of-turn:
    # replaying it must not teach the model to stop there.
    replay_rows = [{**data.sft_row(p, r), "replay": True, **({"cut": True} if c else {})}
                   for p, r, c in zip(replay, live_replies["replay"], cut) if r.strip()]
    rows = feedback_rows + reworded_rows + replay_rows
    tg, tb = _likelihood(items)
    # What the version is taught, for its reach (``tuneloop.memory.reach``): the
    # feedback's own prompts and the rewordings trained on, never replay rows.
    taught = asked + [w for ws in train_words.values() for w in ws]
    return {
        "cutoff": cutoff, "live": live, "rows": rows, "dataset_hash": data.dataset_hash(rows),
        "taught": taught,
        "memory": memory,
        "counts": {"feedback_items": len(items), "feedback_rows": len(feedback_rows),
                   "reworded_rows": len(reworded_rows), "replay_rows": len(replay_rows),
                   "controls": len(controls), "corrected": len(corrected), "paraphrases": len(paraphrases),
                   "knowledge": len(knowledge_prompts), "memory_items": len(memory)},
        "eval": {"trained_good": tg, "trained_bad": tb, "corrected": corrected,
                 "controls": list(zip(controls, live_replies["controls"])),
                 "paraphrases": paraphrases, "knowledge": knowledge_prompts},
        "live_replies": {k: v for k, v in live_replies.items() if k != "replay"},
    }


def _split(replies: list[str], groups: dict[str, list]) -> dict[str, list[str]]:
    """``replies`` to a flat list of every group's prompts, cut back into the groups."""
    out, i = {}, 0
    for name, prompts in groups.items():
        out[name] = replies[i:i + len(prompts)]
        i += len(prompts)
    return out


def _likelihood(items):
    from trainer.evaluate import likelihood_sets

    return likelihood_sets(items)


def eval_data(ds: dict[str, Any]):
    from trainer.evaluate import EvalData

    e = ds["eval"]
    return EvalData(e["trained_good"], e["trained_bad"], [tuple(c) for c in e["corrected"]],
                    [tuple(c) for c in e["controls"]], [tuple(p) for p in e["paraphrases"]],
                    [(k[0], tuple(k[1])) for k in e["knowledge"]])


def line_key(config: Config, community: str | None) -> str:
    """The line a run trains: ``community`` (None: local) under scope community, ``*`` under global."""
    if config.trainer.scope == "global":
        return GLOBAL
    return communities.check(community or communities.LOCAL)


def gate(config: Config, base_path: str, ds: dict[str, Any], candidate: Path,
         registry: Registry | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from trainer import evaluate as ev

    data_ = eval_data(ds)
    groups = {"controls": [c[0] for c in data_.controls], "corrected": [c[0] for c in data_.corrected],
              "paraphrases": [p[0] for p in data_.paraphrases], "knowledge": [k[0] for k in data_.knowledge]}
    probes = [p for g in groups.values() for p in g]
    new_route = routed(config, candidate, probes)
    new_replies = _split(asyncio.run(greedy(config, base_path, candidate, probes, version="candidate",
                                            route=new_route)), groups)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    registry = registry or Registry(config.trainer.registry)
    live_adapter = registry.adapter(ds["live"])
    # The controls' perplexity is the served model's: where a version does not
    # reach a control, the base weights answer it.
    controls = groups["controls"]  # the first group of ``probes``
    live_route = routed(config, live_adapter, controls)
    new_route = None if new_route is None else new_route[:len(controls)]
    plain = (ev.load_model(base_path, None)
             if any(r is not None and not all(r) for r in (live_route, new_route)) else None)
    live_model = ev.load_model(base_path, live_adapter)
    live = ev.measure(live_model, tokenizer, data_, ds["live_replies"], config.trainer.max_len,
                      plain=plain, routed=live_route)
    del live_model
    new_model = ev.load_model(base_path, candidate)
    new = ev.measure(new_model, tokenizer, data_, new_replies, config.trainer.max_len,
                     plain=plain, routed=new_route)
    del new_model, plain
    passed, checks = ev.decide(live, new, ev.Thresholds.from_config(config.trainer))
    lr = ds["live_replies"]
    memory = ev.memory_answered(ds.get("memory", []), new_replies)
    metrics = {**ev.summary(live, new), "memory_items": len(memory), "memory_answered": sum(memory.values())}
    return {
        "passed": passed, "checks": checks, "metrics": metrics, "live": live, "new": new, "memory": memory,
        "corrected": [{"prompt": c[0][-1]["content"], "correction": c[1], "live": a, "new": b}
                      for c, a, b in zip(data_.corrected, lr["corrected"], new_replies["corrected"])],
        "paraphrases": [{"prompt": p[0][-1]["content"], "correction": p[1], "live": a, "new": b}
                        for p, a, b in zip(data_.paraphrases, lr["paraphrases"], new_replies["paraphrases"])],
        "knowledge": [{"prompt": k[0][-1]["content"], "answers": list(k[1]), "live": a, "new": b}
                      for k, a, b in zip(data_.knowledge, lr["knowledge"], new_replies["knowledge"])],
        "controls_changed": [{"prompt": c[0][-1]["content"], "live": c[1], "new": nr}
                             for c, nr in zip(data_.controls, new_replies["controls"]) if c[1].strip() != nr.strip()],
    }


def run(config: Config, run_id: int | None = None, reason: str = "manual",
        community: str | None = None) -> dict[str, Any] | None:
    """One whole run of ``community``'s line; returns its outcome on the main process (``None`` on
    the others)."""
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
    key = line_key(config, community)
    registry = Registry.line(t.registry, key)
    lock = registry.lock()
    store = runs = None
    box: list[Any] = [None, None]
    if main:
        store = Store(config.storage.path)
        runs = Runs(store)
        if run_id is None:
            run_id = runs.create(reason, os.getpid(), community=key)
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
    work = registry.staging(name, create=False)
    try:
        base_path = resolve_base(config.model.base, progress=False)
        if main:
            runs.reap(lock_held=True, keep=run_id)
            runs.update(run_id, status="running", stage="dataset", pid=os.getpid(), started_at=time.time())
            registry.clean_staging(keep=name)
            work = registry.staging(name)
            t0 = time.perf_counter()
            # The community's rows only: feedback, the replay set and the gate's controls.
            ds = build_dataset(config, store.scoped(None if key == GLOBAL else key), registry, run_id,
                               base_path)
            ds["seconds"] = round(time.perf_counter() - t0, 1)
            tmp = work / "dataset.json.tmp"
            tmp.write_text(json.dumps(ds, ensure_ascii=False), encoding="utf-8")
            os.replace(tmp, work / "dataset.json")
            runs.update(run_id, stage="train", data_cutoff=ds["cutoff"], dataset_hash=ds["dataset_hash"])
            log.info("%s: community %s, dataset %s (%s)", name, key, ds["dataset_hash"], ds["counts"])
        acc.wait_for_everyone()
        ds = json.loads((work / "dataset.json").read_text(encoding="utf-8"))
        fcfg = finetune_config(config)
        tuner = Finetuner(base_path, ds["rows"], fcfg, acc, init_adapter=registry.adapter(ds["live"]))
        stats = tuner.train()
        candidate = work / "version" / ADAPTER
        tuner.save(candidate)
        taught = write_taught(candidate, ds.get("taught", []), parent=registry.adapter(ds["live"])) if main else []
        acc.wait_for_everyone()
        if not main:
            return None
        runs.update(run_id, stage="gate")
        t0 = time.perf_counter()
        report = gate(config, base_path, ds, candidate, registry)
        # Where a run's time goes: the dataset stage is mostly the live model's
        # greedy replies (replay set and the gate's "before"), training is the
        # finetuner's loop, the gate is the candidate's replies and likelihoods.
        seconds = {"dataset": ds["seconds"], "train": stats["seconds"],
                   "gate": round(time.perf_counter() - t0, 1)}
        verdict = "passed" if report["passed"] else "rejected"
        meta = {"parent": ds["live"], "run_id": name, "reason": reason, "community": key,
                "base": config.model.base,
                "data_cutoff": ds["cutoff"], "base_path": str(base_path),
                "dataset_hash": ds["dataset_hash"], "dataset": ds["counts"], "method": t.method,
                "hyperparameters": {**config_dict(fcfg), "replay_ratio": t.replay_ratio,
                                    "replay_prompts": t.replay_prompts, "paraphrases": t.paraphrases},
                "train": stats, "seconds": seconds, "taught_prompts": len(taught),
                "metrics": report["metrics"], "checks": report["checks"], "verdict": verdict}
        runs.update(run_id, stage="registry")
        version = registry.add(work / "version", meta, report)
        if report["passed"]:
            registry.set_live(version, action="promote", by=name)
            # Consolidation: items the new live weights answer leave the fast
            # path; the others (and any the parent consolidated but this
            # version was not checked on) go back to it.
            if ds["live"]:
                store.memory_unconsolidate([registry.adapter_name(ds["live"])])
            store.set_memory_status(report["memory"], registry.adapter_name(version))
        outcome = {"run_id": name, "community": key, "status": "done", "version": version,
                   "promoted": report["passed"],
                   "verdict": verdict, "dataset_hash": ds["dataset_hash"], "metrics": report["metrics"],
                   "checks": report["checks"], "train": stats, "seconds": seconds,
                   "live": registry.live() or "base"}
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
    p.add_argument("--community", help='the community whose line to train (scope = "community"; '
                   "default: local)")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        outcome = run(load(args.config), args.run_id, args.reason, args.community)
    except TuneloopError as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return 1
    if outcome is not None and args.json:
        print(json.dumps(outcome, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
