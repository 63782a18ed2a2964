"""``tuneloop memory``: the memory of corrections, item by item, with status and hit counts.

Imported by ``bot.cli.build_parser`` to register it.
"""

from __future__ import annotations

from bot.cli import _print_json, command
from tuneloop.config import Config
from tuneloop.errors import InputError


def _memory_args(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--status", choices=("fast", "consolidated"), help="only items of this status")
    p.add_argument("--limit", type=int, default=100, help="newest items shown (default 100)")


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@command("memory", "corrections in the fast memory: status (fast or consolidated), hits, ratings")(_memory_args)
def cmd_memory(args, config: Config) -> int:
    from bot.runtime import open_store

    if args.limit < 1:
        raise InputError(f"--limit must be at least 1, got {args.limit}")
    with open_store(config) as store:
        stats = store.memory_stats()
        items = store.memory_items(status=args.status, limit=args.limit)
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
