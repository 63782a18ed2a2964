"""The gate: is a candidate version better than the live one, without forgetting?

Boundary: two models (live and candidate), the evaluation data of a run, and
the thresholds of ``[trainer]`` in; figures, checks and a verdict out. Greedy
replies come from the engine the bot serves with (``tuneloop.engine.local``), so
"the same reply" here means the same reply users get.

The checks, each against the live version:

(a) held-out feedback, never trained on: the preference margin (mean
    per-token log-likelihood of 👍 and corrected replies minus that of 👎
    and corrected-away replies) may not fall by more than
    ``max_heldout_drop``; greedy replies to held-out corrected prompts may
    not match their corrections less often.
(b) the replay set's control prompts, never trained on: perplexity of the
    live model's own replies may rise by at most ``max_ppl_increase``
    (relative), and at least ``min_control_same`` of the greedy replies must
    be exactly the live model's.
(c) corrections: ROUGE-L (rouge-score) of greedy replies against the
    corrections must rise by at least ``min_rouge_gain``; BLEU (sacrebleu)
    is reported beside it. Exact match, not key terms, is what counts a
    reply as corrected: a key-term judge calls "Paris is not the capital"
    right.
(d) the feedback trained on must be learned: its preference margin rises.

A candidate that fails any check is kept as rejected with this report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.pretrain import collate, sft_example

log = logging.getLogger(__name__)

Prompt = list[dict[str, str]]


@dataclass
class Thresholds:
    max_ppl_increase: float = 0.10
    min_control_same: float = 0.8
    max_heldout_drop: float = 0.5
    min_rouge_gain: float = 0.0
    min_heldout_items: int = 4

    @classmethod
    def from_config(cls, t) -> Thresholds:
        return cls(t.max_ppl_increase, t.min_control_same, t.max_heldout_drop, t.min_rouge_gain,
                   t.min_heldout_items)


@dataclass
class EvalData:
    """What a run evaluates on. Texts are replies; prompts are chat contexts."""

    heldout_good: list[tuple[Prompt, str]]
    heldout_bad: list[tuple[Prompt, str]]
    trained_good: list[tuple[Prompt, str]]
    trained_bad: list[tuple[Prompt, str]]
    #: (prompt, correction, held out?)
    corrected: list[tuple[Prompt, str, bool]]
    #: (prompt, the live model's greedy reply)
    controls: list[tuple[Prompt, str]]


def likelihood_sets(items: list[dict[str, Any]]) -> tuple[list, list]:
    """(desirable, undesirable) (prompt, reply) pairs of feedback items (``data.feedback_items``)."""
    good, bad = [], []
    for it in items:
        if it["verdict"] == "up":
            good.append((it["prompt"], it["reply"]))
        elif it["verdict"] == "down" or it["corrections"]:
            bad.append((it["prompt"], it["reply"]))
        if it["corrections"]:
            good.append((it["prompt"], it["corrections"][-1]))
    return good, bad


def load_model(base_path: str | Path, adapter: str | Path | None):
    """The base model with ``adapter`` merged in (a full model folder loads as it is)."""
    from transformers import AutoModelForCausalLM

    if adapter is not None and not (Path(adapter) / "adapter_config.json").exists():
        return AutoModelForCausalLM.from_pretrained(str(adapter), dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model.eval()


@torch.no_grad()
def logps(model, tokenizer, pairs: list[tuple[Prompt, str]], max_len: int = 256,
          batch: int = 16) -> tuple[float, int]:
    """Total log-likelihood of the replies (prompt-masked, end-of-turn included) and their token count."""
    examples = [e for e in (sft_example(tokenizer, p, r, max_len) for p, r in pairs) if e]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        b = collate(examples[i:i + batch], pad)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["labels"][:, 1:]
        mask = labels != -100
        lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total += float((lp * mask).sum())
        count += int(mask.sum())
    return total, count


def _per_token(model, tokenizer, pairs, max_len) -> float | None:
    total, count = logps(model, tokenizer, pairs, max_len)
    return total / count if count else None


def margin(good: float | None, bad: float | None) -> float | None:
    """Preference margin: log-likelihood of desirable replies minus undesirable ones."""
    if good is None and bad is None:
        return None
    return (good or 0.0) - (bad or 0.0)


def text_metrics(hyps: list[str], refs: list[str]) -> dict[str, float | None]:
    """Exact match, corpus BLEU (sacrebleu) and mean ROUGE-L F1 (rouge-score) of ``hyps`` against ``refs``."""
    if not refs:
        return {"exact": None, "bleu": None, "rougeL": None}
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return {
        "exact": sum(_same(h, r) for h, r in zip(hyps, refs)) / len(refs),
        "bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 3),
        "rougeL": round(sum(rouge) / len(rouge), 4),
    }


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def measure(model, tokenizer, data: EvalData, corrected_replies: list[str],
            control_replies: list[str], max_len: int = 256) -> dict[str, Any]:
    """Every figure of one model; greedy replies are given (from the serving engine)."""
    hg = _per_token(model, tokenizer, data.heldout_good, max_len)
    hb = _per_token(model, tokenizer, data.heldout_bad, max_len)
    tg = _per_token(model, tokenizer, data.trained_good, max_len)
    tb = _per_token(model, tokenizer, data.trained_bad, max_len)
    total, count = logps(model, tokenizer, data.controls, max_len)
    held = [i for i, c in enumerate(data.corrected) if c[2]]
    trained = [i for i, c in enumerate(data.corrected) if not c[2]]

    def texts(idx):
        return text_metrics([corrected_replies[i] for i in idx], [data.corrected[i][1] for i in idx])

    return {
        "heldout": {"good_logp": hg, "bad_logp": hb, "margin": margin(hg, hb),
                    "corrected": texts(held)},
        "trained": {"good_logp": tg, "bad_logp": tb, "margin": margin(tg, tb),
                    "corrected": texts(trained)},
        "corrected": texts(range(len(data.corrected))),
        "replay": {"ppl": math.exp(-total / count) if count else None,
                   "control_same": (sum(_same(r, c[1]) for r, c in zip(control_replies, data.controls))
                                    / len(data.controls)) if data.controls else None},
    }


def decide(live: dict[str, Any], new: dict[str, Any], th: Thresholds,
           heldout_items: int | None = None) -> tuple[bool, list[dict[str, Any]]]:
    """The checks, each ``{"name", "passed", "value", "limit", "why"}``, and whether all passed.

    With fewer than ``min_heldout_items`` held-out items the held-out checks
    are reported (``"gating": False``) but do not decide: one or two items
    say nothing about generalisation.
    """
    checks: list[dict[str, Any]] = []
    few = heldout_items is not None and heldout_items < th.min_heldout_items

    def check(name: str, passed: bool, value, limit, why: str) -> None:
        gating = not (few and name.startswith("heldout"))
        checks.append({"name": name, "passed": bool(passed), "value": value, "limit": limit, "why": why,
                       "gating": gating})

    lp, np_ = live["replay"]["ppl"], new["replay"]["ppl"]
    if lp is not None and np_ is not None:
        rise = np_ / lp - 1.0
        check("replay_perplexity", rise <= th.max_ppl_increase, round(rise, 4), th.max_ppl_increase,
              "relative perplexity rise on the replay set's control replies")
    same = new["replay"]["control_same"]
    if same is not None:
        check("controls_same", same >= th.min_control_same, round(same, 4), th.min_control_same,
              "share of control prompts whose greedy reply is unchanged")
    lm, nm = live["heldout"]["margin"], new["heldout"]["margin"]
    if lm is not None and nm is not None:
        check("heldout_margin", nm >= lm - th.max_heldout_drop, round(nm - lm, 4), -th.max_heldout_drop,
              "change of the held-out preference margin (nats per token)")
    le, ne = live["heldout"]["corrected"]["exact"], new["heldout"]["corrected"]["exact"]
    if le is not None and ne is not None:
        check("heldout_corrected", ne >= le, round(ne, 4), round(le, 4),
              "share of held-out corrected prompts answered with their correction")
    lr, nr = live["corrected"]["rougeL"], new["corrected"]["rougeL"]
    if lr is not None and nr is not None:
        check("corrections_rougeL", nr - lr >= th.min_rouge_gain and nr > lr - 1e-9, round(nr - lr, 4),
              th.min_rouge_gain, "ROUGE-L gain of greedy replies against corrections")
    tl, tn = live["trained"]["margin"], new["trained"]["margin"]
    if tl is not None and tn is not None:
        check("learned", tn > tl, round(tn - tl, 4), 0.0,
              "rise of the trained feedback's preference margin (nats per token)")
    return all(c["passed"] for c in checks if c["gating"]), checks


def summary(live: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The flat figures shown by ``tuneloop models`` and returned by ``retrain --json``."""
    def r(x):
        return None if x is None else round(x, 4)

    return {
        "control_same": r(new["replay"]["control_same"]),
        "corrected_exact": r(new["corrected"]["exact"]), "rougeL": r(new["corrected"]["rougeL"]),
        "ppl_increase": None if not live["replay"]["ppl"] or new["replay"]["ppl"] is None
        else r(new["replay"]["ppl"] / live["replay"]["ppl"] - 1),
        "bleu": r(new["corrected"]["bleu"]),
        "ppl_live": r(live["replay"]["ppl"]), "ppl_new": r(new["replay"]["ppl"]),
        "corrected_exact_live": r(live["corrected"]["exact"]),
        "bleu_live": r(live["corrected"]["bleu"]), "rougeL_live": r(live["corrected"]["rougeL"]),
        "heldout_margin_live": r(live["heldout"]["margin"]), "heldout_margin": r(new["heldout"]["margin"]),
        "trained_margin_live": r(live["trained"]["margin"]), "trained_margin": r(new["trained"]["margin"]),
    }
