"""The learning loop's parts that need no model: registry, run lock, runs, datasets, schedule, CLI."""

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


def test_holdout_is_a_floor_and_rotates_between_runs(tmp_path):
    items = data.feedback_items(feedback_store(tmp_path))
    train, held = data.split_holdout(items, 0.2, "0:1")
    assert len(held) == 2 and len(train) == 8
    assert {i["exchange_id"] for i in train} | {i["exchange_id"] for i in held} == set(range(1, 11))
    assert data.split_holdout(items, 0.2, "0:1") == (train, held)  # deterministic
    helds = {tuple(i["exchange_id"] for i in data.split_holdout(items, 0.2, f"0:{r}")[1]) for r in range(6)}
    assert len(helds) > 1  # a later run trains on what an earlier one held out
    assert len(data.split_holdout(items[:4], 0.2, "x")[1]) == 0


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
