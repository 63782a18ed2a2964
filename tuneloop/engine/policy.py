"""The engine's decoding policy, for code that decodes with transformers' ``generate`` instead.

The engine picks each token from the model's logits alone: greedy, or
temperature and top-p sampling, and stops at the model's end-of-turn tokens,
a stop string or the token limit. It applies nothing else a model's
``generation_config`` may ask for (n-gram bans, repetition penalties), and
that is deliberate: ``no_repeat_ngram_size`` in ``generate`` forbids any
n-gram already in the sequence, prompt included, so a reply may not repeat
four tokens of the question it answers, nor of an earlier turn, nor of a
correction a user taught (a learning bot must be able to say it back
verbatim). ``generate`` fills every setting left unset from the model's
``generation_config``, so a baseline or an evaluation that wants the bot's
replies passes ``generate_kwargs()``: those settings, explicitly neutral.
"""

from __future__ import annotations

from typing import Any

#: ``generation_config`` settings that change which token greedy decoding
#: picks, at the values that leave the logits as they are.
NEUTRAL: dict[str, Any] = {
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0,
    "num_beams": 1,
    "do_sample": False,
}


def generate_kwargs(**kwargs: Any) -> dict[str, Any]:
    """Arguments for ``model.generate`` that decode greedily as the engine does, plus ``kwargs``."""
    return {**NEUTRAL, **kwargs}
