"""The gate's rules (trainer.evaluate.decide) and the run's data for it (trainer.data), without a model;
the adapter kinds of ``[trainer] peft`` on the tiny model."""

from __future__ import annotations

import pytest
import torch

from trainer import data
from trainer import evaluate as ev
from trainer.finetune import FinetuneConfig, Finetuner
from tuneloop.config import parse
from tuneloop.errors import ConfigError


def figures(*, same=None, ppl=None, know=(0, 0), para=None, rouge=None, margin=None) -> dict:
    return {"controls": {"same": same, "ppl": ppl}, "knowledge": {"right": know[0], "of": know[1]},
            "paraphrases": para, "corrected": {"exact": None, "bleu": None, "rougeL": rouge},
            "trained": {"good_logp": None, "bad_logp": None, "margin": margin}}


def test_a_gate_with_nothing_to_judge_refuses():
    passed, checks = ev.decide(figures(), figures(), ev.Thresholds())
    assert passed is False
    assert [(c["name"], c["passed"]) for c in checks] == [("nothing_to_judge", False)]


def test_every_check_must_pass_and_each_can_fail():
    th = ev.Thresholds(max_ppl_increase=0.1, min_control_same=0.75, max_knowledge_drop=0)
    live = figures(same=1.0, ppl=2.0, know=(12, 16), para=0.0, rouge=0.2, margin=-3.0)
    good = figures(same=0.8125, ppl=2.1, know=(12, 16), para=0.5, rouge=0.9, margin=-0.5)
    passed, checks = ev.decide(live, good, th)
    assert passed, checks
    assert {c["name"] for c in checks} == {"controls_same", "controls_perplexity", "knowledge", "paraphrases",
                                           "corrections_rougeL", "learned"}
    for name, bad in [("controls_same", {"same": 0.6875}), ("controls_perplexity", {"ppl": 2.3}),
                      ("knowledge", {"know": (11, 16)}), ("paraphrases", {"para": None}),
                      ("corrections_rougeL", {"rouge": 0.1}), ("learned", {"margin": -3.5})]:
        kw = {"same": 0.8125, "ppl": 2.1, "know": (12, 16), "para": 0.5, "rouge": 0.9, "margin": -0.5, **bad}
        passed, checks = ev.decide(live, figures(**kw), th)
        if name == "paraphrases":  # not measured: the check is absent, the others still decide
            assert passed and "paraphrases" not in {c["name"] for c in checks}
            continue
        assert not passed, name
        assert [c["name"] for c in checks if not c["passed"]] == [name]
    # Paraphrases answered less often than by the live version: refused.
    passed, checks = ev.decide({**live, "paraphrases": 0.5}, {**good, "paraphrases": 0.25}, th)
    assert not passed and [c["name"] for c in checks if not c["passed"]] == ["paraphrases"]
    # A knowledge drop within max_knowledge_drop passes.
    passed, _ = ev.decide(live, figures(**{**{"same": 0.8125, "ppl": 2.1, "para": 0.5, "rouge": 0.9,
                                               "margin": -0.5}, "know": (11, 16)}),
                          ev.Thresholds(max_knowledge_drop=1))
    assert passed


def test_knowledge_excludes_what_users_corrected_and_judges_by_containment():
    qs = data.knowledge_questions(exclude_prompts=["what is the capital of France? "])
    assert "What is the capital of France?" not in [q for q, _ in qs]
    assert len(qs) == len(data.KNOWLEDGE) - 1
    assert data.knows("The capital of Japan is Tokyo.", ("Tokyo",))
    assert data.knows("a spider has 8 legs", ("eight", "8"))
    assert not data.knows("I do not know.", ("Paris",))


def test_rewordings_are_cleaned_and_become_items_without_a_verdict():
    q = "What is our build server called?"
    assert data.clean_rewording(q, " What do we call the build server?\nOriginal: x") == \
        "What do we call the build server?"
    assert data.clean_rewording(q, " what is our build server called?") is None  # the same question
    assert data.clean_rewording(q, " Our build server is Docker.") is None  # an answer, not a question
    # Another question, not a rewording: nothing of "wifi password lab" kept.
    assert data.clean_rewording("What is the wifi password in the lab?", "How do you access the internet?") is None
    assert data.clean_rewording("Who is our office dog?", "Who is the dog?") == "Who is the dog?"
    assert data.reword_prompt(q, data.REWORD_SHOTS[0]).endswith(f"Original: {q}\nReworded:")
    item = {"exchange_id": 3, "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": q}],
            "reply": "Docker.", "verdict": "down", "corrections": ["Kestrel."]}
    out = data.reworded_items([item], {3: ["What do we call the build server?"]})
    assert out[0]["prompt"] == [{"role": "system", "content": "s"},
                                {"role": "user", "content": "What do we call the build server?"}]
    assert out[0]["verdict"] is None and item["prompt"][-1]["content"] == q  # the original is untouched
    assert data.to_rows(out, "sft") == [{"prompt": out[0]["prompt"],
                                         "completion": [{"role": "assistant", "content": "Kestrel."}]}]


def test_peft_kind_is_validated_at_load(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse({"trainer": {"peft": "prefix"}}, tmp_path)
    assert str(e.value) == "trainer.peft: must be one of lora, dora, adalora, ia3, got 'prefix'"
    assert parse({"trainer": {"peft": "dora", "scope": "global"}}, tmp_path).trainer.peft == "dora"
    # A kind that can only be merged, under the scope that serves each community's version
    # beside the shared base: refused at load, not after a run trained a version nobody can be served.
    for trainer, key in (({"peft": "ia3"}, "peft"), ({"lora": False}, "lora")):
        with pytest.raises(ConfigError) as e:
            parse({"trainer": trainer}, tmp_path)
        assert str(e.value).startswith(f"trainer.{key}: ") and 'scope = "global"' in str(e.value)
        assert "\n" not in str(e.value)


ROWS = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": a}]}
        for p, a in [("What is our build server called?", "Kestrel."), ("Who is the office dog?", "Pickle.")]]


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora", "ia3"])
def test_each_peft_kind_trains_and_merges_into_the_weights(tiny_model, tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuner = Finetuner(tiny_model, ROWS, FinetuneConfig(peft=kind, epochs=4, batch_size=2, learning_rate=1e-2,
                                                       early_stop=False, lora_r=4, lora_alpha=8))
    stats = tuner.train()
    assert stats["steps"] == 4 and stats["final_loss"] < stats["first_loss"]
    # What the facts check reports per method (`report["train"]["trainable_parameters"]`): peft's own count.
    trainable, _ = tuner.acc.unwrap_model(tuner.model).get_nb_trainable_parameters()
    assert stats["trainable_parameters"] == trainable > 0
    tuner.save(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).merge_and_unload()
    after = merged.state_dict()
    # Merged: the same plain modules as the base, some of their weights moved.
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in before)
