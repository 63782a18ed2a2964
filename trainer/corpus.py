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

#: A few conversations the chatterbot corpus lacks and a chat bot meets first:
#: its name, what it does, greetings of the day, farewells, thanks. Training
#: only (``load_pairs(extras=True)``); an extra whose prompt the corpus already
#: has is dropped, so the corpus keeps its own answers and evaluation (corpus
#: pairs only) is unchanged.
EXTRA_CATEGORY = "tuneloop"
EXTRA_CONVERSATIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "english": (
        ("What is your name?", "My name is tuneloop."),
        ("What's your name?", "I am tuneloop."),
        ("Who made you?", "The people who run tuneloop. I learn from your feedback."),
        (
            "What can you do?",
            "I can chat with you and answer simple questions, and I learn from your feedback.",
        ),
        ("How can you help me?", "I can chat and answer simple questions. Rate my replies and I get better."),
        ("Can you help me?", "Sure, what do you need?"),
        ("I need help.", "Of course. What can I help you with?"),
        ("Tell me about yourself.", "I am tuneloop, a small chat bot that learns from your reactions."),
        ("Good morning", "Good morning! How are you today?"),
        ("Good afternoon", "Good afternoon! How can I help?"),
        ("Good evening", "Good evening! How are you?"),
        ("Good night", "Good night! Sleep well."),
        ("Goodbye", "Goodbye! Talk to you soon."),
        ("Bye", "Bye! Have a nice day."),
        ("See you later", "See you later!"),
        ("Thanks", "You're welcome!"),
        ("Thank you very much", "You're welcome!"),
        ("Thanks a lot", "No problem!"),
        ("Good job", "Thank you!"),
        ("You are wrong.", "Sorry. Write me a better reply and I will learn from it."),
    ),
    "chinese": (
        ("你叫什么名字?", "我叫 tuneloop。"),
        ("你叫什么?", "我叫 tuneloop。"),
        ("你的名字是什么?", "我的名字是 tuneloop。"),
        ("你是谁?", "我是 tuneloop，一个聊天机器人。"),
        ("你能做什么?", "我可以陪你聊天，回答简单的问题，还会从你的反馈中学习。"),
        ("你会做什么?", "我会聊天，也会从你的反馈中学习。"),
        ("再见", "再见！下次聊。"),
        ("拜拜", "拜拜！"),
        ("晚上好", "晚上好！"),
        ("晚安", "晚安，做个好梦。"),
        ("谢谢你", "不客气。"),
        ("非常感谢", "不客气！"),
        ("你好啊", "你好！"),
    ),
}


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


def load_pairs(languages: Iterable[str] = DEFAULT_LANGUAGES, extras: bool = False) -> list[Pair]:
    """Every consecutive ``(message, reply)`` pair, with its earlier lines as context.

    ``extras`` appends ``extra_pairs`` (training only).
    """
    pairs: list[Pair] = []
    for language, category, lines in load_conversations(languages):
        for i in range(len(lines) - 1):
            pairs.append(Pair(language, category, lines[i], lines[i + 1], tuple(lines[:i])))
    if extras:
        pairs.extend(extra_pairs(languages, pairs))
    return pairs


def extra_pairs(languages: Iterable[str], corpus_pairs: Sequence[Pair]) -> list[Pair]:
    """``EXTRA_CONVERSATIONS`` as pairs, less those whose prompt ``corpus_pairs`` has."""
    known = {(p.language, normalize(p.message)) for p in corpus_pairs}
    out = []
    for language in languages:
        for lines in EXTRA_CONVERSATIONS.get(language, ()):
            for i in range(len(lines) - 1):
                if (language, normalize(lines[i])) not in known:
                    out.append(Pair(language, EXTRA_CATEGORY, lines[i], lines[i + 1], tuple(lines[:i])))
    return out


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


def casual(text: str) -> str:
    """How people often type a message: lower case, no closing punctuation (Latin text only)."""
    if not text.isascii():
        return text
    return text.lower().rstrip(" ?.!") or text
