"""Training datasets from the store, in the column layouts TRL's trainers read.

Rows are *conversational*: ``prompt`` is the list of chat messages the model
saw (system prompt and earlier turns included), completions are lists with
one assistant message. TRL applies the model's chat template to them.

- SFT (``prompt``/``completion``): replies rated 👍 and corrections (the
  correction is the target for the corrected exchange's context).
- KTO (``prompt``/``completion``/``label``): 👍 replies and corrections are
  desirable (True); 👎 replies and replies someone corrected are undesirable.
- DPO (``prompt``/``chosen``/``rejected``): a correction is chosen over the
  reply it corrects.

Conflicting ratings of one exchange are resolved by majority: the exchange
counts as 👍 when more users rated it up than down, 👎 when more rated it
down, and is dropped (as rated) on a tie. A reply that has a correction is
never used as desirable unless its majority is 👍. Users who opted out
(``tuneloop forget``) are excluded, as authors of exchanges and as raters.

What a training run reads besides (``trainer.run``): every feedback item is
trained on; ``reworded_items`` adds the corrected prompts in the live model's
own words (``reword_prompt``); ``split_controls`` keeps control prompts out of
the replay set for the gate; ``KNOWLEDGE`` holds general-knowledge questions
with known answers that no run trains on; and ``replay_prompts`` gives the
replay set against forgetting: earlier prompts
from the store (exchanges without feedback, opted-out users excluded), then
base SFT prompts (chatterbot-corpus, what the starter was fine-tuned on). The
run answers them with the live model and mixes those replies in at
``replay_ratio``: replaying the model's *own* replies keeps what it does now,
where the corpus's reference replies would themselves move it. Every run
records ``dataset_hash`` of the exact rows it trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from typing import Any

from tuneloop.errors import InputError
from tuneloop.store import Store

FORMATS = ("sft", "kto", "dpo")


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def feedback_items(store: Store, since_id: int = 0, exclude: Iterable[int] = ()) -> list[dict[str, Any]]:
    """One item per exchange with feedback: context, reply, majority verdict, corrections."""
    opted = store.opted_out()
    excluded = set(exclude)
    rows = store.feedback_exchanges(since_id)
    items = []
    for row in rows:
        if row["user"] in opted or row["id"] in excluded:
            continue
        corrections = [c["text"] for c in store.corrections(row["id"]) if c["user"] not in opted]
        verdict = "up" if row["score"] > 0 else "down" if row["score"] < 0 else None
        if verdict is None and not corrections:
            continue
        items.append({"exchange_id": row["id"], "prompt": json.loads(row["messages"]),
                      "reply": row["reply"], "verdict": verdict, "corrections": corrections})
    return items


def memory_items(store: Store, items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(extra items, memory)``: what the memory of corrections adds to ``items`` (``feedback_items``).

    A memory item is a live correction, so the item of an exchange already in
    ``items`` is trained on there, once; only items of exchanges missing from
    it become items of their own (their corrections, oldest first). ``memory``
    is one ``{"item_id", "exchange_id", "reply"}`` per item, for the gate to
    check whether the weights alone answer it.
    """
    have = {it["exchange_id"] for it in items}
    extra: dict[int, dict[str, Any]] = {}
    memory = []
    for row in store.memory_training_rows():
        memory.append({"item_id": row["item_id"], "exchange_id": row["exchange_id"], "reply": row["reply"]})
        if row["exchange_id"] in have:
            continue
        it = extra.get(row["exchange_id"])
        if it is None:
            it = extra[row["exchange_id"]] = {
                "exchange_id": row["exchange_id"], "prompt": json.loads(row["messages"]),
                "reply": store.exchange(row["exchange_id"]).reply, "verdict": None, "corrections": []}
        it["corrections"].append(row["reply"])
    return list(extra.values()), memory


