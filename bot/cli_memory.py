"""``tuneloop memory``: the memory of corrections, item by item, with status and hit counts.

Imported by ``bot.cli.build_parser`` to register it.
"""

from __future__ import annotations

from bot.cli import _print_json, command, community_arg
from tuneloop.config import Config
from tuneloop.errors import InputError


def _memory_args(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--status", choices=("fast", "consolidated"), help="only items of this status")
    p.add_argument("--limit", type=int, default=100, help="newest items shown (default 100)")
    p.add_argument("--community", help="one community's memory only (default: all)")


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@command("memory", "corrections in the fast memory: status (fast or consolidated), hits, ratings")(_memory_args)
def cmd_memory(args, config: Config) -> int:
    from bot.runtime import open_store

    if args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    with open_store(config) as store:
        view = store.scoped(community_arg(store, args.community))
        stats = view.memory_stats()
        items = view.memory_items(status=args.status, limit=args.limit)
    stats["enabled"] = config.memory.enabled
    if args.json:
        _print_json({"stats": stats, "items": items})
        return 0
    share = "-" if stats["consolidated_share"] is None else f"{stats['consolidated_share']:.0%}"
    print(f"memory {'on' if stats['enabled'] else 'off'}: {stats['items']} items ({stats['fast']} fast, "
          f"{stats['consolidated']} consolidated = {share}), {stats['hits']} hits, "
          f"replies that used it rated {stats['rated_up']} up / {stats['rated_down']} down")
    if items:
        print(f"{'id':>6} {'status':<12} {'hits':>5} {'up':>4} {'down':>4}  prompt -> correction")
    for it in items:
        print(f"{it['id']:>6} {it['status']:<12} {it['hits']:>5} {it['rated_up']:>4} {it['rated_down']:>4}  "
              f"{_short(it['prompt'], 40)} -> {_short(it['reply'], 40)}")
    return 0


# -- replies on the lifelong set ----------------------------------------------------------------

def _eval_args(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--split", choices=("tune", "heldout"), default="heldout")
    p.add_argument("--every", type=int, default=1, help="teach every Nth item only (a quicker run)")
    p.add_argument("--concurrency", type=int, default=16, help="replies in flight at once")
    p.add_argument("--reply", choices=("verbatim", "context"), help="override [memory] reply")


async def _eval_replies(config: Config, split: str, every: int, concurrency: int, reply: str | None) -> dict:
    """The issue's reply-level figures: each item taught once by a correction, then asked again."""
    import asyncio
    import dataclasses

    from bot.chat import Turn
    from bot.runtime import services
    from tuneloop.memory.evalset import build

    items, queries = build(split)
    items = items[::every]
    keys = {i.key for i in items}
    queries = [q for q in queries if q.expect is None or q.expect in keys]
    facts = {i.key: i.fact for i in items}
    gate = asyncio.Semaphore(concurrency)

    async def ask(svc, text: str, user: str = "eval"):
        async with gate:
            ex = await svc.chat.respond(Turn(text=text, user=user, platform="cli"))
        return ex, svc.store.memory_uses(ex.id)

    def has(reply: str, fact: str) -> bool:
        return fact.casefold() in reply.casefold()

    async def ask_all(svc):
        # Unrelated prompts one at a time: a batch's other rows can flip a
        # greedy token, and "unchanged" must measure the memory alone.
        out = await asyncio.gather(*(ask(svc, q.text) for q in queries if q.kind != "unrelated"))
        alone = [await ask(svc, q.text) for q in queries if q.kind == "unrelated"]
        it, un = iter(out), iter(alone)
        return [next(un) if q.kind == "unrelated" else next(it) for q in queries]

    mem = dataclasses.replace(config.memory, reply=reply or config.memory.reply)
    off = dataclasses.replace(config, memory=dataclasses.replace(mem, enabled=False))
    on = dataclasses.replace(config, memory=dataclasses.replace(mem, enabled=True))
    async with services(off) as svc:  # the weights alone, before anything is taught
        base = await ask_all(svc)
    async with services(on) as svc:
        async def teach(item):
            first, _ = await ask(svc, item.prompt, user="learner")
            svc.feedback.correct(first.id, "teacher", item.answer, admin=True)  # live at once, no review
            return await ask(svc, item.prompt, user="learner")  # the very next reply

        nexts = await asyncio.gather(*(teach(i) for i in items))
        after = await ask_all(svc)

    def share(flags: list[bool]) -> float | None:
        return round(sum(flags) / len(flags), 4) if flags else None

    def rate(kind: str, results) -> float | None:
        return share([has(ex.reply, facts[q.expect]) for q, (ex, _) in zip(queries, results) if q.kind == kind])

    near = [(q, b, a) for q, b, a in zip(queries, base, after) if q.kind == "near_miss"]
    unrelated = [(b, a) for q, b, a in zip(queries, base, after) if q.kind == "unrelated"]
    all_facts = list(facts.values())
    return {
        "model": config.model.base, "reply": mem.reply, "split": split, "items": len(items),
        "queries": {k: sum(q.kind == k for q in queries) for k in ("taught", "paraphrase", "near_miss", "unrelated")},
        "memory_on": {
            "next_reply_uses_correction": share([has(ex.reply, i.fact) and bool(uses)
                                                 for i, (ex, uses) in zip(items, nexts)]),
            "reliability": rate("taught", after),
            "generalization": rate("paraphrase", after),
            "near_miss_matched_memory": share([bool(a[1]) for _, _, a in near]),
            "near_miss_took_taught_answer": share([any(has(a[0].reply, f) and not has(b[0].reply, f)
                                                       for f in all_facts) for _, b, a in near]),
            "unrelated_matched_memory": share([bool(a[1]) for _, a in unrelated]),
            "unrelated_unchanged": share([a[0].reply == b[0].reply for b, a in unrelated]),
        },
        "memory_off": {"reliability": rate("taught", base), "generalization": rate("paraphrase", base)},
    }


@command("memory-eval", "the memory's reply-level figures on the lifelong set (a scratch store, "
         "no training)")(_eval_args)
def cmd_memory_eval(args, config: Config) -> int:
    import asyncio
    import dataclasses
    import tempfile
    from pathlib import Path

    if args.every < 1 or args.concurrency < 1:
        raise InputError("--every and --concurrency must be at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        scratch = dataclasses.replace(config, storage=dataclasses.replace(config.storage,
                                                                          path=Path(tmp) / "eval.db"))
        out = asyncio.run(_eval_replies(scratch, args.split, args.every, args.concurrency, args.reply))
    if args.json:
        _print_json(out)
    else:
        for section in ("memory_on", "memory_off"):
            print(section + ": " + ", ".join(f"{k} {v}" for k, v in out[section].items()))
    return 0
