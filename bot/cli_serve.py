"""``tuneloop run`` and ``tuneloop bench``: the serving commands.

Imported by ``bot.cli.build_parser`` to register them; the heavy modules
(aiohttp app, engine, benchmark) load only when a command runs.
"""

from __future__ import annotations

import asyncio

from bot.cli import command
from tuneloop.config import Config


def _run_args(p) -> None:
    p.add_argument("--grace", type=float, default=None,
                   help="seconds in-flight replies get to finish on Ctrl-C/SIGTERM (default 5)")


@command("run", "serve: the engine, the web chat and API on [server], and every enabled adapter")(_run_args)
def cmd_run(args, config: Config) -> int:
    from bot.serve import GRACE_S, serve

    grace = GRACE_S if args.grace is None else max(0.0, args.grace)
    return asyncio.run(serve(config, grace=grace))


def _bench_args(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--dtype", action="append", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights' dtype; repeat to measure several (default: [model] dtype)")
    p.add_argument("--quantize", action="append", choices=("auto", "none", "int8", "int4"),
                   help="weights the fused step reads at a few rows; repeat to measure several "
                        "(default: [model] quantize)")
    p.add_argument("--write", metavar="FILE", help="also write the result into FILE's section for this model "
                   "(docs/benchmarks.md)")
    p.add_argument("--adapters", metavar="N,N,...", type=_counts,
                   help="instead: a batch of 32 requests over N distinct random LoRA adapters each "
                        "([trainer] lora_r, lora_alpha, lora_targets), e.g. 1,4,16")
    p.add_argument("--peer", choices=("llamacpp",),
                   help="instead: the engine against llama.cpp on [model] base's GGUF file, alternating "
                        "(needs the llamacpp extra: pip install 'tuneloop[llamacpp]')")


def _counts(text: str) -> list[int]:
    import argparse

    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive counts like 1,4,16, got {text!r}")
    return counts


@command("bench", "measure the engine: throughput and latency under concurrent requests")(_bench_args)
def cmd_bench(args, config: Config) -> int:
    import shlex
    import sys

    from bot.bench import bench_main

    command = "tuneloop " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    return bench_main(config, args.json, dtypes=args.dtype, write=args.write, command=command,
                      adapters=args.adapters, peer=args.peer, quantizes=args.quantize)
