"""The learning loop's parts that need no model (registry, run lock, runs, datasets, schedule, CLI), and the
LIVE follower on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bot.cli import main
from trainer import data
from tuneloop.config import parse_schedule
from tuneloop.errors import ConfigError, InputError, NotFoundError
from tuneloop.learning.registry import Registry
from tuneloop.learning.runs import Runs
from tuneloop.store import Store


def make_version(reg: Registry, tmp_path, parent=None, verdict="passed") -> str:
    work = tmp_path / f"work-{time.perf_counter_ns()}"
    (work / "adapter").mkdir(parents=True)
    (work / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    return reg.add(work, {"parent": parent, "verdict": verdict, "metrics": {"control_same": 1.0}}, {"ok": 1})


def test_registry_versions_promote_and_rollback(tmp_path):
    reg = Registry(tmp_path / "models")
    assert reg.live() is None and reg.versions() == []
    v1 = make_version(reg, tmp_path)
    v2 = make_version(reg, tmp_path, parent=v1)
    assert (v1, v2) == ("v1", "v2")
    assert reg.meta(v2)["parent"] == "v1" and reg.report(v2) == {"ok": 1}
    reg.promote(v1)
    reg.promote(v2)
    assert reg.live() == "v2"
    reg.rollback()  # to the parent
    assert reg.live() == "v1"
    reg.rollback()  # v1's parent is the base model
    assert reg.live() is None
    with pytest.raises(InputError):
        reg.rollback()
    reg.rollback("v2")
    assert reg.live() == "v2"
    with pytest.raises(NotFoundError):
        reg.promote("v9")
    with pytest.raises(NotFoundError):
        reg.promote("../etc")
    assert [m["live"] for m in reg.list()] == [False, True]
    history = [json.loads(line) for line in (reg.root / "history.jsonl").read_text().splitlines()]
    assert [h["to"] for h in history] == ["v1", "v2", "v1", "base", "v2"]


def test_live_pointer_survives_a_crash_mid_write(tmp_path):
    reg = Registry(tmp_path / "models")
    v1 = make_version(reg, tmp_path)
    reg.promote(v1)
    # A crash between writing the temporary file and os.replace leaves it behind.
    (reg.root / ".LIVE.dead.tmp").write_text("v7\n")
    # A crash mid-way through building a version leaves a staging folder, not a version.
    (reg.root / ".staging" / "run-9" / "version" / "adapter").mkdir(parents=True)
    assert reg.live() == "v1" and reg.versions() == ["v1"]
    reg.clean_staging()
    assert not any((reg.root / ".staging").iterdir())


def test_run_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    reg = Registry(tmp_path / "models")
    code = ("import sys, time; from tuneloop.learning.registry import RunLock; "
            "l = RunLock(sys.argv[1]); assert l.acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(reg.root / "train.lock")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert reg.lock().held_elsewhere()
        assert not reg.lock().acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        lock = reg.lock()
        assert lock.acquire()
        lock.release()
    finally:
        proc.kill()
        proc.wait()


def test_interrupted_runs_are_marked_failed(tmp_path):
    store = Store(tmp_path / "t.db")
    runs = Runs(store)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rid = runs.create("test", pid=dead.pid)
    runs.update(rid, status="running", stage="train")
    alive = runs.create("test", pid=os.getpid())  # queued, its process alive: left alone
    runs.reap(lock_held=False)
    assert runs.get(rid)["status"] == "failed" and "train" in runs.get(rid)["error"]
    assert runs.get(alive)["status"] == "queued"


def feedback_store(tmp_path) -> Store:
    store = Store(tmp_path / "t.db")
    for i in range(10):
        ex = store.add_exchange(platform="cli", user="u", conversation_id=f"c{i}",
                                messages=[{"role": "user", "content": f"q{i}"}], prompt=f"q{i}", reply="r",
                                model_version="base")
        store.rate(ex.id, "rater", "down")
        store.add_correction(ex.id, "rater", f"a{i}")
    for i in range(5):
        store.add_exchange(platform="cli", user="v", conversation_id=f"d{i}",
                           messages=[{"role": "user", "content": f"plain {i}"}], prompt=f"plain {i}",
                           reply="ok", model_version="base")
    return store


def test_new_feedback_counts_and_opt_outs(tmp_path):
    store = feedback_store(tmp_path)
    assert store.count_feedback_since(None) == 20
    cutoff = time.time()
    assert store.count_feedback_since(cutoff) == 0
    store.rate(1, "someone", "up")
    assert store.count_feedback_since(cutoff) == 1
    store.forget_user("someone")
    assert store.count_feedback_since(cutoff) == 0


def test_controls_are_held_out_of_replay_and_stay_controls(tmp_path):
    pool = [[{"role": "user", "content": f"prompt {i}"}] for i in range(20)]
    controls, replay = data.split_controls(pool, 5)
    assert len(controls) == 5 and len(replay) == 15
    assert not {c[-1]["content"] for c in controls} & {r[-1]["content"] for r in replay}
    # A control stays a control when the pool around it changes (a later run never trains on it).
    again, _ = data.split_controls(list(reversed(pool)) + [[{"role": "user", "content": "new"}]], 5)
    assert len({c[-1]["content"] for c in controls} & {c[-1]["content"] for c in again}) >= 4


def test_replay_prompts_skip_feedback_and_opted_out_users(tmp_path):
    store = feedback_store(tmp_path)
    got = data.replay_prompts(store, exclude=[], limit=5, seed=0)
    assert sorted(p[-1]["content"] for p in got) == [f"plain {i}" for i in range(5)]
    store.forget_user("v")
    got = data.replay_prompts(store, exclude=[], limit=5, seed=0, system_prompt="sys",
                              exclude_prompts=["q1"])
    # The store has nothing left to replay: base SFT prompts, asked with the system prompt.
    assert len(got) == 5 and all(p[0] == {"role": "system", "content": "sys"} for p in got)
    assert not any(p[-1]["content"].startswith("plain") for p in got)


def test_schedule_is_checked_at_load():
    assert parse_schedule("interval:60") == ("interval", 60.0)
    assert parse_schedule("0 3 * * *") == ("cron", "0 3 * * *")
    for bad in ("interval:-1", "hourly", "61 * * * *"):
        with pytest.raises(ConfigError, match="trainer.schedule"):
            parse_schedule(bad)


def test_cli_models_promote_rollback_forget_without_a_server(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[storage]\npath = "t.db"\n[trainer]\nregistry = "models"\n')
    store = feedback_store(tmp_path)
    store.close()
    reg = Registry(tmp_path / "models")
    make_version(reg, tmp_path, verdict="rejected")
    assert main(["--config", str(cfg), "promote", "v1"]) == 0
    assert "rejected by the gate" in capsys.readouterr().err
    assert reg.live() == "v1"
    assert main(["--config", str(cfg), "models", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert [(m["version"], m["live"]) for m in models] == [("base", False), ("v1", True)]
    assert main(["--config", str(cfg), "rollback"]) == 0
    assert reg.live() is None and "base is live" in capsys.readouterr().out
    assert main(["--config", str(cfg), "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["live_version"] == "base" and status["new_feedback"] == 20
    assert main(["--config", str(cfg), "forget", "u"]) == 0
    assert "10 exchanges" in capsys.readouterr().out
    assert main(["--config", str(cfg), "promote", "v5"]) == 1


def test_a_cancelled_run_ends_waits_and_a_stopped_control_starts_none(tmp_path):
    from bot.admin import format_status
    from tuneloop.config import load
    from tuneloop.errors import TrainingError
    from tuneloop.learning.control import Control

    cfg = tmp_path / "c.toml"
    cfg.write_text('[storage]\npath = "t.db"\n[trainer]\nregistry = "models"\n')
    store = feedback_store(tmp_path)
    control = Control(load(cfg), store)
    rid = control.runs.create("discord:admin")
    control.runs.update(rid, status="running", stage="train")
    assert control.runs.end(rid, "cancelled", "cancelled: the server that started it stopped")
    assert control.wait(rid, timeout=5)["status"] == "cancelled"  # an end like done and failed
    status = control.status()
    assert status["last_run"]["status"] == "cancelled" and status["running"] is None
    assert "last run: run-1 cancelled" in format_status(status)
    assert control.outcome(rid)["status"] == "cancelled"
    assert control.stop_children() == []  # nothing of its own was running
    with pytest.raises(TrainingError, match="server is stopping"):
        control.start_run("discord:admin")  # an admin's retrain during shutdown starts nothing
    assert [r["id"] for r in control.runs.active()] == []
    store.close()


# -- the one LIVE follower ----------------------------------------------------------------------------


def _lora(model_folder, out) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(model_folder))
    get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules="all-linear",
                                     init_lora_weights=False)).save_pretrained(str(out))


def _version(reg: Registry, tmp_path, name: str, *, lora_of=None, base_path=None) -> str:
    work = tmp_path / f"work-{name}"
    if lora_of is not None:
        _lora(lora_of, work / "adapter")
    else:  # a version whose weights do not load
        (work / "adapter").mkdir(parents=True)
        (work / "adapter" / "adapter_config.json").write_text("{}")
        (work / "adapter" / "adapter_model.safetensors").write_bytes(b"not weights")
    meta = {"parent": None, "verdict": "passed", "metrics": {}}
    if base_path is not None:
        meta["base_path"] = str(base_path)
    return reg.add(work, meta, {})


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_one_live_follower_one_error_policy(tiny_model, tmp_path, caplog):
    """Start-up (``services``) and the watcher follow LIVE alike; a broken version: one line, old weights."""
    from bot.chat import Turn
    from bot.learning import LearningService
    from bot.runtime import services
    from tuneloop.config import load

    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\nbase = "{tiny_model}"\nmax_new_tokens = 8\n[storage]\npath = "{tmp_path / "t.db"}"\n'
                   f'[trainer]\nregistry = "{tmp_path / "models"}"\n')
    config = load(cfg)
    reg = Registry(tmp_path / "models")
    broken = _version(reg, tmp_path, "broken")
    other_base = _version(reg, tmp_path, "other", lora_of=tiny_model, base_path=tmp_path / "another-model")
    good = _version(reg, tmp_path, "good", lora_of=tiny_model, base_path=tiny_model)
    reg.promote(broken)

    def errors() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "bot.learning" and r.levelname == "ERROR"]

    caplog.set_level("INFO")
    async with services(config) as svc:
        # Start-up met the broken version: one line, and the base model serves.
        assert svc.engine.model_version == str(tiny_model)
        assert len(errors()) == 1 and errors()[0].startswith(f"cannot serve {broken}: ModelError")
        assert "\n" not in errors()[0] and errors()[0].endswith(f"still serving {tiny_model}")
        base = await svc.chat.respond(Turn(text="hello", user="u", platform="cli"))
        assert base.model_version == str(tiny_model)

        learning = LearningService(svc)
        follower = learning.follower
        assert await follower.follow() is False  # a new follower (a new process) tries it once more
        assert len(errors()) == 2 and svc.engine.model_version == str(tiny_model)
        caplog.clear()
        assert await follower.follow() is False and errors() == []  # not retried every poll

        reg.promote(other_base)
        assert await follower.follow() is False
        assert len(errors()) == 1 and "another base model" in errors()[0]
        assert svc.engine.model_version == str(tiny_model)

        reg.promote(good)
        assert await follower.follow() is True
        tuned = await svc.chat.respond(Turn(text="hello", user="u", platform="cli"))
        assert tuned.model_version == good and tuned.reply != base.reply

        caplog.clear()
        reg.promote(broken)  # a broken version after a good one: the good weights keep serving
        assert await follower.follow() is False and len(errors()) == 1
        again = await svc.chat.respond(Turn(text="hello", user="u", platform="cli"))
        assert (again.model_version, again.reply) == (good, tuned.reply)

        reg.rollback("base")
        assert await follower.follow() is True
        back = await svc.chat.respond(Turn(text="hello", user="u", platform="cli"))
        assert (back.model_version, back.reply) == (base.model_version, base.reply)
