"""The trainer's greedy replies (the gate's, the replay set's, the facts check's) come from the engine the bot
serves with: the same ``[model]`` dtype, decode step and weight format."""

from __future__ import annotations

import asyncio

from trainer import run
from tuneloop.config import parse


def test_greedy_builds_the_engine_the_bot_serves_with(tmp_path, monkeypatch):
    seen = {}

    class Engine:
        def __init__(self, path, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("stop here")

    import tuneloop.engine.local as local

    monkeypatch.setattr(local, "LocalEngine", Engine)
    config = parse({"model": {"quantize": "int8", "fused_decode": False, "dtype": "float32"}}, tmp_path)
    try:
        asyncio.run(run.greedy(config, "base", None, [[{"role": "user", "content": "hi"}]]))
    except RuntimeError as e:
        assert str(e) == "stop here"
    assert (seen["quantize"], seen["fused_decode"], seen["dtype"]) == ("int8", False, "float32")
