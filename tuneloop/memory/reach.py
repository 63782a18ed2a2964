"""Which messages a learned version answers: those near what its line was taught.

Why. An adapter trained on a few corrections changes replies to everything:
on SmolLM2 the best of nine settings kept 5 of 16 unrelated prompts' greedy
replies, and an adapter scaled down until it kept 14 had learned nothing
(docs/benchmarks.md, "Learning loop on SmolLM2"). Model-editing work keeps
locality by routing instead of by training harder (GRACE, MELO, WISE: an
edit is applied only to inputs inside its scope). tuneloop already serves
one adapter per request (``Engine.submit(adapter=...)``), so routing costs
no second model: a version records the prompts it was taught (``taught.json``
in its adapter folder: its feedback's prompts and their trained rewordings,
its parent's included), and a message gets the adapter when it lies near one
of them, the base weights otherwise. The base reply to a message the line
was never taught about is the reply it had before any training.

Near means the memory matcher's score without its guards: the encoder's
cosine for Latin-script text, the overlap of content characters for Chinese
(``matcher.lexical``). Paraphrases of a taught prompt should reach it, near
misses ("... project Falcon" for a taught "... project Heron") may: the
adapter then answers as it would have without routing. Thresholds picked on
the memory evaluation set (``python -m tuneloop.memory eval``): every
paraphrase of both splits scores >= 0.79 (Latin) / 0.86 (Chinese), unrelated
prompts <= 0.65 / 0.31, so 0.7 / 0.7 route all paraphrases and none of them.

Public surface: ``TAUGHT``, ``read_taught``, ``write_taught``, ``Reach``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from tuneloop.memory.matcher import Features, features, lexical

log = logging.getLogger(__name__)

#: The file in an adapter folder that lists what its line was taught.
TAUGHT = "taught.json"


def read_taught(folder: str | Path | None) -> list[str] | None:
    """The prompts recorded in ``folder``'s ``taught.json``; None when it has none (reaches everything)."""
    if folder is None:
        return None
    path = Path(folder) / TAUGHT
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.error("cannot read %s: %s; the version answers every message", path, e)
        return None
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        log.error("%s holds no list of prompts; the version answers every message", path)
        return None
    return prompts


def write_taught(folder: str | Path, prompts: list[str], parent: str | Path | None = None) -> list[str]:
    """Record ``prompts`` (and ``parent``'s, first) in ``folder``; the prompts written, each once."""
    seen: dict[str, None] = {}
    for p in [*(read_taught(parent) or []), *prompts]:
        text = " ".join(p.split())
        if text:
            seen.setdefault(text, None)
    out = list(seen)
    path = Path(folder) / TAUGHT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"prompts": out}, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return out


class Reach:
    """The taught prompts of one version, encoded once; ``score``/``covers`` judge a message."""

    def __init__(self, prompts: list[str], encoder, cosine: float = 0.7, lexical_min: float = 0.7):
        self.prompts = list(prompts)
        self.cosine, self.lexical_min = cosine, lexical_min
        self._encoder = encoder
        self._feats: list[Features] = [features(p) for p in self.prompts]
        self._matrix = (encoder.encode(self.prompts) if self.prompts
                        else np.zeros((0, getattr(encoder, "dim", 1)), dtype=np.float32))

    def score(self, text: str) -> float:
        """How near ``text`` lies to the nearest taught prompt, over the threshold: >= 1 is covered.

        Each pair is scored on its own scale (cosine, or content overlap where
        either side is Chinese) and divided by that scale's threshold.
        """
        if not self.prompts:
            return 0.0
        new = features(text)
        vector = np.asarray(self._encoder.vector(text), dtype=np.float32)
        # einsum, not ``@``: see ``memory.index`` (OpenBLAS's thread pool on 2 busy cores).
        cosines = np.einsum("ij,j->i", self._matrix, vector)
        best = 0.0
        for f, cos in zip(self._feats, cosines):
            chinese = max(f.cjk_share, new.cjk_share) >= 0.5
            s = lexical(f, new) / self.lexical_min if chinese else float(cos) / self.cosine
            best = max(best, s)
        return best

    def covers(self, text: str) -> bool:
        """Whether ``text`` lies near enough to something taught for the version to answer it."""
        return self.score(text) >= 1.0

    def mask(self, texts: list[str]) -> list[bool]:
        return [self.covers(t) for t in texts]
