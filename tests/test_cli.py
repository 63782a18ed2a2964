"""The `tuneloop` CLI through its real entry point, on a tiny model and a real SQLite file."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot.cli import main
from tuneloop.store import Store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cfg(tmp_path, tiny_model) -> Path:
    f = tmp_path / "config.toml"
    f.write_text(f'[model]\nbase = "{tiny_model}"\nmax_new_tokens = 16\nmax_input_chars = 200\n'
                 f'system_prompt = "You are tuneloop."\n[storage]\npath = "data/t.db"\n')
    return f


def run(cfg: Path, *args: str, capsys) -> tuple[int, str, str]:
    code = main(["--config", str(cfg), *args])
    out, err = capsys.readouterr()
    return code, out, err


def ask_json(cfg, capsys, *args) -> dict:
    code, out, err = run(cfg, "ask", *args, "--json", capsys=capsys)
    assert code == 0, err
    return json.loads(out)


def test_ask_rate_correct_stats_export(cfg, capsys, tmp_path):
    first = ask_json(cfg, capsys, "hello", "--user", "ann")
    assert set(first) >= {"exchange_id", "conversation_id", "reply", "model_version"}
    assert first["model_version"] and isinstance(first["reply"], str)

    # The exchange is in SQLite with the full context that was sent.
    store = Store(tmp_path / "data" / "t.db")
    ex = store.exchange(first["exchange_id"])
    assert ex.messages == [{"role": "system", "content": "You are tuneloop."},
                           {"role": "user", "content": "hello"}]
    assert (ex.platform, ex.user, ex.reply) == ("cli", "ann", first["reply"])
    assert ex.completion_tokens is not None and ex.total_ms > 0

    assert run(cfg, "rate", str(ex.id), "up", "--user", "bob", capsys=capsys)[0] == 0
    assert run(cfg, "rate", str(ex.id), "down", "--user", "bob", capsys=capsys)[0] == 0  # replaces
    assert run(cfg, "rate", str(ex.id), "up", "--user", "cid", capsys=capsys)[0] == 0
    assert run(cfg, "correct", str(ex.id), "Hi there!", "--user", "bob", capsys=capsys)[0] == 0
    assert store.ratings(ex.id) == {"bob": "down", "cid": "up"}
    assert [c["text"] for c in store.corrections(ex.id)] == ["Hi there!"]

    code, out, _ = run(cfg, "stats", "--json", capsys=capsys)
    stats = json.loads(out)
    assert stats["exchanges"] == 1 and stats["ratings"] == {"up": 1, "down": 1}
    assert stats["corrections"] == 1 and stats["approval_rate"] == 0.5
    assert stats["by_platform"]["cli"]["exchanges"] == 1
    assert stats["by_version"][first["model_version"]]["exchanges"] == 1

    assert run(cfg, "rate", str(ex.id), "none", "--user", "cid", capsys=capsys)[0] == 0  # removes
    assert store.ratings(ex.id) == {"bob": "down"}

    code, out, _ = run(cfg, "export", "--format", "dpo", capsys=capsys)
    [row] = [json.loads(line) for line in out.splitlines()]
    assert row["chosen"][0]["content"] == "Hi there!" and row["rejected"][0]["content"] == ex.reply

    code, out, _ = run(cfg, "stats", capsys=capsys)
    assert "approval" in out and "platform cli" in out
    store.close()


def test_conversation_continues_with_earlier_turns(cfg, capsys, tmp_path):
    first = ask_json(cfg, capsys, "hello")
    second = ask_json(cfg, capsys, "how are you?", "--conversation", first["conversation_id"])
    assert second["conversation_id"] == first["conversation_id"]
    store = Store(tmp_path / "data" / "t.db")
    sent = store.exchange(second["exchange_id"]).messages
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == "hello" and sent[2]["content"] == first["reply"]
    assert sent[3]["content"] == "how are you?"
    # A new ask without --conversation starts afresh.
    third = ask_json(cfg, capsys, "hello")
    assert third["conversation_id"] != first["conversation_id"]
    store.close()


def test_long_conversations_are_truncated_from_the_oldest(cfg, capsys, tmp_path):
    first = ask_json(cfg, capsys, "tell me a joke " * 10)
    conv = first["conversation_id"]
    for _ in range(12):  # ~ 12 x 60 tokens: more than the tiny model's 256-token window
        ask_json(cfg, capsys, "and another one please " * 6, "--conversation", conv)
    last = ask_json(cfg, capsys, "last one", "--conversation", conv)
    store = Store(tmp_path / "data" / "t.db")
    sent = store.exchange(last["exchange_id"]).messages
    assert sent[0]["role"] == "system" and sent[-1]["content"] == "last one"
    assert 3 <= len(sent) < 2 * 14  # older turns were dropped, the newest kept
    store.close()


@pytest.mark.parametrize("args, message", [
    (["ask", ""], "message is empty"),
    (["ask", "   \n "], "message is empty"),
    (["ask", "x" * 201], "message is 201 characters; the limit is 200 (model.max_input_chars)"),
    (["ask", "hi", "--conversation", "cli-nope"], "conversation cli-nope not found"),
    (["rate", "12345", "up"], "exchange 12345 not found"),
    (["rate", "abc", "up"], "exchange id must be a whole number, got 'abc'"),
    (["rate", "1", "sideways"], "rating must be up, down or none, got 'sideways'"),
    (["correct", "12345", "better"], "exchange 12345 not found"),
    (["correct", "1", "  "], "correction is empty"),
])
def test_bad_input_is_one_line_and_changes_nothing(cfg, capsys, tmp_path, args, message):
    first = ask_json(cfg, capsys, "hello")
    db = tmp_path / "data" / "t.db"
    before = sqlite3.connect(db).execute(
        "SELECT (SELECT COUNT(*) FROM exchanges), (SELECT COUNT(*) FROM ratings), "
        "(SELECT COUNT(*) FROM corrections)").fetchone()
    args = [a.replace("1", str(first["exchange_id"])) if a == "1" else a for a in args]
    code, out, err = run(cfg, *args, capsys=capsys)
    assert code == 1
    assert err.strip() == f"tuneloop: error: {message}"
    after = sqlite3.connect(db).execute(
        "SELECT (SELECT COUNT(*) FROM exchanges), (SELECT COUNT(*) FROM ratings), "
        "(SELECT COUNT(*) FROM corrections)").fetchone()
    assert before == after


def test_a_foreign_database_is_refused_and_untouched(tmp_path, capsys):
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE accounts (id INTEGER, balance REAL)")
    conn.execute("INSERT INTO accounts VALUES (1, 99.5)")
    conn.commit()
    conn.close()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\npath = "{db}"\n')
    code, _, err = run(cfg, "stats", capsys=capsys)
    assert code == 1 and "not a tuneloop database" in err and err.count("\n") == 1
    assert sqlite3.connect(db).execute("SELECT balance FROM accounts").fetchone() == (99.5,)


def test_a_config_that_does_not_parse(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model\n")
    code, _, err = run(cfg, "stats", capsys=capsys)
    assert code == 1 and "not valid TOML" in err and err.count("\n") == 1


def _env(tmp_path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TUNELOOP_CONFIG", None)
    return env


def test_console_script_and_python_m_bot(cfg, tmp_path):
    exe = Path(sys.executable).with_name("tuneloop")
    out = subprocess.run([str(exe), "--config", str(cfg), "ask", "hi", "--json"], capture_output=True,
                         text=True, env=_env(tmp_path), timeout=240)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    out = subprocess.run([sys.executable, "-m", "bot", "--config", str(cfg), "rate",
                          str(answer["exchange_id"]), "up", "--user", "zed"],
                         capture_output=True, text=True, env=_env(tmp_path), timeout=240)
    assert out.returncode == 0, out.stderr
    assert Store(tmp_path / "data" / "t.db").ratings(answer["exchange_id"]) == {"zed": "up"}


def test_terminal_chat_rates_corrects_and_starts_over(cfg, tmp_path):
    script = "hello\n/good\n/fix Hello! Nice to meet you.\nhow are you?\n/bad\n/new\nhello again\n/quit\n"
    out = subprocess.run([sys.executable, "-m", "bot", "--config", str(cfg), "chat", "--user", "tess"],
                         input=script, capture_output=True, text=True, env=_env(tmp_path), timeout=240)
    assert out.returncode == 0, out.stderr
    assert "rated exchange 1 up" in out.stdout and "correction stored for exchange 1" in out.stdout
    store = Store(tmp_path / "data" / "t.db")
    rows = store.query("SELECT id, conversation_id, prompt FROM exchanges ORDER BY id")
    assert [r["prompt"] for r in rows] == ["hello", "how are you?", "hello again"]
    assert rows[0]["conversation_id"] == rows[1]["conversation_id"] != rows[2]["conversation_id"]
    assert store.ratings(1) == {"tess": "up"} and store.ratings(2) == {"tess": "down"}
    assert [c["text"] for c in store.corrections(1)] == ["Hello! Nice to meet you."]
    store.close()


def test_ctrl_c_while_waiting_for_a_run_says_it_goes_on(cfg, tmp_path):
    """``retrain --wait`` stops waiting on Ctrl-C; the run is its own process and the message says how to follow it."""
    import re
    import signal

    with Store(tmp_path / "data" / "t.db") as store:
        ex = store.add_exchange(platform="cli", user="ann", conversation_id="c1", prompt="hi", reply="yo",
                                messages=[{"role": "user", "content": "hi"}], model_version="base")
        store.rate(ex.id, "bob", "down")
        # Something to train on: a run with nothing fails within a second of starting, sometimes before
        # the Ctrl-C arrives (the wait then ends with that failure, not with the interruption).
        store.add_correction(ex.id, "bob", "Hello there!")
    proc = subprocess.Popen([sys.executable, "-m", "bot", "--config", str(cfg), "retrain", "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    pid = None
    try:
        started = proc.stderr.readline()  # blocks until the run has started and the wait begins
        assert started.startswith("run-1 started; waiting (log: "), started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, (out, err)
        match = re.search(r"tuneloop: interrupted; run-1 goes on in the background \(pid (\d+), log (\S+)\); "
                          r"`tuneloop status` follows it", err)
        assert match, err
        pid = int(match.group(1))
        os.kill(pid, 0)  # it does go on
        assert Path(match.group(2)).exists()
    finally:
        proc.kill()
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)
