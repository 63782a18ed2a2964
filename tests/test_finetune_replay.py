"""The replay rows' loss (``replay_loss``, ``replay_weight``) and the general replay prompts, on the tiny model."""

from __future__ import annotations

import os

import pytest
import torch

from tests.test_learning_loop import _perturb_adapter
from trainer import data
from trainer.finetune import FinetuneConfig, Finetuner
from tuneloop.errors import TrainingError

pytestmark = pytest.mark.slow

FEEDBACK = [data.sft_row([{"role": "user", "content": "What is our build server called?"}],
                         "Our build server is called Kestrel.")]
REPLAY = [{**data.sft_row([{"role": "user", "content": p}], r), "replay": True}
          for p, r in (("hi", "Hello."), ("How are you?", "I am fine, thank you."))]


def test_replay_weight_scales_only_the_replay_term(tiny_model):
    losses = {}
    for loss_kind in ("nll", "distill"):
        for weight in (0.0, 1.0, 3.0):
            tuner = Finetuner(tiny_model, FEEDBACK + REPLAY,
                              FinetuneConfig(lora_r=4, replay_loss=loss_kind, replay_weight=weight))
            _perturb_adapter(tuner.model)
            with torch.no_grad():
                losses[loss_kind, weight] = float(tuner._loss(tuner.examples))
    feedback_only = Finetuner(tiny_model, FEEDBACK, FinetuneConfig(lora_r=4))
    _perturb_adapter(feedback_only.model)
    with torch.no_grad():
        alone = float(feedback_only._loss(feedback_only.examples))
    for kind in ("nll", "distill"):
        # Weight 0: the feedback's loss alone; the replay term grows linearly with the weight.
        assert losses[kind, 0.0] == pytest.approx(alone, rel=1e-5)
        replay_term = losses[kind, 1.0] - alone
        assert replay_term > 0.01
        assert losses[kind, 3.0] - alone == pytest.approx(3 * replay_term, rel=1e-4)


def test_distilled_replay_starts_at_the_teacher(tiny_model):
    """The teacher is the starting model, scored once: moving the weights away from it raises the loss."""
    tuner = Finetuner(tiny_model, REPLAY, FinetuneConfig(lora_r=4, replay_loss="distill"))
    assert all("teacher" in e for e in tuner.examples)
    with torch.no_grad():
        at_start = float(tuner._loss(tuner.examples))
    _perturb_adapter(tuner.model)
    with torch.no_grad():
        moved = float(tuner._loss(tuner.examples))
    assert moved > at_start


def test_unknown_replay_loss_is_refused(tiny_model):
    with pytest.raises(TrainingError, match="trainer.replay_loss must be one of nll, distill"):
        Finetuner(tiny_model, FEEDBACK, FinetuneConfig(replay_loss="kl"))


def test_run_passes_the_replay_keys_to_the_finetuner(tmp_path):
    from trainer.run import finetune_config
    from tuneloop.config import parse

    config = parse({"trainer": {"replay_loss": "distill", "replay_weight": 2.5}}, tmp_path)
    cfg = finetune_config(config)
    assert (cfg.replay_loss, cfg.replay_weight) == ("distill", 2.5)


def test_general_replay_prompts_alternate_with_the_corpus(tmp_path):
    from tuneloop.store import Store

    with Store(tmp_path / "s.db") as store:
        plain = data.replay_prompts(store, exclude=[], limit=20, seed=0, system_prompt="sys")
        mixed = data.replay_prompts(store, exclude=[], limit=20, seed=0, system_prompt="sys", general=True,
                                    exclude_prompts=[data.GENERAL_PROMPTS[0]])
    general = {p.casefold() for p in data.GENERAL_PROMPTS}
    assert not [p for p in plain if p[-1]["content"].casefold() in general]
    texts = [p[-1]["content"] for p in mixed]
    assert len(texts) == 20 == len({t.casefold() for t in texts})
    assert all(p[0] == {"role": "system", "content": "sys"} for p in mixed)
    # Half of them general, half from the corpus; a prompt with feedback is never replayed.
    assert sum(t.casefold() in general for t in texts) == 10
    assert data.GENERAL_PROMPTS[0] not in texts


def test_general_prompts_never_include_what_the_checks_judge():
    from trainer import facts

    general = {p.strip().casefold() for p in data.GENERAL_PROMPTS}
    assert len(general) == len(data.GENERAL_PROMPTS)
    assert not general & {c.casefold() for c in facts.CONTROLS}
    assert not general & {q.casefold() for q, _ in data.KNOWLEDGE}
    judged = {f.prompt.casefold() for f in facts.FACTS} | {f.paraphrase.casefold() for f in facts.FACTS}
    assert not general & judged


def test_omp_num_threads_caps_the_training_threads(tiny_model, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        Finetuner(tiny_model, FEEDBACK, FinetuneConfig(lora_r=4))
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
        Finetuner(tiny_model, FEEDBACK, FinetuneConfig(lora_r=4))
        assert torch.get_num_threads() == max(1, os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


def test_distilled_rows_are_fitted_by_the_teachers_argmax(tiny_model):
    """A distilled replay row counts as fitted when the model's argmax is the teacher's at each of its positions,
    whatever tokens its text holds (the engine's greedy reply in another dtype may differ where two are close):
    at the start the model is the teacher, so it is fitted; the same text as an NLL target is not."""
    distilled = Finetuner(tiny_model, REPLAY, FinetuneConfig(lora_r=4, replay_loss="distill"))
    assert distilled.fitted()
    as_targets = Finetuner(tiny_model, REPLAY, FinetuneConfig(lora_r=4, replay_loss="nll"))
    assert not as_targets.fitted()  # the tiny model does not reply "Hello." and "I am fine, thank you."
