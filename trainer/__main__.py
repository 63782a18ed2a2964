"""``python -m trainer``: the trainer's command line.

Each subcommand is an ``add_<name>(subparsers)`` that registers its arguments
and a ``run_<name>(args) -> int``; ``COMMANDS`` maps names to the pair, so a
new command is one entry and two functions, with no change to ``main``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("trainer")


# --- build-starter ------------------------------------------------------------


def add_build_starter(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("build-starter", help="build the offline starter model (once per machine)")
    p.add_argument("--tiny", action="store_true", help="the TINY recipe used by tests (seconds)")
    p.add_argument("--out", type=Path, help="build into this folder instead of the cache")
    p.add_argument("--force", action="store_true", help="rebuild even if a complete build exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def run_build_starter(args: argparse.Namespace) -> int:
    from trainer import starter

    recipe = starter.TINY if args.tiny else starter.STARTER
    progress = not args.quiet
    if args.out is not None:
        if args.force or not starter.is_complete(args.out, recipe):
            starter.build_model(args.out, recipe, progress=progress)
        path = args.out
    elif args.force:
        path = starter.default_cache_dir() / f"starter-{recipe.key()}"
        starter.build_model(path, recipe, progress=progress)
    else:
        path = starter.ensure_starter(recipe=recipe, progress=progress)
    print(path)
    return 0


# --- eval ---------------------------------------------------------------------


def add_eval(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval", help="exact match and ROUGE-L of greedy replies on the corpus's held-out split"
    )
    p.add_argument("--model", type=Path, help="model folder (default: the starter, built if missing)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--limit", type=int, help="evaluate at most N held-out prompts")
    p.add_argument("--system", help="system message to send before each prompt")
    p.add_argument("--examples", type=int, default=5, help="sample replies to show per split")
    return p


def run_eval(args: argparse.Namespace) -> int:
    from trainer import starter, starter_eval

    path = args.model if args.model is not None else starter.ensure_starter()
    report = starter_eval.evaluate_folder(path, limit=args.limit, system=args.system, examples=args.examples)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"model: {report['model']}")
    print(f"rules: {report['rules']}")
    for split in ("held_out", "train_sample"):
        if split not in report:
            continue
        print(f"\n{split}")
        print(f"  {'language':<10} {'n':>5} {'exact':>7} {'rougeL':>7}")
        for name, s in report[split].items():
            print(f"  {name:<10} {s['n']:>5} {s['exact_match']:>7.3f} {s['rouge_l']:>7.3f}")
    for split, rows in report.get("examples", {}).items():
        print(f"\nexamples ({split})")
        for row in rows:
            print(f"  > {row['prompt']}\n    model:  {row['reply']}\n    corpus: {' | '.join(row['corpus'])}")
    return 0


def add_facts(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from trainer import facts

    return facts.add_parser(sub)


def run_facts(args: argparse.Namespace) -> int:
    from trainer import facts

    return facts.main(args)


def add_run(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="one training run: dataset, fine-tune, gate, registry")
    return p


def run_run(args: argparse.Namespace) -> int:  # reached only through main()'s shortcut
    raise AssertionError("handled in main()")


Command = tuple[
    Callable[[argparse._SubParsersAction], argparse.ArgumentParser], Callable[[argparse.Namespace], int]
]

COMMANDS: dict[str, Command] = {
    "build-starter": (add_build_starter, run_build_starter),
    "eval": (add_eval, run_eval),
    "facts": (add_facts, run_facts),
    "run": (add_run, run_run),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, run in COMMANDS.values():
        add(sub).set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # trainer.run owns its arguments (it also runs under torchrun)
        from trainer.run import main as run_main

        return run_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from tuneloop.errors import TuneloopError

    try:
        return args.run(args)
    except TuneloopError as e:
        print(f"trainer: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