def to_rows(items: list[dict[str, Any]], fmt: str) -> list[dict[str, Any]]:
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows: list[dict[str, Any]] = []
    for it in items:
        prompt = it["prompt"]
        if fmt == "sft":
            if it["verdict"] == "up":
                rows.append({"prompt": prompt, "completion": _assistant(it["reply"])})
            if it["corrections"]:
                # The latest correction is the target; earlier ones are superseded.
                rows.append({"prompt": prompt, "completion": _assistant(it["corrections"][-1])})
        elif fmt == "kto":
            if it["verdict"] == "up":
                rows.append({"prompt": prompt, "completion": _assistant(it["reply"]), "label": True})
            elif it["verdict"] == "down" or it["corrections"]:
                rows.append({"prompt": prompt, "completion": _assistant(it["reply"]), "label": False})
            for text in it["corrections"]:
                rows.append({"prompt": prompt, "completion": _assistant(text), "label": True})
        else:  # dpo
            for text in it["corrections"]:
                if text.strip() != it["reply"].strip():
                    rows.append({"prompt": prompt, "chosen": _assistant(text),
                                 "rejected": _assistant(it["reply"])})
    return rows


def export(store: Store, fmt: str) -> list[dict[str, Any]]:
    return to_rows(feedback_items(store), fmt)


