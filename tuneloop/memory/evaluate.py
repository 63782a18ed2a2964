"""Matcher figures on the lifelong set: thresholds picked on tuning, measured on held-out.

Per query kind: taught prompts matched to their own item (reliability),
paraphrases matched to their own item (generalization), near misses and
unrelated prompts that matched any item (false matches; locality is one
minus that). Precision and recall count a match to the wrong item as a
false positive and a missed one. Beside them, for ``[trainer] reach``: the
share of each kind that a version taught the items would answer.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict

from tuneloop.memory.encoder import Encoder
from tuneloop.memory.evalset import build
from tuneloop.memory.index import Index
from tuneloop.memory.matcher import Thresholds

GRID = {
    "min_cosine": [0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85],
    "min_lexical": [0.4, 0.5, 0.6, 0.7, 0.8],
    "substitution_cosine": [0.75, 0.8, 0.85, 0.9, 0.95, 1.01],
}
MAX_NEAR_MISS = 0.05


class _Prepared:
    def __init__(self, encoder: Encoder, split: str):
        self.items, self.queries = build(split)
        vectors = encoder.encode([i.prompt for i in self.items])
        self.index = Index(encoder.dim)
        for n, (item, vec) in enumerate(zip(self.items, vectors)):
            self.index.add(n, item.prompt, vec)
        self.query_vectors = encoder.encode([q.text for q in self.queries])

    def score(self, t: Thresholds, examples: bool = False) -> dict:
        by_kind: dict[str, list[int]] = {}
        tp = fp = fn = 0
        errors = []
        for q, vec in zip(self.queries, self.query_vectors):
            best, _ = self.index.search(q.text, vec, t)
            got = None if best is None else self.items[best.item_id].key
            ok = got == q.expect
            by_kind.setdefault(q.kind, []).append(ok)
            if got is not None and got == q.expect:
                tp += 1
            else:
                fp += got is not None
                fn += q.expect is not None
            if not ok and examples:
                errors.append({"kind": q.kind, "query": q.text, "expected": q.expect, "matched": got,
                               "why": None if best is None else best.verdict.reason})
        rate = {k: sum(v) / len(v) for k, v in by_kind.items()}
        out = {
            "items": len(self.items),
            "queries": {k: len(v) for k, v in by_kind.items()},
            "reliability": round(rate.get("taught", 0), 4),
            "generalization": round(rate.get("paraphrase", 0), 4),
            "near_miss_matched": round(1 - rate.get("near_miss", 1), 4),
            "unrelated_matched": round(1 - rate.get("unrelated", 1), 4),
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        }
        if examples:
            out["errors"] = errors
        return out


def tune(prepared: _Prepared) -> Thresholds:
    """The thresholds with the best recall whose near misses stay under 5% (then the strictest)."""
    best_key, best = None, None
    for values in itertools.product(*GRID.values()):
        t = Thresholds(**dict(zip(GRID, values)))
        s = prepared.score(t)
        if s["near_miss_matched"] > MAX_NEAR_MISS or s["unrelated_matched"] > MAX_NEAR_MISS:
            continue
        key = (s["recall"] or 0, s["precision"] or 0, sum(values))
        if best_key is None or key > best_key:
            best_key, best = key, t
    if best is None:
        raise RuntimeError("no thresholds keep near misses under 5% on the tuning set")
    return best


def reach_figures(encoder: Encoder, split: str, cosine: float, lexical_min: float) -> dict:
    """Per query kind: the share that reaches a version taught the split's items (``memory.reach``),
    and the lowest and highest score over the threshold (>= 1 reaches)."""
    from tuneloop.memory.reach import Reach

    items, queries = build(split)
    reach = Reach([i.prompt for i in items], encoder, cosine, lexical_min)
    scores: dict[str, list[float]] = {}
    for q in queries:
        scores.setdefault(q.kind, []).append(reach.score(q.text))
    return {kind: {"reached": round(sum(s >= 1.0 for s in v) / len(v), 4), "min": round(min(v), 3),
                   "max": round(max(v), 3)} for kind, v in scores.items()}


def run(encoder: Encoder, thresholds: Thresholds, retune: bool = False, examples: bool = False,
        reach: tuple[float, float] | None = None) -> dict:
    tuning = _Prepared(encoder, "tune")
    picked = tune(tuning) if retune else thresholds
    heldout = _Prepared(encoder, "heldout")
    out = {"encoder": encoder.name, "thresholds": asdict(picked), "retuned": retune,
           "tuning": tuning.score(picked), "heldout": heldout.score(picked, examples=examples)}
    if reach is not None:
        # [trainer] reach: which queries a version taught these items answers (the rest: the base).
        out["reach"] = {"reach_cosine": reach[0], "reach_lexical": reach[1],
                        **{split: reach_figures(encoder, split, *reach) for split in ("tune", "heldout")}}
    return out
