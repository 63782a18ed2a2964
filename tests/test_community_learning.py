"""Communities learn apart (issue 12): each trains, versions and serves its own line.

Through the real HTTP API (two API keys, two communities), the CLI
(``approve``, ``retrain --community``, ``models``, ``status``, ``promote``,
``rollback``) and a real training run on the tiny model:

- a fact taught in ``http:acme`` and approved is answered there at once
  (memory), and from the weights after acme's retrain; ``http:beta`` never
  gets it;
- beta's greedy replies are identical before and after acme's retrain (acme's
  version is an adapter its requests alone name; the weights stay the base's);
- each command's ``--community`` acts on that community's line only; bad
  input (an unknown community, a malformed one, a version of another line) is
  one error line.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import aiohttp
import pytest

from bot.cli import main
from bot.learning import LiveFollower, adapter_for
from bot.runtime import services
from tests.serving import serving
from tuneloop.config import load
from tuneloop.learning.registry import Registry

pytestmark = pytest.mark.slow

ENV = {"TL_CL_ACME": "acme-key-123", "TL_CL_BETA": "beta-key-456"}
ACME, BETA = ENV["TL_CL_ACME"], ENV["TL_CL_BETA"]
A, B = "http:acme", "http:beta"

FACT_Q = "What is the wifi password in the lab?"
FACT = "The wifi password is tulip42."
# Everyday prompts of each community: the replay set and the gate's controls of acme's run come
# from acme's own; beta's are its probes before and after.
TRAFFIC = ["Hello", "How are you?", "What is your name?", "Do you like music?", "Tell me a joke",
           "What time is it?", "Good morning", "What do you do?"]


def config_text(tiny_model, d, *, memory: bool, scope: str = "community") -> str:
    return f"""
[model]
base = "{tiny_model}"
device = "cpu"
max_new_tokens = 16

[storage]
path = "{d / 'tuneloop.db'}"

[server]
[[server.api_keys]]
community = "acme"
key_env = "TL_CL_ACME"

[[server.api_keys]]
community = "beta"
key_env = "TL_CL_BETA"

[trainer]
enabled = false
scope = "{scope}"
registry = "{d / 'models'}"
control_prompts = 8
replay_prompts = 16
paraphrases = 0
replay_ratio = 8.0  # one fact: enough of the live model's own replies to keep the rest as it was
eval_max_new_tokens = 16

