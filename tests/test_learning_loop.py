"""The learning loop end to end on the tiny model: the issue's targets, on CPU.

8 exchanges whose replies are wrong get a 👎 and a correction; 16 control
exchanges get nothing. Through the CLI (``retrain --wait --json``, which
starts ``python -m trainer.run`` in its own process) and the served model
(``bot.runtime.services``, the LocalEngine the bot serves with):

- replay off: the gate rejects the version that damages the controls; the
  served model stays as it was;
- replay on: promoted; >= 7/8 corrected prompts get their correction (greedy),
  >= 13/16 controls give the same reply as before; replies record the version;
- rollback: the previous version's greedy replies, exactly;
- a run SIGKILLed mid-way leaves the live version serving; the next run succeeds.

Figures (paraphrases included) go to the test log: ``pytest -s`` prints them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import pytest

from bot.chat import Turn
from bot.cli import main
from bot.runtime import services
from tuneloop.config import load
from tuneloop.learning.registry import Registry

pytestmark = pytest.mark.slow

CORRECTED = [
    ("What is your name?", "My name is Tuneloop."),
    ("Who made you?", "A team of volunteers made me."),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("What is your favorite color?", "My favorite color is green."),
    ("How old are you?", "I am two years old."),
    ("Where do you live?", "I live on a small server."),
    ("What do you eat?", "I eat electricity."),
    ("Do you like music?", "Yes, I love jazz."),
]
PARAPHRASES = ["what's your name?", "Who created you?", "Which city is the capital of France?",
               "Which color do you like best?", "What is your age?", "Where is your home?",
               "What food do you eat?", "Do you enjoy music?"]

# The default [trainer], with the gate's controls and the replay set drawn from the 16 control
# exchanges (then the corpus), and short replies. The tiny from-scratch model needs a higher
# learning rate than the shipped default (2e-3, measured on SmolLM2): it learns 0-3 of 8
# corrections at 2e-3 and passes at lr 5e-3, r16, alpha 32, pinned here. The weights are what this
# test measures, on every prompt: reach = "all" (routing by what a version was taught is
# tests/test_reach.py's and the facts check's).
EXTRA = ("control_prompts = 8\nreplay_prompts = 16\neval_max_new_tokens = 32\n"
         "learning_rate = 0.005\nlora_r = 16\nlora_alpha = 32\nreach = \"all\"\n")

TRAINER = """
[trainer]
registry = "models"
seed = 0
{extra}
"""


def control_prompts(n: int = 16) -> list[str]:
    import random

    from trainer import corpus

    pairs = [p for p in corpus.load_pairs(("english",)) if not p.context and len(p.message) < 60]
    random.Random(1).shuffle(pairs)
    seen = {c.casefold() for c, _ in CORRECTED} | {p.casefold() for p in PARAPHRASES}
    out = []
    for p in pairs:
        if p.message.casefold() not in seen:
            seen.add(p.message.casefold())
            out.append(p.message)
        if len(out) == n:
            return out
    raise AssertionError("corpus too small")


def write_config(path, model, extra: str = "") -> None:
    # The memory of corrections off: what is measured here is what the weights learned.
    path.write_text(f'[model]\nbase = "{model}"\nmax_new_tokens = 32\n[storage]\npath = "t.db"\n'
                    '[memory]\nenabled = false\n' + TRAINER.format(extra=extra))


async def served(config, prompts: list[str], log_as: str | None = None) -> list[tuple[str, str]]:
    """Greedy replies of the served model (and the version each records)."""
    async with services(config) as svc:
        out = []
        for p in prompts:
            ex = await svc.chat.respond(Turn(text=p, user=log_as or "probe", platform="cli"))
            out.append((ex.reply, ex.model_version))
            if log_as is None:
                # Probes are not traffic: keep them out of the next run's replay set.
                svc.store.forget_user("probe")
        return out


def retrain(cfg, capsys) -> dict:
    capsys.readouterr()
    code = main(["--config", str(cfg), "retrain", "--wait", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == (0 if out["status"] == "done" else 1), out
    return out


@pytest.fixture
def loop_model(request):
    """The session's tiny model; ``TUNELOOP_TEST_MODEL=FOLDER`` reuses one already built."""
    folder = os.environ.get("TUNELOOP_TEST_MODEL")
    return folder if folder else request.getfixturevalue("tiny_model")


