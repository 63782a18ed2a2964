"""`tuneloop export`: JSONL in the layouts TRL's SFT, KTO and DPO trainers read."""

from __future__ import annotations

import json

import pytest
from datasets import load_dataset
from trl.data_utils import is_conversational

from bot.cli import main
from tuneloop.store import Store

SYSTEM = {"role": "system", "content": "be nice"}


@pytest.fixture
def cfg(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[storage]\npath = "t.db"\n')
    store = Store(tmp_path / "t.db")
    msgs1 = [SYSTEM, {"role": "user", "content": "hi"}]
    a = store.add_exchange(platform="cli", user="u", conversation_id="c", messages=msgs1, prompt="hi",
                           reply="hello", model_version="starter")
    msgs2 = msgs1 + [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    b = store.add_exchange(platform="cli", user="u", conversation_id="c", messages=msgs2, prompt="2+2?",
                           reply="5", model_version="starter")
    c = store.add_exchange(platform="cli", user="u", conversation_id="d", messages=[{"role": "user", "content": "tie"}],
                           prompt="tie", reply="meh", model_version="starter")
    gone = store.add_exchange(platform="cli", user="optout", conversation_id="e",
                              messages=[{"role": "user", "content": "secret"}], prompt="secret",
                              reply="x", model_version="starter")
    store.rate(a.id, "r1", "up")
    store.rate(a.id, "r2", "up")
    store.rate(a.id, "r3", "down")  # majority up
    store.rate(b.id, "r1", "down")
    store.add_correction(b.id, "r1", "4")
    store.rate(c.id, "r1", "up")
    store.rate(c.id, "r2", "down")  # a tie: dropped
    store.rate(gone.id, "r1", "up")
    store.forget_user("optout")
    store.close()
    return f


def export(cfg, fmt, tmp_path):
    out = tmp_path / f"{fmt}.jsonl"
    assert main(["--config", str(cfg), "export", "--format", fmt, "--output", str(out)]) == 0
    return out, [json.loads(line) for line in out.read_text().splitlines()]


def test_sft_rows_carry_the_context_and_use_corrections(cfg, tmp_path):
    out, rows = export(cfg, "sft", tmp_path)
    assert [r["completion"][0]["content"] for r in rows] == ["hello", "4"]
    # The corrected exchange's prompt is the whole conversation up to it.
    assert rows[1]["prompt"][0] == SYSTEM and rows[1]["prompt"][-1]["content"] == "2+2?"
    assert len(rows[1]["prompt"]) == 4
    ds = load_dataset("json", data_files=str(out), split="train")
    assert ds.column_names == ["prompt", "completion"]
    assert all(is_conversational(ex) for ex in ds)


def test_kto_rows_label_desirable_and_undesirable(cfg, tmp_path):
    out, rows = export(cfg, "kto", tmp_path)
    got = [(r["completion"][0]["content"], r["label"]) for r in rows]
    assert got == [("hello", True), ("5", False), ("4", True)]
    ds = load_dataset("json", data_files=str(out), split="train")
    assert ds.column_names == ["prompt", "completion", "label"]
    assert all(is_conversational(ex) for ex in ds)


def test_dpo_prefers_the_correction_over_the_reply(cfg, tmp_path):
    out, rows = export(cfg, "dpo", tmp_path)
    assert len(rows) == 1
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "4"}]
    assert rows[0]["rejected"] == [{"role": "assistant", "content": "5"}]
    ds = load_dataset("json", data_files=str(out), split="train")
    assert ds.column_names == ["prompt", "chosen", "rejected"]


def test_export_to_stdout_and_unknown_format(cfg, capsys):
    assert main(["--config", str(cfg), "export", "--format", "sft"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["--config", str(cfg), "export", "--format", "ppo"]) == 1
    assert capsys.readouterr().err.strip() == "tuneloop: error: --format must be one of sft, kto, dpo, got 'ppo'"
