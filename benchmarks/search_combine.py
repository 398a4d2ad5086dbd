"""Concurrent single-query searches answered together (``Searcher``'s default) or one by one.

``Searcher.search`` called from many threads merges the queries that wait while a round is
in flight into one ensemble request and one FAISS search (``client/search.py``).  This
measures what that changes, side by side on one private tritonserver (the cached
cpu-target repository of ``make bench``) and one Flat index of the benchmark catalogue:
two ``Searcher``\\ s share one ``Embedder``, one with ``combine=False``, rounds alternated;
per round, queries/s, p50 and p99 for text and photo queries at concurrency 1, 4 and 16.

    .venv/bin/python -m benchmarks.search_combine --out benchmarks/results/search_combine.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence

from benchmarks import publish
from benchmarks.loadgen import ab_table, closed_loop

LEVELS = (1, 4, 16)
VARIANTS = ("one request per query", "answered together")


def run(index_dir: Path, url: str, texts: Sequence[str], photos: Sequence[bytes], rounds: int,
        seconds: float, levels: Sequence[int] = LEVELS, log=print) -> str:
    """The A/B table for an index built through the server at ``url``."""
    from xmsearch.client.embed import Embedder
    from xmsearch.client.search import Searcher

    embedder = Embedder(url)
    searchers = {VARIANTS[0]: Searcher(index_dir, embedder, combine=False),
                 VARIANTS[1]: Searcher(index_dir, embedder, combine=True)}
    points: dict[tuple[str, str], list[float]] = {}
    try:
        for rnd in range(rounds):
            # Alternate which variant goes first, so a drift within a round hits both alike.
            order = VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]
            for name in order:
                s = searchers[name]
                for kind, data, call in (("text", texts, lambda q, s=s: s.search(text=q, k=10)),
                                         ("photo", photos, lambda q, s=s: s.search(image=q, k=10))):
                    for c in levels:
                        r = closed_loop(call, list(data), c, seconds, label=kind, warmup_s=min(1.0, seconds))
                        points.setdefault((name, f"{kind} queries/s at concurrency {c}"), []).append(r.qps)
                        points.setdefault((name, f"{kind} p50 ms at concurrency {c}"), []).append(r.p50_ms)
                        points.setdefault((name, f"{kind} p99 ms at concurrency {c}"), []).append(r.p99_ms)
                log(f"round {rnd + 1}/{rounds}: {name} done")
    finally:
        for s in searchers.values():
            s.close()
        embedder.close()
    # Row order: every queries/s row, then every p50 row, then every p99 row.
    points = dict(sorted(points.items(), key=lambda kv: ("queries/s" not in kv[0][1], "p99" in kv[0][1])))
    return (f"Medians over {rounds} alternated rounds (min-max), {seconds:.0f} s per load point, "
            f"{len(texts)} text and {len(photos)} photo queries, index {index_dir}, server {url}.\n\n"
            + ab_table(points, *VARIANTS))


def main(argv: list[str] | None = None) -> int:
    from benchmarks import stack
    from benchmarks.e2e import load_queries, measure_ingest
    from xmsearch import spec

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--text-model", default=spec.DEFAULT_TEXT_MODEL,
                   help=f"text model of the served repository (default: {spec.DEFAULT_TEXT_MODEL})")
    p.add_argument("--items", type=int, default=300, help="demo catalogue size (default: 300, as make bench)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per load point")
    p.add_argument("--out", type=Path, help="also write the table here, under the command")
    args = p.parse_args(argv)
    catalogue = stack.demo_catalogue(args.items, max(30, args.items * 3 // 10))
    repository = stack.exported_repository(args.text_model)
    texts = load_queries(catalogue.queries_file, "text")
    photos = load_queries(catalogue.queries_file, "image")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with stack.PrivateServer(repository.path, log_file=stack.CACHE_DIR / "tritonserver-combine.log") as server:
        index_dir = stack.CACHE_DIR / "combine-index"
        ingest = measure_ingest(catalogue.catalog_file, index_dir, server.url)
        text = run(index_dir, server.url, texts, photos, args.rounds, args.seconds)
    publish(f"{started}, {args.text_model} (untrained fusion), {ingest.items} items.\n\n{text}", args.out,
            "benchmarks.search_combine", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
