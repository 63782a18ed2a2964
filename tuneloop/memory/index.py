"""The searchable memory: a cached matrix of prompt vectors plus an inverted index of content units.

Store-free, so the evaluation and the bench use the very code a reply uses.
A search encodes nothing itself: the caller encodes the message once and
passes its vector. Candidates are the nearest prompts by cosine (numpy over
one float32 matrix) and the prompts sharing the most content units (the only
way Chinese finds its candidates); each candidate is then judged by
``matcher.judge``, and the best accepted one wins, the newest on a tie.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from tuneloop.memory.matcher import Features, Thresholds, Verdict, features, judge


@dataclass(frozen=True)
class Match:
    item_id: int
    verdict: Verdict
    cosine: float


class Index:
    def __init__(self, dim: int, candidates: int = 8):
        self.dim = dim
        self.candidates = candidates
        self.ids: list[int] = []
        self.feats: list[Features] = []
        self._pending: list[np.ndarray] = []  # rows added since the matrix was last built
        self._matrix = np.zeros((0, dim), dtype=np.float32)
        self._postings: dict[str, list[int]] = {}

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, item_id: int, prompt: str, vector: np.ndarray) -> None:
        row = len(self.ids)
        self.ids.append(item_id)
        f = features(prompt)
        self.feats.append(f)
        self._pending.append(np.asarray(vector, dtype=np.float32).reshape(self.dim))
        for unit in f.content:
            self._postings.setdefault(unit, []).append(row)

    @property
    def matrix(self) -> np.ndarray:
        if self._pending:
            self._matrix = np.vstack([self._matrix, *self._pending])
            self._pending = []
        return self._matrix

    def _candidate_rows(self, query: Features, cosines: np.ndarray) -> set[int]:
        rows: set[int] = set()
        k = min(self.candidates, len(cosines))
        if k:
            rows.update(int(i) for i in np.argpartition(-cosines, k - 1)[:k])
        shared: Counter[int] = Counter()
        for unit in query.content:
            posting = self._postings.get(unit)
            # A unit in most prompts ("project") says little; rarer units decide.
            if posting and len(posting) <= max(64, len(self.ids) // 10):
                shared.update(posting)
        rows.update(r for r, _ in shared.most_common(self.candidates))
        return rows

    def search(self, text: str, vector: np.ndarray, thresholds: Thresholds,
               allowed: set[int] | None = None) -> tuple[Match | None, list[Match]]:
        """The best accepted match (or None) and every judged candidate, best score first."""
        if not self.ids:
            return None, []
        query = features(text)
        # einsum, not ``@``: a matrix-vector product through OpenBLAS wakes its
        # thread pool, which on 2 busy cores costs 20x the product itself.
        cosines = np.einsum("ij,j->i", self.matrix, np.asarray(vector, dtype=np.float32).reshape(self.dim))
        judged = []
        for row in self._candidate_rows(query, cosines):
            if allowed is not None and self.ids[row] not in allowed:
                continue
            cos = float(cosines[row])
            judged.append(Match(self.ids[row], judge(self.feats[row], query, cos, thresholds), cos))
        judged.sort(key=lambda m: (m.verdict.score, m.item_id), reverse=True)
        best = next((m for m in judged if m.verdict.accepted), None)
        return best, judged
