"""The gate: is a candidate version better than the live one, without forgetting?

Boundary: two models (live and candidate), the evaluation data of a run, and
the thresholds of ``[trainer]`` in; figures, checks and a verdict out. Greedy
replies come from the engine the bot serves with (``tuneloop.engine.local``), so
"the same reply" here means the same reply users get.

The checks, each against the live version; no run trains on what (a)-(c) ask:

(a) control prompts, held out of the replay set: at least
    ``min_control_same`` of their greedy replies must be exactly the live
    model's, and the perplexity of the live model's replies may rise by at
    most ``max_ppl_increase`` (relative);
(b) general-knowledge questions with known answers (``data.KNOWLEDGE``): the
    count answered right may fall by at most ``max_knowledge_drop``;
(c) rewordings of the corrected prompts (the live model's own, kept out of
    training): answered with the correction no less often than by the live
    version; this is what a user who taught a fact means by "learned";
(d) corrections: ROUGE-L (rouge-score) of greedy replies against the
    corrections must rise by at least ``min_rouge_gain``; BLEU (sacrebleu)
    and exact match are reported beside it. ``answered`` judges whether a
    reply states a correction: the same content words in the same order, so
    "The build server is called Kestrel." states "Our build server is called
    Kestrel." while "Paris is not the capital", a missing or an added name or
    number do not (a key-term judge would call "Paris is not the capital"
    right);
(e) the feedback trained on must be learned: its preference margin rises.

A gate that had nothing to judge (no check applied) refuses: passing means
some evidence said yes. A candidate that fails any check is kept as rejected
with this report.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.pretrain import collate, sft_example

log = logging.getLogger(__name__)

Prompt = list[dict[str, str]]


@dataclass
class Thresholds:
    max_ppl_increase: float = 0.10
    min_control_same: float = 0.75
    max_knowledge_drop: int = 0
    min_rouge_gain: float = 0.0

    @classmethod
    def from_config(cls, t) -> Thresholds:
        return cls(t.max_ppl_increase, t.min_control_same, t.max_knowledge_drop, t.min_rouge_gain)


@dataclass
class EvalData:
    """What a run evaluates on. Texts are replies; prompts are chat contexts."""

    trained_good: list[tuple[Prompt, str]]
    trained_bad: list[tuple[Prompt, str]]
    #: (prompt, correction)
    corrected: list[tuple[Prompt, str]]
    #: (prompt, the live model's greedy reply); never trained on
    controls: list[tuple[Prompt, str]]
    #: (reworded corrected prompt, correction); never trained on
    paraphrases: list[tuple[Prompt, str]] = field(default_factory=list)
    #: (question, words a right answer contains); never trained on
    knowledge: list[tuple[Prompt, tuple[str, ...]]] = field(default_factory=list)


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


def answered(reply: str, correction: str) -> bool:
    """Whether ``reply`` states ``correction``: the one test of "learned" (the gate's and the facts check's).

    The same content words in the same order (``data.content_sequence``):
    "The build server is called Kestrel." states "Our build server is called
    Kestrel."; a reply that lacks a content word, adds one (a contradicting
    name or number, "not", "or Falcon") or reorders them ("The billing service
    maintains Priya Raman.") does not. A correction with no content words at
    all must be matched exactly (whitespace aside).
    """
    from trainer.data import content_sequence

    want = content_sequence(correction)
    if not want:
        return _same(reply.strip(), correction.strip())
    return content_sequence(reply) == want


def memory_answered(memory: list[dict[str, Any]], replies: dict[str, list[str]]) -> dict[int, bool]:
    """Per memory item (``data.memory_items``, placed by the run): do the weights alone answer it?

    Yes when the greedy reply to the item's own context is its correction and
    so is the reply to its rewording where the gate has one: an item leaves
    the fast path only if the weights carry it to other wordings too, as the
    memory's matcher does. An item the gate did not ask is not answered.
    """
    out = {}
    for m in memory:
        i, j = m.get("corrected"), m.get("paraphrase")
        ok = i is not None and answered(replies["corrected"][i], m["reply"])
        if ok and j is not None:
            ok = answered(replies["paraphrases"][j], m["reply"])
        out[int(m["item_id"])] = ok
    return out


def _share(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def measure(model, tokenizer, data: EvalData, replies: dict[str, list[str]], max_len: int = 256,
            plain=None, routed: list[bool] | None = None) -> dict[str, Any]:
    """Every figure of one model; its greedy replies (``corrected``, ``controls``, ``paraphrases``,
    ``knowledge``, from the serving engine) are given.

    ``routed`` (per control: does the version reach it, ``tuneloop.memory.reach``)
    with ``plain``, the base model: the controls it does not reach are scored
    by the base model, which is what answers them when served.
    """
    from trainer.data import knows

    tg = _per_token(model, tokenizer, data.trained_good, max_len)
    tb = _per_token(model, tokenizer, data.trained_bad, max_len)
    if routed is None or plain is None:
        total, count = logps(model, tokenizer, data.controls, max_len)
    else:
        t1, c1 = logps(model, tokenizer, [c for c, r in zip(data.controls, routed) if r], max_len)
        t2, c2 = logps(plain, tokenizer, [c for c, r in zip(data.controls, routed) if not r], max_len)
        total, count = t1 + t2, c1 + c2
    corrected = replies["corrected"]
    return {
        "trained": {"good_logp": tg, "bad_logp": tb, "margin": margin(tg, tb)},
        "corrected": text_metrics(corrected, [c[1] for c in data.corrected]),
        "paraphrases": _share([answered(r, p[1]) for r, p in zip(replies["paraphrases"], data.paraphrases)]),
        "knowledge": {"right": sum(knows(r, k[1]) for r, k in zip(replies["knowledge"], data.knowledge)),
                      "of": len(data.knowledge)},
        "controls": {"ppl": math.exp(-total / count) if count else None,
                     "same": _share([_same(r, c[1]) for r, c in zip(replies["controls"], data.controls)])},
    }


def decide(live: dict[str, Any], new: dict[str, Any], th: Thresholds) -> tuple[bool, list[dict[str, Any]]]:
    """The checks, each ``{"name", "passed", "value", "limit", "why"}``, and whether the candidate passes.

    It passes when every check passed and at least one applied: a gate with
    nothing to judge (no controls, no knowledge questions, no corrections, no
    trained feedback) refuses, and says so in a ``nothing_to_judge`` check.
    """
    checks: list[dict[str, Any]] = []

    def check(name: str, passed: bool, value, limit, why: str) -> None:
        checks.append({"name": name, "passed": bool(passed), "value": value, "limit": limit, "why": why,
                       "gating": True})

    same = new["controls"]["same"]
    if same is not None:
        check("controls_same", same >= th.min_control_same, round(same, 4), th.min_control_same,
              "share of held-out control prompts whose greedy reply is unchanged")
    lp, np_ = live["controls"]["ppl"], new["controls"]["ppl"]
    if lp is not None and np_ is not None:
        rise = np_ / lp - 1.0
        check("controls_perplexity", rise <= th.max_ppl_increase, round(rise, 4), th.max_ppl_increase,
              "relative perplexity rise on the held-out controls' live replies")
    if new["knowledge"]["of"]:
        lk, nk = live["knowledge"]["right"], new["knowledge"]["right"]
        check("knowledge", nk >= lk - th.max_knowledge_drop, nk, lk - th.max_knowledge_drop,
              f"general-knowledge questions answered right (live: {lk} of {new['knowledge']['of']})")
    lpar, npar = live["paraphrases"], new["paraphrases"]
    if lpar is not None and npar is not None:
        check("paraphrases", npar >= lpar, round(npar, 4), round(lpar, 4),
              "share of reworded corrected prompts (never trained on) answered with the correction")
    lr, nr = live["corrected"]["rougeL"], new["corrected"]["rougeL"]
    if lr is not None and nr is not None:
        check("corrections_rougeL", nr - lr >= th.min_rouge_gain and nr > lr - 1e-9, round(nr - lr, 4),
              th.min_rouge_gain, "ROUGE-L gain of greedy replies against corrections")
    tl, tn = live["trained"]["margin"], new["trained"]["margin"]
    if tl is not None and tn is not None:
        check("learned", tn > tl, round(tn - tl, 4), 0.0,
              "rise of the trained feedback's preference margin (nats per token)")
    if not checks:
        check("nothing_to_judge", False, 0, 1, "no check applied: no evidence that the version is better")
    return all(c["passed"] for c in checks), checks


def summary(live: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The flat figures shown by ``tuneloop models`` and returned by ``retrain --json``."""
    def r(x):
        return None if x is None else round(x, 4)

    lp, np_ = live["controls"]["ppl"], new["controls"]["ppl"]
    return {
        "control_same": r(new["controls"]["same"]),
        "corrected_exact": r(new["corrected"]["exact"]), "rougeL": r(new["corrected"]["rougeL"]),
        "paraphrases": r(new["paraphrases"]), "paraphrases_live": r(live["paraphrases"]),
        "knowledge": new["knowledge"]["right"], "knowledge_live": live["knowledge"]["right"],
        "knowledge_of": new["knowledge"]["of"],
        "ppl_increase": None if not lp or np_ is None else r(np_ / lp - 1),
        "bleu": r(new["corrected"]["bleu"]),
        "ppl_live": r(lp), "ppl_new": r(np_),
        "corrected_exact_live": r(live["corrected"]["exact"]),
        "bleu_live": r(live["corrected"]["bleu"]), "rougeL_live": r(live["corrected"]["rougeL"]),
        "trained_margin_live": r(live["trained"]["margin"]), "trained_margin": r(new["trained"]["margin"]),
    }