[memory]
enabled = {'true' if memory else 'false'}
"""


@pytest.fixture
def keys_in_env():
    old = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


async def ask(http, base, key, text, user="probe") -> dict:
    body = {"model": "m", "user": user, "temperature": 0,
            "messages": [{"role": "user", "content": text}]}
    async with http.post(f"{base}/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()
        out = await r.json()
    return {"id": out["exchange_id"], "reply": out["choices"][0]["message"]["content"],
            "finish": out["choices"][0]["finish_reason"], "model": out["model"]}


async def session(config, work):
    """Serve ``config`` over HTTP (the live versions followed at start) and run ``work(http, base, svc)``."""
    async with services(config) as svc, serving(svc) as base, aiohttp.ClientSession() as http:
        return await work(http, base, svc)


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.timeout(900)
def test_a_fact_taught_in_one_community_stays_there(tiny_model, tmp_path, keys_in_env, capsys, caplog):
    (tmp_path / "mem.toml").write_text(config_text(tiny_model, tmp_path, memory=True))
    (tmp_path / "weights.toml").write_text(config_text(tiny_model, tmp_path, memory=False))
    mem, weights = str(tmp_path / "mem.toml"), str(tmp_path / "weights.toml")
    cfg = load(mem)
    assert cfg.trainer.scope == "community"  # the default

    # -- acme teaches a fact; a non-admin key's correction waits for review ------------------------
    async def teach(http, base, svc):
        taught = await ask(http, base, ACME, FACT_Q, user="ann")
        assert taught["reply"].strip() != FACT
        async with http.post(f"{base}/api/exchanges/{taught['id']}/feedback",
                             json={"user": "ann", "correction": FACT, "rating": "down"},
                             headers={"Authorization": f"Bearer {ACME}"}) as r:
            assert r.status == 200, await r.text()
            decision = await r.json()
        for text in TRAFFIC:
            await ask(http, base, ACME, text, user="ann")
            await ask(http, base, BETA, text, user="bo")
        return taught, decision

    taught, decision = asyncio.run(session(cfg, teach))
    assert decision["correction"]["status"] == "pending", decision  # [trust] http = review
    correction = decision["correction"]["id"]
    code, out, err = cli(capsys, "--config", mem, "approve", str(correction))
    assert code == 0, err

    # Memory at once: acme's next ask gets the fact, beta's never does.
    async def recall(http, base, svc):
        return await ask(http, base, ACME, FACT_Q), await ask(http, base, BETA, FACT_Q)

    a_mem, b_mem = asyncio.run(session(cfg, recall))
    assert (a_mem["reply"], a_mem["finish"]) == (FACT, "memory")
    assert "tulip42" not in b_mem["reply"] and b_mem["finish"] != "memory"

    # -- bad input: one line each, nothing started --------------------------------------------------
    for args, expect in [(["retrain", "--community", "http:nobody"], "community 'http:nobody' not found"),
                         (["status", "--community", "acme corp!"], "must be 'local' or start with"),
                         (["models", "--community", "http:acme!"], "may hold only"),
                         (["retrain", "--community", B], "no feedback of http:beta"),
                         # without --community: local's line, which has nothing; who has some is named
                         (["retrain"], f"communities with some: {A}; say which with --community"),
                         (["promote", "v1", "--community", A], "version v1 not found"),
                         (["rollback", "--community", A], "nothing to roll back to")]:
        code, out, err = cli(capsys, "--config", mem, *args)
        assert code == 1 and err.count("\n") == 1 and expect in err, (args, err)
        assert err.startswith("tuneloop: error: ")

    # -- beta's greedy replies, weights only, before acme's retrain ---------------------------------
    probes = [FACT_Q, *TRAFFIC]

    async def probe(http, base, svc):
        b = [await ask(http, base, BETA, p) for p in probes]
        a = await ask(http, base, ACME, FACT_Q)
        return b, a, adapter_for(svc.engine, A), adapter_for(svc.engine, B)

    wcfg = load(weights)
    b_before, a_before, *_ = asyncio.run(session(wcfg, probe))
    assert "tulip42" not in a_before["reply"]  # the weights do not know it yet

    # -- acme's retrain: a real training run on acme's rows only ------------------------------------
    code, out, err = cli(capsys, "--config", mem, "retrain", "--community", A, "--wait", "--json")
    run = json.loads(out)
    assert code == 0 and run["status"] == "done" and run["community"] == A, run
    assert run["version"] == "v1", run
    if run["promoted"]:
        assert run["live"] == "v1"
    else:
        # The gate's verdict on a tiny model taught one fact is not what is tested here; an admin
        # serves the version anyway (the same path as the gate's promotion: LIVE names it).
        assert run["live"] == "base"
        code, out, err = cli(capsys, "--config", mem, "promote", "v1", "--community", A)
        assert code == 0 and "rejected by the gate" in err and f"v1 is live in {A}" in out
    line = Registry.line(tmp_path / "models", A)
    meta = line.meta("v1")
    assert meta["community"] == A and meta["parent"] is None
    assert meta["dataset"]["feedback_items"] == 1  # the one approved item: beta's traffic is not acme's
    assert Registry(tmp_path / "models").live() is None  # local's line untouched
    assert line.root == tmp_path / "models" / "communities" / "http+acme"

    # --community on models and status: acme's line, and local's unchanged
    code, out, _ = cli(capsys, "--config", mem, "models", "--community", A, "--json")
    assert [(m["version"], m["live"]) for m in json.loads(out)] == [("base", False), ("v1", True)]
    code, out, _ = cli(capsys, "--config", mem, "models", "--json")
    assert [(m["version"], m["live"]) for m in json.loads(out)] == [("base", True)]
    code, out, _ = cli(capsys, "--config", mem, "status", "--community", A, "--json")
    status = json.loads(out)
    assert (status["community"], status["live_version"], status["last_run"]["version"]) == (A, "v1", "v1")
    code, out, _ = cli(capsys, "--config", mem, "status", "--community", B, "--json")
    status = json.loads(out)
    assert (status["community"], status["live_version"], status["last_run"]) == (B, "base", None)

    # -- after: acme answers from the weights, beta's replies are the very same ---------------------
    b_after, a_after, a_adapter, b_adapter = asyncio.run(session(wcfg, probe))
    assert (a_adapter, b_adapter) == (f"{A}/v1", None)
    assert a_after["model"] == f"{A}/v1" and a_after["finish"] != "memory"
    assert a_after["reply"].strip() == FACT, a_after
    assert [(x["reply"], x["model"]) for x in b_after] == [(x["reply"], x["model"]) for x in b_before]
    assert all("tulip42" not in x["reply"] for x in b_after)
    with capsys.disabled():  # the figures, for `pytest -s`
        print(f"\nacme fact from weights: {a_after['reply']!r}; beta probes identical: "
              f"{sum(x['reply'] == y['reply'] for x, y in zip(b_before, b_after))}/{len(probes)}; "
              f"run seconds: {run['seconds']}; gate: {'passed' if run['promoted'] else 'rejected'} "
              f"({', '.join(c['name'] + '=' + str(c['value']) for c in run['checks'])})")

    # -- rollback and promote act on acme's line; a running follower follows them --------------------
    code, out, err = cli(capsys, "--config", mem, "rollback", "--community", A)
    assert code == 0 and f"base is live in {A} (was v1)" in out, (out, err)
    assert Registry.line(tmp_path / "models", A).live() is None

    async def follow(http, base, svc):
        follower = LiveFollower(wcfg, svc.engine)
        served_before = adapter_for(svc.engine, A)
        assert cli(capsys, "--config", mem, "promote", "v1", "--community", A)[0] == 0
        changed = await follower.follow()
        return served_before, changed, adapter_for(svc.engine, A), await ask(http, base, ACME, FACT_Q)

    served_before, changed, served_after, again = asyncio.run(session(wcfg, follow))
    assert (served_before, changed, served_after) == (None, True, f"{A}/v1")
    assert (again["reply"].strip(), again["model"]) == (FACT, f"{A}/v1")

    # A version of the global line (trained on every community) is never one community's.
    top = Registry(tmp_path / "models")
    shutil.copytree(line.path("v1"), tmp_path / "global-v1")
    meta = json.loads((tmp_path / "global-v1" / "meta.json").read_text())
    version = top.add(tmp_path / "global-v1", {**meta, "community": "*"}, {})
    top.promote(version)

    async def local_adapter(http, base, svc):
        return adapter_for(svc.engine, "local"), (await ask(http, base, ACME, FACT_Q))["model"]

    with caplog.at_level("ERROR", logger="bot.learning"):
        local, acme_model = asyncio.run(session(wcfg, local_adapter))
    assert (local, acme_model) == (None, f"{A}/v1")
    assert any("trained on every community's feedback" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(600)
def test_scope_global_trains_one_line_on_every_community_and_serves_it_to_all(tiny_model, tmp_path, keys_in_env,
                                                                                capsys):
    (tmp_path / "g.toml").write_text(config_text(tiny_model, tmp_path, memory=False, scope="global"))
    cfg = str(tmp_path / "g.toml")
    config = load(cfg)

    async def teach(http, base, svc):
        for key in (ACME, BETA):
            ex = await ask(http, base, key, FACT_Q, user="ann")
            svc.feedback.correct(ex["id"], "admin", FACT, admin=True)  # an admin's correction: live at once
            for text in TRAFFIC[:4]:
                await ask(http, base, key, text, user="ann")

    asyncio.run(session(config, teach))
    code, out, err = cli(capsys, "--config", cfg, "retrain", "--wait", "--json")
    run = json.loads(out)
    assert run["status"] == "done" and run["community"] == "*", run
    meta = Registry(tmp_path / "models").meta(run["version"])
    assert meta["community"] == "*" and meta["dataset"]["feedback_items"] == 2  # both communities' rows
    assert not (tmp_path / "models" / "communities").exists()
    if not run["promoted"]:
        assert cli(capsys, "--config", cfg, "promote", run["version"])[0] == 0

    async def probe(http, base, svc):
        return ([await ask(http, base, key, FACT_Q) for key in (ACME, BETA)],
                adapter_for(svc.engine, A), svc.engine.model_version)

    replies, adapter, engine_version = asyncio.run(session(config, probe))
    assert (adapter, engine_version) == (None, run["version"])  # swapped into the weights, for everyone
    assert [(r["reply"].strip(), r["model"]) for r in replies] == [(FACT, run["version"])] * 2


def test_scope_global_keeps_one_line_and_refuses_community(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "t.db"}"\n[trainer]\nscope = "global"\n'
                   f'registry = "{tmp_path / "models"}"\n')
    code, out, err = cli(capsys, "--config", str(cfg), "status", "--community", "local")
    assert code == 1 and "scope = \"community\"" in err and err.count("\n") == 1
    code, out, err = cli(capsys, "--config", str(cfg), "status", "--json")
    assert code == 0 and json.loads(out)["community"] == "*"
    # Whoever asks (a workspace's admin too), the one line: its runs train on every community.
    from tuneloop.learning.control import Control
    from tuneloop.store import Store

    with Store(tmp_path / "t.db") as store:
        control = Control(load(cfg), store)
        assert control.key("slack:T1") == "*" and control.line("slack:T1").root == tmp_path / "models"
        assert "--community" not in control.command(1, "cli", control.key("slack:T1"))
    cfg.write_text(cfg.read_text().replace('"global"', '"everyone"'))
    code, out, err = cli(capsys, "--config", str(cfg), "status")
    assert code == 1 and "trainer.scope" in err


# -- lines, runs and admin commands per community, without a model ------------------------------------


def _rated(store, community: str, n: int) -> None:
    for i in range(n):
        ex = store.add_exchange(platform="api", user="u", conversation_id=f"{community}-{i}", community=community,
                                messages=[{"role": "user", "content": f"q{i}"}], prompt=f"q{i}", reply="r",
                                model_version="base")
        store.rate(ex.id, "rater", "down")


def _version(line: Registry, tmp_path) -> str:
    work = tmp_path / f"work-{line.community}".replace(":", "+")
    (work / "adapter").mkdir(parents=True)
    (work / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    return line.add(work, {"parent": None, "verdict": "passed", "community": line.community, "metrics": {}}, {})


def test_each_community_has_its_own_feedback_runs_versions_and_admins(tmp_path):
    import time

    from bot.admin import Admin, Caller
    from tuneloop.errors import NotFoundError, PermissionDenied
    from tuneloop.learning.control import Control
    from tuneloop.store import Store

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "t.db"}"\n[trainer]\nmin_feedback = 2\n'
                   f'registry = "{tmp_path / "models"}"\n[admin]\nslack_users = ["U1"]\ndiscord_users = ["D1"]\n')
    config = load(cfg)
    store = Store(config.storage.path)
    _rated(store, "slack:T1", 3)
    _rated(store, "discord:9", 5)
    _rated(store, "local", 1)
    control = Control(config, store)

    # The scheduler's order: most new feedback first; local (1 < min_feedback) is not due.
    assert control.due() == [("discord:9", 5), ("slack:T1", 3)]
    assert (control.new_feedback("slack:T1"), control.new_feedback()) == (3, 1)
    # A finished run of one line resets that line's count only.
    rid = control.runs.create("schedule", community="slack:T1")
    control.runs.update(rid, status="done", started_at=time.time(), finished_at=time.time(),
                        data_cutoff=time.time())
    assert (control.new_feedback("slack:T1"), control.new_feedback("discord:9")) == (0, 5)
    assert control.status("slack:T1")["last_run"]["run_id"] == f"run-{rid}"
    assert control.status("discord:9")["last_run"] is None and control.status()["last_run"] is None
    assert control.due() == [("discord:9", 5)]

    # A version of slack:T1's line: its workspace's admin acts on it; another server's cannot see it.
    line = Registry.line(tmp_path / "models", "slack:T1")
    assert _version(line, tmp_path) == "v1"
    admin = Admin(config, store, control)
    slack, discord = Caller("slack", "U1", community="slack:T1"), Caller("discord", "D1", community="discord:9")
    with pytest.raises(NotFoundError, match="version v1 not found"):
        admin.run(discord, "promote v1")
    with pytest.raises(PermissionDenied):
        admin.run(Caller("slack", "U2", community="slack:T1"), "promote v1")
    assert admin.run(slack, "promote v1") == "v1 is live."
    assert line.live() == "v1" and Registry(tmp_path / "models").live() is None
    history = (line.root / "history.jsonl").read_text().splitlines()
    assert json.loads(history[-1])["by"] == "slack:U1"
    assert "* v1" in admin.run(slack, "models") and "v1" not in admin.run(discord, "models")
    assert "live version: v1" in admin.run(slack, "status")
    assert "live version: base" in admin.run(discord, "status")
    assert control.status()["communities"] == {"slack:T1": "v1"}  # the operator sees every line
    assert "other communities' live versions: slack:T1 v1" in admin.run(Caller("cli", "op"), "status")
    assert "communities" not in control.status("discord:9") and "slack:T1" not in admin.run(discord, "status")
    assert admin.run(slack, "rollback") == "Rolled back: base is live."
    assert line.live() is None
    # One run at a time over every line: slack:T1's run (this process holds the lock) holds
    # back a Discord admin's retrain of its server, and its status says whose run it is.
    from tuneloop.errors import TrainingError

    lock = Registry(tmp_path / "models").lock()
    assert lock.acquire()
    try:
        going = control.runs.create("cli", pid=os.getpid(), community="slack:T1")
        control.runs.update(going, status="running", stage="train")
        with pytest.raises(TrainingError, match=f"run-{going} is going"):
            admin.run(discord, "retrain")
        assert control.status("discord:9")["running"] == f"run-{going} (train) of slack:T1"
        assert control.status("slack:T1")["running"] == f"run-{going} (train)"
    finally:
        lock.release()
    store.close()


@pytest.mark.timeout(120)
async def test_one_firing_runs_each_community_due_one_after_another(tiny_model, tmp_path):
    """The schedule's firing starts the community with the most new feedback; the next starts once that
    run has ended (here a training process that exits at once: ``[trainer] python = /bin/false``)."""
    from bot.learning import LearningService
    from tuneloop.store import Store

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nbase = "{tiny_model}"\n[storage]\npath = "{tmp_path / "t.db"}"\n'
                   f'[trainer]\nmin_feedback = 2\npython = "/bin/false"\nregistry = "{tmp_path / "models"}"\n'
                   '[memory]\nenabled = false\n')
    with Store(tmp_path / "t.db") as store:
        _rated(store, "slack:T1", 2)
        _rated(store, "discord:9", 4)
        _rated(store, "local", 1)  # not due
    config = load(cfg)
    async with services(config) as svc:
        learning = LearningService(svc)
        first = await learning.tick()
        assert first["community"] == "discord:9"
        ended = await asyncio.to_thread(learning.control.wait, first["run_id"], 30, 0.05)
        assert ended["status"] == "failed"  # /bin/false trained nothing
        second = await learning.start_due()
        assert second["community"] == "slack:T1"
        await asyncio.to_thread(learning.control.wait, second["run_id"], 30, 0.05)
        assert await learning.start_due() is None  # local has 1 < min_feedback: never due
        runs = svc.store.training_runs()
        assert [(r["community"], r["reason"]) for r in runs] == [("discord:9", "schedule"), ("slack:T1", "schedule")]
        await learning.stop()