def test_learning_loop_targets(loop_model, tmp_path, capsys):
    tiny_model = loop_model
    cfg = tmp_path / "config.toml"
    write_config(cfg, tiny_model, EXTRA)
    config = load(cfg)
    controls = control_prompts()
    figures: dict = {}

    async def log_traffic():
        async with services(config) as svc:
            for prompt, fix in CORRECTED:
                ex = await svc.chat.respond(Turn(text=prompt, user="alice", platform="cli"))
                assert ex.reply.strip() != fix
                svc.feedback.rate(ex.id, "bob", "down")
                svc.feedback.correct(ex.id, "bob", fix)
            for prompt in controls:
                await svc.chat.respond(Turn(text=prompt, user="carol", platform="cli"))

    asyncio.run(log_traffic())
    probes = [c for c, _ in CORRECTED] + controls + PARAPHRASES
    before = asyncio.run(served(config, probes))

    # 1. Replay off: the corrections alone wreck the controls, and the gate says no.
    t0 = time.perf_counter()
    write_config(cfg, tiny_model, EXTRA + "replay_ratio = 0.0")
    off = retrain(cfg, capsys)
    figures["replay_off"] = {"seconds": round(time.perf_counter() - t0, 1), **off["metrics"]}
    assert off["promoted"] is False, off
    assert not next(c for c in off["checks"] if c["name"] == "controls_same")["passed"]
    assert Registry(tmp_path / "models").live() is None
    assert asyncio.run(served(config, probes)) == before

    # 2. A run killed mid-way (SIGKILL) leaves the live version serving.
    write_config(cfg, tiny_model, EXTRA)
    _touch_feedback(config)
    capsys.readouterr()
    assert main(["--config", str(cfg), "retrain", "--json"]) == 0
    started = json.loads(capsys.readouterr().out)
    _kill_when_training(config, started)
    assert Registry(tmp_path / "models").live() is None
    assert asyncio.run(served(config, probes)) == before

    # 3. The next run succeeds: replay on. The gate's verdict must agree with
    # what users would see: a promoted version meets the targets.
    t0 = time.perf_counter()
    on = retrain(cfg, capsys)
    figures["replay_on"] = {"seconds": round(time.perf_counter() - t0, 1), "promoted": on["promoted"],
                            **on["metrics"], "checks": {c["name"]: c["value"] for c in on["checks"]}}
    version = on["version"]
    assert on["status"] == "done" and version
    if not on["promoted"]:
        # Rejected: nothing changed for users. An admin can still promote it
        # (on the tiny model the controls' replies are noise-level guesses).
        assert Registry(tmp_path / "models").live() is None
        assert main(["--config", str(cfg), "promote", version]) == 0
    after = asyncio.run(served(load(cfg), probes))
    assert all(v == version for _, v in after)  # replies record the version that produced them
    fixed = sum(r.strip() == fix for (r, _), (_, fix) in zip(after[:8], CORRECTED))
    same = sum(a[0] == b[0] for a, b in zip(after[8:24], before[8:24]))
    para = sum(r.strip() == fix for (r, _), (_, fix) in zip(after[24:], CORRECTED))
    figures["served"] = {"corrected": f"{fixed}/8", "controls_same": f"{same}/16", "paraphrases": f"{para}/8",
                         "paraphrase_replies": [r for r, _ in after[24:]]}
    print("\nlearning-loop figures:", json.dumps(figures, indent=1))
    assert fixed >= 7, figures
    if on["promoted"]:
        assert same >= 13, figures

    # 4. Rollback reproduces the previous version's replies exactly.
    assert main(["--config", str(cfg), "rollback"]) == 0
    assert asyncio.run(served(load(cfg), probes)) == before


def _touch_feedback(config) -> None:
    from tuneloop.store import Store

    store = Store(config.storage.path)
    try:
        store.rate(1, "dave", "down")
    finally:
        store.close()


