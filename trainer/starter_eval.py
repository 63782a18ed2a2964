"""How well a chat model answers the corpus: exact match and ROUGE-L of greedy replies.

Runs on any model folder with a chat template. The prompts are the corpus
pairs on the held-out side of ``corpus.split_pairs`` (with the split settings
of the starter's recipe when the folder has a ``tuneloop.json``), plus an
equal-sized seeded sample of training prompts for reference. Each prompt is
asked alone (no context, no system message unless ``system`` is given).

Scoring rules:
- a prompt the corpus answers in several ways counts as right when the reply
  matches **any** of its corpus replies, and its ROUGE-L is the best over them;
- exact match compares normalised text (case-folded, punctuation and spaces
  dropped, see ``corpus.normalize``);
- ROUGE-L F1 tokenises Latin text by words and CJK text by characters
  (rouge-score's default tokenizer drops non-Latin characters, which would
  score every Chinese reply 0).
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from rouge_score import rouge_scorer

from trainer import corpus
from tuneloop.engine.policy import generate_kwargs

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_TOKEN = re.compile(rf"[{_CJK}]|[^\W{_CJK}_]+")


class CharWordTokenizer:
    """rouge-score tokenizer: words for Latin scripts, characters for CJK."""

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN.findall(text.casefold())


_scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=CharWordTokenizer())


def rouge_l(prediction: str, refs: list[str]) -> float:
    """Best ROUGE-L F1 of ``prediction`` against any of ``refs``."""
    return max(_scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs)


def exact_match(prediction: str, refs: list[str]) -> bool:
    """Whether ``prediction`` equals any of ``refs`` once normalised."""
    pred = corpus.normalize(prediction)
    return any(pred == corpus.normalize(ref) for ref in refs)


@dataclass(frozen=True)
class Item:
    language: str
    prompt: str
    refs: list[str]


def eval_items(
    languages: tuple[str, ...] = corpus.DEFAULT_LANGUAGES,
    holdout_fraction: float = 0.1,
    split_seed: int = 0,
    limit: int | None = None,
    seed: int = 0,
) -> dict[str, list[Item]]:
    """``{"held_out": [...], "train_sample": [...]}``, one item per distinct prompt."""
    train, held = corpus.split_pairs(corpus.load_pairs(languages), holdout_fraction, split_seed)
    held_items = [Item(lang, p, refs) for (lang, _), (p, refs) in corpus.references(held).items()]
    train_items = [Item(lang, p, refs) for (lang, _), (p, refs) in corpus.references(train).items()]
    rng = random.Random(seed)
    if limit is not None and len(held_items) > limit:
        held_items = rng.sample(held_items, limit)
    train_items = rng.sample(train_items, min(len(train_items), max(len(held_items), 1)))
    return {"held_out": held_items, "train_sample": train_items}


@torch.no_grad()
def generate_replies(
    model, tokenizer, prompts: list[str], system: str | None = None, max_new_tokens: int = 64, batch: int = 32
) -> list[str]:
    """Greedy replies, batched by prompt length so no prompt is padded."""
    chats = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system}] if system else []
        chats.append(messages + [{"role": "user", "content": prompt}])
    ids = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=False) for c in chats]
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, x in enumerate(ids):
        by_len[len(x)].append(i)
    replies = [""] * len(prompts)
    model.eval()
    for length, members in sorted(by_len.items()):
        for b in range(0, len(members), batch):
            rows = members[b : b + batch]
            input_ids = torch.tensor([ids[i] for i in rows], dtype=torch.long)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                # the bot's replies: the engine's decoding policy, not whatever generation_config adds
                **generate_kwargs(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id),
            )
            for row, i in enumerate(rows):
                replies[i] = tokenizer.decode(out[row, length:], skip_special_tokens=True).strip()
    return replies


def score(items: list[Item], replies: list[str]) -> dict[str, dict[str, float]]:
    """Per language and ``overall``: ``n``, ``exact_match`` (share) and ``rouge_l`` (mean F1)."""
    groups: dict[str, list[tuple[bool, float]]] = defaultdict(list)
    for item, reply in zip(items, replies, strict=True):
        result = (exact_match(reply, item.refs), rouge_l(reply, item.refs))
        groups[item.language].append(result)
        groups["overall"].append(result)
    return {
        name: {
            "n": len(rs),
            "exact_match": round(sum(em for em, _ in rs) / len(rs), 4),
            "rouge_l": round(sum(r for _, r in rs) / len(rs), 4),
        }
        for name, rs in sorted(groups.items(), key=lambda kv: (kv[0] == "overall", kv[0]))
    }


def evaluate(
    model,
    tokenizer,
    items: dict[str, list[Item]],
    system: str | None = None,
    examples: int = 0,
    max_new_tokens: int = 64,
) -> dict:
    """Scores for each split of ``items``; ``examples`` sample replies per split are kept."""
    report: dict = {}
    for split, split_items in items.items():
        if not split_items:
            continue
        prompts = [it.prompt for it in split_items]
        replies = generate_replies(model, tokenizer, prompts, system=system, max_new_tokens=max_new_tokens)
        report[split] = score(split_items, replies)
        if examples:
            report.setdefault("examples", {})[split] = [
                {"prompt": it.prompt, "reply": r, "corpus": it.refs[:3]}
                for it, r in list(zip(split_items, replies, strict=True))[:examples]
            ]
    return report


def evaluate_folder(
    path: Path, limit: int | None = None, system: str | None = None, examples: int = 0
) -> dict:
    """Load the model at ``path`` and ``evaluate`` it on the split its recipe used."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    split = {}
    meta_path = path / "tuneloop.json"
    if meta_path.is_file():
        recipe = json.loads(meta_path.read_text(encoding="utf-8")).get("recipe", {})
        split = {k: recipe[k] for k in ("holdout_fraction", "split_seed") if k in recipe}
        if "languages" in recipe:
            split["languages"] = tuple(recipe["languages"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    items = eval_items(limit=limit, **split)
    report = evaluate(model, tokenizer, items, system=system, examples=examples)
    report["model"] = str(path)
    report["rules"] = (
        "greedy replies; exact match on case/punctuation/space-normalised text; a prompt with several "
        "corpus replies matches any of them (ROUGE-L: best of them); ROUGE-L F1 on words, CJK by character"
    )
    return report
