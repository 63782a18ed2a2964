"""Does a new message ask what a stored prompt asked? Meaning first, then a guard against near misses.

The score of a pair is the encoder's cosine for text in Latin script, and the
overlap of content characters for Chinese: all-MiniLM-L6-v2's vocabulary
holds 244 CJK characters, so most Chinese text reaches it as ``[UNK]`` and
"谁负责苍鹭项目？" / "谁负责猎鹰项目？" encode to the same vector.

A high score is not enough: "Who owns project Falcon?" lies nearer to "Who
owns project Heron?" than many true paraphrases. Two guards reject a pair:

- **key terms**: numbers, quoted text and names (capitalised words inside a
  sentence, all-caps words) of either text must appear in the other;
- **substitution**: content words (or Chinese content characters) of the
  stored prompt are missing from the message *and* the message brings
  content of its own in their place. A paraphrase reorders or drops words
  ("谁负责苍鹭项目" / "苍鹭项目的负责人是谁"); a near miss swaps one
  ("... Heron" / "... falcon"). An English swap of synonyms keeps a high
  cosine, so a substitution passes only at ``substitution_cosine`` or above;
  a Chinese one never does (the encoder cannot tell synonyms there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’\-.][A-Za-z0-9]+)*")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_QUOTED = re.compile(r"[\"“”「」『』‘](.+?)[\"“”「」『』’]")
_SENTENCE_START = re.compile(r"(^|[.!?。！？]\s*)$")

STOP_EN = frozenset("""
a an the of to in on at for from by with about as into over under and or but not no nor so
is are was were be been being am do does did done doing have has had having will would shall
should can could may might must i me my mine we us our ours you your yours he him his she her hers
it its they them their theirs this that these those there here what which who whom whose when
where why how whats whos wheres hows please tell say know let lets just any some all also again
one ones thing things something anything really very much many more most get got give please
thanks thank hey hi hello okay ok yes yeah again still now then than if else
""".split())

# Function characters and question words: a paraphrase adds or drops them freely.
STOP_ZH = frozenset("的了吗呢吧啊呀么是在有和与及或也都就还又很太最这那哪谁什怎么样个位些吗请问一下我你他她它们"
                    "叫做称为给把被让对从向到以及其之于而且即便如果因为所以可以能会要想知道告诉说讲问")


# Chinese interrogatives, longest first: like the English wh-words in STOP_EN
# they say that something is asked, not what ("哪天发布" / "什么时候发布").
QUESTION_ZH = re.compile("什么时候|什么地方|哪一天|哪一个|为什么|怎么样|多少|何时|何处|几时|哪天|哪里|哪儿|哪个|哪|几")


def _stem(word: str) -> str:
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    for suffix, repl in (("ies", "y"), ("ing", ""), ("ed", ""), ("er", ""), ("es", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("ss"):
            return w[: len(w) - len(suffix)] + repl
    return w


@dataclass(frozen=True)
class Features:
    """What the guards and the lexical score compare, computed once per text."""

    text: str
    latin: frozenset[str]      # stems of content words
    cjk: frozenset[str]        # content characters
    keys: frozenset[str]       # numbers, names, quoted text (lower-cased)
    cjk_share: float           # share of CJK characters among words + characters

    @property
    def content(self) -> frozenset[str]:
        return self.latin | self.cjk


def features(text: str) -> Features:
    keys: set[str] = set()
    latin: set[str] = set()
    for q in _QUOTED.findall(text):
        keys.add(q.strip().lower())
    for m in _WORD.finditer(text):
        word = m.group(0)
        low = word.lower()
        if any(c.isdigit() for c in word):
            keys.add(low)
        elif len(word) > 1 and (word.isupper() or (word[0].isupper() and not
                                                    _SENTENCE_START.search(text[:m.start()]))):
            keys.add(_stem(word))
        if low.replace("’", "'") not in STOP_EN and low.split("'")[0] not in STOP_EN:
            latin.add(_stem(word))
    chars = _CJK.findall(QUESTION_ZH.sub(" ", text))
    words = len(_WORD.findall(text))
    return Features(text=text, latin=frozenset(latin), cjk=frozenset(c for c in chars if c not in STOP_ZH),
                    keys=frozenset(keys), cjk_share=len(chars) / max(1, len(chars) + words))


def _contains(text_features: Features, key: str) -> bool:
    low = text_features.text.lower()
    return key in low or key in text_features.latin


def lexical(a: Features, b: Features) -> float:
    """Dice overlap of content units (stems and CJK characters)."""
    x, y = a.content, b.content
    return 2 * len(x & y) / (len(x) + len(y)) if x or y else 0.0


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float
    min_lexical: float
    substitution_cosine: float


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    score: float
    reason: str  # "match", "low score", "key term", "substitution"


def judge(stored: Features, new: Features, cosine: float, t: Thresholds) -> Verdict:
    """Whether ``new`` asks what ``stored`` asked, and why not."""
    chinese = max(stored.cjk_share, new.cjk_share) >= 0.5
    score = lexical(stored, new) if chinese else cosine
    if score < (t.min_lexical if chinese else t.min_cosine):
        return Verdict(False, score, "low score")
    if any(not _contains(new, k) for k in stored.keys) or any(not _contains(stored, k) for k in new.keys):
        return Verdict(False, score, "key term")
    missing, extra = stored.content - new.content, new.content - stored.content
    if missing and extra and (chinese or cosine < t.substitution_cosine):
        return Verdict(False, score, "substitution")
    return Verdict(True, score, "match")