def _kill_when_training(config, started: dict) -> None:
    from tuneloop.learning.runs import Runs, parse_run
    from tuneloop.store import Store

    store = Store(config.storage.path)
    try:
        runs = Runs(store)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            row = runs.get(parse_run(started["run_id"]))
            if row["stage"] == "train":
                break
            assert row["status"] in ("queued", "running"), row
            time.sleep(0.05)
        os.kill(row["pid"], signal.SIGKILL)
        time.sleep(0.5)
        from tuneloop.learning.control import Control

        Control(config, store).reap()
        assert runs.get(parse_run(started["run_id"]))["status"] == "failed"
    finally:
        store.close()


def test_two_training_processes_under_torchrun(loop_model, tmp_path, capsys):
    """The same run under ``torchrun --nproc-per-node 2`` on CPU: DDP over gloo, one registry writer."""
    cfg = tmp_path / "config.toml"
    write_config(cfg, loop_model, 'launcher = "torchrun"\nprocesses = 2\nepochs = 2\ncontrol_prompts = 4\n'
                                  'eval_max_new_tokens = 8\n')
    config = load(cfg)

    async def log_traffic():
        async with services(config) as svc:
            for prompt, fix in CORRECTED[:4]:
                ex = await svc.chat.respond(Turn(text=prompt, user="alice", platform="cli"))
                svc.feedback.correct(ex.id, "bob", fix)

    asyncio.run(log_traffic())
    out = retrain(cfg, capsys)
    assert out["status"] == "done" and out["version"] == "v1"
    meta = Registry(tmp_path / "models").meta("v1")
    assert meta["train"]["processes"] == 2
    assert meta["dataset_hash"] == out["dataset_hash"]
    assert Registry(tmp_path / "models").versions() == ["v1"]  # one writer


def _random_adapter(model_folder, out) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_folder))
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear",
                                            init_lora_weights=False))
    peft.save_pretrained(str(out))


async def test_running_server_follows_promote_and_rollback(loop_model, tmp_path):
    """`tuneloop run`'s LearningService swaps within seconds of a CLI promote / rollback.

    Under the default community scope the live version is a named adapter that
    requests of the community ask for, so the wait is on what "local" is served.
    """
    from bot.learning import LearningService, adapter_for

    cfg = tmp_path / "config.toml"
    write_config(cfg, loop_model, "schedule = \"interval:3600\"\nmin_feedback = 5\n")
    config = load(cfg)
    reg = Registry(tmp_path / "models")
    work = tmp_path / "work"
    _random_adapter(loop_model, work / "adapter")
    version = reg.add(work, {"parent": None, "verdict": "passed", "metrics": {}}, {})
    async with services(config) as svc:
        learning = LearningService(svc, poll=0.1)
        await learning.start()
        svc.admin.control = learning.control
        try:
            base = await svc.chat.respond(Turn(text="hello", user="u", platform="cli"))
            assert base.model_version == str(loop_model)
            assert learning.next_run() is not None
            assert await learning.tick() is None  # 0 new feedback < min_feedback: no run
            assert await asyncio.to_thread(main, ["--config", str(cfg), "promote", version]) == 0
            for _ in range(100):
                if adapter_for(svc.engine, "local") == version:
                    break
                await asyncio.sleep(0.05)
            ex = await svc.chat.respond(Turn(text="hello", user="u", platform="cli"))
            assert ex.model_version == version
            assert "live version: v1" in svc.admin.run(_cli_caller(), "status")
            assert "* v1" in svc.admin.run(_cli_caller(), "models")
            assert "base is live" in svc.admin.run(_cli_caller(), "rollback")
            for _ in range(100):
                if adapter_for(svc.engine, "local") is None:
                    break
                await asyncio.sleep(0.05)
            again = await svc.chat.respond(Turn(text="hello", user="u", platform="cli"))
            assert (again.reply, again.model_version) == (base.reply, base.model_version)
        finally:
            await learning.stop()


def _cli_caller():
    from bot.admin import Caller

    return Caller("cli", "admin")