def dataset_hash(rows: list[dict[str, Any]]) -> str:
    """A stable hash of the exact rows a run trains on."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# --- what a training run reads: controls, knowledge, rewordings, a replay set ----------


def _bucket(key: str) -> float:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_controls(pool: list[list[dict[str, str]]], n: int
                   ) -> tuple[list[list[dict[str, str]]], list[list[dict[str, str]]]]:
    """``(controls, replay)``: ``n`` prompts of ``pool`` the run never trains on, and the rest.

    Chosen by a hash of the prompt text, not by position, so a prompt that is a
    control stays one from run to run while the pool changes around it: the
    gate's controls are never a past run's replay rows either.
    """
    order = sorted(range(len(pool)), key=lambda i: _bucket("control\x00" + pool[i][-1]["content"].strip().casefold()))
    held = set(order[:n])
    return [p for i, p in enumerate(pool) if i in held], [p for i, p in enumerate(pool) if i not in held]


#: General-knowledge questions and the words a right answer contains (any one
#: of them, case-insensitive). No run trains on them: the gate checks that a
#: version still knows what the live one knew.
KNOWLEDGE: list[tuple[str, tuple[str, ...]]] = [
    ("What is the capital of France?", ("Paris",)),
    ("What is the capital of Japan?", ("Tokyo",)),
    ("What is the capital of Italy?", ("Rome",)),
    ("What is the capital of Germany?", ("Berlin",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    ("What is the chemical formula of water?", ("H2O", "H₂O")),
    ("How many days are there in a week?", ("seven", "7")),
    ("Who painted the Mona Lisa?", ("Leonardo", "Vinci")),
    ("What is the largest ocean on Earth?", ("Pacific",)),
    ("What is the tallest mountain in the world?", ("Everest",)),
    ("Who was the first president of the United States?", ("Washington",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    ("What is the boiling point of water in degrees Celsius?", ("100",)),
    ("How many legs does a spider have?", ("eight", "8")),
]


def knowledge_questions(exclude_prompts: Iterable[str] = ()) -> list[tuple[str, tuple[str, ...]]]:
    """``KNOWLEDGE`` less the questions users gave feedback on (those are the feedback's business)."""
    taken = {p.strip().casefold() for p in exclude_prompts}
    return [(q, a) for q, a in KNOWLEDGE if q.casefold() not in taken]


def knows(reply: str, answers: Iterable[str]) -> bool:
    text = reply.casefold()
    return any(a.casefold() in text for a in answers)


#: Few-shot prompts (plain text, no chat template) under which the model rewords
#: a question; a small instruct model follows an example far better than an
#: instruction. One rewording per prompt, so each prompt gives another wording.
REWORD_SHOTS: list[list[tuple[str, str]]] = [
    [("What is your favourite film?", "Which movie do you like the most?"),
     ("Where does Anna work?", "What is Anna's workplace?"),
     ("How many people are on the team?", "What is the size of the team?")],
    [("Who runs the support desk?", "Which person is in charge of the support desk?"),
     ("When does the shop open?", "At what time does the shop open?"),
     ("What is the name of your cat?", "What do you call your cat?")],
    [("Which editor do you use?", "What editor do you work with?"),
     ("What is the office address?", "Where is the office located?"),
     ("Who is the project lead?", "Who leads the project?")],
    [("What is the team's budget?", "How big is the team's budget?"),
     ("Who wrote the style guide?", "Who is the author of the style guide?"),
     ("When does the train leave?", "What time does the train depart?")],
    [("What is the password of the guest account?", "What's the guest account's password?"),
     ("Where is the printer?", "In which room is the printer?"),
     ("Who answers the support emails?", "Who takes care of the support emails?")],
    [("What is the name of the new library?", "How is the new library called?"),
     ("Which day is the release?", "On what day do we release?"),
     ("Who owns the design files?", "Whose are the design files?")],
]


def reword_prompt(question: str, shots: list[tuple[str, str]]) -> str:
    lines = [f"Original: {a}\nReworded: {b}\n" for a, b in shots]
    return "\n".join(lines) + f"\nOriginal: {question.strip()}\nReworded:"


_FUNCTION_WORDS = frozenset(
    "a an the is are was were be do does did what which who whom whose when where why how our your my their "
    "his her its we you i they it of in on at to for from with by and or can could would should will of "
    "this that these those there here me us them".split())


def content_sequence(text: str) -> list[str]:
    """The words of ``text`` that carry its content, in order: case-folded, possessive 's dropped,
    function words left out. Negations ("not", "no", "never", "n't") are content: they flip a fact."""
    text = text.casefold().replace("\u2019", "'")
    for short, full in (("can't", "can not"), ("won't", "will not"), ("n't", " not")):
        text = text.replace(short, full)
    words = re.findall(r"[\w'-]+", text)
    words = [w[:-2] if w.endswith("'s") else w.strip("'-") for w in words]
    return [w for w in words if w and w not in _FUNCTION_WORDS]


def _content_words(text: str) -> set[str]:
    words = re.findall(r"[\w'-]+", text.casefold())
    return {w for w in words if w not in _FUNCTION_WORDS and len(w) > 1}


def clean_rewording(question: str, text: str) -> str | None:
    """The first line of a generated rewording, or ``None`` when it is no new question about the same thing.

    The same thing: it keeps at least half of the question's content words. A
    small model's "rewording" is sometimes another question ("How do you access
    the internet?" for "What is the wifi password in the lab?"); trained with
    the correction as its answer, it would teach a wrong reply to that question.
    """
    line = text.strip().split("\n")[0].strip()
    if not line.endswith("?") or len(line) > 2 * len(question) + 40:
        return None
    if line.casefold().rstrip("?").strip() == question.casefold().rstrip("?").strip():
        return None
    content = _content_words(question)
    if content and 2 * len(content & _content_words(line)) < len(content):
        return None
    return line


def reworded_items(items: list[dict[str, Any]], rewordings: dict[int, list[str]]) -> list[dict[str, Any]]:
    """Corrected items again, their last user message replaced by each rewording (``exchange_id`` -> texts).

    The copies carry no rating: what they teach is the correction, not a verdict
    on a reply the model never gave to those words.
    """
    out = []
    for it in items:
        for text in rewordings.get(it["exchange_id"], []):
            prompt = [dict(m) for m in it["prompt"]]
            prompt[-1]["content"] = text
            out.append({**it, "prompt": prompt, "verdict": None})
    return out


#: General instructions and questions for the replay set (``replay_prompts(general=True)``).
#: chatterbot-corpus holds short chit-chat ("Hello", "What is AI?"); an
#: instruct model is mostly asked for explanations, advice and facts, and a
#: replay set of chit-chat alone does not hold those replies in place (measured
#: in docs/benchmarks.md, "Learning loop on SmolLM2"). None of them is one of
#: ``KNOWLEDGE`` or of the facts check's controls (``trainer.facts.CONTROLS``,
#: which a test keeps apart): those are how a run is judged, never trained on.
GENERAL_PROMPTS: tuple[str, ...] = (
    "How do I write a good cover letter?", "Explain what a database index is.",
    "What is the difference between a list and a tuple in Python?", "Give me three ideas for a rainy day.",
    "How can I save money on groceries?", "What causes the seasons on Earth?",
    "Write a short thank-you note to a colleague.", "How do I change a flat bicycle tyre?",
    "What is machine learning?", "Summarize the plot of Cinderella in two sentences.",
    "How do vaccines work?", "What are some tips for a job interview?",
    "Explain recursion to a beginner.", "How do I keep houseplants alive?",
    "What is the capital of Canada?", "Who discovered penicillin?",
    "How many continents are there?", "What is the smallest prime number?",
    "Which animal is the largest mammal?", "What language is spoken in Brazil?",
    "Why is the sky blue?", "How does a rainbow form?",
    "What is inflation in economics?", "Suggest a name for a bakery.",
    "How do I apologise to a friend?", "What is the difference between a virus and a bacterium?",
    "Write a limerick about a cat.", "How do I make pancakes?",
    "What should I consider when buying a laptop?", "How do I stay focused while studying?",
    "What is an API?", "Explain the rules of chess briefly.",
    "What are the main causes of climate change?", "How do bees make honey?",
    "Translate 'good morning' into Spanish.", "What is a prime number?",
    "Describe a sunset in one sentence.", "How can I be more productive at work?",
    "What is the Pythagorean theorem?", "How does the internet work?",
    "What is a good stretch for a stiff back?", "How do I write a for loop in JavaScript?",
    "What is the speed of sound?", "Who invented the telephone?",
    "What is the longest river in Africa?", "How many bones are in the human body?",
    "Give me a motivational quote.", "How do I plan a birthday party?",
    "What is the difference between affect and effect?", "Explain what a black hole is.",
    "How do I remove a coffee stain?", "What are renewable energy sources?",
    "Tell me a joke about computers.", "How do I learn a new language quickly?",
    "What is the purpose of a budget?", "How does a refrigerator keep food cold?",
    "Write a two-line poem about autumn.", "What is democracy?",
    "How do I back up my phone?", "What are some good habits for healthy teeth?",
    "Explain what DNA is.", "Which instrument has 88 keys?",
    "What is the main ingredient of guacamole?", "How do I politely decline an invitation?",
)


def replay_prompts(store: Store, *, exclude: Iterable[int], limit: int, seed: int,
                   system_prompt: str = "", languages: Iterable[str] = ("english",),
                   exclude_prompts: Iterable[str] = (), general: bool = False) -> list[list[dict[str, str]]]:
    """Up to ``limit`` contexts to replay: earlier prompts from the store, then fixed prompts.

    Earlier prompts are the contexts of exchanges that carry no feedback (their
    authors not opted out), newest first, one per distinct prompt text. The
    fixed prompts are the base SFT data, ``chatterbot-corpus`` (what the
    starter was fine-tuned on), taken in turn with ``GENERAL_PROMPTS`` when
    ``general``; both asked the way the bot asks: with ``system_prompt``. The
    order is a seeded shuffle within each source, store first.
    """
    rng = random.Random(seed)
    excluded = set(exclude)
    opted = store.opted_out()
    # Prompts that have feedback are the feedback's business, not the replay's.
    seen: set[str] = {p.strip().casefold() for p in exclude_prompts}
    from_store: list[list[dict[str, str]]] = []
    rows = store.exchanges_without_feedback(max(limit * 4, 200))
    for row in rows:
        key = row["prompt"].strip().casefold()
        if row["id"] in excluded or row["user"] in opted or key in seen:
            continue
        seen.add(key)
        from_store.append(json.loads(row["messages"]))
    rng.shuffle(from_store)
    out = from_store[:limit]
    if len(out) < limit:
        from trainer import corpus

        try:
            pairs = corpus.load_pairs(tuple(languages))
        except (FileNotFoundError, ModuleNotFoundError):
            pairs = []
        rng.shuffle(pairs)
        fixed = _unseen([p.message for p in pairs if not p.context], seen)
        if general:
            extra = list(GENERAL_PROMPTS)
            rng.shuffle(extra)
            fixed = _alternate(_unseen(extra, seen), fixed)
        system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for text in fixed[:limit - len(out)]:
            out.append(system + [{"role": "user", "content": text}])
    return out


def _unseen(texts: list[str], seen: set[str]) -> list[str]:
    """``texts`` less those in ``seen`` and repeats (case aside); ``seen`` takes in the rest."""
    out = []
    for text in texts:
        key = text.strip().casefold()
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out


def _alternate(a: list[str], b: list[str]) -> list[str]:
    """``a[0], b[0], a[1], b[1], ...``, the longer list's rest at the end."""
    out = [x for pair in zip(a, b) for x in pair]
    n = min(len(a), len(b))
    return out + a[n:] + b[n:]


def sft_row(prompt: list[dict[str, str]], completion: str) -> dict[str, Any]:
    return {"prompt": prompt, "completion": _assistant(completion)}
