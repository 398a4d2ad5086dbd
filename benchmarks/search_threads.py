"""Single-query searches with FAISS's OpenMP threads limited to the query count, or not.

``CatalogIndex`` runs a search of fewer queries than OpenMP threads on as many threads as
queries (``client.index._omp_threads_at_most``).  This measures what that changes, side by
side on one running server and one index, rounds alternated: the client's CPU time per
single text query (search, and the embedding request alone), and ``Searcher.search``
queries/s and p50 for text and photo queries at concurrency 1 and 16.

The ``benchmarks`` package makes idle OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``,
``benchmarks/__init__.py``) for its other measurements; this one runs with the OpenMP
runtime's default wait policy, the one an ``xmsearch`` process gets, unless
``--wait-policy passive`` is given.

    .venv/bin/python -m benchmarks.search_threads --index demo/index-multilingual-e5-small-q4 \\
        --catalog demo --url localhost:8001 --out benchmarks/results/search_threads.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from benchmarks import publish
from benchmarks.loadgen import ab_table, closed_loop
from xmsearch.catalog import read_catalog


def _cpu_ms_per_call(fn, inputs) -> float:
    t0 = time.process_time()
    for x in inputs:
        fn(x)
    return 1000 * (time.process_time() - t0) / len(inputs)


def run(index_dir: Path, catalog: Path, url: str, rounds: int, seconds: float, log=print) -> str:
    import xmsearch.client.index as client_index
    from xmsearch.client.embed import Embedder
    from xmsearch.client.search import Searcher

    limited = client_index._omp_threads_at_most
    # nullcontext(n): FAISS keeps the calling thread's OpenMP setting (all cores by default).
    variants = {"caller's threads": contextlib.nullcontext, "at most one per query": limited}
    rows, _ = read_catalog(catalog / "catalog.jsonl")
    texts = [r.title for r in rows[:300]]
    photos = [r.image.read_bytes() for r in rows[:100]]
    embedder = Embedder(url)
    searcher = Searcher(index_dir, embedder)
    points: dict[tuple[str, str], list[float]] = {}

    def search_text(text: str) -> object:
        return searcher.search(text=text, k=10)

    def search_photo(photo: bytes) -> object:
        return searcher.search(image=photo, k=10)

    try:
        for t in texts[:50]:  # warm-up
            search_text(t)
        for rnd in range(rounds):
            for name, limit in variants.items():
                client_index._omp_threads_at_most = limit
                points.setdefault((name, "client CPU ms per text search"), []).append(
                    _cpu_ms_per_call(search_text, texts))
                points.setdefault((name, "client CPU ms per text embedding alone"), []).append(
                    _cpu_ms_per_call(lambda t: embedder.embed_queries([t], None), texts))
                for kind, data, call in (("text", texts, search_text), ("photo", photos, search_photo)):
                    for c in (1, 16):
                        r = closed_loop(call, data, c, seconds, label=kind, warmup_s=min(1.0, seconds))
                        points.setdefault((name, f"{kind} queries/s at concurrency {c}"), []).append(r.qps)
                        points.setdefault((name, f"{kind} p50 ms at concurrency {c}"), []).append(r.p50_ms)
                log(f"round {rnd + 1}/{rounds}: {name} done")
    finally:
        client_index._omp_threads_at_most = limited
        searcher.close()
        embedder.close()
    policy = os.environ.get("OMP_WAIT_POLICY", "the OpenMP runtime's default")
    return (f"Medians over {rounds} alternated rounds (min-max), {seconds:.0f} s per load point, "
            f"index {index_dir}, server {url}, OMP_WAIT_POLICY {policy}.\n\n" + ab_table(points, *variants))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=Path, required=True, help="an index built by `xmsearch index`")
    p.add_argument("--catalog", type=Path, required=True, help="folder with catalog.jsonl (texts and photos)")
    p.add_argument("--url", default="localhost:8001", help="gRPC address of the server the index was built with")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per load point")
    p.add_argument("--wait-policy", choices=("default", "passive"), default="default",
                   help="OpenMP wait policy of this process (default: the runtime's, as in an xmsearch process)")
    p.add_argument("--out", type=Path, help="also write the table here, under the command")
    args = p.parse_args(argv)
    if "faiss" in sys.modules:
        raise SystemExit("benchmarks.search_threads: faiss was imported before the wait policy could be set")
    if args.wait_policy == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    publish(run(args.index, args.catalog, args.url, args.rounds, args.seconds), args.out,
            "benchmarks.search_threads", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