@pytest.mark.parametrize("method", ["sft", "kto", "dpo"])
def test_each_method_trains_and_saves_an_adapter(loop_model, tmp_path, method):
    """Each method moves the adapter off its initialisation and makes the corrections likelier."""
    from safetensors.torch import load_file

    from trainer import data
    from trainer.evaluate import load_model, logps
    from trainer.finetune import FinetuneConfig, Finetuner

    items = [{"exchange_id": i, "prompt": [{"role": "user", "content": p}], "reply": "I am not sure.",
              "verdict": "down", "corrections": [fix]} for i, (p, fix) in enumerate(CORRECTED[:4])]
    rows = data.to_rows(items, method)
    rows += [{**data.sft_row([{"role": "user", "content": "hi"}], "Hello."), "replay": True}]
    pairs = [(it["prompt"], it["corrections"][0]) for it in items]
    tuner = Finetuner(loop_model, rows, FinetuneConfig(method=method, epochs=3, batch_size=4, early_stop=False))
    before, n = logps(load_model(loop_model, None), tuner.tokenizer, pairs)
    stats = tuner.train()
    assert stats["steps"] == len(tuner.steps()) > 0
    assert stats["final_loss"] == stats["final_loss"]  # not NaN
    tuner.save(tmp_path / "adapter")
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    # LoRA's B starts at zero: a trained adapter has moved it.
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(float(w.abs().max()) > 0 for w in lora_b)
    after, n_after = logps(load_model(loop_model, tmp_path / "adapter"), tuner.tokenizer, pairs)
    assert n_after == n
    assert after / n > before / n + 0.05, (method, before / n, after / n)  # nats per token


def _perturb_adapter(model) -> None:
    """Random LoRA B weights: the policy then differs from the reference (B = 0), so the losses are non-trivial."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()


def test_loop_losses_equal_trl_on_the_same_batch(loop_model, tmp_path):
    """The loop's SFT and DPO losses are TRL's (SFTTrainer, DPOTrainer with loss_type sigmoid + sft), computed by
    TRL's own code on the same model and batch. (KTO is not compared: TRL estimates its reference point from
    mismatched pairs, the loop from the batch.)"""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from trainer import data
    from trainer.finetune import FinetuneConfig, Finetuner
    from trainer.pretrain import collate

    items = [{"exchange_id": i, "prompt": [{"role": "user", "content": p}], "reply": "I am not sure.",
              "verdict": "down", "corrections": [fix]} for i, (p, fix) in enumerate(CORRECTED[:4])]
    common = {"output_dir": str(tmp_path / "trl"), "use_cpu": True, "bf16": False, "report_to": [],
              "save_strategy": "no"}

    sft = Finetuner(loop_model, data.to_rows(items, "sft"), FinetuneConfig(lora_r=4))
    _perturb_adapter(sft.model)
    trl_sft = SFTTrainer(model=sft.model, args=SFTConfig(**common), processing_class=sft.tokenizer,
                         train_dataset=Dataset.from_list(data.to_rows(items, "sft")))
    batch = collate([e["sft"] for e in sft.examples], sft.pad)
    with torch.no_grad():
        ours = sft._loss(sft.examples)
        theirs = trl_sft.compute_loss(trl_sft.model, dict(batch))
    assert float(ours) > 0.1
    assert torch.allclose(ours, theirs, rtol=1e-4), (float(ours), float(theirs))

    dpo = Finetuner(loop_model, data.to_rows(items, "dpo"), FinetuneConfig(method="dpo", lora_r=4, beta=0.1))
    _perturb_adapter(dpo.model)
    trl_dpo = DPOTrainer(model=dpo.model, args=DPOConfig(**common, loss_type=["sigmoid", "sft"], beta=0.1),
                         processing_class=dpo.tokenizer, train_dataset=Dataset.from_list(data.to_rows(items, "dpo")))
    pairs = [e for e in dpo.examples if "pair" in e]
    b = collate([e["pair"][0] for e in pairs] + [e["pair"][1] for e in pairs], dpo.pad)
    inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
              "completion_mask": (b["labels"] != -100).long(),
              "ref_chosen_logps": torch.tensor([e["ref"][0] for e in pairs]),
              "ref_rejected_logps": torch.tensor([e["ref"][1] for e in pairs])}
    trl_dpo.precompute_ref_logps = True  # the reference log-probs are given, as the loop scores them once
    with torch.no_grad():
        ours = dpo._loss(pairs)
        theirs = trl_dpo.compute_loss(trl_dpo.model, inputs)
    assert float(ours) > 0.1
    assert torch.allclose(ours, theirs, rtol=1e-4), (float(ours), float(theirs))
