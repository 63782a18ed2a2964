"""Dialogue pairs from the ``chatterbot-corpus`` package, and a held-out split.

This module knows YAML files and text; it knows nothing of tokenizers or
models. The corpus ships as ``chatterbot_corpus/data/<language>/<category>.yml``
files, each with a ``conversations:`` list of conversations, each a list of
lines that alternate between two speakers.

A conversation ``[l0, l1, ..., ln-1]`` yields the consecutive pairs
``(l_i -> l_{i+1})`` for ``i < n-1``; pair ``i`` carries ``l0 .. l_{i-1}`` as
its context, so multi-turn conversations are kept as multi-turn examples.

Held-out split (``split_pairs``): the corpus repeats prompts on purpose
("Hi, How is it going?" has six replies), so a split by pair would put the
same prompt on both sides and the held-out figures would measure recall, not
generalisation. Pairs are therefore split **by prompt**: every pair whose
normalised message (case-folded, punctuation and spaces dropped) is the same
lands on the same side, decided by a seeded hash of that normalised text. The
split is deterministic across machines and Python versions and does not move
when unrelated pairs are added.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

try:  # the C loader reads the corpus in a fraction of the time
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

log = logging.getLogger(__name__)

DEFAULT_LANGUAGES: tuple[str, ...] = ("english", "chinese")


@dataclass(frozen=True)
class Pair:
    """One turn of a corpus conversation: ``message`` answered by ``reply``."""

    language: str
    category: str
    message: str
    reply: str
    #: earlier lines of the same conversation, oldest first; the last one was
    #: said by the assistant (the speaker of ``reply``)
    context: tuple[str, ...] = ()

    def messages(self, system: str | None = None) -> list[dict[str, str]]:
        """The chat messages that lead up to ``reply`` (without the reply)."""
        out: list[dict[str, str]] = []
        if system:
            out.append({"role": "system", "content": system})
        # Roles alternate backwards from the message, which the user said.
        turns = [*self.context, self.message]
        for j, text in enumerate(turns):
            role = "user" if (len(turns) - 1 - j) % 2 == 0 else "assistant"
            out.append({"role": role, "content": text})
        return out


def corpus_dir() -> Path:
    """The ``data`` folder of the installed ``chatterbot_corpus`` package."""
    import chatterbot_corpus

    return Path(chatterbot_corpus.__file__).parent / "data"


def _text(line: object) -> str | None:
    # The YAML holds the odd number, boolean or null; keep what reads as text.
    if line is None or isinstance(line, (dict, list)):
        return None
    text = str(line).strip()
    return text or None


def load_conversations(languages: Iterable[str] = DEFAULT_LANGUAGES) -> list[tuple[str, str, list[str]]]:
    """``(language, category, lines)`` for every conversation, in a stable order."""
    return [(lang, cat, list(lines)) for lang, cat, lines in _conversations(tuple(languages))]


@functools.lru_cache(maxsize=8)
def _conversations(languages: tuple[str, ...]) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    root = corpus_dir()
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for language in languages:
        folder = root / language
        if not folder.is_dir():
            raise FileNotFoundError(f"chatterbot-corpus has no language {language!r} (looked in {folder})")
        for path in sorted(folder.glob("*.yml")):
            with path.open(encoding="utf-8") as f:
                doc = yaml.load(f, Loader=_Loader) or {}
            for conversation in doc.get("conversations") or []:
                if not isinstance(conversation, list):
                    continue
                lines = [t for t in (_text(x) for x in conversation) if t]
                if len(lines) >= 2:
                    out.append((language, path.stem, tuple(lines)))
    return tuple(out)


def load_pairs(languages: Iterable[str] = DEFAULT_LANGUAGES) -> list[Pair]:
    """Every consecutive ``(message, reply)`` pair, with its earlier lines as context."""
    pairs: list[Pair] = []
    for language, category, lines in load_conversations(languages):
        for i in range(len(lines) - 1):
            pairs.append(Pair(language, category, lines[i], lines[i + 1], tuple(lines[:i])))
    return pairs


def corpus_text(languages: Iterable[str] = DEFAULT_LANGUAGES) -> list[str]:
    """One document per conversation, its lines joined by newlines (pretraining text)."""
    return ["\n".join(lines) for _, _, lines in load_conversations(languages)]


def normalize(text: str) -> str:
    """Case-folded text without punctuation, symbols or spaces: the prompt identity."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if unicodedata.category(ch)[0] in "LN")


def _bucket(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(pair: Pair, holdout_fraction: float, seed: int) -> bool:
    """Whether ``pair`` falls on the held-out side (decided by its prompt alone)."""
    return _bucket(f"{pair.language}\x00{normalize(pair.message)}", seed) < holdout_fraction


def split_pairs(
    pairs: Sequence[Pair], holdout_fraction: float = 0.1, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """``(train, held_out)``: pairs with the same normalised prompt stay together.

    See the module docstring for the rule. The fraction is of distinct prompts,
    so the share of pairs held out is close to it but not exact.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    train: list[Pair] = []
    held: list[Pair] = []
    for pair in pairs:
        (held if is_held_out(pair, holdout_fraction, seed) else train).append(pair)
    return train, held


def references(pairs: Iterable[Pair]) -> dict[tuple[str, str], tuple[str, list[str]]]:
    """Group pairs by ``(language, normalised prompt)``: ``(prompt text, acceptable replies)``.

    The corpus often gives one prompt several replies; an evaluation counts a
    reply as right when it matches any of them.
    """
    out: dict[tuple[str, str], tuple[str, list[str]]] = {}
    for pair in pairs:
        key = (pair.language, normalize(pair.message))
        prompt, replies = out.setdefault(key, (pair.message, []))
        if pair.reply not in replies:
            replies.append(pair.reply)
    return out
