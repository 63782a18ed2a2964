"""``python -m tuneloop.memory eval|bench``: the memory's figures.

- ``eval [--json] [--retune] [--errors]``: matcher figures on the lifelong
  set (``evalset``), thresholds from ``[memory]`` (or picked again on the
  tuning split with ``--retune``), reported on both splits; and for
  ``[trainer] reach``, the share of each query kind a version taught the
  items would answer (``reach``).
- ``bench [--items N] [--queries N] [--json]``: what matching adds to one
  reply with N items in memory (a real SQLite store, the real encoder):
  p50/p95 of the whole ``Memory.recall`` and of its parts, the index's
  memory, and the encoding rate of a backlog.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from tuneloop.community import LOCAL
from tuneloop.config import load
from tuneloop.errors import TuneloopError


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cmd_eval(args) -> dict:
    from tuneloop.memory.encoder import Encoder
    from tuneloop.memory.evaluate import run
    from tuneloop.memory.matcher import Thresholds

    config = load(args.config)
    m, t = config.memory, config.trainer
    thresholds = Thresholds(m.min_cosine, m.min_lexical, m.substitution_cosine)
    return run(Encoder(m.encoder, int8=m.encoder_int8), thresholds, retune=args.retune, examples=args.errors,
               reach=(t.reach_cosine, t.reach_lexical))


def _bench_prompts(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct prompts in the shape of real corrections, English and Chinese."""
    from tuneloop.memory.evalset import EN_RELATIONS, ZH_RELATIONS

    syll = ["ka", "lo", "mi", "ter", "van", "zu", "pel", "dor", "sia", "qu", "ren", "bo", "tal", "nix"]
    han = "云山海风星河石林雪月光雷火花竹松鹤龙虎凤"
    templates = [t for rel in EN_RELATIONS.values() for t in [rel[0], *rel[2], *rel[3]]]
    zh_templates = [t for rel in ZH_RELATIONS.values() for t in [rel[0], *rel[2], *rel[3]]]
    seen: set[str] = set()
    out = []
    while len(out) < n:
        if rng.random() < 0.8:
            name = "".join(rng.choice(syll) for _ in range(rng.randint(2, 3))).capitalize()
            text = rng.choice(templates).format(e=name)
        else:
            name = "".join(rng.choice(han) for _ in range(2))
            text = rng.choice(zh_templates).format(e=name)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def cmd_bench(args) -> dict:
    import numpy as np

    from tuneloop.memory import Memory
    from tuneloop.memory.encoder import Encoder
    from tuneloop.memory.evalset import build
    from tuneloop.memory.index import Index
    from tuneloop.store import Store

    config = load(args.config).memory
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "bench.db") as store:
        prompts = _bench_prompts(args.items, rng)
        t0 = time.perf_counter()
        with store.transaction():  # one transaction: filling the store is not what is measured
            for i, p in enumerate(prompts):
                ex = store.add_exchange(platform="web", user=f"u{i % 50}", conversation_id=f"c{i}",
                                        messages=[{"role": "user", "content": p}], prompt=p, reply="?",
                                        model_version="v0")
                store.add_correction(ex.id, "teacher", f"answer {i}")
        fill_s = time.perf_counter() - t0
        rss0 = _rss_mb()
        encoder = Encoder(config.encoder, int8=config.encoder_int8)
        rss_encoder = _rss_mb() - rss0
        # Encoding a backlog of 10,000 prompts takes minutes on 2 cores, and the
        # cost of a match does not depend on the vectors' values: ``--encoded``
        # prompts are encoded for real (that rate is reported), every other
        # item gets a real vector plus noise.
        real = min(args.encoded, len(prompts))
        t0 = time.perf_counter()
        vectors = encoder.encode(prompts[:real])
        encode_s = time.perf_counter() - t0
        noise = np.random.default_rng(0).standard_normal((len(prompts) - real, encoder.dim)).astype(np.float32)
        rest = vectors[rng.choices(range(real), k=len(prompts) - real)] + 0.3 * noise / np.sqrt(encoder.dim)
        rest /= np.linalg.norm(rest, axis=1, keepdims=True)
        key = Encoder.key(encoder.name, encoder.int8)
        ids = [r["id"] for r in store.memory_index_rows(key)]
        store.set_memory_vectors(key, [(i, v.astype("<f4").tobytes())
                                                  for i, v in zip(ids, np.vstack([vectors, rest]))])
        memory = Memory(config, store, encoder=encoder)
        t0 = time.perf_counter()
        memory.refresh()
        refresh_s = time.perf_counter() - t0
        # The index alone, as tracemalloc counts it (numpy's buffers included).
        rows = store.memory_index_rows(memory.encoder_key)
        tracemalloc.start()
        index = Index(encoder.dim)
        for r in rows:
            index.add(r["id"], r["prompt"], np.frombuffer(r["vector"], dtype="<f4"))
        index.matrix  # noqa: B018 - built lazily; count it
        index_mb = tracemalloc.get_traced_memory()[0] / 2**20
        tracemalloc.stop()
        del index

        _, queries = build("heldout")
        texts = [q.text for q in queries]
        rng.shuffle(texts)
        texts = (texts * (args.queries // len(texts) + 1))[: args.queries]
        memory.recall(texts[0])  # first call pays one-time costs
        timing: dict[str, list[float]] = {"recall": [], "encode": [], "search": [], "generation_check": []}
        idx = memory._indexes[LOCAL]
        matched = 0
        for text in texts:
            t0 = time.perf_counter()
            hits = memory.recall(text)
            t1 = time.perf_counter()
            vec = encoder.encode([text])[0]
            t2 = time.perf_counter()
            idx.search(text, vec, memory.thresholds)
            t3 = time.perf_counter()
            store.memory_generation()
            t4 = time.perf_counter()
            for k, v in (("recall", t1 - t0), ("encode", t2 - t1), ("search", t3 - t2),
                         ("generation_check", t4 - t3)):
                timing[k].append(v * 1000)
            matched += bool(hits)
        return {
            "items": args.items, "queries": len(texts), "queries_matched": matched,
            "cpu_cores": os.cpu_count(),
            "ms": {k: {"p50": round(statistics.median(v), 3), "p95": round(_pct(v, 0.95), 3)}
                   for k, v in timing.items()},
            "index_mb": round(index_mb, 1), "matrix_mb": round(args.items * encoder.dim * 4 / 2**20, 1),
            "encoder_rss_mb": round(rss_encoder, 1), "process_rss_mb": round(_rss_mb(), 1),
            "encoded_for_real": real, "backlog_items_per_s": round(real / encode_s, 1),
            "index_load_s": round(refresh_s, 2),
            "store_fill_s": round(fill_s, 1),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneloop.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="config file (default: $TUNELOOP_CONFIG or ./config.toml)")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="matcher figures on the tuning and held-out sets")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--retune", action="store_true", help="pick thresholds on the tuning split first")
    ev.add_argument("--errors", action="store_true", help="list the held-out queries answered wrong")
    bench = sub.add_parser("bench", help="cost of matching per reply with many items")
    bench.add_argument("--items", type=int, default=10_000)
    bench.add_argument("--queries", type=int, default=300)
    bench.add_argument("--encoded", type=int, default=500, help="items encoded for real (the rest: noise)")
    bench.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "bench" and min(args.items, args.queries, args.encoded) < 1:
            raise TuneloopError("--items, --queries and --encoded must be at least 1")
        out = cmd_eval(args) if args.command == "eval" else cmd_bench(args)
    except TuneloopError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(json.dumps(out, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
