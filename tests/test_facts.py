"""``python -m trainer facts`` on the tiny model: the scripted made-up-facts check runs end to end and
reports what the version's weights answer (the figures on SmolLM2 are a benchmark, not a test)."""

from __future__ import annotations

import json

import pytest

from trainer import facts
from trainer.__main__ import main
from trainer.evaluate import answered
from tuneloop.errors import InputError
from tuneloop.learning.registry import Registry
from tuneloop.memory.reach import read_taught

pytestmark = pytest.mark.slow


def test_config_moves_store_and_registry_into_the_work_folder(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nbase = "starter"\n[storage]\npath = "real.db"\n[trainer]\nregistry = "real"\n')
    config = facts.facts_config(str(cfg), tmp_path / "w", base="/models/x",
                                overrides=["learning_rate=0.002", "peft=dora", "scope=global",
                                           "lora_targets=q_proj,v_proj"])
    assert config.storage.path == tmp_path / "w" / "facts.db"
    assert config.trainer.registry == tmp_path / "w" / "models"
    assert (config.model.base, config.trainer.learning_rate, config.trainer.peft) == ("/models/x", 0.002, "dora")
    assert config.trainer.lora_targets == "q_proj,v_proj"
    with pytest.raises(InputError, match="--set takes KEY=VALUE"):
        facts.facts_config(str(cfg), tmp_path / "w", overrides=["learning_rate"])


def test_controls_are_never_replay_rows():
    from trainer import corpus

    known = {p.message.strip().casefold() for p in corpus.load_pairs(("english",))}
    assert not [c for c in facts.CONTROLS if c.casefold() in known]
    assert len(facts.FACTS) == 8 and len(facts.CONTROLS) == 16
    assert all(f.paraphrase.casefold() != f.prompt.casefold() for f in facts.FACTS)


def test_facts_end_to_end_on_the_tiny_model(tiny_model, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[trainer]\neval_max_new_tokens = 8\n")
    code = main(["facts", "--config", str(cfg), "--base", str(tiny_model), "--work", str(tmp_path / "w"),
                 "--set", "max_steps=8", "--set", "replay_prompts=4", "--set", "control_prompts=4", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == "v1" and report["verdict"] in ("passed", "rejected")
    assert report["train"]["steps"] == 8 and report["settings"]["max_steps"] == 8
    # The counts agree with the replies shown beside them.
    fixed = sum(answered(r["reply"], f.correction) for r, f in zip(report["replies"]["corrected"], facts.FACTS))
    assert report["corrected"] == f"{fixed}/8"
    changed = len(report["replies"]["controls_changed"])
    assert report["controls_same"] == f"{16 - changed}/16"
    assert set(report["seconds"]) == {"dataset", "train", "gate", "run"}
    assert all(v >= 0 for v in report["seconds"].values())
    # Served with reach = "taught" (the default): the version answers what it was taught about, its
    # paraphrases included; controls and knowledge questions get the base weights, so the same replies.
    assert report["settings"]["reach"] == "taught"
    assert report["reached"] == {"corrected": "8/8", "paraphrases": "8/8", "controls": "0/16",
                                 "knowledge": f"0/{len(facts.data.KNOWLEDGE)}"}
    assert report["controls_same"] == "16/16" and report["knowledge"].split("/")[0].split("->")[0] == \
        report["knowledge"].split("/")[0].split("->")[1]
    assert set(report["adapter_everywhere"]) == {"corrected", "paraphrases", "controls_same", "knowledge"}
    # The version recorded what it was taught: every corrected prompt (and the rewordings trained on).
    version = Registry(tmp_path / "w" / "models")
    taught = read_taught(version.adapter("v1"))
    assert {f.prompt for f in facts.FACTS} <= set(taught) and version.meta("v1")["taught_prompts"] == len(taught)
    assert not {c.casefold() for c in facts.CONTROLS} & {t.casefold() for t in taught}
    # The gate judges the served model too: the controls' replies and perplexity are the base's.
    assert report["gate"]["controls_same"][0] == 1.0 and report["gate"]["controls_perplexity"][0] == 0.0
    # The gate judged the run (with held-out controls and knowledge questions), whatever its verdict.
    assert {"controls_same", "knowledge", "learned"} <= set(report["gate"])
