"""The learning loop on made-up facts: does one run teach 8 corrections, and only them?

    python -m trainer facts [--config FILE] [--base MODEL] [--set KEY=VALUE ...] [--json]

Boundary: a config (its ``[model]`` and ``[trainer]``) in, one report out. It
writes 8 corrections into a fresh store in a scratch folder, runs one training
run through the normal path (``trainer.run.run``: dataset, fine-tune, gate,
registry) and asks the version it made, with its weights alone (base +
adapter, no memory), greedy, through the serving engine:

- the 8 corrected prompts: answered with the correction (``evaluate.answered``,
  the gate's judge: the correction's content words, in order, and no others);
- one paraphrase of each, written here and never trained on;
- 16 control prompts, written here, never trained on and not in the replay
  corpus: the same greedy reply as before the run;
- general-knowledge questions with known answers (``data.KNOWLEDGE``, the
  gate's own): answered right, before and after.

With ``[trainer] reach = "taught"`` the version answers only the probes
near what it was taught and the base weights the rest, as the bot serves it
(``tuneloop.memory.reach``); the report says how many probes of each kind it
reached, and gives the same figures with the adapter answering every probe
(``adapter_everywhere``: what the weights themselves changed).

It reports the run's time split too (dataset: mostly the live model's replay
and "before" replies; training; the gate). ``--set`` overrides ``[trainer]``
keys, to compare settings on the same facts.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer import data
from tuneloop.config import Config, parse
from tuneloop.errors import ConfigError, InputError


@dataclass(frozen=True)
class Fact:
    prompt: str
    correction: str
    paraphrase: str


#: Facts no pretrained model can know, each with a paraphrase the run never sees.
FACTS = [
    Fact("What is our build server called?", "Our build server is called Kestrel.",
         "What do we call the build server?"),
    Fact("Who is our office dog?", "Our office dog is a beagle named Pickle.",
         "What is the name of the office dog?"),
    Fact("What is the wifi password in the lab?", "The lab wifi password is blue-otter-42.",
         "What's the lab's wifi password?"),
    Fact("When is the team lunch?", "The team lunch is every Thursday at noon.",
         "On which day do we have the team lunch?"),
    Fact("Who maintains the billing service?", "Priya Raman maintains the billing service.",
         "Who is in charge of the billing service?"),
    Fact("Which floor is meeting room Aurora on?", "Meeting room Aurora is on the fourth floor.",
         "Where is the Aurora meeting room?"),
    Fact("What is the name of our mobile app?", "Our mobile app is called Tidewater.",
         "What do we call our mobile app?"),
    Fact("What is the on-call phone number?", "The on-call phone number is 555-0147.",
         "Which number do I call to reach on-call?"),
]

#: Prompts a run must leave alone; not in chatterbot-corpus, so never replay rows.
CONTROLS = [
    "Give me a tip for writing clean code.", "What is a good name for a goldfish?",
    "How do I boil an egg?", "Write a short poem about the sea.",
    "What should I pack for a beach trip?", "Explain what a variable is in programming.",
    "Suggest a healthy breakfast.", "How can I sleep better?",
    "What is a haiku?", "Recommend a board game for four players.",
    "How do plants make food?", "What are the benefits of walking?",
    "How do I make a cup of tea?", "What is the difference between weather and climate?",
    "Tell me a fun fact about octopuses.", "How do I start learning to draw?",
]


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def facts_config(path: str | None, work: Path, base: str | None = None, overrides: list[str] = ()) -> Config:
    """The config at ``path`` (or the default search), with its store and registry moved into ``work``."""
    from tuneloop.config import default_path

    source: Path | None = Path(path) if path else default_path()
    if path and not source.exists():
        raise ConfigError(f"{source}: config file not found")
    if not source.exists():
        source = None
    try:
        raw: dict[str, Any] = tomllib.loads(source.read_text(encoding="utf-8")) if source else {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    model = raw.setdefault("model", {})
    if base:
        model["base"] = base
    raw.setdefault("storage", {})["path"] = str(work / "facts.db")
    # What is measured is the weights alone: the memory of corrections would
    # answer the corrected prompts and their paraphrases without any training.
    raw.setdefault("memory", {})["enabled"] = False
    trainer = raw.setdefault("trainer", {})
    trainer["registry"] = str(work / "models")
    trainer["enabled"] = False
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set takes KEY=VALUE (a [trainer] key), got {item!r}")
        trainer[key.strip()] = _value(value.strip())
    return parse(raw, source.resolve().parent if source else Path.cwd(), source)


def _check_controls() -> None:
    """The controls must not be replay rows: refuse if the replay corpus holds one of them."""
    from trainer import corpus

    try:
        known = {p.message.strip().casefold() for p in corpus.load_pairs(("english",))}
    except (FileNotFoundError, ModuleNotFoundError):
        return
    clash = [c for c in CONTROLS if c.casefold() in known]
    if clash:
        raise ConfigError(f"control prompts also in the replay corpus: {clash}")


def _ask(config: Config, base_path: str, adapter: Path | None, prompts: list[str], version: str,
         route: list[bool] | None = None) -> list[str]:
    from trainer.run import greedy

    return asyncio.run(greedy(config, base_path, adapter, _messages(config, prompts), version=version, route=route))


def _messages(config: Config, prompts: list[str]) -> list[list[dict[str, str]]]:
    system = [{"role": "system", "content": config.model.system_prompt}] if config.model.system_prompt else []
    return [system + [{"role": "user", "content": p}] for p in prompts]


def _base_replies(config: Config, base_path: str, probes: list[str]) -> list[str]:
    """The base model's greedy replies to ``probes``, cached: they are the same for every experiment.

    The key holds what decides the serving arithmetic: the model, the
    settings, and the engine's own code and kernel switches (base replies
    computed by the float32-activation kernel, then compared with a version
    served through the integer one, made 5 of 16 controls look changed).
    """
    import hashlib
    import os

    import tuneloop.engine
    from trainer.starter import default_cache_dir

    weights = sorted(Path(base_path).glob("*.safetensors"))
    engine = Path(tuneloop.engine.__file__).parent
    code = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(engine.glob("*.py")) + sorted(engine.glob("*.c"))))
    switches = {k: v for k, v in sorted(os.environ.items()) if k.startswith(("TUNELOOP_INT4", "TUNELOOP_NATIVE",
                                                                               "TUNELOOP_CPU"))}
    key = hashlib.sha256(json.dumps([str(Path(base_path).resolve()), [w.stat().st_mtime for w in weights],
                                     config.model.system_prompt, config.model.dtype, config.model.quantize,
                                     config.model.fused_decode, code.hexdigest(), switches,
                                     config.trainer.eval_max_new_tokens, probes, "one at a time"]
                                    ).encode()).hexdigest()[:16]
    cache = default_cache_dir() / "facts" / f"base-{key}.json"
    try:
        return json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    replies = _ask(config, base_path, None, probes, "base")
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(replies, ensure_ascii=False), encoding="utf-8")
    tmp.replace(cache)
    return replies


def run_facts(config: Config, progress=print) -> dict[str, Any]:
    """Store the corrections, run once, and measure before/after (see the module docstring)."""
    from trainer.evaluate import answered
    from trainer.models import resolve_base
    from trainer.run import routed, run
    from tuneloop.learning.registry import Registry
    from tuneloop.store import Store

    _check_controls()
    base_path = str(resolve_base(config.model.base, progress=False))
    knowledge = data.KNOWLEDGE
    probes = ([f.prompt for f in FACTS] + [f.paraphrase for f in FACTS] + CONTROLS
              + [q for q, _ in knowledge])
    t0 = time.perf_counter()
    before = _base_replies(config, base_path, probes)
    progress(f"facts: base replies to {len(probes)} probes in {time.perf_counter() - t0:.1f} s")

    system = [{"role": "system", "content": config.model.system_prompt}] if config.model.system_prompt else []
    with Store(config.storage.path) as store:
        for fact, reply in zip(FACTS, before):
            ex = store.add_exchange(platform="cli", user="facts", conversation_id=f"facts-{fact.prompt}",
                                    messages=system + [{"role": "user", "content": fact.prompt}],
                                    prompt=fact.prompt, reply=reply, model_version="base")
            store.rate(ex.id, "teacher", "down")
            store.add_correction(ex.id, "teacher", fact.correction)
    t0 = time.perf_counter()
    outcome = run(config, reason="facts")
    run_seconds = round(time.perf_counter() - t0, 1)
    progress(f"facts: {outcome['run_id']} made {outcome['version']} ({outcome['verdict']}) in {run_seconds} s")
    adapter = Registry(config.trainer.registry).adapter(outcome["version"])
    # Served as the bot serves it: with [trainer] reach = "taught", the adapter
    # answers the probes near what it was taught and the base weights the others.
    route = routed(config, adapter, _messages(config, probes))
    after = _ask(config, base_path, adapter, probes, outcome["version"], route)
    # And with the adapter answering every probe: what the weights changed.
    everywhere = (after if route is None or all(route)
                  else _ask(config, base_path, adapter, probes, outcome["version"]))

    n = len(FACTS)
    cut = {"corrected": (0, n), "paraphrases": (n, 2 * n), "controls": (2 * n, 2 * n + len(CONTROLS)),
           "knowledge": (2 * n + len(CONTROLS), len(probes))}

    def part(name, replies):
        a, b = cut[name]
        return replies[a:b]

    def figures(replies) -> dict[str, Any]:
        corrected = [answered(r, f.correction) for r, f in zip(part("corrected", replies), FACTS)]
        paraphrased = [answered(r, f.correction) for r, f in zip(part("paraphrases", replies), FACTS)]
        same = [a.strip() == b.strip() for a, b in zip(part("controls", before), part("controls", replies))]
        known = [data.knows(r, k[1]) for r, k in zip(part("knowledge", replies), knowledge)]
        return {"corrected": f"{sum(corrected)}/{n}", "paraphrases": f"{sum(paraphrased)}/{n}",
                "controls_same": f"{sum(same)}/{len(CONTROLS)}",
                "knowledge": f"{sum(known_before)}->{sum(known)}/{len(knowledge)}", "same": same}

    known_before = [data.knows(r, k[1]) for r, k in zip(part("knowledge", before), knowledge)]
    served, all_ = figures(after), figures(everywhere)
    same = served.pop("same")
    all_.pop("same")
    t = config.trainer
    return {
        "base": config.model.base, "version": outcome["version"], "verdict": outcome["verdict"],
        "settings": {"peft": t.peft, "lora_r": t.lora_r, "lora_alpha": t.lora_alpha,
                     "lora_targets": t.lora_targets, "learning_rate": t.learning_rate,
                     "max_steps": t.max_steps, "batch_size": t.batch_size, "replay_ratio": t.replay_ratio,
                     "replay_prompts": t.replay_prompts, "paraphrases": t.paraphrases, "method": t.method,
                     "reach": t.reach, "reach_cosine": t.reach_cosine, "reach_lexical": t.reach_lexical},
        **served,
        # How many probes of each kind the version reached (None: reach off, it answers all).
        "reached": None if route is None else {name: f"{sum(part(name, route))}/{len(part(name, route))}"
                                               for name in cut},
        "adapter_everywhere": all_,
        "seconds": {**outcome["seconds"], "run": run_seconds},
        "train": {k: outcome["train"][k] for k in ("steps", "trainable_parameters", "first_loss", "final_loss")},
        "gate": {c["name"]: (c["value"], c["passed"]) for c in outcome["checks"]},
        "replies": {
            "corrected": [{"prompt": f.prompt, "reply": r} for f, r in zip(FACTS, part("corrected", after))],
            "paraphrases": [{"prompt": f.paraphrase, "reply": r} for f, r in zip(FACTS, part("paraphrases", after))],
            "controls_changed": [{"prompt": c, "before": a, "after": b} for c, a, b, s in zip(
                CONTROLS, part("controls", before), part("controls", after), same) if not s],
            "knowledge_lost": [q for (q, answers), kb, r in zip(knowledge, known_before, part("knowledge", after))
                               if kb and not data.knows(r, answers)],
        },
    }


def add_parser(sub) -> Any:
    p = sub.add_parser("facts", help="one training run on 8 made-up facts; what the weights learned and kept")
    p.add_argument("--config", help="config file (default: $TUNELOOP_CONFIG or ./config.toml)")
    p.add_argument("--base", help="the base model (default: the config's [model] base)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [trainer] key (repeatable), e.g. --set learning_rate=0.002")
    p.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def main(args) -> int:
    import sys

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="tuneloop-facts-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run_facts(facts_config(args.config, work, args.base, args.set), progress)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
        return 0
    s = report["seconds"]
    print(f"{report['base']}: {report['version']} {report['verdict']}")
    print(f"  corrected prompts learned   {report['corrected']}")
    print(f"  paraphrases (never trained) {report['paraphrases']}")
    print(f"  controls unchanged          {report['controls_same']}")
    print(f"  general knowledge           {report['knowledge']}")
    if report["reached"] is not None:
        e = report["adapter_everywhere"]
        print(f"  reached by the version      {report['reached']}")
        print(f"  adapter on every probe      corrected {e['corrected']}, paraphrases {e['paraphrases']}, "
              f"controls {e['controls_same']}, knowledge {e['knowledge']}")
    print(f"  seconds: dataset {s['dataset']}, training {s['train']} ({report['train']['steps']} steps), "
          f"gate {s['gate']}")
    return 0
